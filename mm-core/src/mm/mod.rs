//! `Mm` (the `mm_struct` analogue), its two reference counts, and the
//! operations on its VMAs and pages.
//!
//! One idea per file: the struct and its configuration here; the two
//! reference counts in `refs.rs`; the fault/access path in `fault.rs`; the
//! userfaultfd handler's side of a fault (`tracked/` steps 3-6, the
//! [`FaultTarget`] impl) in `tracked_fault.rs`; the zap in `zap.rs`; the syscalls (`mmap`, `munmap`, `madvise`, ...) in
//! `syscalls.rs`, their blocking shells in `blocking.rs`; secondary MMUs and
//! scanner exit hooks in `notifier.rs`. `exit_mmap` lives in `exit.rs`.

mod blocking;
mod dirty;
mod fault;
mod ksm_wp;
mod notifier;
mod refs;
mod syscalls;
mod tracked_fault;
mod zap;

pub(crate) use dirty::{present_runs, written_runs, DiffBase, DiffState};
pub use dirty::{GuestSnapshot, ResetStats};
pub use ksm_wp::prepare_all;
pub(crate) use ksm_wp::KsmMmState;
pub use notifier::{ExitHook, MmNotifier, WouldBlock};
pub use refs::{MmGrab, MmUser, MmWatch};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::flags::MmFlags;
use crate::mmap_lock::MmapLock;
use crate::pgtable::{PageTable, MAX_GPN};
use crate::sched;
use crate::sys::{self, PAGE_SIZE};
use crate::tracked::{FaultTarget, SnapshotSource, TrackedStats, Tracker, DEFAULT_FAULT_AROUND};
use crate::types::Pressure;
use crate::vma::{Prot, Vma, VmaTree};

const PAGE: u64 = PAGE_SIZE as u64;

pub use crate::types::BoxFuture;

/// What the layer above does at VMA-advice time, injected into every mm by
/// whoever creates it ([`Host::new_mm`](crate::Host::new_mm) gives KSM's,
/// `ksm::KsmHooks`), as the pressure path is (`types::Pressure`): the mm
/// never names the KSM seam.
pub(crate) trait VmaHooks: Send + Sync {
    /// `madvise(UNMERGEABLE)` of `[addr, addr + len)`, called under the
    /// mmap write lock (`state`) **before** `VM_MERGEABLE` is cleared
    /// (`unmerge_ksm_pages`, the kernel's `ksm_madvise` order): breaks the
    /// sharing of every merged page of the range.
    fn unmergeable(&self, mm: &Mm, state: &MmState, addr: u64, len: u64) -> Result<()>;
}

/// Per-mm configuration.
#[derive(Debug, Clone, Copy)]
pub struct MmConfig {
    /// First address past the guest address space (`TASK_SIZE`).
    pub va_limit: u64,
    /// Lowest address `mmap` picks when no address is given (`mmap_min_addr`).
    pub mmap_floor: u64,
    /// Open this mm's userfaultfd `UFFD_USER_MODE_ONLY` even where a full
    /// descriptor is allowed (least privilege for a runtime whose guests
    /// only touch memory from user mode, such as WASM). Without the
    /// privilege for a full one it is user-mode-only anyway
    /// ([`TrackedStats::user_mode_only`]).
    pub user_mode_only_uffd: bool,
    /// The budget is a hard cap for tracked memory too: when a direct
    /// touch finds no room after `PRESSURE_ROUNDS` runs of the pressure
    /// path, the faulting guest is killed (`Guest::kill`) and the fault
    /// answered with `SIGBUS` (contained to the thread by
    /// [`contain::install`](crate::contain::install)), instead of the
    /// default fail-open (served over budget, recorded as debt, repaid by
    /// later zaps).
    pub hard_budget: bool,
    /// Tracked regions of this mm keep a **dirty log**: they are registered
    /// with a `UFFD_FEATURE_WP_ASYNC` userfaultfd, so a write to a page
    /// protected by the last harvest only clears its protection, in the
    /// kernel, with no message (a minor fault). [`MmUser::take_dirty`]
    /// harvests the pages written since the last harvest (`PAGEMAP_SCAN`);
    /// [`MmUser::snapshot`] and [`MmUser::reset`] build on it. The
    /// synchronous write-protect is then unavailable for this mm:
    /// [`MmUser::write_protect`] and merging its memory with KSM
    /// ([`Advice::Mergeable`]) fail with [`Error::NotAllowed`]. Needs
    /// Linux 6.7 ([`Error::Unsupported`] at the first tracked `mmap`
    /// otherwise).
    pub dirty_log: bool,
}

