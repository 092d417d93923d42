//! The KSM seam: the mm side of page merging for a KSM scanner (`mm-ksm`),
//! the analogue of the kernel's `ksm_add_vma` / `break_ksm` hooks. The host
//! side of a merge lives here, so that a merge frees real host memory and
//! the scanner itself needs no `unsafe`.
//!
//! A scanner reaches an mm's pages only through [`KsmMm`], built from the
//! mm and a guard of **its** mmap lock ([`KsmMm::new`] checks the state is
//! the mm's): `KsmMm::new(&mm, &state)?.merge(..)`. This module sits above
//! `mm`, which never calls into it: the write-protect registration of
//! mergeable VMAs that `mmap` and `madvise(MERGEABLE)` do (`ksm_add_vma`)
//! is the mm's own (`mm/ksm_wp.rs`, with [`prepare_all`] and the
//! per-mm counter behind [`wp_failures`]), and `madvise(UNMERGEABLE)`
//! unshares through the `mm::VmaHooks` hook that [`Host::new_mm`]
//! injects, implemented here by `KsmHooks` as [`KsmMm::unshare`].
//!
//! Files: `merge.rs` (snapshot, merge, zero page), `unshare.rs` (break the
//! sharing, give back charges); this one holds [`KsmMm`],
//! [`Vma::ksm_capable`] and the hook.
//!
//! [`Host::new_mm`]: crate::Host::new_mm
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
//! fault path; direct writes are found by [`KsmMm::snapshot`] through
//! `/proc/self/pagemap` (the page is anonymous again) and charged there. A
//! zap of merged pages (`DONTNEED`, the reaper) maps anonymous memory back,
//! since `DONTNEED` on a private file mapping would expose the stable page
//! again instead of zeros. Stable pages are never reused at the same memfd
//! offset (the offsets only grow), so a stale private file mapping can only
//! ever read a hole (zeros; shmem allocates a page there, uncharged, see
//! DESIGN-NOTES.md), never another guest's data.

mod batch;
mod merge;
mod unshare;

pub use batch::{BatchOp, BatchOutcome, BatchRun};

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mm::{Mm, MmState, VmaHooks};
use crate::pgtable::{pte_lock, pte_unlock, Leaf, Pte, PAGES_PER_LEAF};
use crate::sched;
use crate::sys::{self, pagemap, PAGE_SIZE};
use crate::tracked::Tracker;
use crate::vma::{Prot, VmFlags, Vma};

pub use crate::mm::prepare_all;

const PAGE: u64 = PAGE_SIZE as u64;
/// Offsets of the store (in pages). The memfd is sparse; offsets are never
/// reused, so this bounds the stable pages ever created (2^36 pages).
const STORE_PAGES: u64 = 1 << 36;
/// Pages of one window of the store's read-only view (1 GiB).
const VIEW_PAGES: u64 = 1 << 18;
/// Windows kept mapped; past it every window is unmapped (offsets only
/// grow, so old windows are rarely needed again). Each costs one host map.
const VIEW_MAX: usize = 8;

/// The KSM memfd that holds the stable pages.
#[derive(Debug)]
pub struct StableStore {
    fd: OwnedFd,
    /// Next free page offset (bump allocation; offsets are never reused).
    next: AtomicU64,
    /// Pages released (hole punched).
    released: AtomicU64,
    /// Read-only windows of the memfd by window index: the merge compares
    /// guest pages with stable pages in place (one `memcmp`), instead of a
    /// `pread` copy per merge (8 % of the scanner's CPU on scattered data).
    views: std::sync::Mutex<std::collections::HashMap<u64, memmap2::Mmap>>,
}

