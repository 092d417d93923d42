//! Tracked regions: guest mappings registered with a userfaultfd that the mm
//! owns and serves from one handler thread, so that direct touches by the
//! embedder (vCPUs through KVM, JIT code) are charged and seen.
//!
//! # The protocol
//!
//! 1. The first tracked `mmap` of an mm opens its userfaultfd (MISSING, WP
//!    when offered, `EVENT_REMOVE`, `EVENT_UNMAP`, `POISON`) and starts the
//!    handler thread: the only thread mm-core spawns besides the timer.
//! 2. Each tracked host mapping is registered **before** it is published (no
//!    one can touch it unregistered) and entered in the range registry
//!    (host range → guest address, fault-around size) under the write lock.
//! 3. A thread touching a missing page blocks in the kernel; the handler
//!    reads the message and resolves it under the per-page locks, exactly as
//!    the access path does: lock the PTEs of the fault-around window
//!    (try-locks only, see 6; held by a guard that unlocks on unwind),
//!    re-check `UNSTABLE` once every lock of the window is held, charge the
//!    budget for every missing page of the window,
//!    `UFFDIO_COPY` each run of missing pages from a zero source (this also
//!    wakes the faulter), set `PRESENT`, unlock. The access path populates
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
//! 8. Teardown: `exit_mmap` unregisters every tracked range before it zaps
//!    (`users == 0`, nobody may touch the memory any more, and a zap running
//!    on the handler thread itself, from an OOM kill inside the pressure
//!    path, must not wait for its own REMOVE message), then, after its write
//!    unlock, stops and joins the handler; the descriptor closes when the
//!    last region and the handler let go of the tracker.
//! 9. A handler that panics does not hang the guest: the panic is caught, the
//!    tracker is marked dead, every range is unregistered (which wakes the
//!    blocked threads; they refault and the kernel serves them, uncharged:
//!    the regions degrade to untracked), the queued messages are drained and
//!    the descriptor is closed. Later tracked operations fail with
//!    [`Error::TrackerDead`]; the access path falls back to the untracked
//!    populate. The panic message is logged at `error` level.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::flags::MmFlag;
use crate::mm::Mm;
use crate::pgtable::{Leaf, Pte, PAGES_PER_LEAF};
use crate::sys::{self, HostRange, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::uffd::{self, Event, EventFd, Fill, Uffd};

const PAGE: u64 = PAGE_SIZE as u64;

/// Default fault-around window: one 2 MiB chunk, clamped to the VMA.
pub const DEFAULT_FAULT_AROUND: u64 = HUGE_PAGE_SIZE as u64;
/// Pressure rounds that free nothing before the handler fails open.
pub const PRESSURE_ROUNDS: u32 = 3;
/// How long a fault may find its page locked before the handler resolves
/// that one page without the lock (see `resolve_busy`). Time, not handler
/// rounds: a round can be a 1 ms poll or a burst of messages, and a
/// legitimate zapper holds the lock for one madvise of at most 2 MiB.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);
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
    /// Faults answered with `UFFDIO_POISON` (SIGBUS) after `UNSTABLE`.
    pub pages_poisoned: u64,
    /// Write-protect faults seen (left blocked until unprotect).
    pub wp_faults: u64,
    /// REMOVE / UNMAP messages from the embedder's own madvise / munmap.
    pub foreign_removes: u64,
    /// `EAGAIN` retries (a REMOVE racing a COPY).
    pub eagain_retries: u64,
    /// Pressure-path runs started by the handler.
    pub pressure_runs: u64,
    /// Pages served over budget (fail-open) so far.
    pub fail_open_pages: u64,
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
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    pages_faulted: AtomicU64,
    pages_populated_api: AtomicU64,
    pages_poisoned: AtomicU64,
    wp_faults: AtomicU64,
    foreign_removes: AtomicU64,
    eagain_retries: AtomicU64,
    pressure_runs: AtomicU64,
    fail_open_pages: AtomicU64,
    busy_breaks: AtomicU64,
    api_wp_waits: AtomicU64,
}

/// One registered host range.
#[derive(Debug, Clone, Copy)]
struct Range {
    host_end: usize,
    /// Guest address of the range's first host byte.
    guest_start: u64,
    fault_around: u64,
}

