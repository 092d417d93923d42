//! `Mm` (the `mm_struct` analogue), its two reference counts, and the
//! operations on its VMAs and pages.
//!
//! # The two counts
//!
//! | kernel | here | keeps alive |
//! |---|---|---|
//! | `mm_users` (`mmget`, `mmget_not_zero`, `mmput`) | [`MmUser`] | the contents: VMAs, page tables, host memory |
//! | `mm_count` (`mmgrab`, `mmdrop`) | [`MmGrab`] | only the struct: id, flags, lock, an empty tree |
//!
//! All users together hold one count, dropped by the teardown that the last
//! user runs. `users` is never raised from 0: [`MmGrab::upgrade`] is
//! `mmget_not_zero`. The struct is freed exactly when the count reaches 0
//! (every handle owns an `Arc<Mm>`, and `users > 0 ⇒ count ≥ 1`, so the last
//! `Arc` goes with the last count; [`MmWatch`] lets a test observe it).

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_lite::future::block_on;

use crate::error::{Access, Error, Result};
use crate::flags::{MmFlag, MmFlags};
use crate::host::{Budget, HostInner};
use crate::mmap_lock::MmapLock;
use crate::pgtable::{pte_lock, pte_unlock, PageTable, Pte, MAX_GPN, PAGES_PER_LEAF};
use crate::sched;
use crate::sys::{self, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::tracked::{TrackedStats, Tracker, DEFAULT_FAULT_AROUND};
use crate::vma::{HostRegion, Prot, VmFlags, Vma, VmaTree};

const PAGE: u64 = PAGE_SIZE as u64;

/// A boxed, sendable future (for hooks called from protocol code).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A secondary MMU that mirrors this mm (a KVM memslot, vhost, an IOMMU):
/// the `mmu_notifier` analogue.
pub trait MmNotifier: Send + Sync {
    /// The mm is being torn down (`mmu_notifier_release`): drop every
    /// translation now. Called once, first in `exit_mmap`, with no lock held;
    /// the notifier is unhooked afterwards.
    fn release(&self, mm: &Mm);

    /// Guest range `range` is about to lose its pages. `blockable == false`
    /// (the reaper) means the callee must not sleep and may refuse with
    /// [`WouldBlock`]; the caller then skips the range and retries later.
    fn invalidate_range_start(
        &self,
        range: Range<u64>,
        blockable: bool,
    ) -> std::result::Result<(), WouldBlock> {
        let _ = (range, blockable);
        Ok(())
    }

    /// The pages of `range` are gone.
    fn invalidate_range_end(&self, range: Range<u64>) {
        let _ = range;
    }
}

/// A notifier refused a nonblocking invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("mmu notifier would block")]
pub struct WouldBlock;

/// A background scanner registered with an mm (KSM, a khugepaged analogue)
/// that must be told before the teardown, the `ksm_exit` hook.
pub trait ExitHook: Send + Sync {
    /// Called from the last `mmput` with `users` already 0, before
    /// `exit_mmap` (I-KSM-3). May take the mmap lock (the write-lock
    /// barrier), never a scanner mutex (I-KSM-1).
    fn exit<'a>(&'a self, mm: &'a Mm) -> BoxFuture<'a, ()>;
}

/// Per-mm configuration.
#[derive(Debug, Clone, Copy)]
pub struct MmConfig {
    /// First address past the guest address space (`TASK_SIZE`).
    pub va_limit: u64,
    /// Lowest address `mmap` picks when no address is given (`mmap_min_addr`).
    pub mmap_floor: u64,
}

impl Default for MmConfig {
    fn default() -> Self {
        MmConfig {
            va_limit: MAX_GPN * PAGE,
            mmap_floor: 1 << 20,
        }
    }
}

/// How to map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    AnonPrivate,
    /// Shared memory backed by a memfd this mm owns (`MAP_SHARED`); never
    /// reaped (the reaper skips `VM_SHARED`).
    SharedMemfd,
}

/// Arguments of [`MmUser::mmap`].
#[derive(Debug, Clone, Copy)]
pub struct MapOptions {
    /// Guest address, or `None` to let the mm choose.
    pub addr: Option<u64>,
    /// Length in bytes (page aligned, non-zero).
    pub len: u64,
    /// Protection.
    pub prot: Prot,
    /// Backing.
    pub kind: MapKind,
    /// `MADV_HUGEPAGE` from the start (host mapping 2 MiB aligned).
    pub hugepage: bool,
    /// Mark `VM_PFNMAP`-like pinned: never reaped.
    pub pinned: bool,
    /// A tracked region: registered with the mm's userfaultfd so direct
    /// touches are charged (see `tracked.rs`). Private anonymous only.
    pub tracked: bool,
    /// Fault-around window of a tracked region, in bytes: a power of two
    /// from one page to 2 MiB (default 2 MiB), clamped to the VMA.
    pub fault_around: u64,
}

impl MapOptions {
    /// Private anonymous read-write memory of `len` bytes anywhere.
    pub fn anon(len: u64) -> Self {
        MapOptions {
            addr: None,
            len,
            prot: Prot::READ_WRITE,
            kind: MapKind::AnonPrivate,
            hugepage: false,
            pinned: false,
            tracked: false,
            fault_around: DEFAULT_FAULT_AROUND,
        }
    }

    /// Shared memfd-backed read-write memory of `len` bytes anywhere.
    pub fn shared(len: u64) -> Self {
        MapOptions {
            kind: MapKind::SharedMemfd,
            ..MapOptions::anon(len)
        }
    }

    /// At a fixed guest address (fails with `Overlap` if taken; never replaces).
    pub fn at(mut self, addr: u64) -> Self {
        self.addr = Some(addr);
        self
    }

    /// With this protection.
    pub fn prot(mut self, prot: Prot) -> Self {
        self.prot = prot;
        self
    }

    /// With `MADV_HUGEPAGE`.
    pub fn hugepage(mut self, on: bool) -> Self {
        self.hugepage = on;
        self
    }

    /// Pinned (never reaped).
    pub fn pinned(mut self, on: bool) -> Self {
        self.pinned = on;
        self
    }

    /// Tracked by the mm's userfaultfd (direct touches are charged).
    pub fn tracked(mut self, on: bool) -> Self {
        self.tracked = on;
        self
    }

    /// Fault-around window of a tracked region (bytes).
    pub fn fault_around(mut self, bytes: u64) -> Self {
        self.fault_around = bytes;
        self
    }
}

/// `madvise` advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: private pages are freed and read back as zeros;
    /// shared pages are only unmapped (their contents stay).
    DontNeed,
    /// `MADV_MERGEABLE`: set `VM_MERGEABLE`. Do not use it on memory that
    /// is the target of kernel I/O (`O_DIRECT`, io_uring registered
    /// buffers, vhost): a merge cannot see the device's pin (DESIGN-NOTES).
    Mergeable,
    /// `MADV_UNMERGEABLE`: clear `VM_MERGEABLE`.
    Unmergeable,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
}

/// Why pages are being zapped (tracing only; the work is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZapReason {
    /// `exit_mmap` step 5 (`unmap_vmas`, fullmm).
    Exit,
    /// The OOM reaper or `process_mrelease` (per VMA, nonblocking).
    Reap,
    /// `munmap`.
    Munmap,
    /// `madvise(DONTNEED)`.
    DontNeed,
}

/// What the mmap lock guards: the VMA tree.
#[derive(Debug, Default)]
pub struct MmState {
    vmas: VmaTree,
}

impl MmState {
    /// The VMA tree. Empty once `exit_mmap` has run (step 11).
    pub fn vmas(&self) -> &VmaTree {
        &self.vmas
    }
}

