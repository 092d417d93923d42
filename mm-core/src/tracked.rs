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
//!    (try-locks only, see 6), re-check `UNSTABLE` after seeing the faulting
//!    PTE empty, charge the budget for every missing page of the window,
//!    `UFFDIO_COPY` each run of missing pages from a zero source (this also
//!    wakes the faulter), set `PRESENT`, unlock. The access path populates
//!    tracked pages with the same ioctl under the same locks, so a page is
//!    populated and charged once, by whoever holds its lock first; the other
//!    sees `PRESENT` (or `EEXIST`) and only wakes.
//! 4. Budget exhausted: the handler keeps the fault queued and runs the
//!    pressure path ([`crate::host::pressure`]) as a future it polls between
//!    `poll(2)` rounds, so it keeps reading REMOVE/UNMAP messages while
//!    reclaim waits (a reaper zapping a tracked region blocks in
//!    `madvise(DONTNEED)` until its REMOVE message is read). After
//!    [`PRESSURE_ROUNDS`] rounds that free nothing it **fails open**: the
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
//!    handler ignores REMOVE messages inside an announced range; a REMOVE or
//!    UNMAP from the embedder's own `madvise` / `munmap` clears and uncharges
//!    the present PTEs of the range (deferred while locked).
//!    `UFFDIO_COPY` fails with `EAGAIN` while such a message is unread: the
//!    handler drains and retries; the access path retries with backoff
//!    (it holds PTE locks, but reading a message never needs one).
//! 7. Write-protect: [`MmUser::write_protect`](crate::MmUser::write_protect)
//!    populates then protects; a writer blocks (its WP message is left
//!    unanswered) until [`MmUser::write_unprotect`](crate::MmUser::write_unprotect)
//!    lifts the protection, which wakes it.
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

use crate::error::{Error, Result};
use crate::flags::MmFlag;
use crate::mm::Mm;
use crate::pgtable::{Pte, PAGES_PER_LEAF};
use crate::sys::{self, HostRange, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::uffd::{self, Event, EventFd, Fill, Uffd};

const PAGE: u64 = PAGE_SIZE as u64;

/// Default fault-around window: one 2 MiB chunk, clamped to the VMA.
pub const DEFAULT_FAULT_AROUND: u64 = HUGE_PAGE_SIZE as u64;
/// Pressure rounds that free nothing before the handler fails open.
pub const PRESSURE_ROUNDS: u32 = 3;
/// Handler rounds a fault may find its page locked before the handler
/// resolves that one page without the lock (see `resolve_busy`).
const BUSY_ROUNDS: u32 = 50;
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
    /// Is the handler thread running?
    pub handler_alive: bool,
    /// Is write-protect mode available on tracked regions?
    pub write_protect: bool,
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
    /// Host ranges our own zaps are discarding right now (step 6). Leaf
    /// lock, taken under PTE locks by the zapper and alone by the handler.
    self_zaps: Mutex<Vec<(usize, usize)>>,
    counters: Counters,
    handler: Mutex<Option<JoinHandle<()>>>,
    handler_id: OnceLock<ThreadId>,
    #[cfg(test)]
    pub(crate) panic_next_fault: AtomicBool,
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
    Served,
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
            self_zaps: Mutex::new(Vec::new()),
            counters: Counters::default(),
            handler: Mutex::new(None),
            handler_id: OnceLock::new(),
            #[cfg(test)]
            panic_next_fault: AtomicBool::new(false),
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
        lock(&self.self_zaps).push((start, end));
        let r = f();
        let mut z = lock(&self.self_zaps);
        if let Some(i) = z.iter().position(|x| *x == (start, end)) {
            z.swap_remove(i);
        }
        r
    }

    fn is_self_zap(&self, start: usize, end: usize) -> bool {
        lock(&self.self_zaps)
            .iter()
            .any(|&(s, e)| s <= start && end <= e)
    }

    /// Wakes the threads blocked on `r` (a KSM merge, after the remap).
    pub(crate) fn wake_range(&self, r: HostRange) -> Result<()> {
        self.with_uffd(|u| u.wake(r.ptr() as usize, r.len()))
            .map_err(Error::host("UFFDIO_WAKE"))
    }

    /// `UFFDIO_WRITEPROTECT` over a host range.
    pub(crate) fn writeprotect(&self, r: HostRange, wp: bool) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        self.with_uffd(|u| u.writeprotect(r.ptr() as usize, r.len(), wp))
            .map_err(Error::host("UFFDIO_WRITEPROTECT"))
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
            handler_alive: !self.is_dead() && !self.stop.load(Ordering::SeqCst),
            write_protect: self.wp,
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
    busy_rounds: u32,
}

