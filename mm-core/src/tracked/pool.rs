//! The handler pool: every tracked mm of the process is served by a few
//! handler threads (shards), each reading a few shared userfaultfds.
//!
//! A userfaultfd belongs to the process's address space, not to a guest:
//! one descriptor can register the ranges of any number of guests. So
//! instead of one descriptor, one eventfd and one thread per tracked mm
//! (which stops at about 510 guests under the default `ulimit -n 1024`),
//! the process keeps one pool:
//!
//! 1. The pool has `n` shards ([`set_uffd_handler_threads`], default
//!    [`DEFAULT_UFFD_HANDLER_THREADS`]), created at the first tracked
//!    `mmap` of the process. A new tracker is given the next shard, round
//!    robin.
//! 2. A shard owns at most four descriptors, one per mode: the full one
//!    (or what `Uffd::open` falls back to when the process may not open
//!    it) or the `UFFD_USER_MODE_ONLY` one (`MmConfig::user_mode_only_uffd`),
//!    each with synchronous write-protect or with `WP_ASYNC` (the dirty
//!    log, `MmConfig::dirty_log`: a feature of the whole descriptor, so
//!    those mms get descriptors of their own kind), each opened when its
//!    first tracker asks, with the same feature request as before, so a mm
//!    sees exactly the feature set (WP, POISON, REMOVE/UNMAP) its own
//!    descriptor had. Plus one eventfd that wakes the thread. At most
//!    `5 n` descriptors (`3 n` without dirty-logged guests) and `n`
//!    threads for the whole process, whatever the number of guests.
//! 3. Every registration of a tracker enters a **routing entry** (host
//!    range → tracker, held weakly) in its shard's routing map **before**
//!    the range is registered, and drops it **after** the range is
//!    unregistered (`Tracker::forget`, step 8 of `tracked/`; the
//!    diagram there names the race).
//! 4. The shard thread `poll`s its eventfd and descriptors, bumps the read
//!    generation (see `SelfZaps::retired`), reads every queued message,
//!    routes each by its address to its tracker, and runs that mm's part
//!    of the old per-mm loop (`handler.rs`: classify, forget foreign
//!    removes, settle, the pressure future, serve faults) on a per-mm
//!    queue that exists only while the mm has work pending.
//! 5. The routing map is a lock-free skip list (crossbeam-skiplist, over
//!    crossbeam-epoch): the shard thread looks addresses up without any
//!    lock, so **no guest thread can hold a lock the handler needs** while
//!    it is blocked in a fault (a guest faulting inside an `mmap` holding
//!    a map lock would otherwise stall every guest of the shard). Writers
//!    (register / forget, under the mm's write lock) insert and remove
//!    entries lock-free too.
//! 6. A panic while serving one mm is caught for that mm alone: the mm's
//!    tracker dies (step 9 of `tracked/`), its ranges are unregistered and
//!    unrouted, and the thread goes on serving the others.
//! 7. The threads live as long as the process (like the kernel threads
//!    they stand for); an idle one sleeps in `poll` with no timeout.
//! 8. Each shard also has a **quiet** descriptor per mode (write-protect
//!    only, no events; [`Shard::quiet_uffd`]) for the untracked mergeable
//!    regions KSM write-protects. It is never polled: nothing on it needs
//!    a reader, and without `EVENT_UNMAP`/`EVENT_REMOVE` a merge's `mmap`
//!    or a zero-page `DONTNEED` does not wait for one (issue 12).
//!
//! 9. A message is looked up after the read that returned it, so a
//!    tracker that unroutes a range waits ([`Shard::route_barrier`]) until
//!    the messages already read are routed, before the range can be
//!    unmapped and mapped again by another mm (`Tracker::forget`).
//!
//! `poll(2)` over at most five descriptors rather than an epoll set: the
//! set per thread is fixed and tiny, and epoll would cost one more
//! descriptor per shard for nothing.

use std::collections::HashMap;

use crossbeam_skiplist::SkipMap;

