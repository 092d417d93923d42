//! Tracked regions: guest mappings registered with a userfaultfd shared by
//! the mms of one shard of the process's handler pool and served by that
//! shard's thread, so that direct touches by the embedder (vCPUs through
//! KVM, JIT code) are charged and seen.
//!
//! Files: this one holds the range registry, the [`Tracker`] itself and
//! the [`FaultTarget`] hook; `pool.rs` the pool (shards, shared
//! descriptors, the routing map, the shard threads); `handler.rs` one
//! mm's queues and round on its shard thread; `source.rs` where a lazy
//! restore's pages come from;
//! `wp.rs` write-protect (step 7); `tests.rs` the unit tests. The fault
//! resolution under the PTE locks (steps 3-6) is the mm's
//! (`mm/tracked_fault.rs`), reached through [`FaultTarget`]: this module
//! sits below `mm` and never names it.
//!
//! # The protocol
//!
//! 1. The first tracked `mmap` of an mm creates its tracker on the next
//!    shard of the pool (`pool.rs`), which opens the shard's descriptor of
//!    the mm's mode (full or user-mode-only; MISSING, WP when offered,
//!    `EVENT_REMOVE`, `EVENT_UNMAP`, `POISON`, `MINOR_SHMEM`) and starts the shard's
//!    thread if they are not open yet: the pool's threads are the only
//!    threads mm-core spawns besides the timer. No descriptor and no thread
//!    is the mm's own.
//! 2. Each tracked host mapping is routed to the mm in its shard's routing
//!    map and registered **before** it is published (no one can touch it
//!    unregistered) and entered in the range registry (host range → guest
//!    address, fault-around size) under the write lock.
//! 3. A thread touching a missing page blocks in the kernel; the handler
//!    reads the message and resolves it under the per-page locks, exactly as
//!    the access path does: lock the PTEs of the fault-around window
//!    (try-locks only, see 6; held by a guard that unlocks on unwind),
//!    re-check `UNSTABLE` once every lock of the window is held, charge the
//!    budget for every missing page of the window,
//!    `UFFDIO_COPY` each run of missing pages from a zero source (or, in a
//!    lazy restore, from the snapshot file for the pages it holds and never
//!    served: `source.rs`; in a shared region `UFFDIO_ZEROPAGE`: step 10)
//!    (this also wakes the faulter), set `PRESENT`,
//!    unlock. The access path populates
//!    tracked pages with the same ioctl under the same locks, so a page is
//!    populated and charged once, by whoever holds its lock first; the other
//!    sees `PRESENT` (or `EEXIST`) and only wakes.
//! 4. Budget exhausted: the handler keeps the fault queued and runs the
//!    pressure path (the mm's injected [`Pressure`](crate::types::Pressure) hook) as a future it polls between
//!    `poll(2)` rounds, so it keeps reading REMOVE/UNMAP messages while
//!    reclaim waits (a reaper zapping a tracked region blocks in
//!    `madvise(DONTNEED)` until its REMOVE message is read). After
//!    [`PRESSURE_ROUNDS`] rounds that free nothing it **fails open**, and
//!    stays so until a `try_charge` succeeds or a pressure run frees memory
//!    (not one pressure cycle per page): the
//!    page is served anyway, uncharged, and recorded as this mm's
//!    overcommit debt; the first pages freed from the mm later pay the debt
//!    before the budget sees them (`charged = present − debt` holds
//!    throughout). The guest keeps running over budget instead of hanging
//!    in a fault nobody can resolve; the debt is visible in
//!    [`TrackedStats::overcommit_bytes`].
//! 5. After `MMF_UNSTABLE` a fault on an empty PTE gets `UFFDIO_POISON`
//!    instead of a page: the faulting thread takes SIGBUS, the userspace
//!    `check_stable_address_space`. The reaper sets `UNSTABLE` before its
//!    first zap and zaps under the page locks, so the check under the lock
//!    sees it (same diagram as the access path in `mm.rs`).
//! 6. `madvise(DONTNEED)` on a range registered with `EVENT_REMOVE` blocks
//!    the caller until the handler has read the REMOVE message. Our own
//!    zaps hold PTE locks while they do it, so **the handler never waits for
//!    a PTE lock**: it try-locks, and a fault whose page is locked stays
//!    queued and is retried after the next round of reading messages. Our own
//!    zaps announce their range first ([`Tracker::self_zap`]), and the
//!    handler ignores REMOVE messages inside an announced range (kept as
//!    "retired" after the zap returns, until the handler's next read: the
//!    read itself lets the zapper's madvise return); a REMOVE or
//!    UNMAP from the embedder's own `madvise` / `munmap` clears and uncharges
//!    the present PTEs of the range (deferred while locked).
//!    `UFFDIO_COPY` fails with `EAGAIN` while such a message is unread: the
//!    handler drains and retries; the access path retries with backoff
//!    (it holds PTE locks, but reading a message never needs one).
//! 7. Write-protect: [`MmUser::write_protect`](crate::MmUser::write_protect)
//!    populates then protects, setting `Pte::WP` on the present pages with
//!    the PTE locks held across the ioctl; a direct writer blocks (its WP
//!    message is left unanswered) until
//!    [`MmUser::write_unprotect`](crate::MmUser::write_unprotect) lifts the
//!    protection, which wakes it. An API write never copies into a `WP`
//!    page: it drops its PTE locks and the mmap lock and waits for the WP
//!    generation to move (unprotect, a zap of the page, the handler's
//!    death), so it never blocks in the kernel holding locks.
//! 8. Teardown: `exit_mmap` unregisters every tracked range and drops its
//!    routing entries before it zaps (`users == 0`, nobody may touch the
//!    memory any more, and a zap running on a shard thread itself, from an
//!    OOM kill inside the pressure path, must not wait for a REMOVE message
//!    only that thread can read; the race the routing order closes is
//!    drawn at [`Tracker::forget`]), then, after its write unlock, detaches
//!    the mm from its shard (`Tracker::stop`, which never blocks: the shard
//!    thread drops the mm's queue at its next round). The descriptor stays
//!    open for the shard's other mms.
//! 9. A handler that panics on one mm does not hang the guest nor the
//!    shard: the panic is caught for that mm alone, the tracker is marked
//!    dead, every range of the mm is unregistered and unrouted (which wakes
//!    the blocked threads; they refault and the kernel serves them,
//!    uncharged: the regions degrade to untracked), and the shard goes on
//!    serving its other mms. Later tracked operations fail with
//!    [`Error::TrackerDead`]; the access path falls back to the untracked
//!    populate. The panic message is logged at `error` level.
//! 10. Shared memfd regions (`MapKind::SharedMemfd`, issue 15 §3). The
//!     host range is registered `MISSING | MINOR`, without WP
//!     ([`Tracker::register_shared`]; [`Error::Unsupported`] at `mmap` when
//!     the descriptor lacks `MINOR_SHMEM`, which the user-mode-only one has
//!     here). A shared page's `PRESENT` means *in the memfd and charged*: a
//!     page is charged once, when it enters the memfd. A fault on a page
//!     that is not `PRESENT` (a `MISSING` fault, or a `MINOR` one on a page
//!     some earlier fill left in the memfd uncharged) is step 3 with
//!     `UFFDIO_ZEROPAGE` for the COPY (in a shmem mapping the kernel
//!     allocates a zeroed page in the page cache and maps it), and
//!     `UFFDIO_CONTINUE` for a page the memfd already holds (ZEROPAGE says
//!     `EEXIST`): `Uffd::fill_shmem`, which the access path runs too,
//!     under the same locks. A fault on a `PRESENT` page (the memfd holds
//!     it, this mapping does not: a `MINOR` fault after a DONTNEED of the
//!     mapping, or the copy of an accessor that holds the page's lock) is
//!     answered by `UFFDIO_CONTINUE` of the run of `PRESENT` pages from it
//!     to the window's end, charging nothing and taking **no** PTE lock
//!     (`continue_present` in `mm/tracked_fault.rs`: munmap and exit
//!     unregister a range before they zap it, so the range cannot change
//!     under the ioctl unnoticed, and waiting for an accessor's lock would
//!     stall it for [`BUSY_TIMEOUT`]). A DONTNEED (ours, announced as a self
//!     zap and run under the PTE locks like a zap, or the embedder's
//!     REMOVE) keeps the pages in the memfd and charged; munmap and exit zap under the PTE locks with
//!     `fallocate(PUNCH_HOLE)`, which frees the memfd's pages, unmaps them
//!     and sends no message, and uncharge them (`rss_shmem`). An embedder's
//!     munmap of the host range (UNMAP) only drops the registration: the
//!     pages stay charged until our munmap or exit punches them. Refused by
//!     name: huge pages, a lazy restore, a dirty log, `write_protect`,
//!     `madvise(MERGEABLE)`.