/// One guest address space. Reached through [`MmUser`] or [`MmGrab`].
pub struct Mm {
    id: u64,
    name: String,
    users: AtomicUsize,
    count: AtomicUsize,
    pub(crate) flags: MmFlags,
    lock: MmapLock<MmState>,
    pub(crate) pgtable: PageTable,
    /// Present private pages (`MM_ANONPAGES`).
    pub(crate) rss_anon: AtomicU64,
    /// Present shared pages (`MM_SHMEMPAGES`).
    rss_shmem: AtomicU64,
    pub(crate) budget: Arc<Budget>,
    pub(crate) host: Weak<HostInner>,
    /// The userfaultfd tracker, created by the first tracked mmap (under
    /// the write lock) and taken by exit_mmap. Held only to clone or take.
    tracker: Mutex<Option<Arc<Tracker>>>,
    /// Bytes of present pages served over budget by a failing-open handler
    /// and not charged; repaid first by every uncharge (`tracked.rs` step 4).
    pub(crate) debt: AtomicU64,
    /// Mergeable untracked VMAs whose host range could not be registered
    /// for userfaultfd write-protect (no userfaultfd, no WP): KSM skips
    /// them (see [`Mm::ksm_wp_failures`]).
    ksm_wp_failures: AtomicU64,
    /// Only held for push/take, never across an await.
    notifiers: Mutex<Vec<Arc<dyn MmNotifier>>>,
    /// Only held for push/clone, never across an await.
    exit_hooks: Mutex<Vec<Arc<dyn ExitHook>>>,
    /// exit_mmap has begun (set at its step 1). Not a protocol flag (the
    /// kernel has none: `ksm_test_exit` is `users == 0`); only the oracle
    /// of I-KSM-2 reads it, to catch a scanner inside a teardown.
    exit_started: AtomicBool,
    config: MmConfig,
}

impl std::fmt::Debug for Mm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mm")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("users", &self.users())
            .field("count", &self.count())
            .field("flags", &self.flags)
            .field("rss_pages", &self.rss_pages())
            .finish()
    }
}

fn lock_list<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while pushing to a Vec cannot leave it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Validates a page-aligned, non-empty range below `limit`; returns its end.
pub(crate) fn check_range(addr: u64, len: u64, limit: u64) -> Result<u64> {
    if len == 0 {
        return Err(Error::ZeroLength { addr });
    }
    if addr % PAGE != 0 || len % PAGE != 0 {
        return Err(Error::Unaligned { addr, len });
    }
    let end = addr.checked_add(len).ok_or(Error::Overflow { addr, len })?;
    if end > limit {
        return Err(Error::OutOfRange { addr, len, limit });
    }
    Ok(end)
}

impl Mm {
    pub(crate) fn new_user(
        id: u64,
        name: String,
        budget: Arc<Budget>,
        host: Weak<HostInner>,
        config: MmConfig,
    ) -> MmUser {
        let config = MmConfig {
            va_limit: config.va_limit.min(MAX_GPN * PAGE) & !(PAGE - 1),
            mmap_floor: config.mmap_floor,
        };
        let mm = Mm {
            id,
            name,
            users: AtomicUsize::new(1),
            // The one count all users hold together (mm_init).
            count: AtomicUsize::new(1),
            flags: MmFlags::default(),
            lock: MmapLock::new(MmState::default()),
            pgtable: PageTable::new(),
            rss_anon: AtomicU64::new(0),
            rss_shmem: AtomicU64::new(0),
            budget,
            host,
            tracker: Mutex::new(None),
            debt: AtomicU64::new(0),
            ksm_wp_failures: AtomicU64::new(0),
            notifiers: Mutex::new(Vec::new()),
            exit_hooks: Mutex::new(Vec::new()),
            exit_started: AtomicBool::new(false),
            config,
        };
        MmUser {
            mm: Some(Arc::new(mm)),
        }
    }