use super::handler::{Handler, ShardWaker};
use super::*;

/// Handler threads of the pool when [`set_uffd_handler_threads`] was not
/// called.
pub const DEFAULT_UFFD_HANDLER_THREADS: usize = 2;
/// The longest [`Shard::route_barrier`] waits for the shard thread to
/// finish routing one round's messages (it takes microseconds).
const ROUTE_BARRIER_WAIT: Duration = Duration::from_secs(5);
/// Upper bound of the pool size.
const MAX_THREADS: usize = 64;

/// The features asked of every descriptor (granted as the kernel offers).
const WANTED: u64 = uffd::feature::PAGEFAULT_FLAG_WP
    | uffd::feature::EVENT_REMOVE
    | uffd::feature::EVENT_UNMAP
    | uffd::feature::POISON
    | uffd::feature::WP_HUGETLBFS_SHMEM
    | uffd::feature::MINOR_SHMEM;

/// The features of a quiet descriptor ([`Shard::quiet_uffd`]): write-protect
/// only, **no events**. With `EVENT_UNMAP`/`EVENT_REMOVE` every `mmap`
/// over a registered range and every `DONTNEED` in it blocks its caller
/// until a handler thread has read the message: two context switches per
/// KSM merge or zero discard, which cost ~130 µs of CPU per saved page on
/// scattered data here (issue 12).
const QUIET: u64 = uffd::feature::PAGEFAULT_FLAG_WP | uffd::feature::WP_HUGETLBFS_SHMEM;

/// The size asked with [`set_uffd_handler_threads`]; the pool is created
/// under this lock, so a size set concurrently with the creation is
/// either used or refused, never silently ignored.
static CONFIG: Mutex<Option<usize>> = Mutex::new(None);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the number of userfaultfd handler threads serving every tracked
/// guest of the process (1..=64, default [`DEFAULT_UFFD_HANDLER_THREADS`]).
/// Call it before the first tracked `mmap`: once the pool runs, asking for
/// its current size is `Ok` and any other size is
/// [`Error::PoolRunning`](crate::Error::PoolRunning).
pub fn set_uffd_handler_threads(threads: usize) -> Result<()> {
    if threads == 0 || threads > MAX_THREADS {
        return Err(Error::InvalidArgument {
            what: "userfaultfd handler threads must be 1..=64",
        });
    }
    let mut c = lock(&CONFIG);
    if let Some(p) = POOL.get() {
        return if p.shards.len() == threads {
            Ok(())
        } else {
            Err(Error::PoolRunning {
                running: p.shards.len(),
                asked: threads,
            })
        };
    }
    *c = Some(threads);
    Ok(())
}

/// The number of handler threads the pool has (or will have when the
/// first tracked `mmap` creates it).
pub fn uffd_handler_threads() -> usize {
    match POOL.get() {
        Some(p) => p.shards.len(),
        None => lock(&CONFIG).unwrap_or(DEFAULT_UFFD_HANDLER_THREADS),
    }
}

/// The process's shards.
struct Pool {
    shards: Vec<Arc<Shard>>,
    next: AtomicU64,
}

/// The next shard, round robin (creates the pool on first use).
pub(super) fn pick() -> Result<Arc<Shard>> {
    let p = match POOL.get() {
        Some(p) => p,
        None => {
            let c = lock(&CONFIG);
            let n = c.unwrap_or(DEFAULT_UFFD_HANDLER_THREADS);
            POOL.get_or_init(|| Pool {
                shards: (0..n).map(|i| Arc::new(Shard::new(i))).collect(),
                next: AtomicU64::new(0),
            })
        }
    };
    // Relaxed: a round-robin ticket, no memory is published through it.
    let i = p.next.fetch_add(1, Ordering::Relaxed) as usize % p.shards.len();
    let s = p.shards[i].clone();
    s.wake_fd()?;
    Ok(s)
}

/// One routing entry: `[start, end)` belongs to `owner`.
pub(super) struct Route {
    end: usize,
    pub(super) owner: Weak<Tracker>,
}

