//! Page-merging primitives for a KSM scanner (`mm-ksm`): the host side of a
//! merge, so that a merge frees real host memory and the scanner itself
//! needs no `unsafe`.
//!
//! # The mechanism
//!
//! Stable pages live in one memfd per scanner, the [`StableStore`]. A merge
//! of guest pages onto stable pages:
//!
//! 1. locks the PTEs of the run (ascending; excludes the access API and
//!    zaps) and checks each page is still present and private;
//! 2. write-protects the run with userfaultfd (a tracked region, or an
//!    untracked one registered for write-protect only when it became
//!    mergeable, see `MmUser::madvise`): from here a direct writer (vCPU,
//!    JIT code) blocks in its fault;
//! 3. compares the run with the stable pages (or, for a new stable run,
//!    writes it into them): the contents cannot change inside the window;
//! 4. maps the stable pages over the run with `MAP_FIXED | MAP_PRIVATE`,
//!    announced as our own zap so the handler ignores the `UNMAP` message.
//!    The kernel frees the old anonymous pages; a later write by anyone is
//!    copy-on-write into a fresh private page;
//! 5. populates the mapping for reads (`MADV_POPULATE_READ`: the guest
//!    really maps the shared page, and PSS shows it), wakes the writers
//!    blocked at 2 (they refault on the new mapping and copy), and sets the
//!    PTEs to `KSM | FILEMAP | stable id`, not `PRESENT`. The caller gets
//!    which pages were charged (PTE `PRESENT`; a page an embedder touched
//!    through the host pointer of an untracked region never was) and moves
//!    or gives back exactly those charges: each stable page is charged at
//!    most once.
//!
//! ```text
//!   ksmd (ksm_merge)                    | vCPU
//!   lock PTEs; present + private?       |
//!   UFFDIO_WRITEPROTECT                 |
//!   compare with the stable page: equal | write -> WP fault, blocks
//!   mmap(MAP_FIXED|MAP_PRIVATE, memfd)  |
//!   UFFDIO_WAKE                         | refault: CoW of the stable page,
//!   PTE = KSM | id; unlock              |   the write lands in its own copy
//! ```
//!
//! Without step 2 the write could land in the old page between the compare
//! and the remap, and be lost with it.
//!
//! Breaking the sharing: the access API's writes copy (and charge) in the
//! fault path; direct writes are found by [`Mm::ksm_snapshot`] through
//! `/proc/self/pagemap` (the page is anonymous again) and charged there. A
//! zap of merged pages (`DONTNEED`, the reaper) maps anonymous memory back,
//! since `DONTNEED` on a private file mapping would expose the stable page
//! again instead of zeros. Stable pages are never reused at the same memfd
//! offset (the offsets only grow), so a stale private file mapping can only
//! ever read a hole (zeros; shmem allocates a page there, uncharged, see
//! DESIGN-NOTES.md), never another guest's data.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::mm::{Mm, MmState};
use crate::pgtable::{pte_lock, pte_unlock, Pte, PAGES_PER_LEAF};
use crate::sched;
use crate::sys::{self, pagemap, PAGE_SIZE};
use crate::vma::{Prot, VmFlags, Vma};

const PAGE: u64 = PAGE_SIZE as u64;
/// Offsets of the store (in pages). The memfd is sparse; offsets are never
/// reused, so this bounds the stable pages ever created (2^36 pages).
const STORE_PAGES: u64 = 1 << 36;

/// The KSM memfd that holds the stable pages.
#[derive(Debug)]
pub struct StableStore {
    fd: OwnedFd,
    /// Next free page offset (bump allocation; offsets are never reused).
    next: AtomicU64,
    /// Pages released (hole punched).
    released: AtomicU64,
}

impl StableStore {
    /// A new, empty store.
    pub fn new(name: &str) -> Result<StableStore> {
        let fd = sys::memfd_sized(name, STORE_PAGES * PAGE).map_err(Error::host("memfd_create"))?;
        Ok(StableStore {
            fd,
            next: AtomicU64::new(0),
            released: AtomicU64::new(0),
        })
    }

    /// Reserves `n` consecutive stable pages; `None` when the offsets are
    /// exhausted.
    pub fn alloc(&self, n: u64) -> Option<u64> {
        // Relaxed: a counter; the pages are published by the merge's page
        // locks and the scanner mutex.
        let first = self.next.fetch_add(n, Ordering::Relaxed);
        (first + n <= STORE_PAGES).then_some(first)
    }