    /// Unique id of this address space.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Has exit_mmap begun? (Diagnostics and oracles only; scanners test
    /// `users == 0`, as the kernel's `ksm_test_exit`.)
    pub fn exit_started(&self) -> bool {
        self.exit_started.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_exit_started(&self) {
        self.exit_started.store(true, Ordering::SeqCst);
    }

    /// `mm_users`.
    pub fn users(&self) -> usize {
        self.users.load(Ordering::SeqCst)
    }

    /// `mm_count`.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The `MMF_*` flags.
    pub fn flags(&self) -> &MmFlags {
        &self.flags
    }

    /// The mmap lock.
    pub fn lock(&self) -> &MmapLock<MmState> {
        &self.lock
    }

    /// Configuration.
    pub fn config(&self) -> MmConfig {
        self.config
    }

    /// Present pages (private + shared) as the page table counts them.
    pub fn rss_pages(&self) -> u64 {
        self.rss_anon.load(Ordering::Relaxed) + self.rss_shmem.load(Ordering::Relaxed)
    }

    /// Present private pages.
    pub fn anon_rss_pages(&self) -> u64 {
        self.rss_anon.load(Ordering::Relaxed)
    }

    /// Present shared pages.
    pub fn shmem_rss_pages(&self) -> u64 {
        self.rss_shmem.load(Ordering::Relaxed)
    }

    /// Bytes of page-table nodes (`pgtables_bytes`).
    pub fn pgtables_bytes(&self) -> u64 {
        self.pgtable.nodes() as u64 * PAGE
    }

    /// The host budget this mm is charged to.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The page table (for walkers that hold the mmap lock).
    pub fn page_table(&self) -> &PageTable {
        &self.pgtable
    }

    /// Registers a secondary MMU.
    pub fn register_notifier(&self, n: Arc<dyn MmNotifier>) {
        lock_list(&self.notifiers).push(n);
    }

    /// Registers a scanner exit hook (`ksm_exit`).
    pub fn add_exit_hook(&self, h: Arc<dyn ExitHook>) {
        lock_list(&self.exit_hooks).push(h);
    }

    /// Scanner exit hooks registered so far.
    pub fn exit_hook_count(&self) -> usize {
        lock_list(&self.exit_hooks).len()
    }

    /// `mmu_notifier_invalidate_range_start[_nonblock]` over every notifier.
    /// On refusal the ones already started are ended again.
    pub fn notify_invalidate_start(
        &self,
        range: Range<u64>,
        blockable: bool,
    ) -> std::result::Result<(), WouldBlock> {
        let ns = lock_list(&self.notifiers).clone();
        for (i, n) in ns.iter().enumerate() {
            if let Err(e) = n.invalidate_range_start(range.clone(), blockable) {
                for done in &ns[..i] {
                    done.invalidate_range_end(range.clone());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// `mmu_notifier_invalidate_range_end`.
    pub fn notify_invalidate_end(&self, range: Range<u64>) {
        let ns = lock_list(&self.notifiers).clone();
        for n in &ns {
            n.invalidate_range_end(range.clone());
        }
    }

    /// Host pages resident (by `mincore`) under every VMA; the kernel's view.
    pub fn resident_bytes(&self, state: &MmState) -> Result<u64> {
        let mut pages = 0;
        for v in state.vmas.iter() {
            pages += sys::resident_pages(v.host_range(v.start, v.end))
                .map_err(Error::host("mincore"))?;
        }
        Ok(pages as u64 * PAGE)
    }

    pub(crate) fn uncharge_pages(&self, anon: u64, shmem: u64) {
        if anon + shmem == 0 {
            return;
        }
        let prev_a = self.rss_anon.fetch_sub(anon, Ordering::Relaxed);
        let prev_s = self.rss_shmem.fetch_sub(shmem, Ordering::Relaxed);
        debug_assert!(prev_a >= anon && prev_s >= shmem, "rss underflow");
        self.budget.uncharge(self.repay_debt((anon + shmem) * PAGE));
    }

    /// Pays fail-open debt out of `bytes` being freed; returns what is left
    /// to uncharge, so that `charged = present - debt` stays true.
    pub(crate) fn repay_debt(&self, bytes: u64) -> u64 {
        let mut cur = self.debt.load(Ordering::Relaxed);
        loop {
            if cur == 0 {
                return bytes;
            }
            let r = cur.min(bytes);
            // Relaxed: a counter; the pages it stands for are ordered by the
            // page locks of the zap that frees them.
            match self.debt.compare_exchange_weak(
                cur,
                cur - r,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return bytes - r,
                Err(c) => cur = c,
            }
        }
    }

    /// The tracker, if a tracked region was ever mapped.
    pub(crate) fn tracker(&self) -> Option<Arc<Tracker>> {
        lock_list(&self.tracker).clone()
    }

    /// Mergeable untracked VMAs that KSM cannot merge because their host
    /// range could not be registered for userfaultfd write-protect (no
    /// userfaultfd, or a kernel without `UFFD_FEATURE_PAGEFAULT_FLAG_WP`):
    /// the fallback is today's behaviour (registered with KSM, never
    /// merged), made visible here and by a `warn` event.
    pub fn ksm_wp_failures(&self) -> u64 {
        self.ksm_wp_failures.load(Ordering::Relaxed)
    }

    /// Counters of the tracked regions, `None` if none was ever mapped.
    pub fn tracked_stats(&self) -> Option<TrackedStats> {
        self.tracker()
            .map(|t| t.stats(self.debt.load(Ordering::Relaxed)))
    }

    /// exit_mmap: unregister every tracked range before the zap (see
    /// `tracked.rs` step 8).
    pub(crate) fn tracker_forget_all(&self) {
        if let Some(t) = self.tracker() {
            t.forget_all();
        }
    }

    /// exit_mmap, after the write unlock: stop the handler and drop the
    /// mm's reference to the tracker (the descriptor closes with the last).
    pub(crate) fn tracker_stop(&self) {
        let t = lock_list(&self.tracker).take();
        if let Some(t) = t {
            t.stop();
        }
    }

    /// Zaps `[start, end)` of `vma` (`unmap_page_range`): clears the PTEs,
    /// frees the host pages and uncharges them. Returns the pages uncharged.
    ///
    /// Needs the mmap lock in either mode (`state` is the proof). Pages are
    /// zapped one leaf (2 MiB) at a time with every PTE of that leaf locked
    /// in ascending order, so an accessor is never in the middle of copying a
    /// page whose host memory goes (it holds the page lock), and one that
    /// comes after sees the PTE empty and, after `UNSTABLE`, fails. Host
    /// ranges with no leaf were never populated through the API but may have
    /// been touched directly by the embedder: they are discarded too, in one
    /// call per run.
    pub fn zap_range(
        &self,
        state: &MmState,
        vma: &Vma,
        start: u64,
        end: u64,
        reason: ZapReason,
    ) -> Result<u64> {
        // I-EX-4: no zap after free_pgtables (the reaper vs teardown race
        // the write lock in exit_mmap step 8 closes).
        sched::check(
            !self.pgtable.is_freed(),
            "I-EX-4: page table zapped after free_pgtables",
        );
        let _ = state;
        debug_assert!(vma.start <= start && end <= vma.end && start < end);
        if vma.flags.contains(VmFlags::LOCKED) {
            // madvise(DONTNEED) refuses mlocked host memory; the guest flag
            // stays (it only changes under the write lock), only the host's
            // pin on these pages goes. Since 5.18 the reaper reaps VM_LOCKED.
            sys::lock(vma.host_range(start, end), false).map_err(Error::host("munlock"))?;
        }
        let shared = vma.is_shared();
        let guard = crossbeam_epoch::pin();
        let (first, last) = (start / PAGE, end / PAGE);
        let mut freed = 0u64;
        let mut pending: Option<u64> = None; // start gpn of a leafless run
        let mut gpn = first;
        let mut olds = Vec::with_capacity(PAGES_PER_LEAF as usize);
        let mut wp_cleared = false;
        // Found by Nth-failure injection (kill_anywhere): a failed host free
        // used to abort the zap, and exit_mmap / munmap, whose VMA is
        // already out of every guest's reach, then dropped the VMA with its
        // pages still charged (I-RC-3: budget never back to 0). For those
        // two the pages count as freed anyway: the host mapping under them
        // is unmapped when its region goes (exit_mmap step 10; munmap once
        // the last VMA slicing the region is gone), which frees them.
        let free_host = |s: u64, e: u64| match (vma.free_host(s, e), reason) {
            (Err(err), ZapReason::Exit | ZapReason::Munmap) => {
                tracing::warn!(target: "mm_core::zap", mm_id = self.id, ?reason, error = %err,
                    "host free failed; pages freed with the mapping");
                Ok(())
            }
            (res, _) => res,
        };
        // One leaf's pages, under all of its PTE locks.
        let mut zap_leaf = |leaf: &crate::pgtable::Leaf, gpn: u64, stop: u64| -> Result<()> {
            olds.clear();
            for p in gpn..stop {
                olds.push(pte_lock(leaf.pte(p)));
            }
            let mut res = free_host(gpn * PAGE, stop * PAGE);
            if res.is_ok() && matches!(reason, ZapReason::DontNeed | ZapReason::Reap) {
                // Merged pages (KSM): the host range is a private
                // mapping of the KSM memfd, where DONTNEED only drops
                // a private copy and a later touch would read the
                // stable page, not zeros. Put anonymous memory back
                // (munmap and exit_mmap leave the range dead anyway).
                res = self.restore_anon_runs(vma, gpn, &olds);
            }
            for (i, p) in (gpn..stop).enumerate() {
                let old = olds[i];
                if res.is_ok() {
                    if Pte(old).present() {
                        freed += 1;
                    }
                    wp_cleared |= old & Pte::WP != 0;
                    // Present, KSM, FILEMAP, KSM_ZERO, WP: all gone.
                    pte_unlock(leaf.pte(p), 0);
                } else {
                    pte_unlock(leaf.pte(p), old);
                }
            }
            res
        };
        // A leafless run is discarded without page locks. A leaf may appear
        // under it meanwhile (the access path, or the KSM scanner's
        // snapshot of an untracked region, both under the read lock too):
        // look again after the discard and zap any such leaf under its
        // locks, so nothing populated or merged there survives the zap.
        //
        //   zap (DONTNEED)               | ksmd (untracked region)
        //   leaf? none                   |
        //                                | leaf_alloc, lock, merge: the
        //                                |   range maps the stable page
        //   DONTNEED: drops nothing      |
        //   leaf? yes: lock, restore anon|
        //
        // Without the second look the guest would read the merged contents
        // back after its DONTNEED instead of zeros.
        let flush = |p: u64,
                     q: u64,
                     zap_leaf: &mut dyn FnMut(&crate::pgtable::Leaf, u64, u64) -> Result<()>|
         -> Result<()> {
            free_host(p * PAGE, q * PAGE)?;
            let mut g = p;
            while g < q {
                let stop = ((g / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(q);
                if let Some(leaf) = self.pgtable.leaf(g, &guard) {
                    zap_leaf(leaf, g, stop)?;
                }
                g = stop;
            }
            Ok(())
        };
        // Whatever fails, what was zapped so far is uncharged below (a
        // multi-leaf zap used to return before uncharging earlier leaves).
        let res = (|| -> Result<()> {
            while gpn < last {
                let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(last);
                match self.pgtable.leaf(gpn, &guard) {
                    None => {
                        pending.get_or_insert(gpn);
                    }
                    Some(leaf) => {
                        if let Some(p) = pending.take() {
                            flush(p, gpn, &mut zap_leaf)?;
                        }
                        zap_leaf(leaf, gpn, stop)?;
                    }
                }
                gpn = stop;
            }
            if let Some(p) = pending.take() {
                flush(p, last, &mut zap_leaf)?;
            }
            Ok(())
        })();
        if wp_cleared {
            // API writers waiting for these pages' unprotect (step 7 of
            // tracked.rs): the pages are gone, so is the protection.
            if let Some(t) = vma.region.tracker() {
                t.wp_changed();
            }
        }
        if shared {
            self.uncharge_pages(0, freed);
        } else {
            self.uncharge_pages(freed, 0);
        }
        res?;
        tracing::trace!(target: "mm_core::zap", mm_id = self.id, ?reason, start, end, pages = freed);
        Ok(freed)
    }

    /// Maps anonymous memory back over every run of `FILEMAP` pages among
    /// `olds` (the locked PTE words of the pages from `first_gpn`), and
    /// registers the runs with the tracker again in a tracked region.
    fn restore_anon_runs(&self, vma: &Vma, first_gpn: u64, olds: &[u64]) -> Result<()> {
        let is_file = |o: u64| o & Pte::FILEMAP != 0;
        let mut i = 0;
        while i < olds.len() {
            if !is_file(olds[i]) {
                i += 1;
                continue;
            }
            let j = (i..olds.len())
                .find(|&j| !is_file(olds[j]))
                .unwrap_or(olds.len());
            let (s, e) = ((first_gpn + i as u64) * PAGE, (first_gpn + j as u64) * PAGE);
            crate::merge::restore_anon(vma, s, e)?;
            i = j;
        }
        Ok(())
    }

    /// The fault path for `[start, end)` inside one leaf and one VMA: lock the
    /// PTEs, populate the missing pages (charging the budget), run `f` on the
    /// host memory, unlock. `f` gets (host pointer, byte offset from `start`).
    ///
    /// Returns `Err(NeedMemory)` through `Fault::Budget` when the budget is
    /// exhausted, so the caller can drop every lock before asking the host
    /// for room.
    fn fault_chunk(
        &self,
        vma: &Vma,
        start: u64,
        end: u64,
        write: bool,
        f: &mut dyn FnMut(*mut u8, u64, u64),
    ) -> std::result::Result<(), Fault> {
        sched::check(
            !self.pgtable.is_freed(),
            "I-EX-4: page table populated after free_pgtables",
        );
        // Huge VMAs populate the whole 2 MiB block (inside the VMA) at once,
        // so the charge matches the THP the host maps.
        let (lo, hi) = if vma.flags.contains(VmFlags::HUGEPAGE) {
            let hp = HUGE_PAGE_SIZE as u64;
            (
                (start & !(hp - 1)).max(vma.start),
                ((start & !(hp - 1)) + hp).min(vma.end),
            )
        } else {
            (start, end)
        };
        let guard = crossbeam_epoch::pin();
        let leaf = self.pgtable.leaf_alloc(lo / PAGE, &guard);
        let mut olds = [0u64; PAGES_PER_LEAF as usize];
        let n = ((hi - lo) / PAGE) as usize;
        for (i, gpn) in (lo / PAGE..hi / PAGE).enumerate() {
            olds[i] = pte_lock(leaf.pte(gpn));
        }
        let unlock_all = |olds: &[u64], set: u64| {
            for (i, gpn) in (lo / PAGE..hi / PAGE).enumerate() {
                pte_unlock(leaf.pte(gpn), olds[i] | set);
            }
        };
        if write && olds[..n].iter().any(|o| o & Pte::WP != 0) {
            // A write-protected page (tracked.rs step 7): the copy below
            // would block in the kernel's WP fault while we hold these PTE
            // locks and the caller holds the mmap read lock; zaps and the
            // reaper would then spin on the locks, and a queued munmap
            // (writer) would keep `write_unprotect` (a reader) from ever
            // running. Back off instead: the caller drops every lock and
            // waits for the generation read here (under the locks that
            // showed the bit) to move.
            if let Some(t) = vma.region.tracker().filter(|t| !t.is_dead()) {
                let gen = t.wp_gen();
                let t = t.clone();
                unlock_all(&olds[..n], 0);
                return Err(Fault::WriteProtected(t, gen));
            }
        }
        // A KSM page (mm-ksm, `merge.rs`) is mapped but not present: a read
        // sees the stable page as it is; a write copies it (the kernel's
        // copy-on-write of the private file mapping, done by `f` below) and
        // the copy is charged here like a populated page.
        let needs = |o: u64| !Pte(o).present() && !Pte(o).ksm();
        let missing = olds[..n].iter().filter(|o| needs(**o)).count() as u64;
        let cow = if write {
            olds[..n].iter().filter(|o| Pte(**o).ksm()).count() as u64
        } else {
            0
        };
        if missing + cow > 0 {
            // I-RP-5 / check_stable_address_space: re-checked under the page
            // lock after seeing the PTE empty. The reaper sets UNSTABLE
            // before its first zap and zaps under these same page locks:
            //
            //   reaper                       | accessor
            //   set UNSTABLE                 |
            //   lock pte, clear, DONTNEED    |
            //                                | lock pte: empty
            //                                | UNSTABLE? yes -> Err(Unstable)
            //
            // Without this check the accessor would repopulate a zero page
            // and hand the guest zeros where its data was.
            if missing > 0 && self.flags.test(MmFlag::UNSTABLE) {
                unlock_all(&olds[..n], 0);
                return Err(Fault::Err(Error::Unstable { mm_id: self.id }));
            }
            if let Err(e) = self.budget.try_charge((missing + cow) * PAGE) {
                unlock_all(&olds[..n], 0);
                return Err(Fault::Budget(e));
            }
            // Populate each run of missing pages with one madvise, or, in a
            // tracked region, with UFFDIO_COPY/ZEROPAGE: MADV_POPULATE there
            // would fault into our own handler, and the handler must see the
            // page as populated by whoever holds its PTE lock first.
            let tracker = vma.region.tracker().filter(|t| !t.is_dead());
            let mut i = 0;
            while i < n {
                if !needs(olds[i]) {
                    i += 1;
                    continue;
                }
                let j = (i..n).find(|&j| !needs(olds[j])).unwrap_or(n);
                let r = vma.host_range(lo + i as u64 * PAGE, lo + j as u64 * PAGE);
                let write = vma.prot.contains(Prot::WRITE);
                let mut done = [false; PAGES_PER_LEAF as usize];
                let res = match tracker
                    .as_ref()
                    .map(|t| t.populate_locked(r.ptr() as usize, &mut done[..j - i], write))
                {
                    Some(Ok(true)) => Ok(()),
                    Some(Err(e)) => Err(e),
                    // Untracked, or the handler died (ranges unregistered).
                    Some(Ok(false)) | None => {
                        if crate::sched::fail("fail:madvise(POPULATE)") {
                            Err(crate::vma::injected("madvise(POPULATE)"))
                        } else if write {
                            sys::populate_write(r).map_err(Error::host("madvise(POPULATE)"))
                        } else {
                            sys::populate_read(r).map_err(Error::host("madvise(POPULATE)"))
                        }
                    }
                };
                if let Err(e) = res {
                    // Pages populated so far in this chunk are not marked
                    // present; give their charge back and drop them again.
                    // Only the runs that were missing: present (and KSM)
                    // pages of the window hold data and keep their PTE.
                    self.budget.uncharge((missing + cow) * PAGE);
                    let mut k = 0;
                    while k < n {
                        if !needs(olds[k]) {
                            k += 1;
                            continue;
                        }
                        let m = (k..n).find(|&m| !needs(olds[m])).unwrap_or(n);
                        let _ = vma.free_host(lo + k as u64 * PAGE, lo + m as u64 * PAGE);
                        k = m;
                    }
                    unlock_all(&olds[..n], 0);
                    return Err(Fault::Err(e));
                }
                i = j;
            }
            if vma.is_shared() {
                self.rss_shmem.fetch_add(missing + cow, Ordering::Relaxed);
            } else {
                self.rss_anon.fetch_add(missing + cow, Ordering::Relaxed);
            }
        }
        let base = vma.host_range(start, end).ptr();
        f(base, 0, end - start);
        let dirty = if write { Pte::DIRTY } else { 0 };
        for (i, gpn) in (lo / PAGE..hi / PAGE).enumerate() {
            let o = Pte(olds[i]);
            let new = match (o.ksm(), write) {
                // Read of a KSM page: still shared, still uncharged.
                (true, false) => o.0,
                // Written: now a private copy (FILEMAP stays: the host range
                // is still the file mapping until a zap).
                (true, true) => (o.flags() & !Pte::KSM) | Pte::PRESENT | dirty,
                (false, _) => o.0 | Pte::PRESENT | dirty,
            };
            pte_unlock(leaf.pte(gpn), new);
        }
        Ok(())
    }

    /// Runs the fault path over `[addr, addr+len)`, calling `f(host_ptr,
    /// offset, len)` for each piece, with the pages populated and locked.
    pub(crate) async fn access(
        &self,
        addr: u64,
        len: u64,
        access: Access,
        f: &mut (dyn FnMut(*mut u8, u64, u64) + Send),
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = addr.checked_add(len).ok_or(Error::Overflow { addr, len })?;
        if end > self.config.va_limit {
            return Err(Error::OutOfRange {
                addr,
                len,
                limit: self.config.va_limit,
            });
        }
        let mut pos = addr;
        let mut pressure_rounds = 0;
        'retry: loop {
            let state = self.lock.read().await;
            sched::point("access:locked").await;
            if self.flags.test(MmFlag::UNSTABLE) {
                return Err(Error::Unstable { mm_id: self.id });
            }
            state.vmas.check_mapped(pos, end)?;
            let need = match access {
                Access::Read => Prot::READ,
                Access::Write => Prot::WRITE,
            };
            for vma in state.vmas.overlapping(pos, end) {
                if !vma.prot.contains(need) {
                    return Err(Error::Protection {
                        addr: pos.max(vma.start),
                        access,
                    });
                }
            }
            let vmas: Vec<&Vma> = state.vmas.overlapping(pos, end).collect();
            for vma in vmas {
                while pos < end.min(vma.end) {
                    let pstart = pos & !(PAGE - 1);
                    let leaf_end = ((pstart / PAGE / PAGES_PER_LEAF) + 1) * PAGES_PER_LEAF * PAGE;
                    let cend = leaf_end.min(vma.end).min(end.next_multiple_of(PAGE));
                    let (from, to) = (pos, cend.min(end));
                    // A step between the early UNSTABLE check and the page
                    // lock: the reaper may set UNSTABLE and zap right here,
                    // which is what the check under the page lock is for.
                    sched::point("access:fault").await;
                    let mut g = |host: *mut u8, _off: u64, _n: u64| {
                        // `host` maps `pstart`; hand out the byte window.
                        f(
                            host.wrapping_add((from - pstart) as usize),
                            from - addr,
                            to - from,
                        );
                    };
                    match self.fault_chunk(vma, pstart, cend, access == Access::Write, &mut g) {
                        Ok(()) => pos = to,
                        Err(Fault::Err(e)) => return Err(e),
                        Err(Fault::WriteProtected(t, gen)) => {
                            // Every page lock is dropped; drop the mmap lock
                            // too (write_unprotect, munmap and the reaper need
                            // it) and wait for the protection to go.
                            drop(state);
                            t.wait_wp(gen).await;
                            continue 'retry;
                        }
                        Err(Fault::Budget(e)) => {
                            // Every page lock is dropped; drop the mmap lock
                            // too before asking for room, because reclaim
                            // (KSM, the OOM reaper) takes mmap locks.
                            drop(state);
                            pressure_rounds += 1;
                            let freed = match self.host.upgrade() {
                                Some(h) if pressure_rounds <= 3 => {
                                    crate::host::pressure(&h, e.requested, Some(self.id)).await
                                }
                                _ => false,
                            };
                            if !freed {
                                return Err(e.into_error());
                            }
                            continue 'retry;
                        }
                    }
                }
            }
            return Ok(());
        }
    }

    /// Populates every readable page of `[start, end)` (mlock).
    async fn populate(&self, start: u64, end: u64) -> Result<()> {
        let ranges: Vec<(u64, u64, bool)> = {
            let state = self.lock.read().await;
            state.vmas.check_mapped(start, end)?;
            state
                .vmas
                .overlapping(start, end)
                .map(|v| {
                    (
                        v.start.max(start),
                        v.end.min(end),
                        v.prot.contains(Prot::READ),
                    )
                })
                .collect()
        };
        for (s, e, readable) in ranges {
            if readable {
                self.access(s, e - s, Access::Read, &mut |_, _, _| {})
                    .await?;
            }
        }
        Ok(())
    }
}

/// How the fault path failed.
enum Fault {
    Budget(crate::host::OverBudget),
    /// A write hit a `Pte::WP` page: wait for this tracker's WP generation
    /// to move past the one given, with no lock held.
    WriteProtected(Arc<Tracker>, u64),
    Err(Error),
}

impl Vma {
    /// Frees the host pages under guest `[start, end)` of this VMA.
    pub(crate) fn free_host(&self, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let off = self.region_off + (start - self.start) as usize;
        self.region.free_pages(off, (end - start) as usize)
    }
}

impl Drop for Mm {
    fn drop(&mut self) {
        // check_mm (I-RC-3): by the time the struct goes, teardown has left
        // nothing behind. A failed creation (never mapped) is also clean.
        let rss = self.rss_pages();
        let nodes = self.pgtable.nodes();
        crate::sched::check(
            self.count() == 0,
            "I-RC-2: mm struct freed while its count was not 0",
        );
        if rss != 0 || nodes != 0 || self.count() != 0 {
            tracing::error!(target: "mm_core", mm_id = self.id, rss, nodes, count = self.count(), "Bad rss-counter state at mm free");
            debug_assert!(
                std::thread::panicking(),
                "mm {} freed with rss {rss}, {nodes} page-table nodes, count {}",
                self.id,
                self.count()
            );
        }
    }
}

/// A user reference (`mm_users`): keeps the address space's contents alive.
///
/// Cloning is `mmget`. Dropping the last one runs the teardown (`__mmput`:
/// scanner exit hooks, then `exit_mmap`) in the dropping thread; async owners
/// should call [`MmUser::exit`] instead.
pub struct MmUser {
    /// `None` only inside `exit`, which consumes `self`.
    mm: Option<Arc<Mm>>,
}

impl std::fmt::Debug for MmUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MmUser").field(&**self).finish()
    }
}

impl std::ops::Deref for MmUser {
    type Target = Mm;
    fn deref(&self) -> &Mm {
        self.mm
            .as_deref()
            .expect("MmUser is only empty inside exit()")
    }
}

impl Clone for MmUser {
    /// `mmget`: we hold a user, so `users ≥ 1` and the increment can be relaxed.
    fn clone(&self) -> Self {
        self.users.fetch_add(1, Ordering::Relaxed);
        MmUser {
            mm: self.mm.clone(),
        }
    }
}

impl Drop for MmUser {
    fn drop(&mut self) {
        if let Some(mm) = self.mm.take() {
            if mm.users.fetch_sub(1, Ordering::AcqRel) == 1 {
                block_on(mm.mmput_last());
            }
        }
    }
}

impl MmUser {
    /// `mmput` for async owners: drop this user; if it was the last, run the
    /// teardown in this task.
    pub async fn exit(mut self) {
        let mm = self.mm.take().expect("present until exit");
        // AcqRel: pairs with the other users' decrements, so the teardown
        // sees everything they did to the mm.
        if mm.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            mm.mmput_last().await;
        }
    }

    /// `mmgrab`: a count reference to the struct.
    pub fn grab(&self) -> MmGrab {
        self.count.fetch_add(1, Ordering::Relaxed);
        MmGrab {
            mm: self.mm.clone().expect("present until exit"),
        }
    }

    /// An observer that tells when the struct has been freed.
    pub fn watch(&self) -> MmWatch {
        MmWatch(Arc::downgrade(
            self.mm.as_ref().expect("present until exit"),
        ))
    }

    /// Maps memory (`mmap`); returns the guest address.
    ///
    /// The host mapping is created before the lock is taken; a fixed address
    /// that overlaps an existing VMA fails with `Overlap` (`MAP_FIXED_NOREPLACE`).
    pub async fn mmap(&self, opts: MapOptions) -> Result<u64> {
        let limit = self.config.va_limit;
        let probe = opts.addr.unwrap_or(0);
        check_range(probe, opts.len, limit)?;
        let align = if opts.hugepage {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        let len = usize::try_from(opts.len).map_err(|_| Error::Overflow {
            addr: probe,
            len: opts.len,
        })?;
        if opts.tracked {
            if opts.kind != MapKind::AnonPrivate || opts.hugepage {
                return Err(Error::NotAllowed {
                    addr: probe,
                    reason: "tracked regions are private anonymous 4 KiB mappings",
                });
            }
            let fa = opts.fault_around;
            if !fa.is_power_of_two() || !(PAGE..=HUGE_PAGE_SIZE as u64).contains(&fa) {
                return Err(Error::BadFaultAround { bytes: fa });
            }
        }
        let mut region = match opts.kind {
            MapKind::AnonPrivate => HostRegion::new_anon(len, align, opts.prot)?,
            MapKind::SharedMemfd => HostRegion::new_shared(&self.name, len, align, opts.prot)?,
        };
        if opts.hugepage {
            sys::set_hugepage(region.range(0, len), true)
                .map_err(Error::host("madvise(HUGEPAGE)"))?;
        }
        let mut flags = VmFlags::EMPTY;
        flags = flags.with(VmFlags::SHARED, opts.kind == MapKind::SharedMemfd);
        flags = flags.with(VmFlags::HUGEPAGE, opts.hugepage);
        flags = flags.with(VmFlags::PINNED, opts.pinned);
        flags = flags.with(VmFlags::TRACKED, opts.tracked);
        let mut state = self.lock.write().await;
        sched::point("mmap:locked").await;
        if self.flags.test(MmFlag::UNSTABLE) {
            return Err(Error::Unstable { mm_id: self.id });
        }
        if opts.tracked {
            // Registered before the VMA is published (tracked.rs step 2): no
            // one can touch the host range unregistered. The tracker is
            // created under the write lock, so two tracked mmaps agree on it.
            let t = self.tracker_or_start()?;
            t.register(region.range(0, len))?;
            region.set_tracked(t);
        }
        let region = Arc::new(region);
        let addr = match opts.addr {
            Some(a) => {
                if let Some(v) = state.vmas.overlapping(a, a + opts.len).next() {
                    return Err(Error::Overlap {
                        addr: a,
                        len: opts.len,
                        vma_start: v.start,
                        vma_end: v.end,
                    });
                }
                a
            }
            None => state
                .vmas
                .find_gap(opts.len, align as u64, self.config.mmap_floor, limit)
                .ok_or(Error::NoSpace { len: opts.len })?,
        };
        if let Some(t) = region.tracker() {
            t.add_range(region.base() as usize, len, addr, opts.fault_around);
        }
        let vma = Vma {
            start: addr,
            end: addr + opts.len,
            prot: opts.prot,
            flags,
            region,
            region_off: 0,
        };
        // `prctl(PR_SET_MEMORY_MERGE)` is on: a new VMA is a KSM candidate
        // from the start (the kernel's `ksm_add_vma`). Tested under the
        // write lock, which `ksm_prepare_all` takes after setting the flag,
        // so no mmap slips between the two.
        if self.flags.test(MmFlag::VM_MERGE_ANY) {
            self.ksm_wp_register(&vma);
        }
        state.vmas.insert(vma);
        Ok(addr)
    }

    /// Registers the host mapping under `vma` (an untracked private
    /// anonymous 4 KiB VMA becoming a KSM candidate) with the mm's
    /// userfaultfd for **write-protect only**, starting the tracker and its
    /// handler if this mm had no tracked region. No MISSING mode: first
    /// touches stay the kernel's, so the region keeps its untracked
    /// charging (pages touched through the host pointer are not charged).
    /// The merge (`merge.rs`) then has its write-protect window; the
    /// handler leaves write faults blocked until the window closes. The
    /// whole host mapping is registered at once (slices of it can become
    /// VMAs of their own); munmap, a region's drop and exit_mmap unregister
    /// it like a tracked one. Returns whether the VMA can now be merged;
    /// failures (no userfaultfd, no WP) are counted in
    /// [`Mm::ksm_wp_failures`] and logged: the VMA is then never merged.
    /// Called under the mmap write lock.
    pub(crate) fn ksm_wp_register(&self, vma: &Vma) -> bool {
        if !vma.ksm_wp_candidate() {
            return vma.region.wp_tracker().is_some();
        }
        if vma.region.ksm_wp().is_some() {
            return true;
        }
        let len = vma.region.len();
        let res = self.tracker_or_start_wp().and_then(|t| {
            t.register_wp_anon(vma.region.range(0, len))?;
            Ok(t)
        });
        match res {
            Ok(t) => {
                // Guest address of the mapping's first byte: VMAs slice
                // their region at contiguous offsets.
                let guest = vma.start - vma.region_off as u64;
                t.add_range(vma.region.base() as usize, len, guest, PAGE);
                vma.region.set_ksm_wp(t);
                true
            }
            Err(e) => {
                self.ksm_wp_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "mm_core::ksm", mm_id = self.id, start = vma.start, end = vma.end, error = %e, "mergeable VMA cannot be write-protected with userfaultfd: KSM will not merge it");
                false
            }
        }
    }

    /// `VM_MERGE_ANY` was just set (mm-ksm's `set_merge_any`): registers
    /// every untracked VMA that KSM may now merge, as `madvise(MERGEABLE)`
    /// does for its range (see `ksm_wp_register`). Takes the write lock.
    /// Returns how many VMAs cannot be merged for lack of write-protect.
    pub async fn ksm_prepare_all(&self) -> Result<u64> {
        let state = self.lock.write().await;
        sched::point("ksm_prepare:locked").await;
        if self.flags.test(MmFlag::UNSTABLE) {
            return Err(Error::Unstable { mm_id: self.id });
        }
        let mut failed = 0;
        for v in state.vmas.iter() {
            if v.ksm_wp_candidate() && !self.ksm_wp_register(v) {
                failed += 1;
            }
        }
        Ok(failed)
    }

    /// The tracker, started at the first tracked mmap (the only thread
    /// mm-core spawns for an mm). Called under the mmap write lock.
    fn tracker_or_start(&self) -> Result<Arc<Tracker>> {
        self.tracker_or_start_if(|_| true)
    }

    /// The tracker for a write-protect-only registration: a new one is only
    /// started (thread and all) if the kernel offers WP.
    fn tracker_or_start_wp(&self) -> Result<Arc<Tracker>> {
        self.tracker_or_start_if(|t| t.wp())
    }

    fn tracker_or_start_if(&self, usable: impl Fn(&Tracker) -> bool) -> Result<Arc<Tracker>> {
        let mut slot = lock_list(&self.tracker);
        if let Some(t) = slot.as_ref() {
            if t.is_dead() {
                return Err(Error::TrackerDead { mm_id: self.id });
            }
            return Ok(t.clone());
        }
        let t = Tracker::new(self.id)?;
        if !usable(&t) {
            return Err(Error::Unsupported {
                what: "userfaultfd write-protect (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
            });
        }
        let mm = self.mm.as_ref().map(Arc::downgrade).unwrap_or_default();
        t.start(mm)?;
        *slot = Some(t.clone());
        Ok(t)
    }

    /// Write-protects the pages of `[addr, addr+len)`, all inside tracked
    /// regions, after populating them (charging the budget): a direct write
    /// blocks until [`write_unprotect`](Self::write_unprotect). Pages zapped
    /// and refaulted meanwhile come back writable.
    pub async fn write_protect(&self, addr: u64, len: u64) -> Result<()> {
        self.write_protect_inner(addr, len, true).await
    }

    /// Lifts the write protection of `[addr, addr+len)` and wakes the
    /// writers blocked on it.
    pub async fn write_unprotect(&self, addr: u64, len: u64) -> Result<()> {
        self.write_protect_inner(addr, len, false).await
    }

    async fn write_protect_inner(&self, addr: u64, len: u64, wp: bool) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        let t = self.tracker().ok_or(Error::NotTracked { addr })?;
        if t.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.id });
        }
        if !t.wp() {
            return Err(Error::Unsupported {
                what: "userfaultfd write-protect (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
            });
        }
        {
            let state = self.lock.read().await;
            state.vmas.check_mapped(addr, end)?;
            let untracked = state
                .vmas
                .overlapping(addr, end)
                .find(|v| !v.flags.contains(VmFlags::TRACKED))
                .map(|v| v.start.max(addr));
            if let Some(addr) = untracked {
                return Err(Error::NotTracked { addr });
            }
        }
        if wp {
            // WP only protects present pages: populate first.
            self.access(addr, len, Access::Read, &mut |_, _, _| {})
                .await?;
        }
        let state = self.lock.read().await;
        state.vmas.check_mapped(addr, end)?;
        let mut res = Ok(());
        for v in state.vmas.overlapping(addr, end) {
            if !v.flags.contains(VmFlags::TRACKED) {
                res = Err(Error::NotTracked {
                    addr: v.start.max(addr),
                });
                break;
            }
            let (s, e) = (v.start.max(addr), v.end.min(end));
            res = self.writeprotect_locked(&t, v, s, e, wp);
            if res.is_err() {
                break;
            }
        }
        drop(state);
        if !wp {
            // After the bits are cleared: wake API writers waiting for them.
            t.wp_changed();
        }
        res
    }

    /// (Un)protects `[s, e)` of tracked `v` one leaf at a time, with the
    /// PTE locks of the leaf held across the ioctl and the `Pte::WP` bits.
    /// Holding them closes the race where a page is zapped and refaulted
    /// between setting its bit and the ioctl (the kernel would protect the
    /// new page while our bit says writable, and an API write under its
    /// locks would block in the kernel). The ioctl never waits for a PTE
    /// lock or for us: its only wait is `EAGAIN` while the handler (which
    /// takes no PTE lock to read messages) has a REMOVE unread.
    fn writeprotect_locked(&self, t: &Tracker, v: &Vma, s: u64, e: u64, wp: bool) -> Result<()> {
        let guard = crossbeam_epoch::pin();
        let mut gpn = s / PAGE;
        let last = e / PAGE;
        let mut olds = Vec::with_capacity(PAGES_PER_LEAF as usize);
        while gpn < last {
            let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(last);
            let leaf = self.pgtable.leaf_alloc(gpn, &guard);
            olds.clear();
            for p in gpn..stop {
                olds.push(pte_lock(leaf.pte(p)));
            }
            // Merged (KSM) pages are refused: the ioctl would protect the
            // memfd mapping under them, and a later unshare or API write
            // would then block in the kernel while holding these page locks,
            // which `write_unprotect` needs (a deadlock). Undo what this call
            // already protected and say why.
            if wp && olds.iter().any(|o| Pte(*o).ksm()) {
                for (i, p) in (gpn..stop).enumerate() {
                    pte_unlock(leaf.pte(p), olds[i]);
                }
                if gpn * PAGE > s {
                    self.writeprotect_locked(t, v, s, gpn * PAGE, false)?;
                }
                return Err(Error::NotAllowed {
                    addr: gpn * PAGE,
                    reason: "write-protect of KSM-merged pages (unmerge them first)",
                });
            }
            let res = t.writeprotect(v.host_range(gpn * PAGE, stop * PAGE), wp);
            for (i, p) in (gpn..stop).enumerate() {
                let old = olds[i];
                // WP only protects present pages (no WP_UNPOPULATED).
                let new = if res.is_ok() && wp && Pte(old).present() {
                    old | Pte::WP
                } else if res.is_ok() && !wp {
                    old & !Pte::WP
                } else {
                    old
                };
                pte_unlock(leaf.pte(p), new);
            }
            res?;
            gpn = stop;
        }
        Ok(())
    }

    /// Unmaps `[addr, addr+len)` (`munmap`): holes inside are fine, as in the
    /// kernel. Zaps the pages (uncharging them); the host range is made
    /// `PROT_NONE` so direct touches fault, and a host mapping is unmapped
    /// when its last VMA goes. Page-table nodes stay until teardown.
    pub async fn munmap(&self, addr: u64, len: u64) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        // Exclusive: VMAs are removed and host mappings freed only under the
        // write lock (I-EX-1), so no reaper/ksmd reader walks a freed VMA.
        let mut state = self.lock.write().await;
        sched::point("munmap:locked").await;
        let removed = state.vmas.remove_range(addr, end);
        for vma in &removed {
            if let Some(t) = vma.region.wp_tracker() {
                // Before the zap (tracked.rs step 2): a handler COPY racing
                // us lands before the zap, which uncharges it, or fails with
                // ENOENT once the range is unregistered.
                let r = vma.host_range(vma.start, vma.end);
                t.forget(r.ptr() as usize, r.ptr() as usize + r.len());
            }
            let _ = self.notify_invalidate_start(vma.start..vma.end, true);
            let res = self.zap_range(&state, vma, vma.start, vma.end, ZapReason::Munmap);
            self.notify_invalidate_end(vma.start..vma.end);
            res?;
            if Arc::strong_count(&vma.region) > 1 {
                sys::protect(vma.host_range(vma.start, vma.end), Prot::NONE.bits())
                    .map_err(Error::host("mprotect"))?;
            }
        }
        drop(removed);
        Ok(())
    }

    /// Changes protection (`mprotect`); splits and merges VMAs.
    pub async fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        let mut state = self.lock.write().await;
        sched::point("mprotect:locked").await;
        state.vmas.check_mapped(addr, end)?;
        for v in state.vmas.overlapping(addr, end) {
            let (s, e) = (v.start.max(addr), v.end.min(end));
            sys::protect(v.host_range(s, e), prot.bits()).map_err(Error::host("mprotect"))?;
        }
        state.vmas.modify(addr, end, |v| v.prot = prot);
        Ok(())
    }

    /// `mlock`: populates (charging the budget), pins the host pages and sets
    /// `VM_LOCKED`.
    pub async fn mlock(&self, addr: u64, len: u64) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        // Populate under the read lock first (it may need to wait for room),
        // then flip the flag under the write lock.
        self.populate(addr, end).await?;
        let mut state = self.lock.write().await;
        sched::point("mlock:locked").await;
        // VM_LOCKED changes only under the exclusive lock: the reaper (a
        // reader) must never see it change mid-walk (CVE-2018-1000200).
        state.vmas.check_mapped(addr, end)?;
        // The kernel's mlock fails (ENOMEM) on PROT_NONE ranges it cannot
        // populate; refuse before pinning anything, so nothing is half-locked.
        if let Some(v) = state
            .vmas
            .overlapping(addr, end)
            .find(|v| v.prot == Prot::NONE)
        {
            return Err(Error::Protection {
                addr: v.start.max(addr),
                access: Access::Read,
            });
        }
        for v in state.vmas.overlapping(addr, end) {
            let (s, e) = (v.start.max(addr), v.end.min(end));
            sys::lock(v.host_range(s, e), true).map_err(Error::host("mlock"))?;
        }
        state
            .vmas
            .modify(addr, end, |v| v.flags = v.flags.with(VmFlags::LOCKED, true));
        Ok(())
    }

    /// `munlock`: clears `VM_LOCKED` under the exclusive lock.
    pub async fn munlock(&self, addr: u64, len: u64) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        let mut state = self.lock.write().await;
        sched::point("munlock:locked").await;
        // Exclusive, for the same reason as mlock (CVE-2018-1000200).
        state.vmas.check_mapped(addr, end)?;
        for v in state.vmas.overlapping(addr, end) {
            let (s, e) = (v.start.max(addr), v.end.min(end));
            sys::lock(v.host_range(s, e), false).map_err(Error::host("munlock"))?;
        }
        state.vmas.modify(addr, end, |v| {
            v.flags = v.flags.with(VmFlags::LOCKED, false)
        });
        Ok(())
    }

    /// `madvise`.
    pub async fn madvise(&self, addr: u64, len: u64, advice: Advice) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        match advice {
            Advice::DontNeed => {
                // Read lock, like the kernel: DONTNEED only zaps pages and
                // races with faults under the page locks.
                let state = self.lock.read().await;
                sched::point("madvise:locked").await;
                state.vmas.check_mapped(addr, end)?;
                for v in state.vmas.overlapping(addr, end) {
                    if v.flags.contains(VmFlags::LOCKED) || v.flags.contains(VmFlags::PINNED) {
                        return Err(Error::NotAllowed {
                            addr: v.start.max(addr),
                            reason: "madvise(DONTNEED) on a locked or pinned mapping",
                        });
                    }
                }
                for v in state.vmas.overlapping(addr, end) {
                    let (s, e) = (v.start.max(addr), v.end.min(end));
                    if v.is_shared() {
                        // Shared contents stay in the memfd; only this
                        // mapping's host PTEs go.
                        sys::discard(v.host_range(s, e))
                            .map_err(Error::host("madvise(DONTNEED)"))?;
                    } else {
                        self.zap_range(&state, v, s, e, ZapReason::DontNeed)?;
                    }
                }
                Ok(())
            }
            Advice::Mergeable | Advice::Unmergeable | Advice::HugePage | Advice::NoHugePage => {
                let mut state = self.lock.write().await;
                sched::point("madvise:locked").await;
                state.vmas.check_mapped(addr, end)?;
                let (flag, on) = match advice {
                    Advice::Mergeable => (VmFlags::MERGEABLE, true),
                    Advice::Unmergeable => (VmFlags::MERGEABLE, false),
                    Advice::HugePage => (VmFlags::HUGEPAGE, true),
                    _ => (VmFlags::HUGEPAGE, false),
                };
                if advice == Advice::Unmergeable {
                    // `unmerge_ksm_pages` before the flag goes, under the same
                    // write lock (the kernel's ksm_madvise order): a scanner
                    // that finds the range no longer mergeable drops its rmap
                    // items, and with them the stable pages' mappers; a page
                    // still mapping one then would read zeros once the
                    // other mappers left (issue 16's data-loss input had the
                    // unshare in a later, separate lock section).
                    self.ksm_unshare(&state, addr, end - addr)?;
                }
                if flag == VmFlags::HUGEPAGE {
                    for v in state.vmas.overlapping(addr, end) {
                        let (s, e) = (v.start.max(addr), v.end.min(end));
                        sys::set_hugepage(v.host_range(s, e), on)
                            .map_err(Error::host("madvise(HUGEPAGE)"))?;
                    }
                }
                state
                    .vmas
                    .modify(addr, end, |v| v.flags = v.flags.with(flag, on));
                if advice == Advice::Mergeable {
                    // An untracked VMA needs its write-protect registration
                    // before KSM can merge it (`ksm_wp_register`). Kept on
                    // UNMERGEABLE: harmless, and undone by munmap/exit.
                    for v in state.vmas.overlapping(addr, end) {
                        if v.ksm_wp_candidate() {
                            self.ksm_wp_register(v);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Reads guest memory into `buf`, populating untouched pages.
    pub async fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let base = buf.as_mut_ptr() as usize;
        self.access(addr, buf.len() as u64, Access::Read, &mut |host, off, n| {
            // SAFETY: the fault path holds the page locks of this window and
            // the mmap read lock, so the host range is mapped, readable and
            // not being discarded; `off + n <= buf.len()` by construction.
            unsafe {
                sys::copy_from_host(
                    host,
                    std::slice::from_raw_parts_mut((base + off as usize) as *mut u8, n as usize),
                )
            }
        })
        .await
    }

    /// Writes `data` into guest memory.
    pub async fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        let base = data.as_ptr() as usize;
        self.access(
            addr,
            data.len() as u64,
            Access::Write,
            &mut |host, off, n| {
                // SAFETY: as in `read`, for a writable range (checked above).
                unsafe {
                    sys::copy_to_host(
                        std::slice::from_raw_parts((base + off as usize) as *const u8, n as usize),
                        host,
                    )
                }
            },
        )
        .await
    }

    /// Fills `[addr, addr+len)` with `byte`.
    pub async fn fill(&self, addr: u64, len: u64, byte: u8) -> Result<()> {
        self.access(addr, len, Access::Write, &mut |host, _off, n| {
            // SAFETY: as in `write`.
            unsafe { sys::fill_host(host, n as usize, byte) }
        })
        .await
    }

    /// Does guest memory at `addr` equal `data`?
    pub async fn compare(&self, addr: u64, data: &[u8]) -> Result<bool> {
        let mut equal = true;
        let mut page = vec![0u8; 0];
        let base = data.as_ptr() as usize;
        self.access(
            addr,
            data.len() as u64,
            Access::Read,
            &mut |host, off, n| {
                page.resize(n as usize, 0);
                // SAFETY: as in `read`.
                unsafe { sys::copy_from_host(host, &mut page) };
                // SAFETY: `off + n <= data.len()` by construction of the windows.
                let want = unsafe {
                    std::slice::from_raw_parts((base + off as usize) as *const u8, n as usize)
                };
                equal &= page == want;
            },
        )
        .await?;
        Ok(equal)
    }

    /// The VMA containing `addr` (a copy of its descriptor). Its
    /// [`host_ptr`](Vma::host_ptr) is usable while this user is held.
    pub async fn find_vma(&self, addr: u64) -> Result<Vma> {
        let state = self.lock.read().await;
        state
            .vmas
            .find(addr)
            .cloned()
            .ok_or(Error::Unmapped { addr })
    }

    /// All VMAs (copies).
    pub async fn vmas(&self) -> Vec<Vma> {
        self.lock.read().await.vmas.iter().cloned().collect()
    }

    /// Host bytes resident under this mm's VMAs, by `mincore`.
    pub async fn resident_bytes(&self) -> Result<u64> {
        let state = self.lock.read().await;
        (**self).resident_bytes(&state)
    }

    // Blocking wrappers for synchronous embedders: thin shells over the
    // async protocol code (they park the thread while waiting for the lock).

    /// Blocking [`mmap`](Self::mmap).
    pub fn mmap_blocking(&self, opts: MapOptions) -> Result<u64> {
        block_on(self.mmap(opts))
    }
    /// Blocking [`munmap`](Self::munmap).
    pub fn munmap_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.munmap(addr, len))
    }
    /// Blocking [`mprotect`](Self::mprotect).
    pub fn mprotect_blocking(&self, addr: u64, len: u64, prot: Prot) -> Result<()> {
        block_on(self.mprotect(addr, len, prot))
    }
    /// Blocking [`mlock`](Self::mlock).
    pub fn mlock_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.mlock(addr, len))
    }
    /// Blocking [`munlock`](Self::munlock).
    pub fn munlock_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.munlock(addr, len))
    }
    /// Blocking [`madvise`](Self::madvise).
    pub fn madvise_blocking(&self, addr: u64, len: u64, advice: Advice) -> Result<()> {
        block_on(self.madvise(addr, len, advice))
    }
    /// Blocking [`read`](Self::read).
    pub fn read_blocking(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        block_on(self.read(addr, buf))
    }
    /// Blocking [`write`](Self::write).
    pub fn write_blocking(&self, addr: u64, data: &[u8]) -> Result<()> {
        block_on(self.write(addr, data))
    }
    /// Blocking [`fill`](Self::fill).
    pub fn fill_blocking(&self, addr: u64, len: u64, byte: u8) -> Result<()> {
        block_on(self.fill(addr, len, byte))
    }
    /// Blocking [`compare`](Self::compare).
    pub fn compare_blocking(&self, addr: u64, data: &[u8]) -> Result<bool> {
        block_on(self.compare(addr, data))
    }
    /// Blocking [`find_vma`](Self::find_vma).
    pub fn find_vma_blocking(&self, addr: u64) -> Result<Vma> {
        block_on(self.find_vma(addr))
    }
    /// Blocking [`vmas`](Self::vmas).
    pub fn vmas_blocking(&self) -> Vec<Vma> {
        block_on(self.vmas())
    }
    /// Blocking [`resident_bytes`](Self::resident_bytes).
    pub fn resident_bytes_blocking(&self) -> Result<u64> {
        block_on(self.resident_bytes())
    }
    /// Blocking [`write_protect`](Self::write_protect).
    pub fn write_protect_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.write_protect(addr, len))
    }
    /// Blocking [`write_unprotect`](Self::write_unprotect).
    pub fn write_unprotect_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.write_unprotect(addr, len))
    }
}