/// One shard of the pool: a handler thread, its descriptors, its routing
/// map.
pub(crate) struct Shard {
    idx: usize,
    /// The descriptors by mode ([`Mode::slot`]): without or with
    /// `UFFD_USER_MODE_ONLY` (a full one may be a user-mode-only one after
    /// `Uffd::open`'s fallback), without or with `WP_ASYNC` (the dirty
    /// log, `MmConfig::dirty_log`). Locked only to open or clone one.
    slots: [Mutex<Option<Arc<Uffd>>>; 4],
    /// The quiet descriptors (without, with `UFFD_USER_MODE_ONLY`): the
    /// write-protect-only registrations of untracked mergeable regions
    /// (`mm/ksm_wp.rs`). Never polled: they deliver no events, and a
    /// write-protect fault needs no reader (the merge's unprotect or
    /// `UFFDIO_WAKE` wakes the writer, read or not).
    quiet: [Mutex<Option<Arc<Uffd>>>; 2],
    /// Wakes the thread (a new descriptor, a pressure future ready, a
    /// tracker stopped). Opened with the shard's first tracker.
    wake: OnceLock<EventFd>,
    /// Host start → route. Lock-free (point 5).
    pub(super) routes: SkipMap<usize, Route>,
    /// Bumped before every read of messages (see `SelfZaps::retired`).
    read_gen: AtomicU64,
    /// The read generation whose messages are all routed (point 9): set
    /// after the last descriptor's messages of a round went to their mms.
    routed_gen: AtomicU64,
    /// Notified whenever `routed_gen` moves ([`Shard::route_barrier`]).
    routed: event_listener::Event,
    /// The shard thread, once started: it never waits for itself.
    thread: OnceLock<std::thread::ThreadId>,
    /// Is the thread running? Locked only to start it.
    started: Mutex<bool>,
}

impl Shard {
    fn new(idx: usize) -> Shard {
        Shard {
            idx,
            slots: Default::default(),
            quiet: Default::default(),
            wake: OnceLock::new(),
            routes: SkipMap::new(),
            read_gen: AtomicU64::new(0),
            routed_gen: AtomicU64::new(0),
            routed: event_listener::Event::new(),
            thread: OnceLock::new(),
            started: Mutex::new(false),
        }
    }

    /// The wake eventfd, opened on first use.
    fn wake_fd(&self) -> Result<&EventFd> {
        if let Some(w) = self.wake.get() {
            return Ok(w);
        }
        let w = EventFd::new().map_err(Error::host("eventfd"))?;
        // A racing opener's eventfd is dropped (closed) here.
        Ok(self.wake.get_or_init(|| w))
    }

    /// Wakes the thread's `poll`.
    pub(super) fn wake(&self) {
        if let Some(w) = self.wake.get() {
            w.signal();
        }
    }

    /// The shard's descriptor for the mode asked, opened on first use.
    pub(super) fn uffd(&self, user_mode_only: bool, dirty_log: bool) -> std::io::Result<Arc<Uffd>> {
        let slot = &self.slots[usize::from(user_mode_only) | usize::from(dirty_log) << 1];
        let mut g = lock(slot);
        if let Some(u) = g.as_ref() {
            return Ok(u.clone());
        }
        let wanted = if dirty_log {
            WANTED | uffd::feature::WP_ASYNC
        } else {
            WANTED
        };
        let u = Arc::new(Uffd::open(wanted, user_mode_only)?);
        *g = Some(u.clone());
        drop(g);
        // The thread polls the descriptors it finds at each round.
        self.wake();
        Ok(u)
    }

    /// The shard's quiet descriptor (no events, see [`QUIET`]), opened on
    /// first use.
    pub(super) fn quiet_uffd(&self, user_mode_only: bool) -> std::io::Result<Arc<Uffd>> {
        let mut g = lock(&self.quiet[usize::from(user_mode_only)]);
        if let Some(u) = g.as_ref() {
            return Ok(u.clone());
        }
        let u = Arc::new(Uffd::open(QUIET, user_mode_only)?);
        *g = Some(u.clone());
        Ok(u)
    }