use crate::types::lock;
use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::{self, HostRange, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::types::BoxFuture;
use crate::uffd::{self, Event, EventFd, Fill, Uffd};

mod handler;
mod pool;
mod source;
#[cfg(test)]
mod tests;
mod wp;

pub use source::SnapshotSource;
pub(crate) use source::{Restore, Segment};

pub(crate) use pool::Shard;
pub use pool::{set_uffd_handler_threads, uffd_handler_threads, DEFAULT_UFFD_HANDLER_THREADS};

/// Default fault-around window: one 2 MiB chunk, clamped to the VMA.
pub const DEFAULT_FAULT_AROUND: u64 = HUGE_PAGE_SIZE as u64;
/// Pressure rounds that free nothing before the handler fails open.
pub const PRESSURE_ROUNDS: u32 = 3;
/// How long a fault may find its page locked before the handler resolves
/// that one page without the lock (see `resolve_busy`). Time, not handler
/// rounds: a round can be a 1 ms poll or a burst of messages, and a
/// legitimate zapper holds the lock for one madvise of at most 2 MiB.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// [`BUSY_TIMEOUT`], or the race harness's shorter one
/// ([`set_busy_timeout`], `sched` feature only).
fn busy_timeout() -> Duration {
    #[cfg(feature = "sched")]
    {
        let us = BUSY_TIMEOUT_US.load(Ordering::Relaxed);
        if us != 0 {
            return Duration::from_micros(us);
        }
    }
    BUSY_TIMEOUT
}

#[cfg(feature = "sched")]
static BUSY_TIMEOUT_US: AtomicU64 = AtomicU64::new(0);

/// Race harness only (`sched` feature): how long a fault may find its page
/// locked before the handler serves it without the lock, for the whole
/// process (`Duration::ZERO`: the default, 100 ms). The harness's
/// `touch_vs_reap` holds a page's lock across a direct touch of it (as an
/// API accessor on another thread does during its copy) and waits for the
/// handler, so each such touch costs this long.
#[cfg(feature = "sched")]
pub fn set_busy_timeout(d: Duration) {
    BUSY_TIMEOUT_US.store(
        d.as_micros().min(u128::from(u64::MAX)) as u64,
        Ordering::Relaxed,
    );
}
/// `EAGAIN` retries of the access path before it gives up.
const API_EAGAIN_TRIES: u32 = 20_000;

/// Counters of one mm's tracked regions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackedStats {
    /// Missing-page faults resolved by the handler.
    pub faults: u64,
    /// Pages the handler populated (faulting pages plus fault-around).
    pub pages_faulted: u64,
    /// Pages the access API populated in tracked regions.
    pub pages_populated_api: u64,
    /// Pages of shared regions mapped with `UFFDIO_CONTINUE` from the
    /// memfd they were already in (a `MINOR` fault: the page was charged
    /// when it entered the memfd; step 10).
    pub pages_continued: u64,
    /// Faults answered with `UFFDIO_POISON` (SIGBUS) after `UNSTABLE`.
    pub pages_poisoned: u64,
    /// Write-protect faults seen (left blocked until unprotect).
    pub wp_faults: u64,
    /// REMOVE / UNMAP messages from the embedder's own madvise / munmap.
    pub foreign_removes: u64,
    /// `EAGAIN` retries (a REMOVE racing a COPY).
    pub eagain_retries: u64,
    /// Fault-around copies retried shorter because the window crossed a
    /// VMA boundary (`ENOENT`: an `mprotect` split the tracked range).
    pub vma_clips: u64,
    /// Pressure-path runs started by the handler.
    pub pressure_runs: u64,
    /// Pages served over budget (fail-open) so far.
    pub fail_open_pages: u64,
    /// Hard budget (`MmConfig::hard_budget`): faults that found no room
    /// after the pressure path and were answered with SIGBUS instead of
    /// being served over budget (the first one kills the guest; later
    /// ones find it killed).
    pub hard_limit_kills: u64,
    /// Current overcommit debt in bytes (served uncharged, not yet repaid).
    pub overcommit_bytes: u64,
    /// Faults resolved without the page lock after it stayed busy.
    pub busy_breaks: u64,
    /// API writes that found a write-protected page and waited for
    /// `write_unprotect` with no lock held.
    pub api_wp_waits: u64,
    /// Is the handler thread running?
    pub handler_alive: bool,
    /// Is write-protect mode available on tracked regions?
    pub write_protect: bool,
    /// Is `UFFDIO_POISON` available (Linux 6.6+)? Without it a fault after
    /// `UNSTABLE` stays blocked instead of getting SIGBUS.
    pub poison: bool,
    /// The descriptor is `UFFD_USER_MODE_ONLY` (the process may not open a
    /// full one: `vm.unprivileged_userfaultfd = 0`, no `CAP_SYS_PTRACE`, no
    /// access to `/dev/userfaultfd`). Touches from user mode (threads, JIT
    /// code, the access API) are tracked as usual; a fault the kernel takes
    /// on the process's behalf (a KVM vCPU, `O_DIRECT`, a syscall reading
    /// guest memory) on a missing page fails with `EFAULT` instead. Such a
    /// region is no KVM memslot: see the README's "Privileges".
    pub user_mode_only: bool,
}