/// A count reference (`mm_count`): keeps the struct (id, flags, lock, an
/// empty tree) alive, never the contents. Check for exit (`users() == 0`,
/// `OOM_SKIP`, an empty tree) after taking the lock before using contents.
pub struct MmGrab {
    mm: Arc<Mm>,
}

impl std::fmt::Debug for MmGrab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MmGrab").field(&*self.mm).finish()
    }
}

impl std::ops::Deref for MmGrab {
    type Target = Mm;
    fn deref(&self) -> &Mm {
        &self.mm
    }
}

impl Clone for MmGrab {
    /// `mmgrab` from a held count.
    fn clone(&self) -> Self {
        self.mm.count.fetch_add(1, Ordering::Relaxed);
        MmGrab {
            mm: self.mm.clone(),
        }
    }
}

impl Drop for MmGrab {
    /// `mmdrop`. When this was the last count, the `Arc` released right
    /// after is the last one too, and the struct is freed here.
    fn drop(&mut self) {
        let prev = self.mm.count.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev >= 1, "mm_count underflow");
    }
}

impl MmGrab {
    /// `mmget_not_zero`: a user reference if the address space still has
    /// users; never raises `users` from 0 (I-RC-1).
    pub fn upgrade(&self) -> Option<MmUser> {
        let mut n = self.mm.users.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return None;
            }
            match self
                .mm
                .users
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(MmUser {
                        mm: Some(self.mm.clone()),
                    })
                }
                Err(cur) => n = cur,
            }
        }
    }

    /// An observer that tells when the struct has been freed.
    pub fn watch(&self) -> MmWatch {
        MmWatch(Arc::downgrade(&self.mm))
    }
}