/// The per-mm userfaultfd state shared by the handler, the access path and
/// the tracked host regions.
pub(crate) struct Tracker {
    mm_id: u64,
    /// The descriptor; `None` once the handler died (closing it releases
    /// every waiter). Read-locked around each ioctl, write-locked only by
    /// the death path.
    uffd: RwLock<Option<Uffd>>,
    wp: bool,
    /// Write-protect also works on memfd mappings (KSM's merged pages).
    wp_shmem: bool,
    poison: bool,
    wake: EventFd,
    stop: AtomicBool,
    dead: AtomicBool,
    /// Host start → range. Leaf lock: held only to insert, remove or copy
    /// out an entry, never with a PTE lock held by the same thread.
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
    counters: Counters,
    handler: Mutex<Option<JoinHandle<()>>>,
    handler_id: OnceLock<ThreadId>,
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
    /// Zaps that ended since the handler last started a read. A zapper's
    /// madvise returns as soon as the handler has *read* its REMOVE, so it
    /// can pop its entry before the handler looks the message up; keeping
    /// popped entries until the next read closes that race (without it our
    /// own REMOVE is taken as foreign and uncharges pages a fault
    /// re-populated after our zap).
    retired: Vec<(usize, usize)>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("mm_id", &self.mm_id)
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 2 MiB read-only anonymous mapping never written: every page reads as
/// the zero page, so a COPY from it costs one cache-hot 4 KiB source page.
fn zero_source() -> Result<*const u8> {
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
enum Outcome {
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

impl Tracker {
    /// Opens the descriptor (step 1). The handler is started by
    /// [`Tracker::start`].
    pub(crate) fn new(mm_id: u64) -> Result<Arc<Tracker>> {
        let wanted = uffd::feature::PAGEFAULT_FLAG_WP
            | uffd::feature::EVENT_REMOVE
            | uffd::feature::EVENT_UNMAP
            | uffd::feature::POISON
            | uffd::feature::WP_HUGETLBFS_SHMEM;
        let u = Uffd::open(wanted).map_err(Error::host("userfaultfd"))?;
        let wp = u.has(uffd::feature::PAGEFAULT_FLAG_WP);
        let wp_shmem = wp && u.has(uffd::feature::WP_HUGETLBFS_SHMEM);
        let poison = u.has(uffd::feature::POISON);
        Ok(Arc::new(Tracker {
            mm_id,
            uffd: RwLock::new(Some(u)),
            wp,
            wp_shmem,
            poison,
            wake: EventFd::new().map_err(Error::host("eventfd"))?,
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            ranges: Mutex::new(BTreeMap::new()),
            self_zaps: Mutex::new(SelfZaps::default()),
            wp_gen: AtomicU64::new(0),
            wp_event: event_listener::Event::new(),
            counters: Counters::default(),
            handler: Mutex::new(None),
            handler_id: OnceLock::new(),
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

    /// Starts the handler thread for `mm`.
    pub(crate) fn start(self: &Arc<Self>, mm: Weak<Mm>) -> Result<()> {
        let t = self.clone();
        let h = std::thread::Builder::new()
            .name(format!("guestmm-uffd-{}", self.mm_id))
            .spawn(move || handler_main(t, mm))
            .map_err(Error::host("spawn uffd handler"))?;
        let _ = self.handler_id.set(h.thread().id());
        *lock(&self.handler) = Some(h);
        Ok(())
    }

    fn with_uffd<R>(&self, f: impl FnOnce(&Uffd) -> std::io::Result<R>) -> std::io::Result<R> {
        let g = self.uffd.read().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(u) => f(u),
            None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Is write-protect mode available?
    pub(crate) fn wp(&self) -> bool {
        self.wp
    }

    /// Registers a fresh, unpublished host mapping (step 2).
    pub(crate) fn register(&self, r: HostRange) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        let mode = uffd::mode::MISSING | if self.wp { uffd::mode::WP } else { 0 };
        self.with_uffd(|u| u.register(r, mode))
            .map_err(Error::host("UFFDIO_REGISTER"))?;
        Ok(())
    }

    /// Can merged pages (private memfd mappings) be write-protected?
    pub(crate) fn wp_shmem(&self) -> bool {
        self.wp_shmem
    }

    /// Registers a KSM merged range (a private memfd mapping) for
    /// write-protect only, so that its pages can be merged again.
    pub(crate) fn register_wp_only(&self, r: HostRange) -> Result<()> {
        if self.is_dead() || !self.wp_shmem {
            return Ok(());
        }
        self.with_uffd(|u| u.register(r, uffd::mode::WP))
            .map_err(Error::host("UFFDIO_REGISTER(WP)"))?;
        Ok(())
    }

    /// Registers an untracked private anonymous mapping for write-protect
    /// only (KSM on an untracked region): no MISSING mode, so first touches
    /// stay the kernel's and the handler only ever sees write-protect
    /// faults (left blocked until the merge's window closes) and the
    /// REMOVE/UNMAP messages of the range. `Unsupported` without WP.
    pub(crate) fn register_wp_anon(&self, r: HostRange) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        if !self.wp {
            return Err(Error::Unsupported {
                what: "userfaultfd write-protect (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
            });
        }
        self.with_uffd(|u| u.register(r, uffd::mode::WP))
            .map_err(Error::host("UFFDIO_REGISTER(WP)"))?;
        Ok(())
    }

    /// Enters a registered range in the registry, under the mmap write lock.
    pub(crate) fn add_range(&self, host: usize, len: usize, guest: u64, fault_around: u64) {
        lock(&self.ranges).insert(
            host,
            Range {
                host_end: host + len,
                guest_start: guest,
                fault_around,
            },
        );
    }

    /// Removes `[start, end)` from the registry (splitting entries) and
    /// unregisters it. Callers: munmap (write lock, **before** its zap, so a
    /// COPY racing it either lands before the zap, which then uncharges it,
    /// or fails with ENOENT), a region's drop, and exit_mmap.
    pub(crate) fn forget(&self, start: usize, end: usize) {
        self.forget_registry(start, end);
        // Unregistering wakes every thread blocked in the range; they
        // refault and the kernel serves them (or SIGSEGV: munmap makes the
        // range PROT_NONE). A dead tracker has nothing registered.
        let _ = self.with_uffd(|u| u.unregister(start, end - start));
    }

    fn forget_registry(&self, start: usize, end: usize) {
        let mut ranges = lock(&self.ranges);
        let hits: Vec<(usize, Range)> = ranges
            .range(..end)
            .filter(|(s, r)| **s < end && r.host_end > start)
            .map(|(s, r)| (*s, *r))
            .collect();
        for (s, r) in hits {
            ranges.remove(&s);
            if s < start {
                ranges.insert(
                    s,
                    Range {
                        host_end: start,
                        ..r
                    },
                );
            }
            if r.host_end > end {
                ranges.insert(
                    end,
                    Range {
                        guest_start: r.guest_start + (end - s) as u64,
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
            self.forget(s, e);
        }
    }

    fn lookup(&self, addr: usize) -> Option<(usize, Range)> {
        let ranges = lock(&self.ranges);
        let (s, r) = ranges.range(..=addr).next_back()?;
        (addr < r.host_end).then_some((*s, *r))
    }

    /// Runs `f` (a discard of `[start, end)`) announced as our own zap, so
    /// the handler ignores the REMOVE message it produces (step 6).
    pub(crate) fn self_zap<R>(&self, start: usize, end: usize, f: impl FnOnce() -> R) -> R {
        lock(&self.self_zaps).live.push((start, end));
        let r = f();
        let mut z = lock(&self.self_zaps);
        if let Some(i) = z.live.iter().position(|x| *x == (start, end)) {
            z.live.swap_remove(i);
        }
        // Kept until the handler's next read: it may have read our REMOVE
        // (which let madvise return) and not looked it up yet.
        z.retired.push((start, end));
        r
    }

    /// The handler is about to read messages: zaps that ended before this
    /// point had their REMOVE read already, so their entries can go.
    fn clear_retired_zaps(&self) {
        lock(&self.self_zaps).retired.clear();
    }

    fn is_self_zap(&self, start: usize, end: usize) -> bool {
        let z = lock(&self.self_zaps);
        z.live
            .iter()
            .chain(z.retired.iter())
            .any(|&(s, e)| s <= start && end <= e)
    }

    /// Wakes the threads blocked on `r` (a KSM merge, after the remap).
    pub(crate) fn wake_range(&self, r: HostRange) -> Result<()> {
        self.with_uffd(|u| u.wake(r.ptr() as usize, r.len()))
            .map_err(Error::host("UFFDIO_WAKE"))
    }

    /// The current generation of `Pte::WP` clearings (step 7). Read under
    /// the PTE lock that showed the bit set.
    pub(crate) fn wp_gen(&self) -> u64 {
        self.wp_gen.load(Ordering::SeqCst)
    }

    /// Some `Pte::WP` bits were cleared (unprotect, a zap, death): wake the
    /// API writers waiting for them. Called after the bits are cleared.
    pub(crate) fn wp_changed(&self) {
        self.wp_gen.fetch_add(1, Ordering::SeqCst);
        self.wp_event.notify(usize::MAX);
    }

    /// Waits (async, no lock held) until the `Pte::WP` generation moves
    /// past `gen` or the tracker dies.
    pub(crate) async fn wait_wp(&self, gen: u64) {
        self.counters.api_wp_waits.fetch_add(1, Ordering::Relaxed);
        loop {
            // Listen first, then re-check: a clearing between our unlock and
            // `listen` bumped the generation, so it is never missed.
            let l = self.wp_event.listen();
            if self.wp_gen() != gen || self.is_dead() {
                return;
            }
            l.await;
        }
    }

    /// `UFFDIO_WRITEPROTECT` over a host range. The caller holds the PTE
    /// locks of the range; `EAGAIN` (a REMOVE/UNMAP not yet read) is retried
    /// with backoff, as in `populate_locked`: the handler reads messages
    /// without any page lock.
    pub(crate) fn writeprotect(&self, r: HostRange, wp: bool) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        let mut tries = 0u32;
        loop {
            match self.with_uffd(|u| u.writeprotect(r.ptr() as usize, r.len(), wp)) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < API_EAGAIN_TRIES => {
                    tries += 1;
                    self.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
                    if tries < 64 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                Err(_) if self.is_dead() => return Err(Error::TrackerDead { mm_id: self.mm_id }),
                res => return res.map_err(Error::host("UFFDIO_WRITEPROTECT")),
            }
        }
    }

    /// Populates the run `[host, host + n pages)` for the access path, under
    /// the caller's PTE locks; sets `done[i]` for each page now present
    /// (populated here or found present: `EEXIST`). Retries `EAGAIN` with
    /// backoff (step 6). Returns `Ok(false)` when the tracker is dead and
    /// the caller must populate the untracked way.
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
        let src = zero_source()?;
        let n = done.len();
        let mut i = 0;
        let mut tries = 0u32;
        while i < n {
            let at = host + i * PAGE_SIZE;
            let len = (n - i) * PAGE_SIZE;
            let res = self.with_uffd(|u| {
                if write {
                    u.copy(at, src, len, true)
                } else {
                    u.zeropage(at, len)
                }
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
                        op: "UFFDIO_COPY",
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

    pub(crate) fn stats(&self, debt: u64) -> TrackedStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TrackedStats {
            faults: l(&c.faults),
            pages_faulted: l(&c.pages_faulted),
            pages_populated_api: l(&c.pages_populated_api),
            pages_poisoned: l(&c.pages_poisoned),
            wp_faults: l(&c.wp_faults),
            foreign_removes: l(&c.foreign_removes),
            eagain_retries: l(&c.eagain_retries),
            pressure_runs: l(&c.pressure_runs),
            fail_open_pages: l(&c.fail_open_pages),
            overcommit_bytes: debt,
            busy_breaks: l(&c.busy_breaks),
            api_wp_waits: l(&c.api_wp_waits),
            handler_alive: !self.is_dead() && !self.stop.load(Ordering::SeqCst),
            write_protect: self.wp,
            poison: self.poison,
        }
    }

    /// Stops and joins the handler (exit_mmap, after its write unlock).
    /// From the handler thread itself (an OOM kill inside the pressure path
    /// ran the teardown) it only asks it to stop: it exits when it returns.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.signal();
        let h = lock(&self.handler).take();
        if let Some(h) = h {
            if Some(&std::thread::current().id()) == self.handler_id.get() {
                return;
            }
            let _ = h.join();
        }
    }

    /// Step 9: the handler died. Unregister, drain, close.
    fn die(&self, why: &str) {
        tracing::error!(target: "mm_core::tracked", mm_id = self.mm_id, why, "userfaultfd handler died; tracked regions degrade to untracked");
        self.dead.store(true, Ordering::SeqCst);
        let all: Vec<(usize, usize)> = lock(&self.ranges)
            .iter()
            .map(|(s, r)| (*s, r.host_end))
            .collect();
        for (s, e) in all {
            let _ = self.with_uffd(|u| u.unregister(s, e - s));
        }
        let mut ev = Vec::new();
        let _ = self.with_uffd(|u| u.read_events(&mut ev));
        // Closing releases the context: any message queued after the drain
        // (a REMOVE racing the unregister) is completed by the kernel.
        let closed = self.uffd.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(closed);
        // API writers waiting for an unprotect: nobody will unprotect now,
        // and unregistering lifted the protection (step 9).
        self.wp_changed();
    }
}

/// Wakes the handler's `poll` when a pressure future can make progress.
struct HandlerWaker(Arc<Tracker>);

impl Wake for HandlerWaker {
    fn wake(self: Arc<Self>) {
        self.0.wake.signal();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake.signal();
    }
}

fn handler_main(t: Arc<Tracker>, mm: Weak<Mm>) {
    let res = std::panic::catch_unwind(AssertUnwindSafe(|| handler_loop(&t, &mm)));
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => t.die(&format!("handler error: {e}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            t.die(&format!("handler panicked: {msg}"));
        }
    }
}

type Pressure = Pin<Box<dyn Future<Output = bool> + Send>>;

struct Queued {
    addr: usize,
    /// When the handler first found the faulting page locked.
    busy_since: Option<Instant>,
}

fn handler_loop(t: &Arc<Tracker>, mm_weak: &Weak<Mm>) -> std::io::Result<()> {
    let waker = Waker::from(Arc::new(HandlerWaker(t.clone())));
    let mut events = Vec::new();
    let mut faults: VecDeque<Queued> = VecDeque::new();
    let mut removes: Vec<(usize, usize)> = Vec::new();
    let mut unmaps: Vec<(usize, usize)> = Vec::new();
    // Pages served without their lock (`resolve_busy`), to be charged once
    // the lock is free and the PTE is still empty.
    let mut settle: Vec<usize> = Vec::new();
    let mut pressure: Option<Pressure> = None;
    let mut failed_rounds = 0u32;
    let raw = t.with_uffd(|u| Ok(u.raw()))?;
    loop {
        let timeout = if faults.is_empty() && removes.is_empty() && settle.is_empty() {
            -1
        } else {
            1
        };
        uffd::poll_readable(&[raw, t.wake.raw()], timeout)?;
        t.wake.drain();
        if t.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        events.clear();
        // Before the read (step 6): a zap that ended before this point had
        // its REMOVE read in an earlier round.
        t.clear_retired_zaps();
        t.with_uffd(|u| u.read_events(&mut events))?;
        #[cfg(test)]
        if t.hold_after_read.load(Ordering::SeqCst)
            && events.iter().any(|e| matches!(e, Event::Remove { .. }))
        {
            // Let the zappers' madvise return and pop their entries first
            // (bounded: a zap that never pops must not hang the handler).
            let deadline = Instant::now() + Duration::from_secs(10);
            let read: Vec<(usize, usize)> = events
                .iter()
                .filter_map(|e| match *e {
                    Event::Remove { start, end } => Some((start, end)),
                    _ => None,
                })
                .collect();
            while lock(&t.self_zaps).live.iter().any(|z| read.contains(z))
                && Instant::now() < deadline
            {
                std::thread::yield_now();
            }
        }
        for ev in &events {
            match *ev {
                Event::PageFault { wp: true, .. } => {
                    // Step 7: left blocked until write_unprotect wakes it.
                    t.counters.wp_faults.fetch_add(1, Ordering::Relaxed);
                }
                Event::PageFault { addr, .. } => faults.push_back(Queued {
                    addr,
                    busy_since: None,
                }),
                Event::Remove { start, end } => {
                    if !t.is_self_zap(start, end) {
                        t.counters.foreign_removes.fetch_add(1, Ordering::Relaxed);
                        removes.push((start, end));
                    }
                }
                Event::Unmap { start, end } if t.is_self_zap(start, end) => {
                    // A KSM merge mapping the stable page over tracked pages
                    // (`merge.rs`): the pages are accounted by the merge,
                    // and the registry keeps the range (a zap maps
                    // anonymous memory back and registers it again).
                }
                Event::Unmap { start, end } => {
                    t.counters.foreign_removes.fetch_add(1, Ordering::Relaxed);
                    removes.push((start, end));
                    unmaps.push((start, end));
                }
                Event::Other(_) => {}
            }
        }
        let Some(mm) = mm_weak.upgrade() else {
            return Ok(());
        };
        // The embedder's own madvise/munmap: clear and uncharge what we
        // can lock now, keep the rest for the next round.
        let mut left = Vec::new();
        for (s, e) in removes.drain(..) {
            mm.tracked_forget_pages(t, s, e, &mut left);
        }
        removes = left;
        // An unmapped range is no longer registered (the kernel dropped it);
        // its pages were cleared above or are retried page by page.
        for (s, e) in unmaps.drain(..) {
            t.forget_registry(s, e);
        }
        settle.retain(|&a| !mm.settle_busy(t, a));

        if let Some(p) = pressure.as_mut() {
            match p.as_mut().poll(&mut Context::from_waker(&waker)) {
                Poll::Pending => continue,
                Poll::Ready(freed) => {
                    pressure = None;
                    if freed {
                        failed_rounds = 0;
                    } else {
                        failed_rounds += 1;
                    }
                }
            }
        }
        let n = faults.len();
        for _ in 0..n {
            let Some(mut q) = faults.pop_front() else {
                break;
            };
            #[cfg(test)]
            if t.panic_next_fault.swap(false, Ordering::SeqCst) {
                panic!("injected handler panic");
            }
            let fail_open = failed_rounds >= PRESSURE_ROUNDS;
            let force = q.busy_since.is_some_and(|s| s.elapsed() >= BUSY_TIMEOUT);
            match mm.tracked_fault(t, q.addr, fail_open, force) {
                Outcome::Charged => {
                    // A real charge succeeded: memory is back, leave
                    // fail-open. Not on `Served`: a page served over budget
                    // (or a poison, a refault of a charged page) says nothing
                    // about room, and resetting there would cost every
                    // further fault a full pressure cycle (up to `oom_wait`
                    // each with an OOM victim pending).
                    failed_rounds = 0;
                }
                Outcome::Served => {}
                Outcome::Unlocked => settle.push(q.addr),
                Outcome::Busy => {
                    q.busy_since.get_or_insert_with(Instant::now);
                    faults.push_back(q);
                }
                Outcome::NeedMemory(bytes) => {
                    faults.push_front(q);
                    t.counters.pressure_runs.fetch_add(1, Ordering::Relaxed);
                    let (relief, id) = (mm.pressure.clone(), mm.id());
                    let mut fut: Pressure =
                        Box::pin(async move { relief.relieve(bytes, Some(id)).await });
                    match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
                        Poll::Ready(freed) => {
                            if freed {
                                failed_rounds = 0;
                            } else {
                                failed_rounds += 1;
                            }
                            // Retried on the next round (1 ms).
                        }
                        Poll::Pending => pressure = Some(fut),
                    }
                    break;
                }
            }
        }
        drop(mm);
    }
}

/// The PTE locks the handler holds on one fault-around window. Unlocks on
/// drop: a panic between locking and unlocking (caught by `handler_main`,
/// step 9) must not leave `LOCK` bits set, or every later `pte_lock` of
/// those pages (zaps, the reaper, the access path) would spin forever.
/// Until [`WindowLocks::commit`] the drop restores the words as locked and
/// gives back the charge taken for the window.
struct WindowLocks<'a> {
    mm: &'a Mm,
    leaf: &'a Leaf,
    lo_gpn: u64,
    n: usize,
    /// Old word | LOCK, 0 = not held.
    held: [u64; PAGES_PER_LEAF as usize],
    /// Pages to unlock as `PRESENT` (after `commit`).
    present: [bool; PAGES_PER_LEAF as usize],
    /// Bytes charged for the window and not yet accounted as present.
    charged: u64,
    committed: bool,
}

impl WindowLocks<'_> {
    /// The pages are accounted: unlock with `PRESENT` where populated.
    fn commit(mut self, present: &[bool]) {
        self.present[..present.len()].copy_from_slice(present);
        self.charged = 0;
        self.committed = true;
    }
}

impl Drop for WindowLocks<'_> {
    fn drop(&mut self) {
        for i in 0..self.n {
            if self.held[i] != 0 {
                let set = if self.committed && self.present[i] {
                    Pte::PRESENT
                } else {
                    0
                };
                crate::pgtable::pte_unlock(
                    self.leaf.pte(self.lo_gpn + i as u64),
                    self.held[i] | set,
                );
            }
        }
        if self.charged > 0 {
            self.mm.budget.uncharge(self.charged);
        }
    }
}

impl Mm {
    /// Step 3: resolves a missing-page fault at host address `addr`.
    fn tracked_fault(&self, t: &Tracker, addr: usize, fail_open: bool, force: bool) -> Outcome {
        let Some((hs, r)) = t.lookup(addr) else {
            // No longer ours (munmap in flight, unregistered): let it refault.
            let _ = t.with_uffd(|u| u.wake(addr, PAGE_SIZE));
            return Outcome::Served;
        };
        let guest = r.guest_start + (addr - hs) as u64;
        let range_lo = r.guest_start;
        let range_hi = r.guest_start + (r.host_end - hs) as u64;
        let fa = r.fault_around;
        let lo = (guest & !(fa - 1)).max(range_lo);
        let hi = ((guest & !(fa - 1)) + fa).min(range_hi);
        debug_assert_eq!(lo / PAGE / PAGES_PER_LEAF, (hi - 1) / PAGE / PAGES_PER_LEAF);
        let host_of = |g: u64| hs + (g - r.guest_start) as usize;
        let guard = crossbeam_epoch::pin();
        let leaf = self.pgtable.leaf_alloc(lo / PAGE, &guard);
        let gpn_f = guest / PAGE;
        t.counters.faults.fetch_add(1, Ordering::Relaxed);

        // Try-lock the faulting page first: the handler never waits for a
        // PTE lock (step 6). A zapper holding it is blocked in madvise until
        // we read its REMOVE message, which needs no lock.
        let Some(old_f) = try_lock(leaf.pte(gpn_f)) else {
            if force {
                return self.resolve_busy(t, addr);
            }
            return Outcome::Busy;
        };
        let n = ((hi - lo) / PAGE) as usize;
        let fi = (gpn_f - lo / PAGE) as usize;
        let mut w = WindowLocks {
            mm: self,
            leaf,
            lo_gpn: lo / PAGE,
            n,
            held: [0; PAGES_PER_LEAF as usize],
            present: [false; PAGES_PER_LEAF as usize],
            charged: 0,
            committed: false,
        };
        w.held[fi] = old_f;
        if Pte(old_f).present() {
            // Charged, but the host page is gone (the embedder's own
            // DONTNEED): bring it back without charging again.
            drop(w);
            let src = match zero_source() {
                Ok(s) => s,
                Err(_) => return Outcome::Served,
            };
            let _ = t.with_uffd(|u| match u.copy(addr, src, PAGE_SIZE, true)? {
                Fill::Done => Ok(()),
                _ => u.wake(addr, PAGE_SIZE),
            });
            return Outcome::Served;
        }
        #[cfg(test)]
        if t.unstable_after_first_lock.swap(false, Ordering::SeqCst) {
            self.flags.set(MmFlag::UNSTABLE);
        }
        // The rest of the window, ascending, try-locks only (skip busy pages).
        for (i, gpn) in (lo / PAGE..hi / PAGE).enumerate() {
            if gpn != gpn_f {
                if let Some(o) = try_lock(leaf.pte(gpn)) {
                    w.held[i] = o;
                }
            }
        }
        // check_stable_address_space under the page locks (step 5), the
        // counterpart of the reaper's "set UNSTABLE, then zap under the page
        // locks":
        //
        //   reaper                       | handler
        //   set UNSTABLE                 |
        //   lock pte, clear, DONTNEED    |
        //                                | try-lock pte: empty
        //                                | UNSTABLE? yes -> POISON (SIGBUS)
        //
        // Checked only once *every* lock of the window is held: the reaper
        // zaps per VMA, so it may set UNSTABLE and zap pages of the window
        // between our locking of the faulting page and of the others; a check
        // before that would let us COPY zeros over pages it just reaped.
        if self.flags.test(MmFlag::UNSTABLE) {
            drop(w);
            return self.poison_fault(t, addr);
        }
        let want = |w: &WindowLocks<'_>, i: usize| {
            w.held[i] != 0 && !Pte(w.held[i]).present() && !Pte(w.held[i]).ksm()
        };
        let mut missing: u64 = (0..n).filter(|&i| want(&w, i)).count() as u64;
        let mut only_faulting = false;
        let mut overcommit = false;
        if self.budget.try_charge(missing * PAGE).is_err() {
            // Shrink the window to the faulting page before asking for room.
            if self.budget.try_charge(PAGE).is_ok() {
                only_faulting = true;
                missing = 1;
            } else if fail_open {
                only_faulting = true;
                missing = 1;
                overcommit = true;
            } else {
                drop(w);
                return Outcome::NeedMemory(PAGE);
            }
        }
        if !overcommit {
            w.charged = missing * PAGE;
        }
        #[cfg(test)]
        if t.panic_after_lock.swap(false, Ordering::SeqCst) {
            panic!("injected handler panic with the window locked");
        }
        let selected = |i: usize| want(&w, i) && (!only_faulting || i == fi);
        let mut present = [false; PAGES_PER_LEAF as usize];
        let src = zero_source().ok();
        let mut i = 0;
        while i < n {
            if !selected(i) {
                i += 1;
                continue;
            }
            let j = (i..n).find(|&j| !selected(j)).unwrap_or(n);
            self.fill_run(t, host_of(lo + i as u64 * PAGE), src, &mut present[i..j]);
            i = j;
        }
        let populated = (0..n).filter(|&i| present[i]).count() as u64;
        // Charged `missing`, populated `populated` (≤ missing): return the rest.
        if overcommit {
            if populated > 0 {
                // Relaxed: a counter, read back by `uncharge_pages`.
                self.debt.fetch_add(PAGE, Ordering::Relaxed);
                t.counters.fail_open_pages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "mm_core::tracked", mm_id = self.id(), addr, "budget exhausted after pressure; fail-open");
            }
        } else if missing > populated {
            self.budget.uncharge((missing - populated) * PAGE);
        }
        self.rss_anon.fetch_add(populated, Ordering::Relaxed);
        t.counters
            .pages_faulted
            .fetch_add(populated, Ordering::Relaxed);
        w.commit(&present[..n]);
        // Wake every thread blocked in the window (COPY ran with DONTWAKE).
        // If COPY failed for the faulting page (EAGAIN: a REMOVE is queued;
        // or the range went away) it refaults and is queued again, behind
        // the message we must read first.
        let _ = t.with_uffd(|u| u.wake(host_of(lo), (hi - lo) as usize));
        if overcommit || missing == 0 {
            Outcome::Served
        } else {
            Outcome::Charged
        }
    }

    /// `UFFDIO_COPY` of one run for the handler, marking `present` pages.
    fn fill_run(&self, t: &Tracker, host: usize, src: Option<*const u8>, present: &mut [bool]) {
        let Some(src) = src else { return };
        let n = present.len();
        let mut i = 0;
        while i < n {
            let at = host + i * PAGE_SIZE;
            // DONTWAKE: the faulters are woken after the PTEs say PRESENT
            // and the counters are updated, so a woken thread never sees
            // its page populated but not yet accounted.
            match t.with_uffd(|u| u.copy(at, src, (n - i) * PAGE_SIZE, false)) {
                Ok(Fill::Done) => {
                    present[i..].iter_mut().for_each(|p| *p = true);
                    return;
                }
                Ok(Fill::Exists { done }) => {
                    // EEXIST under our lock on an empty PTE: a page the
                    // kernel still holds (a foreign REMOVE whose zap is not
                    // done). Count it as ours: it is charged, and the next
                    // zap clears both. The caller wakes the whole window.
                    let k = done / PAGE_SIZE;
                    present[i..=i + k].iter_mut().for_each(|p| *p = true);
                    i += k + 1;
                }
                Ok(Fill::Again { done }) => {
                    let k = done / PAGE_SIZE;
                    present[i..i + k].iter_mut().for_each(|p| *p = true);
                    t.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
                    // A REMOVE is queued and unread, and we are its reader:
                    // retrying here cannot succeed. Give up on the rest of the
                    // run; the caller wakes the faulter, which refaults and is
                    // served after the next drain of the queue.
                    return;
                }
                Err(e) => {
                    tracing::debug!(target: "mm_core::tracked", mm_id = self.id(), error = %e, "UFFDIO_COPY failed");
                    return;
                }
            }
        }
    }

    /// UNSTABLE: SIGBUS for the faulter (step 5). Without POISON support
    /// (pre-6.6) the fault is left unanswered: the thread stays blocked
    /// rather than read zeros, until teardown unregisters the range.
    fn poison_fault(&self, t: &Tracker, addr: usize) -> Outcome {
        if t.poison {
            match t.with_uffd(|u| u.poison(addr, PAGE_SIZE)) {
                Ok(Fill::Done) => {
                    t.counters.pages_poisoned.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) | Err(_) => {
                    let _ = t.with_uffd(|u| u.wake(addr, PAGE_SIZE));
                }
            }
        }
        Outcome::Served
    }

    /// The faulting page stayed locked for [`BUSY_TIMEOUT`]: most likely an
    /// accessor faulted on it while holding its lock (its page was discarded
    /// behind our back by the embedder). Populate that one page without the
    /// lock, so it can finish, and return [`Outcome::Unlocked`]: the handler
    /// then settles the charge with [`Mm::settle_busy`] once the lock is
    /// free (the holder may have been a slow zapper that leaves the PTE
    /// empty over the page we just mapped).
    fn resolve_busy(&self, t: &Tracker, addr: usize) -> Outcome {
        t.counters.busy_breaks.fetch_add(1, Ordering::Relaxed);
        if self.flags.test(MmFlag::UNSTABLE) {
            return self.poison_fault(t, addr);
        }
        if let Ok(src) = zero_source() {
            let _ = t.with_uffd(|u| match u.copy(addr, src, PAGE_SIZE, true)? {
                Fill::Done => Ok(()),
                _ => u.wake(addr, PAGE_SIZE),
            });
        }
        Outcome::Unlocked
    }

    /// After `resolve_busy` mapped the page at `addr` without its lock:
    /// try-lock it; if the PTE is still empty while the host page is
    /// resident, account it now (charge, or fail-open debt when the budget
    /// is full: the page exists either way) and mark it `PRESENT`, so that
    /// `charged = present − debt` holds again and the next zap uncharges it.
    /// Returns `false` while the page is still locked (retry next round).
    fn settle_busy(&self, t: &Tracker, addr: usize) -> bool {
        let Some((hs, r)) = t.lookup(addr) else {
            return true; // unmapped meanwhile: nothing to account
        };
        let gpn = (r.guest_start + (addr - hs) as u64) / PAGE;
        let guard = crossbeam_epoch::pin();
        let Some(leaf) = self.pgtable.leaf(gpn, &guard) else {
            return true;
        };
        let Some(old) = try_lock(leaf.pte(gpn)) else {
            return false;
        };
        let mut new = old;
        if !Pte(old).present() && sys::page_resident(addr).unwrap_or(false) {
            if self.budget.try_charge(PAGE).is_err() {
                // Relaxed: a counter, read back by `uncharge_pages`.
                self.debt.fetch_add(PAGE, Ordering::Relaxed);
                t.counters.fail_open_pages.fetch_add(1, Ordering::Relaxed);
            }
            self.rss_anon.fetch_add(1, Ordering::Relaxed);
            t.counters.pages_faulted.fetch_add(1, Ordering::Relaxed);
            new |= Pte::PRESENT;
        }
        crate::pgtable::pte_unlock(leaf.pte(gpn), new);
        true
    }

    /// The embedder discarded `[start, end)` itself (REMOVE / UNMAP): clear
    /// and uncharge the present PTEs we can lock; push what stays locked.
    fn tracked_forget_pages(
        &self,
        t: &Tracker,
        start: usize,
        end: usize,
        left: &mut Vec<(usize, usize)>,
    ) {
        let mut host = start;
        while host < end {
            let Some((hs, r)) = t.lookup(host) else {
                host += PAGE_SIZE;
                continue;
            };
            let stop = r.host_end.min(end);
            let guard = crossbeam_epoch::pin();
            let mut freed = 0u64;
            let mut wp_cleared = false;
            let mut a = host;
            while a < stop {
                let gpn = (r.guest_start + (a - hs) as u64) / PAGE;
                if let Some(leaf) = self.pgtable.leaf(gpn, &guard) {
                    match try_lock(leaf.pte(gpn)) {
                        Some(old) => {
                            let new = if Pte(old).present() {
                                freed += 1;
                                wp_cleared |= old & Pte::WP != 0;
                                0
                            } else {
                                old
                            };
                            crate::pgtable::pte_unlock(leaf.pte(gpn), new);
                        }
                        None => left.push((a, a + PAGE_SIZE)),
                    }
                }
                a += PAGE_SIZE;
            }
            self.uncharge_pages(freed, 0);
            if wp_cleared {
                t.wp_changed();
            }
            host = stop;
        }
    }
}

fn try_lock(pte: &std::sync::atomic::AtomicU64) -> Option<u64> {
    // Acquire: pairs with the Release in `pte_unlock`, as `pte_lock`.
    let old = pte.fetch_or(Pte::LOCK, Ordering::Acquire);
    if old & Pte::LOCK == 0 {
        Some(old | Pte::LOCK)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Host, MapOptions};

    /// Spins until `cond` holds; panics (instead of hanging) after two
    /// minutes. A bound on a hang, never a measurement.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "still waiting for {what}"
            );
            std::thread::yield_now();
        }
    }