    /// Frees stable page `id` (`fallocate(PUNCH_HOLE)`). The caller knows no
    /// guest maps it any more; a stale private mapping reads zeros.
    pub fn release(&self, id: u64) -> Result<()> {
        let off = usize::try_from(id * PAGE).map_err(|_| Error::Overflow {
            addr: id * PAGE,
            len: PAGE,
        })?;
        sys::punch_hole(&self.fd, off, PAGE_SIZE).map_err(Error::host("fallocate(PUNCH_HOLE)"))?;
        self.released.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads stable pages from `id` into `buf` (a multiple of the page size).
    pub fn read(&self, id: u64, buf: &mut [u8]) -> Result<()> {
        sys::read_from(&self.fd, buf, id * PAGE).map_err(Error::host("pread"))
    }

    /// Stable pages allocated so far, and released so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.next.load(Ordering::Relaxed).min(STORE_PAGES),
            self.released.load(Ordering::Relaxed),
        )
    }
}

/// One page as the KSM scanner sees it ([`Mm::ksm_snapshot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsmPage {
    /// Not populated: nothing to merge.
    Absent,
    /// A private page (its contents were copied out when asked).
    Private,
    /// Maps stable page `id`.
    Stable(u64),
    /// Discarded as a zero page by KSM and not populated since.
    Zero,
}

/// What a merge attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsmMerge {
    /// The run now maps the stable pages (or was discarded as zeros).
    Merged,
    /// Some page was absent, already merged, or different: nothing done.
    Changed,
    /// `mmap` failed with `ENOMEM`: the process is at `vm.max_map_count`.
    MapLimit,
    /// The VMA cannot be merged (see [`Vma::ksm_capable`]).
    NotEligible,
}

impl Vma {
    /// Can the mechanism merge this VMA's pages? Private, 4 KiB, readable,
    /// not locked or pinned, and registered with userfaultfd write-protect
    /// (step 2 needs it): a tracked region, or an untracked one registered
    /// for write-protect only when it became mergeable
    /// ([`MmUser::madvise`](crate::MmUser::madvise) `Mergeable`,
    /// [`Mm::ksm_prepare_all`], an mmap under `VM_MERGE_ANY`). Whether KSM
    /// *should* (`VM_MERGEABLE`) is the scanner's business.
    pub fn ksm_capable(&self) -> bool {
        let no = [
            VmFlags::SHARED,
            VmFlags::HUGEPAGE,
            VmFlags::LOCKED,
            VmFlags::PINNED,
        ];
        !no.iter().any(|f| self.flags.contains(*f))
            && self.prot.contains(Prot::READ)
            && self
                .region
                .wp_tracker()
                .is_some_and(|t| !t.is_dead() && t.wp())
    }

    /// Could this VMA be merged if its host range were registered for
    /// write-protect (private anonymous 4 KiB, not tracked)?
    pub(crate) fn ksm_wp_candidate(&self) -> bool {
        !self.flags.contains(VmFlags::SHARED)
            && !self.flags.contains(VmFlags::HUGEPAGE)
            && !self.flags.contains(VmFlags::TRACKED)
            && self.region.is_anon()
            && self.region.tracker().is_none()
    }
}

/// Maps anonymous memory back over guest `[s, e)` of `vma` (a zap of merged
/// pages) and registers it again with the tracker of a tracked region.
pub(crate) fn restore_anon(vma: &Vma, s: u64, e: u64) -> Result<()> {
    let r = vma.host_range(s, e);
    let map =
        || sys::map_anon_fixed(r, vma.prot.bits()).map_err(Error::host("mmap(MAP_FIXED anon)"));
    let full = vma.region.tracker().is_some();
    match vma.region.wp_tracker() {
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

/// A pagemap entry of a page the embedder populated itself in an
/// untracked region: present, anonymous, mapped only here (the shared zero
/// page a read fault maps is not exclusive, and merging it frees nothing).
fn direct_private(e: u64) -> bool {
    e & pagemap::PRESENT != 0 && e & pagemap::FILE == 0 && e & pagemap::EXCLUSIVE != 0
}

/// A locked run of PTEs inside one leaf.
struct Locked<'g> {
    leaf: &'g crate::pgtable::Leaf,
    first: u64,
    olds: Vec<u64>,
}

impl Locked<'_> {
    fn unlock_with(self, f: impl Fn(usize, u64) -> u64) {
        for (i, o) in self.olds.iter().enumerate() {
            pte_unlock(self.leaf.pte(self.first + i as u64), f(i, *o));
        }
    }
}

