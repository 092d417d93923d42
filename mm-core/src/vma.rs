//! VMAs and the VMA tree, with the kernel's split and merge rules.
//!
//! A guest mapping made by one `mmap` call is backed by one host mapping, a
//! [`HostRegion`]. VMAs are slices of regions; splitting a VMA (mprotect,
//! mlock, madvise of part of it) keeps both halves on the same region, and
//! two neighbours merge again when they sit on the same region at contiguous
//! offsets with equal protection and flags. Two separate `mmap` calls never
//! merge: their host memory is not contiguous (unlike the kernel, whose
//! anonymous VMAs can merge across calls).
//!
//! ```text
//!   guest   0x10000 ─────────── 0x30000 ──────────── 0x50000
//!           │ Vma A (RW)        │ Vma B (R, LOCKED)  │
//!   host    base ─────────────────────────────────── base+0x40000
//!           └──────────── one HostRegion (one mmap) ─┘
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::BitOr;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::sys::{self, HostRange, PAGE_SIZE};
use crate::tracked::Tracker;

/// `contains` and `|` of a bit-set newtype (`Prot`, `VmFlags`).
macro_rules! bit_set_ops {
    ($t:ident) => {
        impl $t {
            /// Does `self` include every bit of `other`?
            pub fn contains(self, other: $t) -> bool {
                self.0 & other.0 == other.0
            }
        }

        impl BitOr for $t {
            type Output = $t;
            fn bitor(self, rhs: $t) -> $t {
                $t(self.0 | rhs.0)
            }
        }
    };
}

/// Protection of a VMA (`PROT_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prot(u8);

impl Prot {
    /// `PROT_NONE`.
    pub const NONE: Prot = Prot(0);
    /// `PROT_READ`.
    pub const READ: Prot = Prot(1);
    /// `PROT_WRITE`.
    pub const WRITE: Prot = Prot(2);
    /// `PROT_EXEC`.
    pub const EXEC: Prot = Prot(4);
    /// `PROT_READ | PROT_WRITE`.
    pub const READ_WRITE: Prot = Prot(3);

    pub(crate) fn bits(self) -> (bool, bool, bool) {
        (
            self.contains(Prot::READ),
            self.contains(Prot::WRITE),
            self.contains(Prot::EXEC),
        )
    }
}

bit_set_ops!(Prot);

impl fmt::Debug for Prot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |p, ch| if self.contains(p) { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(Prot::READ, 'r'),
            c(Prot::WRITE, 'w'),
            c(Prot::EXEC, 'x')
        )
    }
}

/// VMA flags (`VM_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VmFlags(u32);

impl VmFlags {
    /// No flags.
    pub const EMPTY: VmFlags = VmFlags(0);
    /// `VM_LOCKED`: mlocked. Changes only under the exclusive mmap lock
    /// (CVE-2018-1000200: a reader must never see it flip mid-walk).
    pub const LOCKED: VmFlags = VmFlags(1 << 0);
    /// `VM_MERGEABLE`: KSM may merge its pages.
    pub const MERGEABLE: VmFlags = VmFlags(1 << 1);
    /// `VM_SHARED`: memfd-backed shared mapping; never reaped.
    pub const SHARED: VmFlags = VmFlags(1 << 2);
    /// `VM_HUGEPAGE`: `MADV_HUGEPAGE` was given; populated in 2 MiB units.
    pub const HUGEPAGE: VmFlags = VmFlags(1 << 3);
    /// `VM_PFNMAP`-like: pinned by the embedder (device memory, a pinned DMA
    /// buffer); never reaped.
    pub const PINNED: VmFlags = VmFlags(1 << 4);
    /// A tracked region: registered with the mm's userfaultfd, so direct
    /// touches of the host range are charged (`MapOptions::tracked`).
    pub const TRACKED: VmFlags = VmFlags(1 << 5);

    /// `self` with `other` added (`on`) or removed.
    pub fn with(self, other: VmFlags, on: bool) -> VmFlags {
        if on {
            VmFlags(self.0 | other.0)
        } else {
            VmFlags(self.0 & !other.0)
        }
    }
}