crate::counters! {
    pub(crate) struct Counters -> TrackedStats {
        faults, pages_faulted, pages_populated_api, pages_continued, pages_poisoned, wp_faults,
        foreign_removes, eagain_retries, vma_clips, pressure_runs, fail_open_pages,
        hard_limit_kills, busy_breaks, api_wp_waits,
    }
}

/// Where the access path's pages of one run come from
/// ([`Tracker::populate_locked`]).
#[derive(Debug, Clone, Copy)]
enum PageSrc {
    /// A lazy restore's file pages, contiguous from this address.
    File(*const u8),
    /// Zeros: `UFFDIO_COPY` from the zero source for a write, the zero
    /// page for a read (private anonymous).
    Zero,
    /// A shared region's memfd (step 10): zeroed pages for its holes,
    /// `UFFDIO_CONTINUE` for the pages it holds ([`Uffd::fill_shmem`]).
    Shmem,
}

impl From<Option<*const u8>> for PageSrc {
    fn from(p: Option<*const u8>) -> PageSrc {
        p.map_or(PageSrc::Zero, PageSrc::File)
    }
}

/// One registered host range.
#[derive(Debug, Clone)]
pub(crate) struct Range {
    pub(crate) host_end: usize,
    /// Guest address of the range's first host byte.
    pub(crate) guest_start: u64,
    pub(crate) fault_around: u64,
    /// A lazy restore: where missing pages come from (`source.rs`); `None`
    /// for the zero source.
    pub(crate) restore: Option<Arc<Restore>>,
    /// The restore's page index of the range's first page (a range split by
    /// a partial unmap keeps its restore, from a later page).
    pub(crate) src_first: usize,
    /// Registered on the tracker's quiet descriptor ([`Tracker::quiet`]):
    /// an untracked mergeable region (write-protect only, no events).
    pub(crate) quiet: bool,
    /// A shared memfd-backed region (`MISSING | MINOR`, step 10): a page
    /// is charged when it enters the memfd, and a discard of the mapping
    /// (DONTNEED) keeps it there, charged.
    pub(crate) shared: bool,
}

impl Range {
    /// The restore's page index of host address `host` of this range
    /// (which starts at host address `start`).
    pub(crate) fn src_index(&self, start: usize, host: usize) -> usize {
        self.src_first + (host - start) / PAGE_SIZE
    }
}