impl StableStore {
    /// A new, empty store.
    pub fn new(name: &str) -> Result<StableStore> {
        let fd = sys::memfd_sized(name, STORE_PAGES * PAGE).map_err(Error::host("memfd_create"))?;
        Ok(StableStore {
            fd,
            next: AtomicU64::new(0),
            released: AtomicU64::new(0),
            views: Default::default(),
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

    /// Does host range `r` hold the bytes of stable pages `first..` (as
    /// many as `r` is long)? Compared in place through the store's view;
    /// a run that crosses a window, or a window that cannot be mapped, is
    /// compared through `pread`. The caller holds `r`'s page locks and its
    /// write-protect window, and the stable pages are live.
    pub(crate) fn equals(&self, r: sys::HostRange, first: u64) -> Result<bool> {
        let n = r.len() as u64 / PAGE;
        let (w, last) = (first / VIEW_PAGES, (first + n - 1) / VIEW_PAGES);
        if w == last {
            let mut views = crate::types::lock(&self.views);
            if !views.contains_key(&w) {
                if views.len() >= VIEW_MAX {
                    views.clear();
                }
                if let Ok(v) = sys::map_view(
                    &self.fd,
                    w * VIEW_PAGES * PAGE,
                    (VIEW_PAGES * PAGE) as usize,
                ) {
                    views.insert(w, v);
                }
            }
            if let Some(v) = views.get(&w) {
                let at = ((first - w * VIEW_PAGES) * PAGE) as usize;
                // SAFETY: the caller's page locks and write-protect window
                // keep `r` unchanged; the run lies inside window `w` (checked
                // above); its stable pages are live, and they are written
                // only when created and punched only when released, never
                // while a merge onto them runs (the scanner's mutex).
                return Ok(unsafe { sys::host_equals_view(r, v, at) });
            }
        }
        let mut want = vec![0u8; r.len()];
        self.read(first, &mut want)?;
        // SAFETY: as above: nobody writes `r` during the compare.
        Ok(unsafe { sys::host_equals(r, &want) })
    }

    /// Stable pages allocated so far, and released so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.next.load(Ordering::Relaxed).min(STORE_PAGES),
            self.released.load(Ordering::Relaxed),
        )
    }
}

/// One page as the KSM scanner sees it ([`KsmMm::snapshot`]).
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

/// Mergeable untracked VMAs that KSM cannot merge because their host
/// range could not be registered for userfaultfd write-protect (no
/// userfaultfd, or a kernel without `UFFD_FEATURE_PAGEFAULT_FLAG_WP`):
/// the fallback is today's behaviour (registered with KSM, never
/// merged), made visible here and by a `warn` event.
pub fn wp_failures(mm: &Mm) -> u64 {
    mm.ksm.wp_failures.load(Ordering::Relaxed)
}

/// What `mm`'s page table says KSM holds of it right now: `(merging,
/// zero)`, the pages mapping a stable page and the pages discarded as
/// zero pages and not populated since (`/proc/<pid>/ksm_stat`'s
/// `ksm_merging_pages` and `ksm_zero_pages`). Read from the PTEs, so an
/// unmerge or a zap shows at once (issue 12), not after the scanner's next
/// visit; a copy made by a direct write through the host pointer shows
/// once the scanner saw it (the kernel's `ksm_merging_pages` too lags
/// until then). Walks the existing page-table leaves: O(pages mapped).
pub fn page_counts(mm: &Mm) -> (u64, u64) {
    let (mut merging, mut zero) = (0, 0);
    mm.pgtable.each_pte(|p| {
        merging += u64::from(p.ksm());
        zero += u64::from(p.ksm_zero());
    });
    (merging, zero)
}

/// A run of pages to merge onto stable pages ([`KsmMm::merge`]).
#[derive(Debug, Clone, Copy)]
pub struct MergeRun<'s> {
    /// First guest address (page aligned).
    pub addr: u64,
    /// Pages in the run (one VMA, one page-table leaf).
    pub n: u64,
    /// The store holding the stable pages.
    pub store: &'s StableStore,
    /// First stable page id.
    pub first: u64,
    /// The stable pages are new: fill them with this run's contents
    /// (else the run must equal them).
    pub fill: bool,
}

/// One mm's pages as a KSM scanner may touch them, while the scanner holds
/// the mm's mmap lock: built only from a state obtained through a guard of
/// that very mm's lock.
#[derive(Debug, Clone, Copy)]
pub struct KsmMm<'a> {
    mm: &'a Mm,
    state: &'a MmState,
}