    /// The current read generation. SeqCst, like the bump in
    /// `shard_main` before each read: a zapper whose madvise returned
    /// because that read took its REMOVE sees the bumped value.
    pub(super) fn read_gen(&self) -> u64 {
        self.read_gen.load(Ordering::SeqCst)
    }

    /// Point 9: returns once every message the shard thread has read so
    /// far went to the mm its address was routed to **at the time of this
    /// call**. A caller that just unrouted a range calls it before the
    /// range can be unmapped and reused: a message read for the old range
    /// (our own merge's UNMAP, the embedder's REMOVE) but not yet looked
    /// up would otherwise be routed to the next mm mapped at the same
    /// address, which then clears and uncharges pages it never lost (the
    /// race is drawn at [`Tracker::forget`]). The thread only routes
    /// between its read and `routed_gen` (no lock, no fault, no pressure
    /// future), so the wait is short; bounded by [`ROUTE_BARRIER_WAIT`]
    /// all the same (a stuck shard is reported, never waited for forever).
    /// A no-op on the shard thread itself (a teardown run by its pressure
    /// path: its own round's messages are routed already).
    pub(super) fn route_barrier(&self) {
        if self.thread.get() == Some(&std::thread::current().id()) {
            return;
        }
        // SeqCst, against the bump in `shard_main`: a round that read after
        // this load started after the caller's unroute, so it finds no
        // route for the caller's range.
        let target = self.read_gen.load(Ordering::SeqCst);
        let deadline = Instant::now() + ROUTE_BARRIER_WAIT;
        while self.routed_gen.load(Ordering::SeqCst) < target {
            // Listen, then re-check: a store and notify between the load
            // and the listen would otherwise be missed.
            let l = self.routed.listen();
            use event_listener::Listener as _;
            if self.routed_gen.load(Ordering::SeqCst) >= target {
                break;
            }
            if l.wait_deadline(deadline).is_none() {
                tracing::error!(target: "mm_core::tracked", shard = self.idx, "uffd shard did not route its messages in {ROUTE_BARRIER_WAIT:?}; a range is reused without the barrier");
                break;
            }
        }
    }

    /// Starts the thread if it is not running.
    pub(super) fn ensure_thread(self: &Arc<Self>) -> Result<()> {
        let mut started = lock(&self.started);
        if *started {
            return Ok(());
        }
        let s = self.clone();
        std::thread::Builder::new()
            .name(format!("guestmm-uffd-{}", self.idx))
            .spawn(move || shard_main(s))
            .map_err(Error::host("spawn uffd handler"))?;
        *started = true;
        Ok(())
    }

    /// Routes `[start, end)` to `owner`; false when it was routed to it
    /// already (a KSM merge registering a sub-range of a tracked region
    /// for write-protect: the region's entry covers it).
    pub(super) fn route(&self, start: usize, end: usize, owner: &Weak<Tracker>) -> bool {
        if self.covered(start, end, owner) {
            return false;
        }
        // Overlapping entries can only be the owner's own (the range is
        // its mapping): replace them by one.
        self.unroute(start, end, owner);
        self.routes.insert(
            start,
            Route {
                end,
                owner: owner.clone(),
            },
        );
        true
    }

    /// Is `[start, end)` routed to `owner` throughout?
    fn covered(&self, start: usize, end: usize, owner: &Weak<Tracker>) -> bool {
        let mut at = start;
        while at < end {
            let Some(e) = self.routes.range(..=at).next_back() else {
                return false;
            };
            let r = e.value();
            if r.end <= at || !Weak::ptr_eq(&r.owner, owner) {
                return false;
            }
            at = r.end;
        }
        true
    }