/// The per-mm userfaultfd state shared by the handler, the access path and
/// the tracked host regions. The descriptor and the handler thread are not
/// the mm's: they belong to one shard of the process's handler pool
/// (`pool.rs`), shared with the other mms of that shard and mode.
pub(crate) struct Tracker {
    mm_id: u64,
    /// This tracker, for the routing entries it enters in its shard.
    me: Weak<Tracker>,
    /// The pool shard (handler thread, routing map) serving this mm.
    shard: Arc<Shard>,
    /// The shard's descriptor of this mm's mode (full or user-mode-only),
    /// shared with every other mm of the shard in that mode. Once `dead`,
    /// no ioctl goes through it on this tracker's behalf (`with_uffd`
    /// returns `EBADF`, as the closed per-mm descriptor did).
    uffd: Arc<Uffd>,
    /// The shard's quiet descriptor (write-protect only, no REMOVE/UNMAP
    /// messages), opened by the first write-protect-only registration of
    /// an untracked mergeable region (`register_wp_anon`). Every ioctl on a
    /// range goes through the descriptor the range is registered with
    /// ([`Tracker::with_uffd_at`]): a wake or unprotect through the other
    /// one would never wake the writers blocked on it.
    quiet: OnceLock<Arc<Uffd>>,
    wp: bool,
    /// The descriptor is `WP_ASYNC` and ranges are registered for WP: the
    /// dirty log of `MmConfig::dirty_log` (mm/dirty.rs).
    wp_async: bool,
    /// Write-protect also works on memfd mappings (KSM's merged pages).
    wp_shmem: bool,
    /// `MINOR` faults on shmem (`UFFD_FEATURE_MINOR_SHMEM`): tracked shared
    /// regions can be registered (step 10).
    minor_shmem: bool,
    pub(crate) poison: bool,
    /// `UFFD_USER_MODE_ONLY`: kernel-mode faults never reach the handler.
    user_mode_only: bool,
    stop: AtomicBool,
    dead: AtomicBool,
    /// The mm the handler resolves faults on (set once by `start`).
    target: OnceLock<Weak<dyn FaultTarget>>,
    /// Pressure runs in a row that freed nothing (fail-open at
    /// [`PRESSURE_ROUNDS`], step 4). Only the shard thread writes it; it
    /// lives here, not in the shard's per-mm queue, because the queue is
    /// dropped whenever the mm has nothing pending.
    failed_rounds: AtomicU32,
    /// Host start → range. Leaf lock: held only to insert, remove or copy
    /// out an entry, or to mark a lazy restore's pages served
    /// ([`Tracker::discarded`]); nothing is waited for while it is held.
    /// Lazy restores take it under PTE locks (the access path's
    /// `populate_locked`, a zap's `discarded`, the handler's poisoning of
    /// a lost page); no holder ever takes a PTE lock, so that order is the
    /// only one.
    ranges: Mutex<BTreeMap<usize, Range>>,
    /// Host ranges our own zaps are discarding right now, and those that
    /// finished since the handler's last read (step 6). Leaf lock, taken
    /// under PTE locks by the zapper and alone by the handler.
    self_zaps: Mutex<SelfZaps>,
    /// Bumped (then `wp_event` notified) whenever `Pte::WP` bits are
    /// cleared: an API writer that found a write-protected page waits for
    /// it with no lock held (step 7).
    wp_gen: AtomicU64,
    wp_event: event_listener::Event,
    pub(crate) counters: Counters,
    #[cfg(test)]
    pub(crate) panic_next_fault: AtomicBool,
    /// Test hook: panic in `tracked_fault` with the window locked and
    /// charged.
    #[cfg(test)]
    pub(crate) panic_after_lock: AtomicBool,
    /// Test hook: set `UNSTABLE` in `tracked_fault` after the faulting page
    /// is locked and before the rest of the window is (a reaper racing).
    #[cfg(test)]
    pub(crate) unstable_after_first_lock: AtomicBool,
    /// Test hook: after reading a REMOVE, wait until the zapper has popped
    /// its `self_zap` entry before classifying the message.
    #[cfg(test)]
    pub(crate) hold_after_read: AtomicBool,
    /// Test hook: the next `populate_locked` fails.
    #[cfg(test)]
    pub(crate) fail_next_populate: AtomicBool,
}

/// Our own zaps' host ranges (step 6).
#[derive(Debug, Default)]
struct SelfZaps {
    /// Zaps in progress.
    live: Vec<(usize, usize)>,
    /// Zaps that ended since the handler last started a read, with the
    /// shard's read generation at their end. A zapper's madvise returns as
    /// soon as the handler has *read* its REMOVE, so it can pop its entry
    /// before the handler looks the message up; keeping popped entries
    /// until the next read closes that race (without it our own REMOVE is
    /// taken as foreign and uncharges pages a fault re-populated after our
    /// zap). The handler serves many mms from one descriptor, so instead
    /// of clearing every mm's list before each read it bumps the shard's
    /// generation: an entry retired under an older generation is stale.
    retired: Vec<(usize, usize, u64)>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("mm_id", &self.mm_id)
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

/// A 2 MiB read-only anonymous mapping never written: every page reads as
/// the zero page, so a COPY from it costs one cache-hot 4 KiB source page.
pub(crate) fn zero_source() -> Result<*const u8> {
    static ZERO: OnceLock<usize> = OnceLock::new();
    if let Some(p) = ZERO.get() {
        return Ok(*p as *const u8);
    }
    let p = sys::map_anon(HUGE_PAGE_SIZE, PAGE_SIZE, (true, false, false))
        .map_err(Error::host("mmap(zero source)"))?;
    // Two racing initialisers: the loser's mapping stays unused (2 MiB of
    // address space, no memory), never unmapped because it is not shared.
    Ok(*ZERO.get_or_init(|| p.as_ptr() as usize) as *const u8)
}

/// What resolving one fault came to.
pub(crate) enum Outcome {
    /// Served after a successful `try_charge` of the missing pages.
    Charged,
    /// Served without a new charge (refault of a charged page, poison,
    /// fail-open, range gone).
    Served,
    /// Served without the page lock (`resolve_busy`); to be settled.
    Unlocked,
    /// A page lock of the faulting page is held (a zap or an accessor).
    Busy,
    /// The budget cannot cover `bytes`.
    NeedMemory(u64),
}

/// The address space the handler resolves faults on, injected by whoever
/// starts the tracker (the [`Mm`](crate::Mm) that owns it, held weakly),
/// as the pressure path is injected into the mm (`types::Pressure`): the
/// tracker never names the mm. The fault logic under the PTE locks
/// (steps 3-6) is the mm's (`mm/tracked_fault.rs`); the handler thread
/// (`handler.rs`) only queues, orders and retries.
pub(crate) trait FaultTarget: Send + Sync {
    /// Step 3: resolves a missing-page fault at host address `addr`
    /// (`force`: the page stayed locked for [`BUSY_TIMEOUT`]).
    fn resolve(&self, t: &Tracker, addr: usize, fail_open: bool, force: bool) -> Outcome;

    /// Accounts a page served without its lock ([`Outcome::Unlocked`]);
    /// `false` while the page is still locked (retry next round).
    fn settle(&self, t: &Tracker, addr: usize) -> bool;

    /// The embedder discarded `[start, end)` itself (REMOVE / UNMAP): clear
    /// and uncharge the present PTEs that can be locked; push the rest.
    fn forget(&self, t: &Tracker, start: usize, end: usize, left: &mut Vec<(usize, usize)>);