/// Observes an mm struct without keeping it alive (tests and oracles).
#[derive(Debug, Clone)]
pub struct MmWatch(Weak<Mm>);

impl MmWatch {
    /// Has the struct been freed (count reached 0)?
    pub fn is_freed(&self) -> bool {
        self.0.strong_count() == 0
    }
}

impl Mm {
    /// `mmdrop` of the users' collective count, at the end of `__mmput`.
    fn mmdrop_users_count(&self) {
        let prev = self.count.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev >= 1, "mm_count underflow");
    }

    /// `__mmput`: the last user is gone (`users == 0`, never raised again).
    async fn mmput_last(&self) {
        debug_assert_eq!(self.users(), 0);
        sched::point("mmput:start").await;
        // ksm_exit / khugepaged_exit run before exit_mmap with users already
        // 0 (I-KSM-3): a scanner that takes the read lock after their barrier
        // sees users == 0 and leaves the mm alone.
        let hooks = lock_list(&self.exit_hooks).clone();
        for h in &hooks {
            h.exit(self).await;
        }
        sched::point("mmput:after_exit_hooks").await;
        self.exit_mmap().await;
        sched::point("mmput:before_mmdrop").await;
        self.mmdrop_users_count();
    }
}

// exit_mmap lives in exit.rs.
impl Mm {
    pub(crate) fn take_notifiers(&self) -> Vec<Arc<dyn MmNotifier>> {
        std::mem::take(&mut *lock_list(&self.notifiers))
    }

    pub(crate) fn state_take_all(state: &mut MmState) -> Vec<Vma> {
        state.vmas.take_all()
    }
}