bit_set_ops!(VmFlags);

impl fmt::Debug for VmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (VmFlags::LOCKED, "LOCKED"),
            (VmFlags::MERGEABLE, "MERGEABLE"),
            (VmFlags::SHARED, "SHARED"),
            (VmFlags::HUGEPAGE, "HUGEPAGE"),
            (VmFlags::PINNED, "PINNED"),
            (VmFlags::TRACKED, "TRACKED"),
        ];
        f.debug_set()
            .entries(
                names
                    .iter()
                    .filter(|(fl, _)| self.contains(*fl))
                    .map(|(_, n)| n),
            )
            .finish()
    }
}

/// One host mapping (one `mmap` call) backing guest memory.
///
/// Owns the mapping exclusively: it is unmapped when the last VMA that
/// slices it is removed, which only happens under the exclusive mmap lock.
pub(crate) struct HostRegion {
    /// Freed marker: set when `exit_mmap` removes the VMAs over this
    /// region. Using the region afterwards is a protocol violation (I-EX-1).
    removed: std::sync::atomic::AtomicBool,
    base: NonNull<u8>,
    len: usize,
    memfd: Option<OwnedFd>,
    /// Set (before publication) when the mapping is registered with the
    /// mm's userfaultfd.
    tracked: Option<Arc<Tracker>>,
    /// Set once when an untracked mapping is registered with the mm's
    /// userfaultfd for **write-protect only** (no MISSING: first touches
    /// stay the kernel's), so that KSM can merge its pages
    /// (`ksm/`). Never set together with `tracked`.
    ksm_wp: std::sync::OnceLock<Arc<Tracker>>,
}

// SAFETY: HostRegion owns its mapping; the pointer is only handed out as a
// raw address and all kernel-facing operations on it are thread-safe
// syscalls. No Rust reference into the mapping is ever created.
unsafe impl Send for HostRegion {}
// SAFETY: as for Send; shared access only issues syscalls or raw copies
// serialised by the page locks.
unsafe impl Sync for HostRegion {}

/// The error a host call `op` returns when the race harness injects its
/// failure (`sched::fail`): the ENOMEM a real one could return.
pub(crate) fn injected(op: &'static str) -> Error {
    Error::Host {
        op,
        source: std::io::Error::from_raw_os_error(libc::ENOMEM),
    }
}