impl<'a> KsmMm<'a> {
    /// The seam for `mm` under the lock `state` was dereferenced from;
    /// [`Error::ForeignLock`] if `state` is another mm's.
    pub fn new(mm: &'a Mm, state: &'a MmState) -> Result<KsmMm<'a>> {
        mm.check_state(state)?;
        Ok(KsmMm { mm, state })
    }

    /// The scanner's look at `want.len()` pages from `addr`: see
    /// [`Mm`]'s `ksm_snapshot` in `ksm/merge.rs` (one VMA, one leaf; for
    /// each page, under its PTE lock, `out[i]` says what it is and a
    /// private page asked for in `want` is copied to its slot of `buf`).
    pub fn snapshot(
        &self,
        addr: u64,
        want: &[bool],
        buf: &mut [u8],
        out: &mut [KsmPage],
    ) -> Result<()> {
        self.mm.ksm_snapshot(self.state, addr, want, buf, out)
    }

    /// Merges `run` onto its stable pages (steps 1-5 of the module docs).
    /// On `Merged`, `charged[i]` (at least `run.n` long) says whether page
    /// `i` was charged to this mm; the caller moves that charge to the
    /// stable page or gives it back with [`uncharge`](Self::uncharge).
    pub fn merge(&self, run: MergeRun<'_>, charged: &mut [bool]) -> Result<KsmMerge> {
        self.mm.ksm_merge(self.state, run, charged)
    }

    /// The merges and zero discards of one scanner chunk, sharing one
    /// write-protect window where they can (see `ksm/batch.rs`); one
    /// outcome per run, in order. `runs` sorted by address and disjoint
    /// for the shared window (else they go one at a time, with the same
    /// outcomes); a run onto stable pages that a `Fill` run of the batch
    /// creates waits for that run and is `Changed` if it failed.
    pub fn merge_batch(&self, store: &StableStore, runs: &[BatchRun]) -> Vec<Result<BatchOutcome>> {
        self.mm.ksm_merge_batch(self.state, store, runs)
    }

    /// `use_zero_pages`: discards the `n` pages from `addr` if all zeros.
    pub fn zero(&self, addr: u64, n: u64) -> Result<KsmMerge> {
        self.mm.ksm_zero(self.state, addr, n)
    }

    /// Breaks the sharing of every merged page in `[addr, addr + len)`
    /// (`break_ksm`); returns the pages unshared.
    pub fn unshare(&self, addr: u64, len: u64) -> Result<u64> {
        self.mm.ksm_unshare(self.state, addr, len)
    }

    /// Gives back the charge of `pages` merged pages, as reported by
    /// [`merge`](Self::merge).
    pub fn uncharge(&self, pages: u64) {
        self.mm.ksm_uncharge(pages)
    }
}

/// KSM's side of `madvise(UNMERGEABLE)`, injected into every mm by
/// [`Host::new_mm`](crate::Host::new_mm) as its `mm::VmaHooks`.
#[derive(Debug)]
pub(crate) struct KsmHooks;

impl VmaHooks for KsmHooks {
    /// `unmerge_ksm_pages`: [`KsmMm::unshare`] of the range, under the
    /// caller's write lock (`state`), before `VM_MERGEABLE` goes.
    fn unmergeable(&self, mm: &Mm, state: &MmState, addr: u64, len: u64) -> Result<()> {
        KsmMm::new(mm, state)?.unshare(addr, len)?;
        Ok(())
    }
}

impl Vma {
    /// Can the mechanism merge this VMA's pages? Private, readable, not
    /// pinned (mlocked and huge-page are fine), and registered with
    /// userfaultfd write-protect
    /// (step 2 needs it): a tracked region, or an untracked one registered
    /// for write-protect only when it became mergeable
    /// ([`MmUser::madvise`](crate::MmUser::madvise) `Mergeable`,
    /// [`prepare_all`], an mmap under `VM_MERGE_ANY`). Whether KSM
    /// *should* (`VM_MERGEABLE`) is the scanner's business.
    pub fn ksm_capable(&self) -> bool {
        // VM_LOCKED merges, as in the kernel (issue 12): `map_stable` and
        // `discard_zero` keep the host range locked. So does VM_HUGEPAGE:
        // the merge's 4 KiB mapping splits the host's huge page, and the
        // fault path then faults that block 4 KiB at a time
        // (`Mm::fault_chunk`).
        let no = [VmFlags::SHARED, VmFlags::PINNED];
        !no.iter().any(|f| self.flags.contains(*f))
            && self.prot.contains(Prot::READ)
            && self
                .region
                .wp_tracker()
                .is_some_and(|t| !t.is_dead() && t.wp())
    }
}

impl Vma {
    /// Step 4 of a merge: maps stable pages `first..` of `store` over the
    /// host range `r` of this VMA (`MAP_FIXED | MAP_PRIVATE`), announced to
    /// the handler as our own replacement.
    fn map_stable(
        &self,
        t: &Tracker,
        r: sys::HostRange,
        store: &StableStore,
        first: u64,
    ) -> std::io::Result<()> {
        let (hs, he) = (r.ptr() as usize, r.ptr() as usize + r.len());
        t.self_zap(hs, he, || {
            sys::map_file_private_fixed(r, &store.fd, first * PAGE, self.prot.bits())
        })?;
        self.relock(r);
        Ok(())
    }

    /// A KSM zero page: frees the host pages of guest `[s, e)` (announced
    /// as our own zap). The host refuses `DONTNEED` on mlocked memory, so
    /// an mlocked VMA's range is unlocked first and locked again after.
    fn discard_zero(&self, s: u64, e: u64) -> Result<()> {
        let r = self.host_range(s, e);
        if self.flags.contains(VmFlags::LOCKED) {
            sys::lock(r, false).map_err(Error::host("munlock (KSM zero page)"))?;
        }
        let res = self.free_host(s, e);
        self.relock(r);
        res
    }