    /// Drops `owner`'s routing of `[start, end)`, splitting entries that
    /// stick out. The pieces that stay are inserted before the old entry
    /// goes (an insert on the same key replaces it atomically), so an
    /// address outside `[start, end)` is routed throughout.
    pub(super) fn unroute(&self, start: usize, end: usize, owner: &Weak<Tracker>) {
        let hits: Vec<(usize, usize)> = self
            .routes
            .range(..end)
            .rev()
            .take_while(|e| e.value().end > start)
            .filter(|e| Weak::ptr_eq(&e.value().owner, owner))
            .map(|e| (*e.key(), e.value().end))
            .collect();
        for (s, e) in hits {
            if e > end {
                self.routes.insert(
                    end,
                    Route {
                        end: e,
                        owner: owner.clone(),
                    },
                );
            }
            if s < start {
                self.routes.insert(
                    s,
                    Route {
                        end: start,
                        owner: owner.clone(),
                    },
                );
            } else {
                self.routes.remove(&s);
            }
        }
    }

    /// Every range routed to `owner` (step 9: a dying tracker). Walks the
    /// whole map: rare.
    pub(super) fn routes_of(&self, owner: &Weak<Tracker>) -> Vec<(usize, usize)> {
        self.routes
            .iter()
            .filter(|e| Weak::ptr_eq(&e.value().owner, owner))
            .map(|e| (*e.key(), e.value().end))
            .collect()
    }

    /// The live tracker `addr` is routed to.
    fn lookup(&self, addr: usize) -> Option<Arc<Tracker>> {
        let e = self.routes.range(..=addr).next_back()?;
        let r = e.value();
        if addr < r.end {
            r.owner.upgrade()
        } else {
            None
        }
    }

    /// The descriptors open now (distinct).
    fn descriptors(&self) -> Vec<Arc<Uffd>> {
        let mut v: Vec<Arc<Uffd>> = Vec::with_capacity(4);
        for slot in &self.slots {
            if let Some(u) = lock(slot).as_ref() {
                v.push(u.clone());
            }
        }
        v
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("idx", &self.idx)
            .field("routes", &self.routes.len())
            .finish()
    }
}

/// One mm with work pending on a shard thread.
struct Slot {
    t: Arc<Tracker>,
    h: Handler,
}