impl HostRegion {
    pub(crate) fn new_anon(len: usize, align: usize, prot: Prot) -> Result<Self> {
        if crate::sched::fail("fail:mmap") {
            return Err(injected("mmap"));
        }
        let base = sys::map_anon(len, align, prot.bits()).map_err(Error::host("mmap"))?;
        Ok(HostRegion {
            removed: std::sync::atomic::AtomicBool::new(false),
            base,
            len,
            memfd: None,
            tracked: None,
            ksm_wp: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn new_shared(name: &str, len: usize, align: usize, prot: Prot) -> Result<Self> {
        if crate::sched::fail("fail:memfd_create") {
            return Err(injected("mmap memfd"));
        }
        let (base, fd) =
            sys::map_memfd(name, len, align, prot.bits()).map_err(Error::host("mmap memfd"))?;
        Ok(HostRegion {
            removed: std::sync::atomic::AtomicBool::new(false),
            base,
            len,
            memfd: Some(fd),
            tracked: None,
            ksm_wp: std::sync::OnceLock::new(),
        })
    }

    /// Marks the region removed (`remove_vma` in exit_mmap).
    pub(crate) fn mark_removed(&self) {
        self.removed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The host range `[off, off+len)` of this region.
    pub(crate) fn range(&self, off: usize, len: usize) -> HostRange {
        crate::sched::check(
            !self.removed.load(std::sync::atomic::Ordering::SeqCst),
            "I-EX-1: a VMA was used after exit_mmap removed it",
        );
        assert!(off % PAGE_SIZE == 0 && len % PAGE_SIZE == 0 && off + len <= self.len);
        // SAFETY: in bounds (asserted above) of a mapping we own that lives
        // as long as `self`; page aligned because base and off are.
        unsafe { HostRange::new(NonNull::new_unchecked(self.base.as_ptr().add(off)), len) }
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Marks the (registered, unpublished) mapping as tracked by `t`.
    pub(crate) fn set_tracked(&mut self, t: Arc<Tracker>) {
        self.tracked = Some(t);
    }

    /// The tracker, for a tracked mapping.
    pub(crate) fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracked.as_ref()
    }

    /// Host length of the mapping.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Is this a private anonymous mapping (not a memfd)?
    pub(crate) fn is_anon(&self) -> bool {
        self.memfd.is_none()
    }

    /// The tracker of an untracked mapping registered for write-protect
    /// only (KSM), if it was.
    pub(crate) fn ksm_wp(&self) -> Option<&Arc<Tracker>> {
        self.ksm_wp.get()
    }

    /// Records the write-protect-only registration (once; `false` if it was
    /// already recorded).
    pub(crate) fn set_ksm_wp(&self, t: Arc<Tracker>) -> bool {
        debug_assert!(self.tracked.is_none());
        self.ksm_wp.set(t).is_ok()
    }

    /// The tracker whose write-protect a merge can use: the full one of a
    /// tracked mapping, or the write-protect-only one.
    pub(crate) fn wp_tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracked.as_ref().or(self.ksm_wp.get())
    }

    /// Frees the host pages of `[off, off+len)`: DONTNEED for anonymous
    /// memory, PUNCH_HOLE for the memfd (the range is dead once the VMA
    /// over it goes; a device backend that maps the memfd too, through
    /// [`Vma::memfd`], reads zeros there from now on).
    pub(crate) fn free_pages(&self, off: usize, len: usize) -> Result<()> {
        let r = self.range(off, len);
        if crate::sched::fail("fail:madvise(DONTNEED)") {
            return Err(injected("madvise(DONTNEED)"));
        }
        if let (Some(_), Some(fd)) = (self.tracker(), &self.memfd) {
            // A tracked shared region (`tracked/` step 10): the punch frees
            // the memfd's pages and unmaps them from every mapping in one
            // call, and sends no REMOVE message (only madvise does), so
            // there is nothing to announce and no handler round trip.
            // Callers are munmap and exit (a shared region is never reaped,
            // and DONTNEED on it does not zap), under the zap's PTE locks.
            return sys::punch_hole(fd, off, len).map_err(Error::host("fallocate(PUNCH_HOLE)"));
        }
        if let Some(t) = self.wp_tracker() {
            // Our own discard: announce it, so the handler does not take the
            // REMOVE message it produces for an embedder's madvise (which
            // would uncharge pages a fault re-populated after our zap).
            let (s, e) = (r.ptr() as usize, r.ptr() as usize + r.len());
            return t.self_zap(s, e, || {
                // Under the zap's PTE locks: a lazy restore's pages of the
                // range read zeros from now on, as discarded pages do.
                t.discarded(s, e);
                sys::discard(r).map_err(Error::host("madvise(DONTNEED)"))
            });
        }
        match &self.memfd {
            None => sys::discard(r).map_err(Error::host("madvise(DONTNEED)")),
            Some(fd) => {
                sys::discard(r).map_err(Error::host("madvise(DONTNEED)"))?;
                sys::punch_hole(fd, off, len).map_err(Error::host("fallocate(PUNCH_HOLE)"))
            }
        }
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        if let Some(t) = self.tracked.take().or_else(|| self.ksm_wp.take()) {
            // Unregister first: munmap of a registered range would queue an
            // UNMAP message and wait for the handler to read it.
            t.forget(
                self.base.as_ptr() as usize,
                self.base.as_ptr() as usize + self.len,
            );
        }
        // SAFETY: we own the mapping; the last VMA slicing it is gone, and
        // VMAs are only removed under the exclusive mmap lock, so no page lock
        // holder or accessor can still be copying from it.
        let res = unsafe { sys::unmap(self.base, self.len) };
        // Memory that silently stays mapped is a leak the tests look for;
        // munmap of our own mapping can only fail on a logic error.
        debug_assert!(
            res.is_ok() || std::thread::panicking(),
            "munmap failed: {res:?}"
        );
        if let Err(e) = res {
            tracing::error!(target: "mm_core", error = %e, "munmap of a guest region failed");
        }
    }
}

/// A virtual memory area of a guest.
#[derive(Clone)]
pub struct Vma {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) prot: Prot,
    pub(crate) flags: VmFlags,
    pub(crate) region: Arc<HostRegion>,
    /// Offset of `start` inside `region`.
    pub(crate) region_off: usize,
}

impl fmt::Debug for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Vma({:#x}..{:#x} {:?} {:?} host={:p})",
            self.start,
            self.end,
            self.prot,
            self.flags,
            self.host_ptr()
        )
    }
}

impl Vma {
    /// First guest address.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// First guest address past the end.
    pub fn end(&self) -> u64 {
        self.end
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Always false: VMAs are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Protection.
    pub fn prot(&self) -> Prot {
        self.prot
    }
    /// Flags.
    pub fn flags(&self) -> VmFlags {
        self.flags
    }
    /// Is this a shared (memfd) mapping?
    pub fn is_shared(&self) -> bool {
        self.flags.contains(VmFlags::SHARED)
    }

    /// The memfd behind a shared mapping ([`MapOptions::shared`](crate::MapOptions::shared)),
    /// and the file offset of [`start`](Self::start): what a vhost-user
    /// `SET_MEM_TABLE` region hands a device backend (the descriptor and
    /// `mmap_offset`; `memory_size` is [`len`](Self::len),
    /// `userspace_addr` the [`host_ptr`](Self::host_ptr)). `None` for
    /// private anonymous memory. The descriptor lives as long as the host
    /// mapping: `try_clone_to_owned` keeps a copy past this `Vma`.
    ///
    /// What another mapping of it does to the accounting: a page it writes
    /// where the memfd had none is in the memfd, uncharged, until the guest
    /// first touches it; in a tracked region that touch's fault finds it in
    /// the page cache, maps it (`UFFDIO_CONTINUE`) and charges it then,
    /// once, like any first touch. munmap and exit punch the whole range
    /// out of the memfd, the other mapping's pages included: it reads
    /// zeros afterwards (a VMM removes the region from its backends first,
    /// as vhost-user's `REM_MEM_REG` asks).
    pub fn memfd(&self) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        use std::os::fd::AsFd as _;
        self.region
            .memfd
            .as_ref()
            .map(|fd| (fd.as_fd(), self.region_off as u64))
    }
    /// Host address of `start`. Valid while a user reference is held: host
    /// mappings are unmapped only by munmap or teardown, never by the reaper.
    pub fn host_ptr(&self) -> *mut u8 {
        // Within the region by construction (region_off + len <= region.len).
        self.region.base().wrapping_add(self.region_off)
    }