    fn touch(ptr: *mut u8, len: usize, byte: u8) {
        let mut off = 0;
        while off < len {
            // SAFETY: test-only direct touch of a live tracked mapping.
            unsafe { ptr.add(off).write_volatile(byte) };
            off += PAGE_SIZE;
        }
    }

    #[test]
    fn test_registry_split() {
        let t = Tracker::new(1).unwrap();
        t.add_range(0x10000, 0x10000, 0x100000, DEFAULT_FAULT_AROUND);
        t.forget_registry(0x14000, 0x18000);
        let r: Vec<_> = lock(&t.ranges)
            .iter()
            .map(|(s, r)| (*s, r.host_end, r.guest_start))
            .collect();
        assert_eq!(
            r,
            vec![(0x10000, 0x14000, 0x100000), (0x18000, 0x20000, 0x108000)]
        );
    }

    #[test]
    fn test_direct_touch_charged_once() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(4 << 20).tracked(true))
            .unwrap();
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
        touch(ptr, 4 << 20, 7);
        assert_eq!(host.stats().charged_bytes, 4 << 20);
        // The API sees the direct writes and populates nothing new.
        let mut b = [0u8; 1];
        mm.read_blocking(addr + 0x3000, &mut b).unwrap();
        assert_eq!(b[0], 7);
        assert_eq!(host.stats().charged_bytes, 4 << 20);
        let s = mm.tracked_stats().unwrap();
        assert_eq!(s.pages_faulted, 1024, "{s:?} addr={addr:#x}");
        drop(mm);
        assert_eq!(host.stats().charged_bytes, 0);
    }

    #[test]
    fn test_handler_panic_degrades() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(2 << 20).tracked(true))
            .unwrap();
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
        let t = mm.tracker().unwrap();
        t.panic_next_fault.store(true, Ordering::SeqCst);
        // The fault is not lost: the dying handler unregisters the range and
        // the kernel serves the refault.
        touch(ptr, PAGE_SIZE, 9);
        // SAFETY: test-only read of the page just written.
        assert_eq!(unsafe { ptr.read_volatile() }, 9);
        assert!(t.is_dead());
        assert!(!mm.tracked_stats().unwrap().handler_alive);
        assert!(matches!(
            mm.write_protect_blocking(addr, PAGE),
            Err(Error::TrackerDead { .. })
        ));
        // The access path falls back to the untracked populate.
        mm.write_blocking(addr + 0x5000, b"x").unwrap();
        assert!(mm.compare_blocking(addr + 0x5000, b"x").unwrap());
        drop(mm);
        assert_eq!(host.stats().charged_bytes, 0);
    }

    #[test]
    fn test_write_protect_blocks_writer() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(1 << 20).tracked(true))
            .unwrap();
        if !mm.tracked_stats().unwrap().write_protect {
            return;
        }
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
        mm.write_protect_blocking(addr, 2 * PAGE).unwrap();
        let wrote = Arc::new(AtomicBool::new(false));
        let w2 = wrote.clone();
        let th = std::thread::spawn(move || {
            touch(ptr as *mut u8, PAGE_SIZE, 5);
            w2.store(true, Ordering::SeqCst);
        });
        // The writer blocks until the protection goes (no timed assertion:
        // wait until the handler has seen its WP fault).
        wait_until("the WP fault", || {
            mm.tracked_stats().unwrap().wp_faults != 0
        });
        assert!(!wrote.load(Ordering::SeqCst));
        mm.write_unprotect_blocking(addr, 2 * PAGE).unwrap();
        th.join().unwrap();
        assert!(wrote.load(Ordering::SeqCst));
        assert!(mm.compare_blocking(addr, &[5]).unwrap());
    }
}

