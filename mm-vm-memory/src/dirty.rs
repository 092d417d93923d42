//! [`DirtyBitmap`]: a `vm-memory` `Bitmap` that also sees direct writes.
//!
//! vm-memory's own `AtomicBitmap` learns about the writes vm-memory makes
//! (`VolatileSlice` calls `mark_dirty`); the writes a vCPU makes through
//! KVM, or a thread through the host pointer, never reach it (Firecracker
//! adds KVM's dirty log for those). [`DirtyBitmap`] keeps such an
//! `AtomicBitmap` for the marks **and** asks the kernel:
//!
//! 1. At creation the region's host range is registered with a userfaultfd
//!    of its own in **asynchronous write-protect** mode
//!    (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7; plus `WP_UNPOPULATED` when
//!    offered) and write-protected as a whole.
//! 2. A write to a protected page (from any thread, or from the kernel on
//!    the process's behalf: KVM, `O_DIRECT`) takes a minor fault that the
//!    kernel resolves by itself: it clears the page's protection and the
//!    write goes on. No message, no handler thread, no round trip.
//! 3. `PAGEMAP_SCAN` reports the pages whose protection is gone
//!    (`PAGE_IS_WRITTEN`); with `PM_SCAN_WP_MATCHING` it protects them
//!    again in the same page-table walk, so a harvest is atomic per page
//!    against writers: a write lands either before the walk reached its
//!    page (reported now) or after (reported next time).
//!
//! [`DirtyBitmap::dirty_at`](Bitmap::dirty_at) answers like
//! `AtomicBitmap::dirty_at`, counting both sources;
//! [`DirtyBitmap::get_and_reset`] returns and clears both, like
//! `AtomicBitmap::get_and_reset` (one bit per 4 KiB page, 64 pages per
//! word).
//!
//! Why this and not mm-core's write-protect machinery (`tracked/wp.rs`):
//! that one is synchronous (a write to a protected page blocks until the
//! protection is lifted, which is what KSM's merge window needs); using it
//! for dirty logging would cost a round trip through the handler thread
//! for the first write of every page in every round. `WP_ASYNC` costs a
//! kernel-only minor fault (DESIGN-NOTES.md has the measurement).
//!
//! A **tracked** region of a guest with a dirty log
//! (`MmConfig::dirty_log`) is already registered with a `WP_ASYNC`
//! userfaultfd, mm-core's: there the bitmap reads the guest's own log
//! (`MmUser::take_dirty` / `peek_dirty`), the same record that
//! `MmUser::snapshot` / `reset` consume. One consumer per guest: a harvest
//! by one hides the pages from the other.
//!
//! Limits:
//! - a range can be registered with one userfaultfd only: a **tracked**
//!   region of a guest without a dirty log (mm-core's userfaultfd) or an
//!   untracked one already
//!   write-protected for KSM merging gets [`Error::DirtyTrackingBusy`], and
//!   marking a dirty-tracked region mergeable later fails in mm-core. Use
//!   [`DirtyBitmap::marks_only`] there (the `AtomicBitmap` behaviour) and
//!   KVM's dirty log for vCPU writes;
//! - huge pages are reported (and protected) at their size;
//! - without `WP_UNPOPULATED`, a page first *read* after protection maps
//!   the zero page unprotected and is reported written (never the reverse:
//!   no write is ever missed).

use std::num::NonZeroUsize;