impl Default for MmConfig {
    fn default() -> Self {
        MmConfig {
            va_limit: MAX_GPN * PAGE,
            mmap_floor: 1 << 20,
            user_mode_only_uffd: false,
            hard_budget: false,
            dirty_log: false,
        }
    }
}

/// How to map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    AnonPrivate,
    /// Shared memory backed by a memfd this mm owns (`MAP_SHARED`); never
    /// reaped (the reaper skips `VM_SHARED`). A DONTNEED drops only the
    /// mapping's host PTEs: the contents stay in the memfd, charged. Can be
    /// tracked (`MINOR` faults + `UFFDIO_CONTINUE`: `tracked/` step 10).
    SharedMemfd,
}

/// Arguments of [`MmUser::mmap`].
#[derive(Debug, Clone)]
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
    /// touches are charged (see `tracked/`). Private anonymous, or shared
    /// memfd (`tracked/` step 10: charged once when a page enters the
    /// memfd); 4 KiB pages only.
    pub tracked: bool,
    /// Fault-around window of a tracked region, in bytes: a power of two
    /// from one page to 2 MiB (default 2 MiB), clamped to the VMA.
    pub fault_around: u64,
    /// Lazy restore: the region's missing pages come from this snapshot
    /// slice instead of zeros (a tracked region of exactly the source's
    /// length; see the `snapshot` module). Nothing is read at `mmap`.
    pub source: Option<SnapshotSource>,
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
            source: None,
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

    /// Lazily restored from `source`: a tracked region of the source's
    /// length whose pages are served from the snapshot file on first touch.
    pub fn restore_from(mut self, source: SnapshotSource) -> Self {
        self.len = source.len();
        self.tracked = true;
        self.source = Some(source);
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

/// What the mmap lock guards: the VMA tree, and the capability to act on
/// it. A `&MmState` is only ever obtained by dereferencing a guard of
/// [`Mm::lock`] (an [`MmapReadGuard`](crate::MmapReadGuard) or
/// [`MmapWriteGuard`](crate::MmapWriteGuard)): the type has private fields,
/// no `Default` and no public constructor, so no crate outside mm-core can
/// forge one. It remembers its mm, and every function that takes it as the
/// proof of the lock checks that it is `self`'s ([`Error::ForeignLock`]).
/// Only mm-core changes it: the write guard has no `DerefMut` outside the
/// crate, so no caller can swap two mms' states behind their locks.
///
/// ```compile_fail
/// // Not constructible outside mm-core: no `Default` ...
/// let forged = mm_core::MmState::default();
/// ```
///
/// ```compile_fail
/// // ... and no public fields or constructor.
/// let forged = mm_core::MmState { mm_id: 1, vmas: mm_core::VmaTree::default() };
/// ```
#[derive(Debug)]
pub struct MmState {
    mm_id: u64,
    vmas: VmaTree,
}

impl MmState {
    pub(crate) fn new(mm_id: u64) -> MmState {
        MmState {
            mm_id,
            vmas: VmaTree::default(),
        }
    }

    /// The VMA tree. Empty once `exit_mmap` has run (step 11).
    pub fn vmas(&self) -> &VmaTree {
        &self.vmas
    }

    /// Id of the mm whose lock this state is behind.
    pub fn mm_id(&self) -> u64 {
        self.mm_id
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
    pub(crate) rss_shmem: AtomicU64,
    pub(crate) budget: Arc<Budget>,
    /// The pressure path (the host's reclaim + OOM killer), injected at
    /// creation: called with no lock held when a charge does not fit.
    pub(crate) pressure: Arc<dyn Pressure>,
    /// The VMA-advice hook of the layer above (KSM's unshare), injected at
    /// creation: `madvise(UNMERGEABLE)` calls it under the write lock.
    vma_hooks: &'static dyn VmaHooks,
    /// The userfaultfd tracker, created by the first tracked mmap (under
    /// the write lock) and taken by exit_mmap. Held only to clone or take.
    tracker: Mutex<Option<Arc<Tracker>>>,
    /// Bytes of present pages served over budget by a failing-open handler
    /// and not charged; repaid first by every uncharge (`tracked/` step 4).
    pub(crate) debt: AtomicU64,
    /// The write-protect registration of mergeable VMAs (`ksm_wp.rs`),
    /// read by the KSM seam.
    pub(crate) ksm: KsmMmState,
    /// Only held for push/take, never across an await.
    notifiers: Mutex<Vec<Arc<dyn MmNotifier>>>,
    /// Only held for push/clone, never across an await.
    exit_hooks: Mutex<Vec<Arc<dyn ExitHook>>>,
    /// exit_mmap has begun (set at its step 1). Not a protocol flag (the
    /// kernel has none: `ksm_test_exit` is `users == 0`); only the oracle
    /// of I-KSM-2 reads it, to catch a scanner inside a teardown.
    exit_started: AtomicBool,
    /// exit_mmap is through (set after its write unlock, step 12): what
    /// the lingering exit of a guest waits for before it clears the
    /// victim mark (`Host::prune_exited`). Not `OOM_SKIP`: a teardown of
    /// an empty tree never sets that flag (step 4, as in the kernel).
    exit_done: AtomicBool,
    config: MmConfig,
    /// What the next diff snapshot file is written against (`dirty.rs`).
    /// A leaf: held only to read or replace it, never across an await.
    pub(crate) diff: Mutex<DiffState>,
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
impl Mm {
    /// [`Error::Killed`] once the owning guest was killed
    /// ([`Error::Unstable`] once it was also reaped: that says more).
    pub(crate) fn check_not_killed(&self) -> Result<()> {
        use crate::flags::MmFlag;
        if self.flags.test(MmFlag::UNSTABLE) {
            return Err(Error::Unstable { mm_id: self.id });
        }
        if self.flags.test(MmFlag::KILLED) {
            return Err(Error::Killed { mm_id: self.id });
        }
        Ok(())
    }
}

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
        pressure: Arc<dyn Pressure>,
        vma_hooks: &'static dyn VmaHooks,
        config: MmConfig,
    ) -> MmUser {
        let config = MmConfig {
            va_limit: config.va_limit.min(MAX_GPN * PAGE) & !(PAGE - 1),
            ..config
        };
        let mm = Mm {
            id,
            name,
            users: AtomicUsize::new(1),
            // The one count all users hold together (mm_init).
            count: AtomicUsize::new(1),
            flags: MmFlags::default(),
            lock: MmapLock::new(MmState::new(id)),
            pgtable: PageTable::new(),
            rss_anon: AtomicU64::new(0),
            rss_shmem: AtomicU64::new(0),
            budget,
            pressure,
            vma_hooks,
            tracker: Mutex::new(None),
            debt: AtomicU64::new(0),
            ksm: KsmMmState::default(),
            notifiers: Mutex::new(Vec::new()),
            exit_hooks: Mutex::new(Vec::new()),
            exit_started: AtomicBool::new(false),
            exit_done: AtomicBool::new(false),
            config,
            diff: Mutex::new(DiffState::default()),
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

    /// Is exit_mmap through (every page freed, the tree empty, the write
    /// lock released)?
    pub fn exit_done(&self) -> bool {
        self.exit_done.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_exit_done(&self) {
        self.exit_done.store(true, Ordering::SeqCst);
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
}

impl Mm {
    /// Checks that `state` (the proof that the caller holds an mmap lock)
    /// is this mm's: a guard of another mm's lock proves nothing here.
    pub(crate) fn check_state(&self, state: &MmState) -> Result<()> {
        if state.mm_id == self.id {
            Ok(())
        } else {
            Err(Error::ForeignLock {
                mm_id: self.id,
                lock_mm_id: state.mm_id,
            })
        }
    }

    /// Host pages resident (by `mincore`) under every VMA; the kernel's view.
    pub fn resident_bytes(&self, state: &MmState) -> Result<u64> {
        self.check_state(state)?;
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

    /// Waits, holding no lock, until `bytes` fit the budget, running the
    /// pressure path (reclaim, OOM kill, bounded wait) as an allocation
    /// would. For callers about to charge pages outside the fault path
    /// (KSM's unmerge, `break_ksm`'s page allocation in the kernel): call
    /// it *before* taking this mm's lock, so the wait never holds a lock
    /// the victim's exit needs (I-KSM-1; see the lock-order block).
    /// Returns at once when the mm is exiting (`users == 0`): nothing of
    /// it will be charged any more.
    pub async fn reserve(&self, bytes: u64) -> Result<()> {
        loop {
            let b = &self.budget;
            if self.users() == 0 || b.limit().saturating_sub(b.charged()) >= bytes {
                return Ok(());
            }
            sched::point("ksm_reserve:pressure").await;
            if !self.pressure.relieve(bytes, None).await {
                if self.users() == 0 {
                    return Ok(());
                }
                return Err(Error::OutOfMemory {
                    requested: bytes,
                    charged: b.charged(),
                    budget: b.limit(),
                });
            }
        }
    }

    /// The tracker, if a tracked region was ever mapped.
    pub(crate) fn tracker(&self) -> Option<Arc<Tracker>> {
        lock_list(&self.tracker).clone()
    }

    /// Counters of the tracked regions, `None` if none was ever mapped.
    pub fn tracked_stats(&self) -> Option<TrackedStats> {
        self.tracker()
            .map(|t| t.stats(self.debt.load(Ordering::Relaxed)))
    }

    /// Race harness only (`sched` feature): returns once the handler's
    /// shard thread ran a whole round that started after this call (woken
    /// if it was idle), so the work of every message read before (a
    /// foreign REMOVE's clearing, a busy page's settlement once its lock
    /// is free) is done; false after a bounded wait (2 s) or with no
    /// tracker. The harness's direct touches
    /// run while every actor is stopped; this keeps the shard thread's
    /// follow-up work out of the next step too.
    #[cfg(feature = "sched")]
    pub fn tracked_round_barrier(&self) -> bool {
        self.tracker().is_some_and(|t| t.round_barrier())
    }

    /// exit_mmap: unregister every tracked range before the zap (see
    /// `tracked/` step 8).
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

impl MmUser {
    /// The tracker, started at the first tracked mmap (the only thread
    /// mm-core spawns for an mm). Called under the mmap write lock.
    pub(crate) fn tracker_or_start(&self) -> Result<Arc<Tracker>> {
        self.tracker_or_start_if(|_| true)
    }

    /// The tracker for a write-protect-only registration: a new one is only
    /// started (thread and all) if the kernel offers WP.
    pub(crate) fn tracker_or_start_wp(&self) -> Result<Arc<Tracker>> {
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
        let t = Tracker::new(
            self.id,
            self.config.user_mode_only_uffd,
            self.config.dirty_log,
        )?;
        if !usable(&t) {
            return Err(Error::Unsupported {
                what: "userfaultfd write-protect (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
            });
        }
        let mm: Weak<dyn FaultTarget> = match self.mm.as_ref() {
            Some(mm) => Arc::downgrade(mm) as Weak<Mm>,
            None => Weak::<Mm>::new(),
        };
        t.start(mm)?;
        *slot = Some(t.clone());
        Ok(t)
    }
}

impl Mm {
    pub(crate) fn state_take_all(state: &mut MmState) -> Vec<Vma> {
        state.vmas.take_all()
    }
}