fn handler_loop(t: &Arc<Tracker>, mm_weak: &Weak<Mm>) -> std::io::Result<()> {
    let waker = Waker::from(Arc::new(HandlerWaker(t.clone())));
    let mut events = Vec::new();
    let mut faults: VecDeque<Queued> = VecDeque::new();
    let mut removes: Vec<(usize, usize)> = Vec::new();
    let mut unmaps: Vec<(usize, usize)> = Vec::new();
    let mut pressure: Option<Pressure> = None;
    let mut failed_rounds = 0u32;
    let raw = t.with_uffd(|u| Ok(u.raw()))?;
    loop {
        let timeout = if faults.is_empty() && removes.is_empty() {
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
        t.with_uffd(|u| u.read_events(&mut events))?;
        for ev in &events {
            match *ev {
                Event::PageFault { wp: true, .. } => {
                    // Step 7: left blocked until write_unprotect wakes it.
                    t.counters.wp_faults.fetch_add(1, Ordering::Relaxed);
                }
                Event::PageFault { addr, .. } => faults.push_back(Queued {
                    addr,
                    busy_rounds: 0,
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

        if let Some(p) = pressure.as_mut() {
            match p.as_mut().poll(&mut Context::from_waker(&waker)) {
                Poll::Pending => continue,
                Poll::Ready(freed) => {
                    pressure = None;
                    if !freed {
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
            match mm.tracked_fault(t, q.addr, fail_open, q.busy_rounds >= BUSY_ROUNDS) {
                Outcome::Served => {
                    failed_rounds = 0;
                }
                Outcome::Busy => {
                    q.busy_rounds += 1;
                    faults.push_back(q);
                }
                Outcome::NeedMemory(bytes) => {
                    faults.push_front(q);
                    t.counters.pressure_runs.fetch_add(1, Ordering::Relaxed);
                    match mm.host.upgrade() {
                        Some(h) => {
                            let id = mm.id();
                            let mut fut: Pressure =
                                Box::pin(async move { crate::host::pressure(&h, bytes, id).await });
                            match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
                                Poll::Ready(freed) => {
                                    if !freed {
                                        failed_rounds += 1;
                                    }
                                    // Retried on the next round (1 ms).
                                }
                                Poll::Pending => pressure = Some(fut),
                            }
                        }
                        None => failed_rounds = PRESSURE_ROUNDS,
                    }
                    break;
                }
            }
        }
        drop(mm);
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
        if Pte(old_f).present() {
            // Charged, but the host page is gone (the embedder's own
            // DONTNEED): bring it back without charging again.
            crate::pgtable::pte_unlock(leaf.pte(gpn_f), old_f);
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
        // check_stable_address_space under the page lock (step 5), the
        // counterpart of the reaper's "set UNSTABLE, then zap under the page
        // locks":
        //
        //   reaper                       | handler
        //   set UNSTABLE                 |
        //   lock pte, clear, DONTNEED    |
        //                                | try-lock pte: empty
        //                                | UNSTABLE? yes -> POISON (SIGBUS)
        //
        // Without it the faulter would get a fresh zero page where its data
        // was.
        if self.flags.test(MmFlag::UNSTABLE) {
            crate::pgtable::pte_unlock(leaf.pte(gpn_f), old_f);
            return self.poison_fault(t, addr);
        }
        // The rest of the window, ascending, try-locks only (skip busy pages).
        let n = ((hi - lo) / PAGE) as usize;
        let mut held = [0u64; PAGES_PER_LEAF as usize]; // old word | LOCK, 0 = not held
        for (i, gpn) in (lo / PAGE..hi / PAGE).enumerate() {
            if gpn == gpn_f {
                held[i] = old_f;
            } else if let Some(o) = try_lock(leaf.pte(gpn)) {
                held[i] = o;
            }
        }
        // KSM pages are mapped (the stable page) though not PRESENT: never
        // fill them (their host range is a memfd mapping, not MISSING-registered).
        let want = |i: usize| held[i] != 0 && !Pte(held[i]).present() && !Pte(held[i]).ksm();
        let unlock = |held: &[u64], present: &[bool]| {
            for (i, gpn) in (lo / PAGE..hi / PAGE).enumerate() {
                if held[i] != 0 {
                    let set = if present[i] { Pte::PRESENT } else { 0 };
                    crate::pgtable::pte_unlock(leaf.pte(gpn), held[i] | set);
                }
            }
        };
        let fi = (gpn_f - lo / PAGE) as usize;
        let mut missing: u64 = (0..n).filter(|&i| want(i)).count() as u64;
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
                unlock(&held[..n], &[false; PAGES_PER_LEAF as usize][..n]);
                return Outcome::NeedMemory(PAGE);
            }
        }
        let selected = |i: usize| want(i) && (!only_faulting || i == fi);
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
        unlock(&held[..n], &present[..n]);
        // Wake every thread blocked in the window (COPY ran with DONTWAKE).
        // If COPY failed for the faulting page (EAGAIN: a REMOVE is queued;
        // or the range went away) it refaults and is queued again, behind
        // the message we must read first.
        let _ = t.with_uffd(|u| u.wake(host_of(lo), (hi - lo) as usize));
        Outcome::Served
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

    /// The faulting page stayed locked for [`BUSY_ROUNDS`] rounds: most
    /// likely an accessor faulted on it while holding its lock (its page was
    /// discarded behind our back by the embedder). Populate that one page
    /// without the lock and without a charge, so it can finish; if the
    /// holder was a slow zapper instead, the page is resident but uncharged
    /// until the next zap of it (a one-page, self-healing under-count).
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
        Outcome::Served
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
            let mut a = host;
            while a < stop {
                let gpn = (r.guest_start + (a - hs) as u64) / PAGE;
                if let Some(leaf) = self.pgtable.leaf(gpn, &guard) {
                    match try_lock(leaf.pte(gpn)) {
                        Some(old) => {
                            let new = if Pte(old).present() {
                                freed += 1;
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
        while mm.tracked_stats().unwrap().wp_faults == 0 {
            std::thread::yield_now();
        }
        assert!(!wrote.load(Ordering::SeqCst));
        mm.write_unprotect_blocking(addr, 2 * PAGE).unwrap();
        th.join().unwrap();
        assert!(wrote.load(Ordering::SeqCst));
        assert!(mm.compare_blocking(addr, &[5]).unwrap());
    }
}