    /// The pressure path for `bytes` (step 4), as a future the handler
    /// polls between rounds with no lock held; true when the charge
    /// should be retried.
    fn pressure(&self, bytes: u64) -> BoxFuture<'static, bool>;
}

impl Tracker {
    /// Opens the descriptor (step 1). The handler is started by
    /// [`Tracker::start`].
    /// `user_mode_only`: ask for `UFFD_USER_MODE_ONLY` even where a full
    /// descriptor is allowed.
    /// `dirty_log`: open the shard's `WP_ASYNC` descriptor
    /// ([`Error::Unsupported`] where the kernel lacks it); its write
    /// protection is a dirty log, not a barrier, so [`Tracker::wp`] is false.
    pub(crate) fn new(mm_id: u64, user_mode_only: bool, dirty_log: bool) -> Result<Arc<Tracker>> {
        let shard = pool::pick()?;
        let u = shard
            .uffd(user_mode_only, dirty_log)
            .map_err(Error::host("userfaultfd"))?;
        let wp_async =
            dirty_log && u.has(uffd::feature::WP_ASYNC) && u.has(uffd::feature::PAGEFAULT_FLAG_WP);
        if dirty_log && !wp_async {
            return Err(Error::Unsupported {
                what: "a dirty log (UFFD_FEATURE_WP_ASYNC, Linux 6.7)",
            });
        }
        let wp = !dirty_log && u.has(uffd::feature::PAGEFAULT_FLAG_WP);
        let wp_shmem = wp && u.has(uffd::feature::WP_HUGETLBFS_SHMEM);
        let poison = u.has(uffd::feature::POISON);
        let minor_shmem = u.has(uffd::feature::MINOR_SHMEM);
        let user_mode_only = u.user_mode_only();
        if user_mode_only {
            tracing::info!(target: "mm_core::tracked", mm_id, "userfaultfd is user-mode-only here (no privilege for a full descriptor): faults the kernel takes on the guest's behalf (KVM, O_DIRECT) get EFAULT");
        }
        Ok(Arc::new_cyclic(|me| Tracker {
            mm_id,
            me: me.clone(),
            shard,
            uffd: u,
            quiet: OnceLock::new(),
            wp,
            wp_async,
            wp_shmem,
            minor_shmem,
            poison,
            user_mode_only,
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            target: OnceLock::new(),
            failed_rounds: AtomicU32::new(0),
            ranges: Mutex::new(BTreeMap::new()),
            self_zaps: Mutex::new(SelfZaps::default()),
            wp_gen: AtomicU64::new(0),
            wp_event: event_listener::Event::new(),
            counters: Counters::default(),
            #[cfg(test)]
            panic_next_fault: AtomicBool::new(false),
            #[cfg(test)]
            panic_after_lock: AtomicBool::new(false),
            #[cfg(test)]
            unstable_after_first_lock: AtomicBool::new(false),
            #[cfg(test)]
            hold_after_read: AtomicBool::new(false),
            #[cfg(test)]
            fail_next_populate: AtomicBool::new(false),
        }))
    }

    /// Hands the tracker to its shard's handler thread for `mm` (held
    /// weakly: the handler drops the mm's queue when the mm is gone),
    /// starting the thread if this is the shard's first tracker.
    pub(crate) fn start(self: &Arc<Self>, mm: Weak<dyn FaultTarget>) -> Result<()> {
        let _ = self.target.set(mm);
        self.shard.ensure_thread()
    }