    /// After a merge replaced host pages of an mlocked VMA: a new mapping
    /// does not inherit the lock. `mlock2(MLOCK_ONFAULT)` locks the merged
    /// page without the write fault a plain `mlock` takes on a writable
    /// private mapping (which would copy the page at once: the kernel too
    /// mlocks a KSM page mapped in a `VM_LOCKED` VMA without copying it).
    /// A failure (`RLIMIT_MEMLOCK` moved meanwhile) leaves the merged page
    /// unlocked but correct: logged, not fatal.
    fn relock(&self, r: sys::HostRange) {
        if self.flags.contains(VmFlags::LOCKED) {
            if let Err(e) = sys::lock_on_fault(r) {
                tracing::warn!(target: "mm_core::ksm", error = %e, "merged pages of an mlocked VMA not locked again");
            }
        }
    }
}

/// A pagemap entry of a page the embedder populated itself in an
/// untracked region: present, anonymous, mapped only here (the shared zero
/// page a read fault maps is not exclusive, and merging it frees nothing).
fn direct_private(e: u64) -> bool {
    e & pagemap::PRESENT != 0 && e & pagemap::FILE == 0 && e & pagemap::EXCLUSIVE != 0
}

/// A locked run of PTEs inside one leaf.
struct Locked<'g> {
    leaf: &'g Leaf,
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
    /// I-KSM-2 oracle, first thing on every KSM path into the mm's pages:
    /// every scanner path tests `users == 0` after its read lock, and
    /// ksm_exit's write-lock barrier waits for one that is still inside, so
    /// no KSM operation runs once exit_mmap began.
    fn check_ksm_before_exit(&self) {
        sched::check(
            !self.exit_started(),
            "I-KSM-2: KSM touched an mm's pages after its exit_mmap began",
        );
    }

    /// The VMA of a run that [`ksm_vma`](Self::ksm_vma) accepts and the
    /// tracker that write-protects it; `None`: not eligible.
    fn ksm_wp_vma<'s>(
        &self,
        state: &'s MmState,
        addr: u64,
        n: u64,
    ) -> Option<(&'s Vma, &'s Arc<Tracker>)> {
        let vma = self.ksm_vma(state, addr, n)?;
        Some((vma, vma.region.wp_tracker()?))
    }

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

    /// Step 1 of a merge or a zero discard: the page locks of the run
    /// (`lock_run`) and which of its pages are charged (`run_charged`).
    /// `Ok(None)` when the run changed or is not all private; on `Ok(None)`
    /// and on an error the PTEs are unlocked again, unchanged.
    fn lock_charged_run<'g>(
        &'g self,
        vma: &Vma,
        r: sys::HostRange,
        addr: u64,
        n: u64,
        guard: &'g crossbeam_epoch::Guard,
    ) -> Result<Option<(Locked<'g>, Vec<bool>)>> {
        let Some(locked) = self.lock_run(addr, n, guard) else {
            return Ok(None);
        };
        match Self::run_charged(vma, r, &locked.olds) {
            Ok(Some(c)) => Ok(Some((locked, c))),
            Ok(None) => {
                locked.unlock_with(|_, o| o);
                Ok(None)
            }
            Err(e) => {
                locked.unlock_with(|_, o| o);
                Err(e)
            }
        }
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
        // The pagemap only when some page's PTE does not tell.
        let need = untracked && olds.iter().any(|o| !Pte(*o).present());
        let mut pm = Vec::new();
        if need {
            pm.resize(olds.len(), 0);
            sys::pagemap(r, &mut pm).map_err(Error::host("pagemap"))?;
        }
        Ok(Self::run_charged_with(vma, olds, need.then_some(&pm[..])))
    }

    /// `run_charged` with the run's pagemap entries already read (`pm`,
    /// needed for an untracked run whose PTEs do not all say `PRESENT`).
    fn run_charged_with(vma: &Vma, olds: &[u64], pm: Option<&[u64]>) -> Option<Vec<bool>> {
        let untracked = !vma.flags.contains(VmFlags::TRACKED);
        let mut charged = Vec::with_capacity(olds.len());
        for (i, o) in olds.iter().enumerate() {
            let p = Pte(*o);
            if p.ksm() || *o & Pte::WP != 0 {
                return None;
            }
            if p.present() {
                charged.push(true);
                continue;
            }
            if !untracked || !pm.is_some_and(|pm| direct_private(pm[i])) {
                return None;
            }
            charged.push(false);
        }
        Some(charged)
    }
}