    /// Is this mapping registered with a `UFFD_USER_MODE_ONLY` userfaultfd
    /// (tracked, or write-protected for KSM, on a host that grants no full
    /// descriptor)? Then a fault the kernel takes on the process's behalf
    /// (a KVM vCPU, `O_DIRECT`) fails with `EFAULT` instead of being
    /// served: not usable as a KVM memslot.
    pub fn user_mode_only(&self) -> bool {
        self.region.wp_tracker().is_some_and(|t| t.user_mode_only())
    }

    pub(crate) fn host_range(&self, start: u64, end: u64) -> HostRange {
        debug_assert!(self.start <= start && end <= self.end);
        self.region.range(
            self.region_off + (start - self.start) as usize,
            (end - start) as usize,
        )
    }

    /// Can `self` (below) and `next` (above) be one VMA?
    fn mergeable_with(&self, next: &Vma) -> bool {
        self.end == next.start
            && Arc::ptr_eq(&self.region, &next.region)
            && self.region_off + self.len() as usize == next.region_off
            && self.prot == next.prot
            && self.flags == next.flags
    }
}

/// The VMA tree of one mm (the maple tree analogue), keyed by start address.
#[derive(Default)]
pub struct VmaTree {
    map: BTreeMap<u64, Vma>,
    /// `find_gap`'s hint (the old kernel's `free_area_cache`): every
    /// address in `[hint_floor, hint_to)` is mapped, so a search from
    /// `hint_floor` may start at `hint_to`. Raised by `find_gap` (under the
    /// write lock: `mmap`), lowered by `remove_range`, reset by `take_all`;
    /// an insert only adds mappings and keeps it true. Atomics only because
    /// `find_gap` takes `&self`.
    hint_floor: AtomicU64,
    hint_to: AtomicU64,
}

impl fmt::Debug for VmaTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.map.values()).finish()
    }
}