/// The shard thread (point 4). Never returns.
fn shard_main(s: Arc<Shard>) {
    let _ = s.thread.set(std::thread::current().id());
    let waker = Waker::from(Arc::new(ShardWaker(s.clone())));
    // Key: the tracker's address (stable while the slot holds it).
    let mut slots: HashMap<usize, Slot> = HashMap::new();
    let mut events: Vec<Event> = Vec::new();
    let Some(wake) = s.wake.get() else {
        // `pick` opens the eventfd before any tracker can start us.
        tracing::error!(target: "mm_core::tracked", shard = s.idx, "uffd shard started without its eventfd");
        return;
    };
    loop {
        let uffds = s.descriptors();
        let mut fds = vec![wake.raw()];
        fds.extend(uffds.iter().map(|u| u.raw()));
        let timeout = if slots.values().any(|sl| sl.h.has_work()) {
            1
        } else {
            -1
        };
        if let Err(e) = uffd::poll_readable(&fds, timeout) {
            tracing::error!(target: "mm_core::tracked", shard = s.idx, error = %e, "poll of the uffd shard failed");
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        wake.drain();
        // Before the reads (step 6): a zap that ended before this point had
        // its REMOVE read in an earlier round. SeqCst: ordered before the
        // reads below, and against the load in `Tracker::self_zap`.
        let gen = s.read_gen.fetch_add(1, Ordering::SeqCst) + 1;
        for u in &uffds {
            events.clear();
            if let Err(e) = u.read_events(&mut events) {
                tracing::error!(target: "mm_core::tracked", shard = s.idx, error = %e, "read of a shared userfaultfd failed");
                continue;
            }
            test_hooks::before_route(&events);
            route_events(&s, u, &events, &mut slots, &waker);
        }
        // Point 9: this round's messages all went to their mms.
        s.routed_gen.store(gen, Ordering::SeqCst);
        s.routed.notify(usize::MAX);
        slots.retain(|_, sl| serve(sl));
    }
}

/// Sorts one read's messages to their mms' queues (step 3 of the pool). A
/// fault at an address routed to nobody (its range was unregistered: the
/// unregister woke the faulter already) is woken again, harmlessly; a
/// REMOVE/UNMAP routed to nobody needed only to be read.
fn route_events(
    s: &Shard,
    u: &Uffd,
    events: &[Event],
    slots: &mut HashMap<usize, Slot>,
    waker: &Waker,
) {
    let mut routed: Vec<(Arc<Tracker>, Event)> = Vec::with_capacity(events.len());
    for ev in events {
        let addr = match *ev {
            Event::PageFault { addr, .. } => addr,
            Event::Remove { start, .. } | Event::Unmap { start, .. } => start,
            Event::Other(_) => continue,
        };
        match s.lookup(addr) {
            Some(t) if !t.is_dead() => routed.push((t, *ev)),
            Some(_) => {}
            None => {
                if let Event::PageFault { addr, .. } = *ev {
                    let _ = u.wake(addr, PAGE_SIZE);
                }
            }
        }
    }
    // Test hook (no-op outside `cfg(test)`), before any classification as
    // in the per-mm loop: it only looks at its own mm's REMOVE messages.
    if cfg!(test) {
        let mut done: Vec<*const Tracker> = Vec::new();
        for (t, _) in &routed {
            if !done.contains(&Arc::as_ptr(t)) {
                done.push(Arc::as_ptr(t));
                super::handler::after_read(t, events);
            }
        }
    }
    for (t, ev) in routed {
        let key = Arc::as_ptr(&t) as usize;
        let slot = slots.entry(key).or_insert_with(|| Slot {
            h: Handler::new(t.clone(), waker.clone()),
            t,
        });
        slot.h.classify(std::slice::from_ref(&ev));
    }
}

/// One round of one mm's work (step 4 of the pool); false when the mm's
/// queue can go (idle, stopped, dead or gone). A panic is this mm's alone
/// (point 6).
fn serve(sl: &mut Slot) -> bool {
    let t = &sl.t;
    if t.stop.load(Ordering::SeqCst) || t.is_dead() {
        return false;
    }
    let Some(mm) = t.target() else {
        return false;
    };
    let res = std::panic::catch_unwind(AssertUnwindSafe(|| sl.h.round(&*mm)));
    drop(mm);
    match res {
        Ok(()) => sl.h.has_work() || sl.h.pressure_in_flight(),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            t.die(&format!("handler panicked: {msg}"));
            false
        }
    }
}

/// Test hooks of the shard thread (no-ops outside `cfg(test)`).
pub(super) mod test_hooks {
    use super::*;

    /// With a range set, the shard thread stops between a read that
    /// returned a REMOVE/UNMAP starting inside it and the routing of that
    /// read's messages, until the range is cleared (bounded).
    #[cfg(test)]
    pub(in crate::tracked) static HOLD_ROUTE: Mutex<Option<(usize, usize)>> = Mutex::new(None);
    /// The shard thread is held by [`HOLD_ROUTE`] right now.
    #[cfg(test)]
    pub(in crate::tracked) static ROUTE_HELD: AtomicBool = AtomicBool::new(false);

    #[cfg(test)]
    pub(super) fn before_route(events: &[Event]) {
        let held = |hold: Option<(usize, usize)>| {
            hold.is_some_and(|(s, e)| {
                events.iter().any(|ev| match *ev {
                    Event::Remove { start, .. } | Event::Unmap { start, .. } => {
                        s <= start && start < e
                    }
                    _ => false,
                })
            })
        };
        if !held(*lock(&HOLD_ROUTE)) {
            return;
        }
        ROUTE_HELD.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&HOLD_ROUTE).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        ROUTE_HELD.store(false, Ordering::SeqCst);
    }

    #[cfg(not(test))]
    pub(super) fn before_route(_events: &[Event]) {}
}