impl Mm {
    /// The VMA that holds `[addr, addr + n pages)` inside one leaf, if the
    /// mechanism can merge it.
    fn ksm_vma<'s>(&self, state: &'s MmState, addr: u64, n: u64) -> Option<&'s Vma> {
        let end = addr.checked_add(n.checked_mul(PAGE)?)?;
        let vma = state.vmas().find(addr)?;
        let same_leaf = addr / PAGE / PAGES_PER_LEAF == (end - PAGE) / PAGE / PAGES_PER_LEAF;
        (n > 0 && addr % PAGE == 0 && end <= vma.end && same_leaf && vma.ksm_capable())
            .then_some(vma)
    }

    fn lock_run<'g>(
        &'g self,
        addr: u64,
        n: u64,
        guard: &'g crossbeam_epoch::Guard,
    ) -> Option<Locked<'g>> {
        let first = addr / PAGE;
        let leaf = self.pgtable.leaf(first, guard)?;
        let olds = (first..first + n).map(|g| pte_lock(leaf.pte(g))).collect();
        Some(Locked { leaf, first, olds })
    }

    /// Charges one page that the kernel already allocated (a copy-on-write
    /// of a merged page): over budget, it becomes fail-open debt, as in the
    /// tracked handler, so `charged = present - debt` holds.
    fn charge_existing(&self) {
        if self.budget.try_charge(PAGE).is_err() {
            // Relaxed: a counter, read back by `uncharge_pages`.
            self.debt.fetch_add(PAGE, Ordering::Relaxed);
        }
        self.rss_anon.fetch_add(1, Ordering::Relaxed);
    }

    /// Which pages of a locked run can be merged, and which of them are
    /// charged: `Some(charged)` when every page is private and mergeable
    /// (`charged[i]`: PTE `PRESENT`, populated through the API; else a page
    /// of an untracked region the embedder touched directly, found through
    /// pagemap, never charged), `None` when some page is absent, merged,
    /// or write-protected by the user (`Pte::WP`: not ours to merge, the
    /// merge would unprotect it and wake its writers).
    fn run_charged(vma: &Vma, r: crate::sys::HostRange, olds: &[u64]) -> Result<Option<Vec<bool>>> {
        let untracked = !vma.flags.contains(VmFlags::TRACKED);
        let mut pm = Vec::new();
        let mut charged = Vec::with_capacity(olds.len());
        for (i, o) in olds.iter().enumerate() {
            let p = Pte(*o);
            if p.ksm() || *o & Pte::WP != 0 {
                return Ok(None);
            }
            if p.present() {
                charged.push(true);
                continue;
            }
            if !untracked {
                return Ok(None);
            }
            if pm.is_empty() {
                pm.resize(olds.len(), 0);
                sys::pagemap(r, &mut pm).map_err(Error::host("pagemap"))?;
            }
            if !direct_private(pm[i]) {
                return Ok(None);
            }
            charged.push(false);
        }
        Ok(Some(charged))
    }

    /// The scanner's look at `want.len()` pages from `addr` (one VMA, one
    /// leaf; the mmap lock held, `state` is the proof). For each page, under
    /// its PTE lock: a private page asked for in `want` is copied to its
    /// slot of `buf`; a merged page whose sharing a direct write broke
    /// (pagemap: anonymous again) is turned into a private page first
    /// (charged in a tracked region, as the handler would have; uncharged
    /// in an untracked one, like any page touched through the host
    /// pointer). In an untracked region a page the embedder touched
    /// directly (pagemap: present, anonymous, exclusive; the PTE says
    /// nothing) is a private, uncharged page. `out[i]` says what page `i`
    /// is now.
    pub fn ksm_snapshot(
        &self,
        state: &MmState,
        addr: u64,
        want: &[bool],
        buf: &mut [u8],
        out: &mut [KsmPage],
    ) -> Result<()> {
        // I-KSM-2 oracle: every scanner path tests `users == 0` after its
        // read lock, and ksm_exit's write-lock barrier waits for one that
        // is still inside, so no KSM operation runs once exit_mmap began.
        sched::check(
            !self.exit_started(),
            "I-KSM-2: KSM touched an mm's pages after its exit_mmap began",
        );
        let n = want.len();
        if buf.len() < n * PAGE_SIZE || out.len() < n {
            return Err(Error::InvalidArgument {
                what: "ksm_snapshot: buf or out shorter than want",
            });
        }
        if n == 0 {
            return Ok(());
        }
        if addr % PAGE != 0 {
            return Err(Error::Unaligned {
                addr,
                len: n as u64 * PAGE,
            });
        }
        let end = addr + n as u64 * PAGE;
        if addr / PAGE / PAGES_PER_LEAF != (end - PAGE) / PAGE / PAGES_PER_LEAF {
            return Err(Error::InvalidArgument {
                what: "ksm_snapshot: the pages cross a page-table leaf (2 MiB)",
            });
        }
        let vma = state
            .vmas()
            .find(addr)
            .filter(|v| end <= v.end)
            .ok_or(Error::Unmapped { addr })?;
        let guard = crossbeam_epoch::pin();
        let first = addr / PAGE;
        // An untracked region's pages may be populated with no PTE (touched
        // through the host pointer): allocate the leaf, so that the merge
        // holds real page locks against the access path and our zaps.
        let untracked = !vma.flags.contains(VmFlags::TRACKED);
        // Pagemap always for an untracked region (direct touches leave no
        // trace in the PTEs), else only when some page maps a stable page
        // (a lock-free peek; re-checked under the lock below).
        let mut pm = Vec::new();
        let read_pagemap = |pm: &mut Vec<u64>| {
            pm.resize(n, 0);
            sys::pagemap(vma.host_range(addr, end), pm).map_err(Error::host("pagemap"))
        };
        if untracked {
            read_pagemap(&mut pm)?;
        }
        let leaf = match self.pgtable.leaf(first, &guard) {
            Some(l) => l,
            // A page of an untracked region touched through the host
            // pointer has no PTE: allocate the leaf so that the merge holds
            // real page locks against the access path and our zaps. Only
            // then: a leaf per 2 MiB of memory nobody touched would cost
            // uncharged page-table memory until teardown.
            None if untracked && pm.iter().any(|e| direct_private(*e)) => {
                self.pgtable.leaf_alloc(first, &guard)
            }
            None => {
                out[..n].fill(KsmPage::Absent);
                return Ok(());
            }
        };
        let any_ksm = (0..n as u64).any(|i| Pte(leaf.pte(first + i).load(Ordering::Relaxed)).ksm());
        if any_ksm && !untracked {
            read_pagemap(&mut pm)?;
        }
        for i in 0..n {
            let pte = leaf.pte(first + i as u64);
            let o = Pte(pte_lock(pte));
            let e = pm.get(i).copied().unwrap_or(0);
            let (new, page) = if o.ksm() {
                // Copied by a direct write since the merge? The copy is a
                // private page again; in a tracked region charge it (the
                // fault path does the same for writes through the API).
                if e & pagemap::PRESENT != 0 && e & pagemap::FILE == 0 {
                    if untracked {
                        (o.flags() & !Pte::KSM, KsmPage::Private)
                    } else {
                        self.charge_existing();
                        ((o.flags() & !Pte::KSM) | Pte::PRESENT, KsmPage::Private)
                    }
                } else {
                    (o.0, KsmPage::Stable(o.stable_id()))
                }
            } else if o.present() || (untracked && direct_private(e)) {
                // Populated through the API (charged), or by the embedder
                // through the host pointer of an untracked region (not).
                (o.0 & !Pte::KSM_ZERO, KsmPage::Private)
            } else if o.0 & Pte::KSM_ZERO != 0 {
                (o.0, KsmPage::Zero)
            } else {
                (o.0, KsmPage::Absent)
            };
            if page == KsmPage::Private && want[i] {
                let at = addr + i as u64 * PAGE;
                let host = vma.host_range(at, at + PAGE).ptr();
                // SAFETY: the page is inside a VMA of this mm and we hold
                // the mmap lock (no munmap can unmap it) and its page lock
                // (no zap of ours, no API populate); `host` is page aligned
                // and the slot is one page inside `buf` (asserted above).
                // A vCPU or the embedder may write (or discard) the page
                // during the copy: `copy_from_host_racy` reads it word by
                // word with volatile loads, and the bytes are only a hint
                // for the checksum; the merge compares again inside its
                // write-protect window (step 3).
                unsafe {
                    sys::copy_from_host_racy(host, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                };
            }
            pte_unlock(pte, new);
            out[i] = page;
        }
        Ok(())
    }

    /// Merges the `n` pages from `addr` (one VMA, one leaf, all private)
    /// onto stable pages `first..first + n` of `store`; with `fill` the
    /// stable pages are new and get this run's contents, else the run must
    /// equal them. Steps 1-5 of the module docs. The mmap lock is held
    /// (`state`) and the caller checked `users > 0`.
    ///
    /// The budget is left to the caller: on `Merged`, `charged[i]` (at
    /// least `n` long) says whether page `i` was charged to this mm (PTE
    /// `PRESENT`; pages an embedder touched directly in an untracked region
    /// never were). The caller moves that charge to the stable page or
    /// gives it back with [`Mm::ksm_uncharge`]; a page that was never
    /// charged must not be uncharged. This mm's rss is already lowered.
    #[allow(clippy::too_many_arguments)]
    pub fn ksm_merge(
        &self,
        state: &MmState,
        addr: u64,
        n: u64,
        store: &StableStore,
        first: u64,
        fill: bool,
        charged: &mut [bool],
    ) -> Result<KsmMerge> {
        // I-KSM-2 oracle: every scanner path tests `users == 0` after its
        // read lock, and ksm_exit's write-lock barrier waits for one that
        // is still inside, so no KSM operation runs once exit_mmap began.
        sched::check(
            !self.exit_started(),
            "I-KSM-2: KSM touched an mm's pages after its exit_mmap began",
        );
        let Some(vma) = self.ksm_vma(state, addr, n) else {
            return Ok(KsmMerge::NotEligible);
        };
        let Some(t) = vma.region.wp_tracker() else {
            return Ok(KsmMerge::NotEligible);
        };
        if (charged.len() as u64) < n {
            return Err(Error::InvalidArgument {
                what: "ksm_merge: charged shorter than the run",
            });
        }
        let end = addr + n * PAGE;
        let r = vma.host_range(addr, end);
        let guard = crossbeam_epoch::pin();
        // 1. Page locks: no accessor, zap or handler fill in the window.
        let Some(locked) = self.lock_run(addr, n, &guard) else {
            return Ok(KsmMerge::Changed);
        };
        let was_charged = match Self::run_charged(vma, r, &locked.olds) {
            Ok(Some(c)) => c,
            Ok(None) => {
                locked.unlock_with(|_, o| o);
                return Ok(KsmMerge::Changed);
            }
            Err(e) => {
                locked.unlock_with(|_, o| o);
                return Err(e);
            }
        };
        if !t.wp_shmem() && locked.olds.iter().any(|o| o & Pte::FILEMAP != 0) {
            // A private copy inside a merged range, which this kernel cannot
            // write-protect: not mergeable until a zap restores it.
            locked.unlock_with(|_, o| o);
            return Ok(KsmMerge::NotEligible);
        }
        // 2. Write-protect: direct writers block from here.
        if let Err(e) = t.writeprotect(r, true) {
            locked.unlock_with(|_, o| o);
            return Err(e);
        }
        let fail = |locked: Locked<'_>| {
            // Unprotecting wakes the writers; their writes land in the
            // page they wrote to, which stays.
            let res = t.writeprotect(r, false);
            locked.unlock_with(|_, o| o);
            res
        };
        // 3. Compare (or fill): the contents are frozen.
        let same = if fill {
            sys::write_pages_to(&store.fd, r, first * PAGE).map(|()| true)
        } else {
            let mut want = vec![0u8; r.len()];
            sys::read_from(&store.fd, &mut want, first * PAGE).map(|()| {
                // SAFETY: page locks held and the range write-protected
                // (steps 1-2): nobody writes it during the compare.
                unsafe { sys::host_equals(r, &want) }
            })
        };
        match same {
            Ok(true) => {}
            Ok(false) => {
                fail(locked)?;
                return Ok(KsmMerge::Changed);
            }
            Err(e) => {
                fail(locked)?;
                return Err(Error::Host {
                    op: "ksm fill/compare",
                    source: e,
                });
            }
        }
        // 4. Map the stable pages over the run; the handler ignores the
        //    UNMAP message of our own replacement.
        let (hs, he) = (r.ptr() as usize, r.ptr() as usize + r.len());
        let mapped = t.self_zap(hs, he, || {
            sys::map_file_private_fixed(r, &store.fd, first * PAGE, vma.prot.bits())
        });
        if let Err(e) = mapped {
            fail(locked)?;
            if e.raw_os_error() == Some(libc::ENOMEM) {
                return Ok(KsmMerge::MapLimit);
            }
            return Err(Error::Host {
                op: "mmap(MAP_FIXED|MAP_PRIVATE memfd)",
                source: e,
            });
        }
        // 5. Map the pages for reads, wake the writers blocked at 2 (they
        //    refault on the new mapping: copy-on-write), publish the PTEs.
        let _ = sys::populate_read(r);
        // Register the merged range for write-protect (memfd mappings need
        // UFFD_FEATURE_WP_HUGETLBFS_SHMEM), so a private copy made later can
        // be merged again; MISSING stays off (the file always has the page).
        if let Err(e) = t.register_wp_only(r) {
            tracing::debug!(target: "mm_core::ksm", mm_id = self.id(), addr, error = %e, "merged range not write-protectable");
        }
        let _ = t.wake_range(r);
        locked.unlock_with(|i, o| {
            (Pte(o).flags() & !(Pte::PRESENT | Pte::DIRTY | Pte::KSM_ZERO))
                | Pte::KSM
                | Pte::FILEMAP
                | ((first + i as u64) << Pte::STABLE_SHIFT)
        });
        // Only the pages that were PRESENT were counted (and charged).
        let present = was_charged.iter().filter(|c| **c).count() as u64;
        // Fail-open debt first (charged = present - debt): only the pages
        // beyond the mm's debt were really charged, and only their charge
        // may move to a stable page or be given back (a debt moved as a
        // charge would be uncharged later without ever being charged).
        let mut real = self.repay_debt(present * PAGE) / PAGE;
        for (c, w) in charged[..n as usize].iter_mut().zip(&was_charged) {
            *c = *w && real > 0;
            if *c {
                real -= 1;
            }
        }
        // Relaxed: a counter (as everywhere for rss).
        let prev = self.rss_anon.fetch_sub(present, Ordering::Relaxed);
        debug_assert!(prev >= present, "rss underflow");
        tracing::trace!(target: "mm_core::ksm", mm_id = self.id(), addr, pages = n, stable = first, fill, "ksm_merge_one_page");
        Ok(KsmMerge::Merged)
    }

    /// `use_zero_pages`: discards the `n` pages from `addr` if they are all
    /// zeros, inside the same write-protect window as a merge; they read
    /// back as zeros (a later touch populates a fresh page).
    pub fn ksm_zero(&self, state: &MmState, addr: u64, n: u64) -> Result<KsmMerge> {
        // I-KSM-2 oracle: every scanner path tests `users == 0` after its
        // read lock, and ksm_exit's write-lock barrier waits for one that
        // is still inside, so no KSM operation runs once exit_mmap began.
        sched::check(
            !self.exit_started(),
            "I-KSM-2: KSM touched an mm's pages after its exit_mmap began",
        );
        let Some(vma) = self.ksm_vma(state, addr, n) else {
            return Ok(KsmMerge::NotEligible);
        };
        let Some(t) = vma.region.wp_tracker() else {
            return Ok(KsmMerge::NotEligible);
        };
        let end = addr + n * PAGE;
        let r = vma.host_range(addr, end);
        let guard = crossbeam_epoch::pin();
        let Some(locked) = self.lock_run(addr, n, &guard) else {
            return Ok(KsmMerge::Changed);
        };
        let charged = match Self::run_charged(vma, r, &locked.olds) {
            Ok(Some(c)) => c.iter().filter(|c| **c).count() as u64,
            Ok(None) => {
                locked.unlock_with(|_, o| o);
                return Ok(KsmMerge::Changed);
            }
            Err(e) => {
                locked.unlock_with(|_, o| o);
                return Err(e);
            }
        };
        if let Err(e) = t.writeprotect(r, true) {
            locked.unlock_with(|_, o| o);
            return Err(e);
        }
        // SAFETY: page locks held and the range write-protected.
        if !unsafe { sys::host_is_zero(r) } {
            let res = t.writeprotect(r, false);
            locked.unlock_with(|_, o| o);
            res?;
            return Ok(KsmMerge::Changed);
        }
        // Announced as our own zap (free_pages), so the handler ignores the
        // REMOVE message. Writers blocked on WP refault on an empty PTE and
        // the handler populates them once we unlock.
        let res = vma.free_host(addr, end);
        let _ = t.wake_range(r);
        if let Err(e) = res {
            let _ = t.writeprotect(r, false);
            locked.unlock_with(|_, o| o);
            return Err(e);
        }
        locked.unlock_with(|_, o| (Pte(o).flags() & !(Pte::PRESENT | Pte::DIRTY)) | Pte::KSM_ZERO);
        // Only what was charged: a page touched through the host pointer of
        // an untracked region never was.
        self.uncharge_pages(charged, 0);
        Ok(KsmMerge::Merged)
    }

    /// Gives back the charge of `pages` merged pages of this mm, as
    /// reported by [`Mm::ksm_merge`] (which already repaid the mm's
    /// fail-open debt with the merged pages).
    pub fn ksm_uncharge(&self, pages: u64) {
        if pages > 0 {
            // Debt was repaid by ksm_merge already: these were charged.
            self.budget.uncharge(pages * PAGE);
        }
    }

    /// Breaks the sharing of every merged page in `[addr, addr + len)`
    /// (`break_ksm` / unmerge): each becomes a charged private copy with the
    /// same contents (`MADV_POPULATE_WRITE` makes the kernel copy it). The
    /// mmap lock is held (`state`). Returns the pages unshared.
    pub fn ksm_unshare(&self, state: &MmState, addr: u64, len: u64) -> Result<u64> {
        // I-KSM-2 oracle: every scanner path tests `users == 0` after its
        // read lock, and ksm_exit's write-lock barrier waits for one that
        // is still inside, so no KSM operation runs once exit_mmap began.
        sched::check(
            !self.exit_started(),
            "I-KSM-2: KSM touched an mm's pages after its exit_mmap began",
        );
        let end = addr.saturating_add(len);
        let guard = crossbeam_epoch::pin();
        let mut done = 0;
        for vma in state.vmas().overlapping(addr, end) {
            let (s, e) = (vma.start.max(addr), vma.end.min(end));
            let mut gpn = s / PAGE;
            while gpn < e / PAGE {
                let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(e / PAGE);
                let Some(leaf) = self.pgtable.leaf(gpn, &guard) else {
                    gpn = stop;
                    continue;
                };
                let peek = (gpn..stop).any(|g| Pte(leaf.pte(g).load(Ordering::Relaxed)).ksm());
                if peek {
                    done += self.unshare_leaf(vma, leaf, gpn, stop)?;
                }
                gpn = stop;
            }
        }
        Ok(done)
    }

    fn unshare_leaf(
        &self,
        vma: &Vma,
        leaf: &crate::pgtable::Leaf,
        gpn: u64,
        stop: u64,
    ) -> Result<u64> {
        let olds: Vec<u64> = (gpn..stop).map(|g| pte_lock(leaf.pte(g))).collect();
        let locked = Locked {
            leaf,
            first: gpn,
            olds,
        };
        let writable = vma.prot.contains(Prot::WRITE);
        let mut res = Ok(());
        let mut copied = vec![false; locked.olds.len()];
        let n = locked.olds.len();
        let mut i = 0;
        while i < n && res.is_ok() {
            if !Pte(locked.olds[i]).ksm() {
                i += 1;
                continue;
            }
            let j = (i..n).find(|&j| !Pte(locked.olds[j]).ksm()).unwrap_or(n);
            let r = vma.host_range((gpn + i as u64) * PAGE, (gpn + j as u64) * PAGE);
            // A read-only VMA is made writable on the host for the copy only
            // (the guest cannot write it: its VMA says read-only).
            let rw = (true, true, vma.prot.contains(Prot::EXEC));
            res = (|| {
                if !writable {
                    sys::protect(r, rw)?;
                }
                let p = sys::populate_write(r);
                if !writable {
                    sys::protect(r, vma.prot.bits())?;
                }
                p
            })()
            .map_err(Error::host("madvise(POPULATE_WRITE) unshare"));
            if res.is_ok() {
                copied[i..j].iter_mut().for_each(|c| *c = true);
                for _ in i..j {
                    self.charge_existing();
                }
            }
            i = j;
        }
        let count = copied.iter().filter(|c| **c).count() as u64;
        locked.unlock_with(|i, o| {
            if copied[i] {
                (Pte(o).flags() & !Pte::KSM) | Pte::PRESENT
            } else {
                o
            }
        });
        res.map(|()| count)
    }
}