    /// Runs an ioctl on the shared descriptor on this mm's behalf;
    /// `EBADF` once the tracker is dead (step 9).
    pub(crate) fn with_uffd<R>(
        &self,
        f: impl FnOnce(&Uffd) -> std::io::Result<R>,
    ) -> std::io::Result<R> {
        if self.is_dead() {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        f(&self.uffd)
    }

    /// Runs an ioctl on the descriptor that host address `addr` is
    /// registered with: the quiet one for an untracked mergeable region,
    /// else the shared one. `EBADF` once the tracker is dead.
    pub(crate) fn with_uffd_at<R>(
        &self,
        addr: usize,
        f: impl FnOnce(&Uffd) -> std::io::Result<R>,
    ) -> std::io::Result<R> {
        if self.is_dead() {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        f(self.uffd_at(addr))
    }

    /// The descriptor `addr` is registered with (see `with_uffd_at`).
    fn uffd_at(&self, addr: usize) -> &Uffd {
        let quiet = {
            let ranges = lock(&self.ranges);
            ranges
                .range(..=addr)
                .next_back()
                .is_some_and(|(_, r)| addr < r.host_end && r.quiet)
        };
        match self.quiet.get() {
            Some(q) if quiet => q,
            _ => &self.uffd,
        }
    }

    /// Is host address `addr` in a range registered on the quiet
    /// descriptor?
    pub(crate) fn is_quiet(&self, addr: usize) -> bool {
        self.quiet
            .get()
            .is_some_and(|q| std::ptr::eq(self.uffd_at(addr), &**q))
    }

    /// The quiet descriptor, opened on first use; `None` when the kernel
    /// gives it no write-protect (the shared descriptor serves then, with
    /// its messages).
    pub(super) fn quiet(&self) -> Option<&Arc<Uffd>> {
        if let Some(q) = self.quiet.get() {
            return Some(q);
        }
        let q = self.shard.quiet_uffd(self.user_mode_only).ok()?;
        if !q.has(uffd::feature::PAGEFAULT_FLAG_WP) {
            return None;
        }
        Some(self.quiet.get_or_init(|| q))
    }

    /// The mm the handler resolves this tracker's faults on.
    fn target(&self) -> Option<Arc<dyn FaultTarget>> {
        self.target.get().and_then(Weak::upgrade)
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Is synchronous write-protect available (a write to a protected page
    /// blocks until unprotected: `write_protect`, KSM's merge window)?
    pub(crate) fn wp(&self) -> bool {
        self.wp
    }

    /// Is this the dirty log's descriptor (`WP_ASYNC`: protection only
    /// records writes)?
    pub(crate) fn wp_async(&self) -> bool {
        self.wp_async
    }

    /// Registers a fresh, unpublished host mapping (step 2).
    pub(crate) fn register(&self, r: HostRange) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        let mode = uffd::mode::MISSING
            | if self.wp || self.wp_async {
                uffd::mode::WP
            } else {
                0
            };
        self.register_routed(r, mode, "UFFDIO_REGISTER")
    }

    /// Registers a fresh, unpublished shared memfd mapping (step 10) for
    /// `MISSING | MINOR` faults: a page missing from the memfd and a page
    /// in the memfd but not mapped here both reach the handler. No WP:
    /// write-protect and the dirty log are refused on shared regions.
    /// [`Error::Unsupported`] where the descriptor has no `MINOR_SHMEM`.
    pub(crate) fn register_shared(&self, r: HostRange) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        if !self.minor_shmem {
            return Err(Error::Unsupported {
                what: "userfaultfd minor faults on shmem (UFFD_FEATURE_MINOR_SHMEM, Linux 5.14) for a tracked shared region",
            });
        }
        let mode = uffd::mode::MISSING | uffd::mode::MINOR;
        self.register_routed(r, mode, "UFFDIO_REGISTER(MISSING|MINOR)")
    }

    /// Enters the routing entry of `r` in the shard, **then** registers
    /// it: a message from a registered range always finds its mm (an
    /// unrouted fault would only be woken to refault, an unrouted REMOVE
    /// lost). A failed registration takes the entry back out.
    fn register_routed(&self, r: HostRange, mode: u64, op: &'static str) -> Result<()> {
        let u = self.uffd_at(r.ptr() as usize);
        self.register_routed_on(u, r, mode, op)
    }

    /// `register_routed` on descriptor `u` (the quiet one for a new
    /// write-protect-only registration, not yet in the registry).
    pub(super) fn register_routed_on(
        &self,
        u: &Uffd,
        r: HostRange,
        mode: u64,
        op: &'static str,
    ) -> Result<()> {
        let (s, e) = (r.ptr() as usize, r.ptr() as usize + r.len());
        let added = self.shard.route(s, e, &self.me);
        let res = if self.is_dead() {
            Err(std::io::Error::from_raw_os_error(libc::EBADF))
        } else {
            u.register(r, mode)
        };
        if let Err(err) = res {
            if added {
                self.shard.unroute(s, e, &self.me);
            }
            return Err(Error::host(op)(err));
        }
        Ok(())
    }

    /// Enters a registered range in the registry, under the mmap write lock
    /// (`restore`: its missing pages come from a snapshot, `source.rs`;
    /// `shared`: a memfd-backed region, step 10).
    pub(crate) fn add_range(
        &self,
        host: usize,
        len: usize,
        guest: u64,
        fault_around: u64,
        restore: Option<Arc<Restore>>,
        shared: bool,
    ) {
        lock(&self.ranges).insert(
            host,
            Range {
                host_end: host + len,
                guest_start: guest,
                fault_around,
                restore,
                src_first: 0,
                quiet: false,
                shared,
            },
        );
    }

    /// Enters an untracked mergeable region registered by
    /// [`Tracker::register_wp_anon`] in the registry, on the descriptor that
    /// registration used (the quiet one when the kernel gave it WP).
    pub(crate) fn add_wp_range(&self, host: usize, len: usize, guest: u64) {
        let quiet = self.quiet.get().is_some();
        lock(&self.ranges).insert(
            host,
            Range {
                host_end: host + len,
                guest_start: guest,
                fault_around: PAGE_SIZE as u64,
                restore: None,
                src_first: 0,
                quiet,
                shared: false,
            },
        );
    }

    /// `[start, end)` was discarded (our zap, under its PTE locks, or the
    /// embedder's REMOVE as the handler reads it): its pages of a lazy
    /// restore are served from now on, so they refault as zeros, as a
    /// discarded anonymous page does (`source.rs`).
    pub(crate) fn discarded(&self, start: usize, end: usize) {
        let ranges = lock(&self.ranges);
        for (s, r) in ranges.range(..end) {
            if r.host_end <= start {
                continue;
            }
            if let Some(rs) = &r.restore {
                let (a, b) = (start.max(*s), end.min(r.host_end));
                rs.mark_served(r.src_index(*s, a), r.src_index(*s, b));
            }
        }
    }

    /// Removes `[start, end)` from the registry (splitting entries),
    /// unregisters it and drops its routing entries. Callers: munmap
    /// (write lock, **before** its zap, so a COPY racing it either lands
    /// before the zap, which then uncharges it, or fails with ENOENT), a
    /// region's drop (before its munmap), and exit_mmap (before its zap).
    ///
    /// The routing entry goes before the memory does, because the
    /// descriptor and the routing map are shared by every mm of the shard:
    ///
    /// ```text
    /// guest A exits (routing entry kept)  | guest B
    /// unregister [x, x+len), munmap it    |
    ///                                     | mmap gets [x, x+len) back,
    ///                                     | registers it on the same uffd
    /// handler reads B's fault at x:       |
    /// routed to A (stale entry), A's      |
    /// registry has no range: wake only    | refaults forever; B's REMOVE
    ///                                     | messages uncharge nothing
    /// ```
    ///
    /// A's entry is dropped here, before `HostRegion::drop` unmaps the
    /// range, so the address can only be reused once it routes to nobody.
    ///
    /// And the entry's drop waits for the messages already read (pool
    /// point 9), because the shard looks a message up after reading it:
    ///
    /// ```text
    /// shard thread                 | guest A            | guest B
    /// reads A's UNMAP (a merge's   |                    |
    /// own remap, or the embedder's | mmap returns;      |
    /// REMOVE) ... preempted        | exit: forget,      |
    ///                              | munmap [x, x+len)  |
    ///                              |                    | mmap gets x back,
    ///                              |                    | routes, fills
    /// looks x up: B. Foreign to B: |                    |
    /// B's PTEs cleared, uncharged, | registration dropped while B's pages
    /// stay in the host (`ksm_vs_reaper`, issue 16: "absent" pages)
    /// ```
    pub(crate) fn forget(&self, start: usize, end: usize) {
        self.forget_unregistering(start, end, true);
    }

    /// `forget`; `unregister_quiet: false` leaves a quiet range registered
    /// (exit_mmap: its zap maps over it or its region is unmapped, which
    /// drops the registration in the same kernel walk, and a quiet range
    /// sends no message meanwhile).
    fn forget_unregistering(&self, start: usize, end: usize, unregister_quiet: bool) {
        // Read before the registry forgets it: which descriptor the
        // range is registered with (a region is one or the other).
        let quiet = self.is_quiet(start);
        self.forget_registry(start, end);
        // Before the range can be unmapped and reused by another mapping.
        crate::contain::unregister_overlapping(start, end);
        // Unregistering wakes every thread blocked in the range; they
        // refault and the kernel serves them (or SIGSEGV: munmap makes the
        // range PROT_NONE). A dead tracker has nothing registered.
        let _ = self.with_uffd(|u| match self.quiet.get() {
            Some(_) if quiet && !unregister_quiet => Ok(()),
            Some(q) if quiet => q.unregister(start, end - start),
            _ => u.unregister(start, end - start),
        });
        // After the unregister: a message read between the two is routed
        // to us and finds no range in our registry (the faulter is woken).
        self.shard.unroute(start, end, &self.me);
        // Before the range can be unmapped and mapped again (pool point 9):
        // a message the shard read before the unroute but has not looked
        // up yet must not be routed to the next mm at these addresses.
        self.shard.route_barrier();
    }

    fn forget_registry(&self, start: usize, end: usize) {
        let mut ranges = lock(&self.ranges);
        let hits: Vec<(usize, Range)> = ranges
            .range(..end)
            .filter(|(s, r)| **s < end && r.host_end > start)
            .map(|(s, r)| (*s, r.clone()))
            .collect();
        for (s, r) in hits {
            ranges.remove(&s);
            if s < start {
                ranges.insert(
                    s,
                    Range {
                        host_end: start,
                        ..r.clone()
                    },
                );
            }
            if r.host_end > end {
                ranges.insert(
                    end,
                    Range {
                        guest_start: r.guest_start + (end - s) as u64,
                        src_first: r.src_index(s, end),
                        ..r
                    },
                );
            }
        }
    }

    /// Unregisters every range (exit_mmap, step 8).
    pub(crate) fn forget_all(&self) {
        let all: Vec<(usize, usize)> = lock(&self.ranges)
            .iter()
            .map(|(s, r)| (*s, r.host_end))
            .collect();
        for (s, e) in all {
            self.forget_unregistering(s, e, false);
        }
    }

    pub(crate) fn lookup(&self, addr: usize) -> Option<(usize, Range)> {
        let ranges = lock(&self.ranges);
        let (s, r) = ranges.range(..=addr).next_back()?;
        (addr < r.host_end).then(|| (*s, r.clone()))
    }

    /// Is host address `addr` in a shared (memfd) range (step 10)?
    pub(crate) fn is_shared(&self, addr: usize) -> bool {
        self.lookup(addr).is_some_and(|(_, r)| r.shared)
    }

    /// Runs `f` (a discard of `[start, end)`) announced as our own zap, so
    /// the handler ignores the REMOVE message it produces (step 6).
    pub(crate) fn self_zap<R>(&self, start: usize, end: usize, f: impl FnOnce() -> R) -> R {
        if self.is_quiet(start) {
            // No message comes from a quiet range: nothing to announce (an
            // entry would stay in `retired` until a read that may never come).
            return f();
        }
        lock(&self.self_zaps).live.push((start, end));
        let r = f();
        let gen = self.shard.read_gen();
        let mut z = lock(&self.self_zaps);
        if let Some(i) = z.live.iter().position(|x| *x == (start, end)) {
            z.live.swap_remove(i);
        }
        // Kept until the handler's next read: it may have read our REMOVE
        // (which let madvise return) and not looked it up yet. Entries of
        // older generations are stale (their REMOVE was read before the
        // current read started): prune them here.
        z.retired.retain(|&(_, _, g)| g >= gen);
        z.retired.push((start, end, gen));
        r
    }

    fn is_self_zap(&self, start: usize, end: usize) -> bool {
        // The generation of the read that returned this message: a zap
        // that ended before that read started had its REMOVE read earlier.
        let gen = self.shard.read_gen();
        let z = lock(&self.self_zaps);
        z.live.iter().any(|&(s, e)| s <= start && end <= e)
            || z.retired
                .iter()
                .any(|&(s, e, g)| g >= gen && s <= start && end <= e)
    }

    /// Wakes the threads blocked on `r` (a KSM merge, after the remap).
    pub(crate) fn wake_range(&self, r: HostRange) -> Result<()> {
        self.with_uffd_at(r.ptr() as usize, |u| u.wake(r.ptr() as usize, r.len()))
            .map_err(Error::host("UFFDIO_WAKE"))
    }

    /// Populates the run `[host, host + n pages)` for the access path, under
    /// the caller's PTE locks; sets `done[i]` for each page now present
    /// (populated here or found present: `EEXIST`). Retries `EAGAIN` with
    /// backoff (step 6). Returns `Ok(false)` when the tracker is dead and
    /// the caller must populate the untracked way. In a lazy restore each
    /// page comes from where [`Restore::data`] says: the snapshot's pages
    /// are copied from the file (also for a read: no zero page where the
    /// snapshot has data), the others as in any tracked region.
    pub(crate) fn populate_locked(
        &self,
        host: usize,
        done: &mut [bool],
        write: bool,
    ) -> Result<bool> {
        #[cfg(test)]
        if self.fail_next_populate.swap(false, Ordering::SeqCst) {
            return Err(Error::Host {
                op: "UFFDIO_COPY",
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        let n = done.len();
        let found = self.lookup(host);
        let shared = found.as_ref().is_some_and(|(_, r)| r.shared);
        if shared && found.as_ref().is_some_and(|(_, r)| r.restore.is_none()) {
            // Step 10: zeroed memfd pages (ZEROPAGE), CONTINUE for a page
            // the memfd already holds; the same fill as the handler's.
            return self.populate_api(host, done, PageSrc::Shmem, write);
        }
        // Where a restore has no data: zeros, in the memfd for a shared one.
        let empty = if shared {
            PageSrc::Shmem
        } else {
            PageSrc::Zero
        };
        let restore = found.and_then(|(s, r)| {
            Some((
                r.src_index(s, host),
                r.guest_start + (host - s) as u64,
                r.restore?,
            ))
        });
        let Some((first, guest, rs)) = restore else {
            return self.populate_api(host, done, empty, write);
        };
        let mut i = 0;
        while i < n {
            let data = rs.data(first + i).is_some();
            let j = rs.run_end(first + i, first + n) - first;
            let at = host + i * PAGE_SIZE;
            if data {
                let src = rs.data(first + i);
                let res = self.populate_api(at, &mut done[i..j], PageSrc::from(src), write);
                for k in (i..j).filter(|&k| done[k]) {
                    rs.mark_served(first + k, first + k + 1);
                }
                rs.release(first + i, first + j);
                match res {
                    Ok(true) => {}
                    // Never zeros where the snapshot has data: the regions
                    // degraded to untracked (step 9) cannot be restored.
                    Ok(false) => return Err(Error::TrackerDead { mm_id: self.mm_id }),
                    Err(Error::Host { source, .. })
                        if source.raw_os_error() == Some(libc::EFAULT) =>
                    {
                        let lost = (i..j).find(|&k| !done[k]).unwrap_or(i);
                        return Err(Error::Snapshot {
                            path: rs.path(first + lost).to_path_buf(),
                            source: crate::error::SnapshotError::DataLost {
                                addr: guest + (lost * PAGE_SIZE) as u64,
                            },
                        });
                    }
                    Err(e) => return Err(e),
                }
            } else if !self.populate_api(at, &mut done[i..j], empty, write)? {
                return Ok(false);
            }
            i = j;
        }
        Ok(true)
    }

    /// One run of [`Tracker::populate_locked`] from one source (`src`).
    fn populate_api(
        &self,
        host: usize,
        done: &mut [bool],
        src: PageSrc,
        write: bool,
    ) -> Result<bool> {
        let zero = zero_source()?;
        let n = done.len();
        let mut i = 0;
        let mut tries = 0u32;
        while i < n {
            let at = host + i * PAGE_SIZE;
            let len = (n - i) * PAGE_SIZE;
            let res = self.with_uffd(|u| match src {
                // The file pages of the run are contiguous (`source.rs`).
                PageSrc::File(p) => u.copy(at, p.wrapping_add(i * PAGE_SIZE), len, true),
                PageSrc::Zero if write => u.copy(at, zero, len, true),
                PageSrc::Zero => u.zeropage(at, len),
                PageSrc::Shmem => u.fill_shmem(at, len, true, &mut 0),
            });
            match res {
                Ok(Fill::Done) => {
                    done[i..].iter_mut().for_each(|d| *d = true);
                    i = n;
                }
                Ok(Fill::Exists { done: b }) => {
                    let k = b / PAGE_SIZE;
                    done[i..=i + k].iter_mut().for_each(|d| *d = true);
                    i += k + 1;
                }
                Ok(Fill::Again { done: b }) => {
                    let k = b / PAGE_SIZE;
                    done[i..i + k].iter_mut().for_each(|d| *d = true);
                    i += k;
                    tries += 1;
                    self.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
                    if tries > API_EAGAIN_TRIES {
                        return Err(Error::Host {
                            op: "UFFDIO_COPY",
                            source: std::io::Error::from_raw_os_error(libc::EAGAIN),
                        });
                    }
                    // The handler reads the pending REMOVE without any page
                    // lock; give it the CPU (2 cores), then back off.
                    if tries < 64 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                }
                Err(_) if self.is_dead() => return Ok(false),
                Err(e) => {
                    return Err(Error::Host {
                        op: match src {
                            PageSrc::Shmem => "UFFDIO_ZEROPAGE/CONTINUE (shmem)",
                            _ => "UFFDIO_COPY",
                        },
                        source: e,
                    })
                }
            }
        }
        let pages = done.iter().filter(|d| **d).count() as u64;
        self.counters
            .pages_populated_api
            .fetch_add(pages, Ordering::Relaxed);
        Ok(true)
    }

    /// The descriptor is `UFFD_USER_MODE_ONLY`.
    pub(crate) fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// [`Mm::tracked_round_barrier`](crate::Mm::tracked_round_barrier):
    /// a whole round of the shard starts and ends after this call, seen
    /// as its read generation moving two past the one current now (a
    /// round bumps it, reads, routes and serves every mm, then the next
    /// round bumps it again: `pool.rs`). Woken each time, as an idle shard
    /// sleeps in `poll`.
    #[cfg(feature = "sched")]
    pub(crate) fn round_barrier(&self) -> bool {
        let g = self.shard.read_gen();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.shard.read_gen() <= g + 1 {
            if Instant::now() >= deadline {
                return false;
            }
            self.shard.wake();
            std::thread::sleep(Duration::from_micros(20));
        }
        true
    }

    pub(crate) fn stats(&self, debt: u64) -> TrackedStats {
        self.counters.snapshot(TrackedStats {
            overcommit_bytes: debt,
            handler_alive: !self.is_dead() && !self.stop.load(Ordering::SeqCst),
            write_protect: self.wp,
            poison: self.poison,
            user_mode_only: self.user_mode_only,
            ..TrackedStats::default()
        })
    }

    /// Detaches the mm from its shard (exit_mmap, after its write
    /// unlock): the shard thread drops the mm's queue (and any pressure
    /// future) at its next round. Nothing is joined: the thread serves
    /// other mms, and every range was unregistered and unrouted already
    /// (step 8), so a fault still queued for this mm only finds no range
    /// and is woken. Never blocks, so it is safe from the handler thread
    /// itself (an OOM kill inside the pressure path ran the teardown).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shard.wake();
    }

    /// Step 9: the handler panicked on this mm. Unregister every range of
    /// the mm and drop its routing entries; the shared descriptor stays
    /// open for the shard's other mms.
    fn die(&self, why: &str) {
        tracing::error!(target: "mm_core::tracked", mm_id = self.mm_id, why, "userfaultfd handler died; tracked regions degrade to untracked");
        self.dead.store(true, Ordering::SeqCst);
        // Every registration of this mm has a routing entry (tracked,
        // write-protect-only and KSM merged ranges alike): unregistering
        // them wakes the blocked threads, which refault and are served by
        // the kernel. A message already queued for them is read by the
        // shard and finds a dead tracker (dropped).
        for (s, e) in self.shard.routes_of(&self.me) {
            let _ = self.uffd_at(s).unregister(s, e - s);
            self.shard.unroute(s, e, &self.me);
        }
        // API writers waiting for an unprotect: nobody will unprotect now,
        // and unregistering lifted the protection (step 9).
        self.wp_changed();
    }
}