use mm_core::{MmUser, VmFlags, Vma, PAGE_SIZE};
use vm_memory::bitmap::{AtomicBitmap, Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::GuestAddress;

use crate::region::find_range;
use crate::sys::{self, PageRegion, Pagemap, WpAsyncUffd};
use crate::{Error, MmRegion, Result};

/// Page regions read per `PAGEMAP_SCAN` call.
const SCAN_BATCH: usize = 256;

/// The kernel side of an untracked region: its own write-protect
/// userfaultfd and the pagemap.
#[derive(Debug)]
struct OwnLog {
    /// Dropped first: closing it unregisters the range while it is
    /// certainly still mapped.
    uffd: WpAsyncUffd,
    pagemap: Pagemap,
    host: usize,
    len: usize,
    /// Keeps the host mapping (so a scan never reads another mapping that
    /// took its place) and, dropped after it, the address space (as a
    /// region's fields).
    _vma: Vma,
    _user: MmUser,
}

impl OwnLog {
    /// Calls `f(offset, len)` for each run of written pages, protecting
    /// them again when `reprotect`.
    fn scan(
        &self,
        start: usize,
        end: usize,
        reprotect: bool,
        mut f: impl FnMut(usize, usize),
    ) -> Result<()> {
        let mut buf = [PageRegion {
            start: 0,
            end: 0,
            categories: 0,
        }; SCAN_BATCH];
        let mut at = start;
        // Each call either ends the walk or fills `buf`, and a filled
        // `buf` moves `walk_end` forward by at least one page: bounded by
        // the number of pages.
        while at < end {
            let (n, walk_end) = self
                .pagemap
                .scan_written(at, end, reprotect, &mut buf)
                .map_err(Error::host("PAGEMAP_SCAN"))?;
            for r in &buf[..n] {
                f(r.start as usize - self.host, (r.end - r.start) as usize);
            }
            if n < buf.len() || walk_end <= at {
                break;
            }
            at = walk_end;
        }
        Ok(())
    }

    fn page_written(&self, offset: usize) -> bool {
        let page = self.host + offset / PAGE_SIZE * PAGE_SIZE;
        let mut written = false;
        // A failing scan answers "dirty": never a missed write.
        self.scan(page, page + PAGE_SIZE, false, |_, _| written = true)
            .map(|()| written)
            .unwrap_or(true)
    }
}

/// The kernel side of a tracked region of a guest with a dirty log
/// (`MmConfig::dirty_log`): mm-core's log, on the tracker's own `WP_ASYNC`
/// userfaultfd (a range is registered with one userfaultfd only).
#[derive(Debug)]
struct MmLog {
    user: MmUser,
    addr: u64,
    len: usize,
    _vma: Vma,
}

/// Where the record of direct writes comes from.
#[derive(Debug)]
enum KernelSide {
    /// An untracked region: a userfaultfd of the bitmap's own.
    Own(OwnLog),
    /// A tracked region of a dirty-logged guest: the guest's log.
    Mm(MmLog),
}

impl KernelSide {
    fn len(&self) -> usize {
        match self {
            KernelSide::Own(k) => k.len,
            KernelSide::Mm(m) => m.len,
        }
    }

    /// Calls `f(offset, len)` for each run written since the last harvest
    /// and protects them again.
    fn harvest(&self, mut f: impl FnMut(usize, usize)) -> Result<()> {
        match self {
            KernelSide::Own(k) => k.scan(k.host, k.host + k.len, true, f),
            KernelSide::Mm(m) => {
                for r in m.user.take_dirty_blocking(m.addr, m.len as u64)? {
                    f((r.start - m.addr) as usize, (r.end - r.start) as usize);
                }
                Ok(())
            }
        }
    }

    fn page_written(&self, offset: usize) -> bool {
        match self {
            KernelSide::Own(k) => k.page_written(offset),
            KernelSide::Mm(m) => {
                let page = m.addr + (offset / PAGE_SIZE * PAGE_SIZE) as u64;
                // A failing scan answers "dirty": never a missed write.
                m.user
                    .peek_dirty_blocking(page, PAGE_SIZE as u64)
                    .map_or(true, |d| !d.is_empty())
            }
        }
    }

    /// Protects the whole range (every page clean).
    fn protect_all(&self) -> Result<()> {
        match self {
            KernelSide::Own(k) => k
                .uffd
                .protect(k.host, k.len)
                .map_err(Error::host("UFFDIO_WRITEPROTECT")),
            KernelSide::Mm(m) => m
                .user
                .take_dirty_blocking(m.addr, m.len as u64)
                .map(drop)
                .map_err(Error::from),
        }
    }
}

/// A dirty bitmap for one region: vm-memory's marks plus the kernel's
/// record of direct writes (module docs).
#[derive(Debug)]
pub struct DirtyBitmap {
    marks: AtomicBitmap,
    kernel: Option<KernelSide>,
}

fn page_size() -> NonZeroUsize {
    NonZeroUsize::new(PAGE_SIZE).expect("PAGE_SIZE is not 0")
}

impl DirtyBitmap {
    /// Tracks `[addr, addr+len)` of `user`'s address space (page-aligned,
    /// inside one read-write VMA): registers its host range with a
    /// `WP_ASYNC` userfaultfd and write-protects it, so every page starts
    /// clean. Offsets are relative to `addr`. The bitmap holds a user
    /// reference and the VMA, as a region does, so it can be used on its
    /// own (e.g. in a [`guest_region_mmap`](crate::guest_region_mmap)).
    ///
    /// On a tracked region of a guest with `MmConfig::dirty_log` the
    /// guest's own log is used (module docs). [`Error::DirtyTrackingBusy`]
    /// on another tracked or a KSM-write-protected range,
    /// [`Error::Unsupported`] before Linux 6.7.
    pub fn new(user: &MmUser, addr: u64, len: u64) -> Result<DirtyBitmap> {
        let (vma, host) = find_range(user, addr, len, GuestAddress(0))?;
        let (host, len_b) = (host as usize, len as usize);
        if user.config().dirty_log && vma.flags().contains(VmFlags::TRACKED) {
            // The guest's own log; the first harvest reports the pages
            // populated (and the holes) so far: start clean.
            let kernel = KernelSide::Mm(MmLog {
                user: user.clone(),
                addr,
                len: len_b,
                _vma: vma,
            });
            kernel.protect_all()?;
            return Ok(DirtyBitmap {
                marks: AtomicBitmap::new(len_b, page_size()),
                kernel: Some(kernel),
            });
        }
        let uffd = WpAsyncUffd::open()
            .map_err(|e| match e.raw_os_error() {
                // No userfaultfd for this process at all.
                Some(libc::EPERM | libc::ENOSYS) => Error::Unsupported {
                    what: "userfaultfd (not permitted or not built in)",
                },
                _ => Error::Host {
                    op: "userfaultfd",
                    source: e,
                },
            })?
            .ok_or(Error::Unsupported {
                what: "asynchronous userfaultfd write-protect (UFFD_FEATURE_WP_ASYNC, Linux 6.7)",
            })?;
        uffd.register_wp(host, len_b).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                Error::DirtyTrackingBusy { addr, len }
            } else {
                Error::Host {
                    op: "UFFDIO_REGISTER(WP)",
                    source: e,
                }
            }
        })?;
        uffd.protect(host, len_b)
            .map_err(Error::host("UFFDIO_WRITEPROTECT"))?;
        let pagemap = Pagemap::open().map_err(Error::host("open /proc/self/pagemap"))?;
        let kernel = OwnLog {
            uffd,
            pagemap,
            host,
            len: len_b,
            _vma: vma,
            _user: user.clone(),
        };
        // Probe once: PAGEMAP_SCAN (Linux 6.7) and the WP_ASYNC check.
        kernel.scan(host, host + PAGE_SIZE, false, |_, _| {})?;
        Ok(DirtyBitmap {
            marks: AtomicBitmap::new(len_b, page_size()),
            kernel: Some(KernelSide::Own(kernel)),
        })
    }

    /// Only vm-memory's own marks (exactly `AtomicBitmap`): for tracked
    /// regions, where the kernel side cannot be registered. Direct writes
    /// are not seen; take vCPU writes from KVM's dirty log.
    pub fn marks_only(len: usize) -> DirtyBitmap {
        DirtyBitmap {
            marks: AtomicBitmap::new(len, page_size()),
            kernel: None,
        }
    }

    /// Does this bitmap see direct writes (the kernel side)?
    pub fn sees_direct_writes(&self) -> bool {
        self.kernel.is_some()
    }

    /// Did the kernel grant `WP_UNPOPULATED` (no false positives from
    /// pages first read after a harvest)?
    pub fn exact_for_unpopulated(&self) -> bool {
        matches!(&self.kernel, Some(KernelSide::Own(k)) if k.uffd.has(sys::FEATURE_WP_UNPOPULATED))
    }

    /// Number of pages (bits).
    pub fn len(&self) -> usize {
        self.marks.len()
    }

    /// Is the bitmap empty (a zero-length region)?
    pub fn is_empty(&self) -> bool {
        self.marks.len() == 0
    }

    /// Bytes covered.
    pub fn byte_size(&self) -> usize {
        self.marks.byte_size()
    }

    /// Is page `index` dirty (by either source)?
    pub fn is_page_dirty(&self, index: usize) -> bool {
        index < self.len() && self.dirty_at(index * PAGE_SIZE)
    }

    /// Moves the kernel's record into the marks and protects the written
    /// pages again.
    fn harvest(&self) -> Result<()> {
        if let Some(k) = &self.kernel {
            k.harvest(|off, len| self.marks.set_addr_range(off, len))?;
        }
        Ok(())
    }

    /// The dirty pages since the last reset, one bit per page (bit `i % 64`
    /// of word `i / 64`), and clears them, as
    /// `AtomicBitmap::get_and_reset`. A write racing this call is reported
    /// now or by the next call, never lost.
    pub fn get_and_reset(&self) -> Result<Vec<u64>> {
        self.harvest()?;
        Ok(self.marks.get_and_reset())
    }

    /// Clears every page (protects the whole range again).
    pub fn reset(&self) -> Result<()> {
        if let Some(k) = &self.kernel {
            k.protect_all()?;
        }
        self.marks.reset();
        Ok(())
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.marks.set_addr_range(offset, len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        if self.marks.is_addr_set(offset) {
            return true;
        }
        match &self.kernel {
            Some(k) if offset < k.len() => k.page_written(offset),
            _ => false,
        }
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl MmRegion<DirtyBitmap> {
    /// A region whose bitmap is a [`DirtyBitmap`] over it (kernel side
    /// included): `[addr, addr+len)` of `user`'s address space at
    /// `guest_base`.
    pub fn dirty_tracked(
        user: &MmUser,
        addr: u64,
        len: u64,
        guest_base: GuestAddress,
    ) -> Result<Self> {
        let bitmap = DirtyBitmap::new(user, addr, len)?;
        MmRegion::with_bitmap(user, addr, len, guest_base, bitmap)
    }
}