impl VmaTree {
    /// Number of VMAs (`map_count`).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No VMAs?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// All VMAs in ascending order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Vma> {
        self.map.values()
    }

    /// The VMA containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.map
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
    }

    /// VMAs overlapping `[start, end)`, ascending.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        let first = self.find(start).map_or(start, |v| v.start);
        self.map.range(first..end).map(|(_, v)| v)
    }

    /// Fails with `Unmapped` at the first hole in `[start, end)`.
    pub fn check_mapped(&self, start: u64, end: u64) -> Result<()> {
        let mut at = start;
        for v in self.overlapping(start, end) {
            if v.start > at {
                return Err(Error::Unmapped { addr: at });
            }
            at = v.end;
        }
        if at < end {
            return Err(Error::Unmapped { addr: at });
        }
        Ok(())
    }

    /// Lowest free gap of `len` bytes at an address aligned to `align`, in
    /// `[floor, limit)`.
    ///
    /// Starts where the hint says everything below is mapped, so a run of
    /// mmaps each costs O(log n) instead of a walk over every VMA from the
    /// floor (issue 11: 100,000 small mmaps took 8 s).
    pub(crate) fn find_gap(&self, len: u64, align: u64, floor: u64, limit: u64) -> Option<u64> {
        let up = |a: u64| a.checked_add(align - 1).map(|x| x & !(align - 1));
        let hinted = self.hint_floor.load(Ordering::Relaxed) == floor;
        let from = if hinted {
            floor.max(self.hint_to.load(Ordering::Relaxed))
        } else {
            floor
        };
        // `free`: the lowest address >= `from` not covered by the VMAs seen
        // so far, while they are contiguous; `hole`: the first gap found.
        let (mut free, mut hole) = (from, None);
        let mut cand = up(from)?;
        let first = self.find(from).map_or(from, |v| v.start);
        let mut found = None;
        for v in self.map.range(first..).map(|(_, v)| v) {
            if hole.is_none() {
                if v.start > free {
                    hole = Some(free);
                } else {
                    free = free.max(v.end);
                }
            }
            if v.end <= cand {
                continue;
            }
            if cand.checked_add(len)? <= v.start {
                found = Some(cand);
                break;
            }
            cand = up(v.end)?;
        }
        // [floor, from) was mapped; so is [from, hole or free) now.
        self.hint_floor.store(floor, Ordering::Relaxed);
        self.hint_to.store(hole.unwrap_or(free), Ordering::Relaxed);
        found.or_else(|| (cand.checked_add(len)? <= limit).then_some(cand))
    }

    pub(crate) fn insert(&mut self, vma: Vma) {
        debug_assert!(self.overlapping(vma.start, vma.end).next().is_none());
        let start = vma.start;
        self.map.insert(start, vma);
        self.merge_at(start);
        if let Some(v) = self.find(start) {
            let end = v.end;
            self.merge_at(end);
        }
    }

    /// Splits the VMA containing `addr` so that a VMA starts at `addr`
    /// (`split_vma`). No-op if `addr` is already a boundary or unmapped.
    pub(crate) fn split_at(&mut self, addr: u64) {
        let Some(v) = self.find(addr) else { return };
        if v.start == addr {
            return;
        }
        let mut hi = v.clone();
        let lo_start = v.start;
        hi.region_off += (addr - hi.start) as usize;
        hi.start = addr;
        self.map.get_mut(&lo_start).expect("found above").end = addr;
        self.map.insert(addr, hi);
    }

    /// Merges the VMA ending at `addr` with the one starting there, if
    /// compatible (`vma_merge`).
    pub(crate) fn merge_at(&mut self, addr: u64) {
        let Some(next) = self.map.get(&addr) else {
            return;
        };
        let Some((&lo_start, lo)) = self.map.range(..addr).next_back() else {
            return;
        };
        if !lo.mergeable_with(next) {
            return;
        }
        let next_end = next.end;
        self.map.remove(&addr);
        self.map.get_mut(&lo_start).expect("found above").end = next_end;
    }

    /// Splits at both ends of `[start, end)` and applies `f` to every VMA
    /// inside, then merges what became compatible. The range must be mapped.
    pub(crate) fn modify(&mut self, start: u64, end: u64, mut f: impl FnMut(&mut Vma)) {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        for k in &keys {
            f(self.map.get_mut(k).expect("key collected above"));
        }
        for k in keys.iter().skip(1) {
            self.merge_at(*k);
        }
        self.merge_at(start);
        self.merge_at(end);
    }

    /// Splits at both ends of `[start, end)` and removes every VMA inside.
    pub(crate) fn remove_range(&mut self, start: u64, end: u64) -> Vec<Vma> {
        // The hole starts at `start` at the lowest: the hint may not pass it.
        let to = self.hint_to.get_mut();
        *to = (*to).min(start);
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        keys.iter()
            .map(|k| self.map.remove(k).expect("key collected above"))
            .collect()
    }

    /// Removes every VMA (`tear_down_vmas` + `__mt_destroy`).
    pub(crate) fn take_all(&mut self) -> Vec<Vma> {
        *self.hint_to.get_mut() = 0;
        std::mem::take(&mut self.map).into_values().collect()
    }

    /// Debug check: sorted, non-overlapping, non-empty, maximally merged.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut prev: Option<&Vma> = None;
        for (k, v) in &self.map {
            if *k != v.start || v.start >= v.end {
                return Err(format!("bad vma {v:?}"));
            }
            if let Some(p) = prev {
                if p.end > v.start {
                    return Err(format!("overlap {p:?} {v:?}"));
                }
                if p.mergeable_with(v) {
                    return Err(format!("unmerged neighbours {p:?} {v:?}"));
                }
            }
            prev = Some(v);
        }
        Ok(())
    }
}

impl Vma {
    /// Maps anonymous memory back over guest `[s, e)` of `vma` (a zap of merged
    /// pages) and registers it again with the tracker of a tracked region.
    pub(crate) fn restore_anon(&self, s: u64, e: u64) -> Result<()> {
        let r = self.host_range(s, e);
        let map = || {
            sys::map_anon_fixed(r, self.prot.bits()).map_err(Error::host("mmap(MAP_FIXED anon)"))
        };
        let full = self.region.tracker().is_some();
        match self.region.wp_tracker() {
            Some(t) => {
                // The merged range may be registered (write-protect only): our
                // own replacement, whose UNMAP message the handler ignores.
                let (hs, he) = (r.ptr() as usize, r.ptr() as usize + r.len());
                t.self_zap(hs, he, map)?;
                if !t.is_dead() {
                    // The new mapping is not registered: as the region was
                    // (tracked: MISSING + WP; untracked: WP only).
                    if full {
                        t.register(r)?;
                    } else {
                        t.register_wp_anon(r)?;
                    }
                }
            }
            None => map()?,
        }
        Ok(())
    }
}