#[cfg(test)]
mod review_tests {
    //! Regression tests for the review findings (see each test's comment).
    use super::*;
    use crate::{Advice, Host, MapOptions};
    use std::sync::mpsc;

    /// Fails (instead of hanging) if a result does not arrive in two
    /// minutes. A bound on a hang, never a measurement.
    const HANG: Duration = Duration::from_secs(120);

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + HANG;
        while !cond() {
            assert!(Instant::now() < deadline, "still waiting for {what}");
            std::thread::yield_now();
        }
    }

    fn touch(ptr: *mut u8, len: usize, byte: u8) {
        let mut off = 0;
        while off < len {
            // SAFETY: test-only direct touch of a live tracked mapping.
            unsafe { ptr.add(off).write_volatile(byte) };
            off += PAGE_SIZE;
        }
    }

    /// Finding 2: an API write to a write-protected page must not block in
    /// the kernel holding PTE locks and the mmap read lock. With a munmap
    /// (writer) queued behind it, `write_unprotect` (a reader) could never
    /// run: nothing completed.
    #[test]
    fn test_wp_api_write_waits_without_locks() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(1 << 20).tracked(true))
            .unwrap();
        if !mm.tracked_stats().unwrap().write_protect {
            eprintln!("skipped: no userfaultfd write-protect");
            return;
        }
        let other = mm.mmap_blocking(MapOptions::anon(1 << 20)).unwrap();
        mm.write_blocking(addr, &[1]).unwrap();
        mm.write_protect_blocking(addr, PAGE).unwrap();
        let (tx, rx) = mpsc::channel();
        let mm2 = mm.clone();
        let writer = std::thread::spawn(move || {
            mm2.write_blocking(addr, &[2]).unwrap();
            tx.send(()).unwrap();
        });
        wait_until("the API writer to wait", || {
            mm.tracked_stats().unwrap().api_wp_waits != 0
        });
        // A writer of the mmap lock: must not wait for the API writer.
        let (tx2, rx2) = mpsc::channel();
        let mm3 = mm.clone();
        let unmapper = std::thread::spawn(move || {
            tx2.send(mm3.munmap_blocking(other, 1 << 20)).unwrap();
        });
        rx2.recv_timeout(HANG)
            .expect("munmap stuck behind a write-protected API write")
            .unwrap();
        unmapper.join().unwrap();
        assert!(
            rx.try_recv().is_err(),
            "the API write ignored the protection"
        );
        mm.write_unprotect_blocking(addr, PAGE).unwrap();
        rx.recv_timeout(HANG)
            .expect("API writer not woken by unprotect");
        writer.join().unwrap();
        assert!(mm.compare_blocking(addr, &[2]).unwrap());
    }

    /// Finding 3: once failed open, stay failed open until a real charge
    /// succeeds: one pressure cycle in all, not one per page.
    #[test]
    fn test_fail_open_is_not_a_pressure_cycle_per_page() {
        let host = Host::with_budget(1 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(4 << 20).tracked(true).fault_around(PAGE))
            .unwrap();
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
        touch(ptr, 2 << 20, 1);
        let s = mm.tracked_stats().unwrap();
        assert_eq!(s.fail_open_pages, 256, "{s:?}");
        assert_eq!(s.overcommit_bytes, 1 << 20, "{s:?}");
        assert!(
            s.pressure_runs <= 2 * u64::from(PRESSURE_ROUNDS),
            "a pressure cycle per page: {s:?}"
        );
        assert_eq!(host.stats().charged_bytes, 1 << 20);
        drop(mm);
        assert_eq!(host.stats().charged_bytes, 0);
    }

    /// Finding 4: `UNSTABLE` set (and the window zapped) after the faulting
    /// page is locked but before the rest of the window is: the fault must
    /// be poisoned, not served with zeros.
    #[test]
    fn test_unstable_rechecked_with_the_whole_window_locked() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(2 << 20).tracked(true))
            .unwrap();
        let t = mm.tracker().unwrap();
        if !t.poison {
            eprintln!("skipped: no UFFDIO_POISON (a poisoned fault would hang)");
            return;
        }
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
        t.unstable_after_first_lock.store(true, Ordering::SeqCst);
        // Fault the page from the kernel (write(2) reads it into a pipe): a
        // poisoned page gives EFAULT here instead of SIGBUS to the test.
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) writes two descriptors into the live array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: reads 16 bytes of a live tracked mapping; fds[1] is ours.
        let r = unsafe { libc::write(fds[1], ptr.cast(), 16) };
        let err = std::io::Error::last_os_error();
        for fd in fds {
            // SAFETY: closing descriptors we own and no longer use.
            unsafe { libc::close(fd) };
        }
        assert_eq!(r, -1, "served zeros after UNSTABLE");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        // POISON wakes the faulter before the handler bumps its counter.
        wait_until("the poison counter", || {
            mm.tracked_stats().unwrap().pages_poisoned != 0
        });
        let s = mm.tracked_stats().unwrap();
        assert_eq!((s.pages_poisoned, s.pages_faulted), (1, 0), "{s:?}");
        assert_eq!(host.stats().charged_bytes, 0);
    }

    /// Finding 5: our own zap's madvise returns once the handler has read
    /// its REMOVE, so it may pop its entry before the handler looks the
    /// message up; it must still not be taken for the embedder's.
    #[test]
    fn test_own_remove_not_foreign_after_zapper_returned() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(2 << 20).tracked(true))
            .unwrap();
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
        touch(ptr, PAGE_SIZE, 1);
        // The fault-around window of the first page (clamped to the VMA).
        let window = host.stats().charged_bytes;
        assert!(window >= PAGE);
        let t = mm.tracker().unwrap();
        t.hold_after_read.store(true, Ordering::SeqCst);
        mm.madvise_blocking(addr, 2 << 20, Advice::DontNeed)
            .unwrap();
        t.hold_after_read.store(false, Ordering::SeqCst);
        assert_eq!(host.stats().charged_bytes, 0);
        // This fault is answered after the round that classified the REMOVE.
        touch(ptr, PAGE_SIZE, 2);
        let s = mm.tracked_stats().unwrap();
        assert_eq!(s.foreign_removes, 0, "{s:?}");
        assert_eq!(host.stats().charged_bytes, window);
        assert!(mm.compare_blocking(addr, &[2]).unwrap());
    }

    /// Finding 6: a handler panic with the window locked releases the PTE
    /// locks and the charge (a leaked LOCK bit made every later
    /// `pte_lock` spin forever).
    #[test]
    fn test_handler_panic_after_lock_releases_locks() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(2 << 20).tracked(true))
            .unwrap();
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
        let t = mm.tracker().unwrap();
        t.panic_after_lock.store(true, Ordering::SeqCst);
        touch(ptr, PAGE_SIZE, 9);
        assert!(t.is_dead());
        {
            let guard = crossbeam_epoch::pin();
            for gpn in addr / PAGE..(addr + (2 << 20)) / PAGE {
                if let Some(p) = mm.page_table().pte(gpn, &guard) {
                    let w = p.load(Ordering::Acquire);
                    assert_eq!(w & Pte::LOCK, 0, "PTE {gpn:#x} left locked: {w:#x}");
                    assert!(!Pte(w).present());
                }
            }
        }
        assert_eq!(host.stats().charged_bytes, 0);
        let (tx, rx) = mpsc::channel();
        let mm2 = mm.clone();
        let th = std::thread::spawn(move || {
            tx.send(mm2.write_blocking(addr, b"x")).unwrap();
        });
        rx.recv_timeout(HANG)
            .expect("access path stuck on a leaked PTE lock")
            .unwrap();
        th.join().unwrap();
        assert!(mm.compare_blocking(addr, b"x").unwrap());
        drop(mm);
        assert_eq!(host.stats().charged_bytes, 0);
    }

    /// Finding 7: a page served without its lock (the lock stayed busy) is
    /// charged once the lock is free if its PTE is still empty.
    #[test]
    fn test_busy_break_is_charged_after_the_lock_goes() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(1 << 20).tracked(true).fault_around(PAGE))
            .unwrap();
        let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
        let state = futures_lite::future::block_on(mm.lock().read());
        let guard = crossbeam_epoch::pin();
        let pte = mm
            .page_table()
            .leaf_alloc(addr / PAGE, &guard)
            .pte(addr / PAGE);
        // A "zapper" holding the page lock, leaving the PTE empty.
        let old = crate::pgtable::pte_lock(pte);
        let (tx, rx) = mpsc::channel();
        let th = std::thread::spawn(move || {
            touch(ptr as *mut u8, PAGE_SIZE, 3);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(HANG).expect("busy fault never resolved");
        th.join().unwrap();
        assert_eq!(mm.tracked_stats().unwrap().busy_breaks, 1);
        crate::pgtable::pte_unlock(pte, old);
        drop(guard);
        drop(state);
        wait_until("the busy page to be charged", || {
            host.stats().charged_bytes == PAGE
        });
        assert_eq!(mm.rss_pages(), 1);
        assert!(mm.compare_blocking(addr, &[3]).unwrap());
        drop(mm);
        assert_eq!(host.stats().charged_bytes, 0);
    }

    /// Finding 9: a failed tracked populate drops only the pages that were
    /// missing (the present ones keep their data) and returns the tracker's
    /// error unchanged.
    #[test]
    fn test_populate_error_keeps_present_pages() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("t");
        let addr = mm
            .mmap_blocking(MapOptions::anon(2 << 20).tracked(true).fault_around(PAGE))
            .unwrap();
        let at = addr + 100 * PAGE;
        mm.write_blocking(at, &[7]).unwrap();
        mm.tracker()
            .unwrap()
            .fail_next_populate
            .store(true, Ordering::SeqCst);
        let r = mm.write_blocking(at + PAGE - 1, &[1, 2]);
        assert!(
            matches!(&r, Err(Error::Host { op: "UFFDIO_COPY", source }) if source.raw_os_error() == Some(libc::EIO)),
            "{r:?}"
        );
        assert_eq!(host.stats().charged_bytes, PAGE);
        assert!(mm.compare_blocking(at, &[7]).unwrap(), "present page lost");
        drop(mm);
        assert_eq!(host.stats().charged_bytes, 0);
    }
}
