//! # mm-reaper: the OOM reaper and `process_mrelease` for guests
//!
//! The OOM killer lives in mm-core's `Host` (it selects, kills, marks the
//! victim and queues its mm here). This crate frees a victim's private
//! memory early, while its threads and its teardown may still be running,
//! exactly as `mm/oom_kill.c` does:
//!
//! 1. **Queue** ([`Reaper`] as `OomReaperQueue`): called once per mm (the
//!    OOM killer set `OOM_REAP_QUEUED`). The entry pins the guest record and
//!    the mm's *count* (`oom_mm`, a grab), never a user: the reaper can never
//!    become the one who runs the teardown (I-EX-6).
//! 2. **Delay** (`wake_oom_reaper`): after `delay` (kernel: 2 s, so the
//!    victim's exit can walk its robust futex list first), an mm that
//!    already has `OOM_SKIP` is dropped ("managed to terminate on its own");
//!    otherwise it goes on the head of a LIFO list.
//! 3. **Reap** (`oom_reap_task`): up to `max_retries` attempts,
//!    `retry_interval` apart, of [`oom_reap_task_mm`]:
//!    `try_read` the mmap lock (never wait for the victim, who may hold it
//!    forever), then check `OOM_SKIP` **under** the read lock (exit_mmap
//!    sets it before its write lock, so a reader that gets in after the
//!    teardown always sees it, I-EX-3), then [`reap_locked`].
//! 4. **Zap** ([`reap_locked`], `__oom_reap_task_mm`): set `UNSTABLE` before
//!    the first zap (I-RP-4), then per VMA from the top down: skip shared and
//!    pinned VMAs, ask the notifiers to invalidate *without blocking* (a
//!    refusal skips the VMA and makes the result partial, retried), zap.
//! 5. **Always** set `OOM_SKIP` at the end, reaped or given up (I-RP-6), so
//!    the OOM killer can move on; drop the pins.
//!
//! [`mrelease`] is `process_mrelease`: a synchronous reap of a *dying* guest
//! (not necessarily an OOM victim), pinning only the count, waiting for the
//! read lock in an interruptible way, re-checking `OOM_SKIP` under it.
//!
//! # Layers
//!
//! ```text
//! Reaper, ReaperThread      queue (OomReaperQueue for mm-core's OOM killer),
//!                           delay timers, the loop, spawn/stop
//! oom_reap_task             retry policy, always OOM_SKIP at the end
//! oom_reap_task_mm          try_read + OOM_SKIP under the lock (one attempt)
//! mrelease*                 process_mrelease (killable read lock)
//! reap_locked, zap_vma      the zap under the read lock (UNSTABLE first)
//! ------------------------------------------------------------------------
//! mm-core                   Host/Guest, Mm flags and lock, Mm::zap_range
//!                           (with the caller's `&MmState`: the lock proof)
//! ```
//!
//! One file (~650 lines): each layer calls only the one below it, and
//! nothing here depends on mm-ksm.

use mm_core::lock;
use std::future::Future;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::future;
use mm_core::{
    Clock, Guest, Host, LoopThread, Mm, MmFlag, MmGrab, MmState, OomReaperQueue, StopLoop,
    SystemClock, ZapReason,
};

/// Reaper settings.
#[derive(Debug, Clone)]
pub struct ReaperConfig {
    /// `OOM_REAPER_DELAY`: time between the kill and the reap (kernel: 2 s).
    pub delay: Duration,
    /// `MAX_OOM_REAP_RETRIES` (kernel: 10).
    pub max_retries: u32,
    /// Sleep between attempts (kernel: 100 ms).
    pub retry_interval: Duration,
    /// How one large VMA's zap is spread over threads (default: one
    /// thread, the kernel's way).
    pub zap: ZapSplit,
    /// Time source for the delay and the retry sleeps.
    pub clock: Arc<dyn Clock>,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            delay: Duration::from_secs(2),
            max_retries: 10,
            retry_interval: Duration::from_millis(100),
            zap: ZapSplit::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// How a reap spreads one large VMA's zap over threads (the kernel zaps on
/// one; a userspace reaper's `madvise(DONTNEED)` of a large VMA is freed
/// faster by several, beside the victim's still running threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZapSplit {
    /// Threads zapping one VMA, the reaping thread included; 0 and 1 mean
    /// one (no split).
    pub threads: usize,
    /// Only a VMA at least this long is split (default 128 MiB: a smaller
    /// one is zapped before another thread would have started).
    pub min_len: u64,
    /// The parts' inner boundaries are guest-address multiples of this
    /// many pages (default 512, 2 MiB: two threads never share a leaf of
    /// the guest's page table, so never its PTE locks). The race harness uses 1, so its VMAs of a few
    /// pages take the split path.
    pub align_pages: NonZeroU64,
}

impl ZapSplit {
    /// `threads` threads with the default thresholds.
    pub fn with_threads(threads: usize) -> ZapSplit {
        ZapSplit {
            threads,
            ..ZapSplit::default()
        }
    }
}

impl Default for ZapSplit {
    fn default() -> Self {
        ZapSplit {
            threads: 1,
            min_len: 128 << 20,
            align_pages: NonZeroU64::new(512).expect("512 is not zero"),
        }
    }
}

/// What one reap attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapOutcome {
    /// Every reapable VMA was zapped.
    Reaped {
        /// Pages uncharged.
        pages: u64,
    },
    /// Some VMA was skipped because a notifier refused to invalidate
    /// without blocking; retry later.
    Partial {
        /// Pages uncharged.
        pages: u64,
    },
    /// The mmap lock was taken (try_read failed); retry later.
    Contended,
    /// `OOM_SKIP` was already set (exit_mmap got there first).
    Skipped,
}

/// Reaper counters (`ReaperStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaperStats {
    /// mms queued by the OOM killer.
    pub queued: u64,
    /// mms dropped at the delay because they already had `OOM_SKIP`.
    pub exited_before_reap: u64,
    /// mms fully reaped.
    pub reaped: u64,
    /// mms the reaper gave up on after its retries.
    pub gave_up: u64,
    /// mms found with `OOM_SKIP` under the lock.
    pub skipped: u64,
    /// Attempts refused by the lock.
    pub contended: u64,
    /// Attempts that were partial.
    pub partial: u64,
    /// Pages uncharged by reaps.
    pub pages_reaped: u64,
    /// Duration of the last successful reap (lock to unlock), µs.
    pub last_reap_us: u64,
}

mm_core::counters! {
    struct Counters -> ReaperStats {
        queued, exited_before_reap, reaped, gave_up, skipped, contended,
        partial, pages_reaped, last_reap_us,
    }
}

struct Entry {
    /// Pins the guest record while queued (`get_task_struct`).
    guest: Guest,
    /// The victim's `oom_mm`: a count, never a user.
    mm: MmGrab,
    due: Instant,
}

struct Inner {
    config: ReaperConfig,
    /// Entries waiting for their delay (the per-task timers).
    timers: Mutex<Vec<Entry>>,
    /// `oom_reaper_list`: LIFO. Never held together with an mmap lock.
    list: Mutex<Vec<Entry>>,
    wake: Event,
    stop: AtomicBool,
    /// A [`Reaper::spawn`] thread runs.
    spawned: AtomicBool,
    stats: Counters,
}

/// The OOM reaper. Cheap to clone; run it with [`Reaper::spawn`] (a std
/// thread) or poll [`Reaper::run`] on any executor.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("stats", &self.stats())
            .finish()
    }
}

struct QueueHandle(Arc<Inner>);

impl OomReaperQueue for QueueHandle {
    /// `queue_oom_reaper` after the test_and_set: arm the delay timer.
    fn queue_oom_reaper(&self, guest: &Guest, mm: MmGrab) {
        let due = self.0.config.clock.now() + self.0.config.delay;
        self.0.stats.queued.fetch_add(1, Ordering::Relaxed);
        lock(&self.0.timers).push(Entry {
            guest: guest.clone(),
            mm,
            due,
        });
        tracing::debug!(target: "mm_reaper::wake_reaper", guest = guest.id(), "wake_reaper");
        self.0.wake.notify(usize::MAX);
    }
}

impl Reaper {
    /// A reaper with this configuration (not yet installed or running).
    pub fn new(config: ReaperConfig) -> Reaper {
        Reaper {
            inner: Arc::new(Inner {
                config,
                timers: Mutex::new(Vec::new()),
                list: Mutex::new(Vec::new()),
                wake: Event::new(),
                stop: AtomicBool::new(false),
                spawned: AtomicBool::new(false),
                stats: Counters::default(),
            }),
        }
    }

    /// Makes this the reaper the host's OOM killer queues victims to.
    /// Idempotent; installing another reaper replaces this one for future
    /// kills (victims already queued here are still reaped here).
    pub fn install(&self, host: &Host) {
        host.set_oom_reaper(Arc::new(QueueHandle(self.inner.clone())));
    }

    /// Counters.
    pub fn stats(&self) -> ReaperStats {
        self.inner.stats.snapshot(ReaperStats::default())
    }

    /// Entries queued or waiting for their delay.
    pub fn pending(&self) -> usize {
        lock(&self.inner.timers).len() + lock(&self.inner.list).len()
    }

    /// Asks [`run`](Self::run) to return after its current step.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify(usize::MAX);
    }

    /// Runs the reaper on a new std thread (`oom_reaper` kthread). One
    /// thread per reaper: a second `spawn` while the first thread runs is
    /// [`SpawnError::AlreadyRunning`] (after [`ReaperThread::stop`] or its
    /// drop, `spawn` works again); a thread the OS refuses is
    /// [`SpawnError::Thread`].
    pub fn spawn(&self) -> Result<ReaperThread, SpawnError> {
        if self.inner.spawned.swap(true, Ordering::SeqCst) {
            return Err(SpawnError::AlreadyRunning);
        }
        self.inner.stop.store(false, Ordering::SeqCst);
        let me = self.clone();
        match std::thread::Builder::new()
            .name("oom_reaper".into())
            .spawn(move || future::block_on(me.run()))
        {
            Ok(handle) => Ok(ReaperThread(LoopThread::new(self.clone(), handle))),
            Err(e) => {
                self.inner.spawned.store(false, Ordering::SeqCst);
                Err(SpawnError::Thread(e))
            }
        }
    }

    /// The reaper loop as a runtime-agnostic future: returns after
    /// [`stop`](Self::stop).
    pub async fn run(&self) {
        while !self.inner.stop.load(Ordering::SeqCst) {
            let listener = self.inner.wake.listen();
            if self.step().await {
                continue;
            }
            let now = self.inner.config.clock.now();
            let next = lock(&self.inner.timers).iter().map(|e| e.due).min();
            let wait = next.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
            future::or(listener, self.inner.config.clock.sleep(wait)).await;
        }
    }

    /// One step: move due entries to the list, then reap the newest one.
    /// Returns whether there was anything to reap. (The race harness drives
    /// this directly.)
    pub async fn step(&self) -> bool {
        self.promote_due();
        let entry = lock(&self.inner.list).pop();
        match entry {
            Some(e) => {
                oom_reap_task(&self.inner.config, &self.inner.stats, e).await;
                true
            }
            None => false,
        }
    }

    /// `wake_oom_reaper` for every entry whose delay is over.
    fn promote_due(&self) {
        let now = self.inner.config.clock.now();
        let due: Vec<Entry> = {
            let mut t = lock(&self.inner.timers);
            let (due, wait): (Vec<Entry>, Vec<Entry>) = t.drain(..).partition(|e| e.due <= now);
            *t = wait;
            due
        };
        for e in due {
            if e.mm.flags().test(MmFlag::OOM_SKIP) {
                // "The victim managed to terminate on its own": drop the pins.
                self.inner
                    .stats
                    .exited_before_reap
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            lock(&self.inner.list).push(e);
        }
    }
}

/// A reaper running on its own thread; stops and joins on drop.
#[derive(Debug)]
pub struct ReaperThread(LoopThread<Reaper>);

impl ReaperThread {
    /// Stops the thread and waits for it.
    pub fn stop(self) {
        self.0.stop();
    }
}

impl StopLoop for Reaper {
    fn stop_loop(&self) {
        self.stop();
    }

    /// [`Reaper::spawn`] may start a thread again.
    fn joined(&self) {
        self.inner.spawned.store(false, Ordering::SeqCst);
    }
}

/// `oom_reap_task`: the retry policy. Always ends by setting `OOM_SKIP` and
/// dropping the pins.
async fn oom_reap_task(config: &ReaperConfig, stats: &Counters, entry: Entry) {
    let mm: &Mm = &entry.mm;
    let mut attempts = 0;
    let done = loop {
        attempts += 1;
        let t = Instant::now();
        match oom_reap_task_mm(mm, config.zap).await {
            ReapOutcome::Reaped { pages } => {
                stats
                    .last_reap_us
                    .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                stats.reaped.fetch_add(1, Ordering::Relaxed);
                stats.pages_reaped.fetch_add(pages, Ordering::Relaxed);
                break true;
            }
            ReapOutcome::Skipped => {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                break true;
            }
            ReapOutcome::Contended => {
                stats.contended.fetch_add(1, Ordering::Relaxed);
            }
            ReapOutcome::Partial { pages } => {
                stats.partial.fetch_add(1, Ordering::Relaxed);
                stats.pages_reaped.fetch_add(pages, Ordering::Relaxed);
            }
        }
        if attempts >= config.max_retries {
            break false;
        }
        config.clock.sleep(config.retry_interval).await;
    };
    let gave_up = !done && !mm.flags().test(MmFlag::OOM_SKIP);
    // I-RP-6: OOM_SKIP always, reaped or given up, so the OOM killer's
    // selection (which aborts while a victim lacks it) can move on.
    mm.flags().set(MmFlag::OOM_SKIP);
    mm_core::sched::point("oom_reap_task:oom_skip_set").await;
    if gave_up {
        // Counted after the flag: whoever sees `gave_up` sees OOM_SKIP.
        stats.gave_up.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(
            target: "mm_reaper",
            guest = entry.guest.id(),
            attempts,
            "oom_reaper: unable to reap guest {}",
            entry.guest.name()
        );
    }
    drop(entry); // put_task_struct + the oom_mm clone
}

/// `oom_reap_task_mm`: one attempt. Never waits for the victim's lock.
pub async fn oom_reap_task_mm(mm: &Mm, zap: ZapSplit) -> ReapOutcome {
    mm_core::sched::point("oom_reap_task_mm:try_read").await;
    let Some(state) = mm.lock().try_read() else {
        tracing::debug!(target: "mm_reaper::skip_task_reaping", mm_id = mm.id(), "skip_task_reaping (contended)");
        return ReapOutcome::Contended;
    };
    // I-EX-3: OOM_SKIP checked UNDER the read lock. exit_mmap sets it
    // before asking for the write lock, so if we got the lock after its
    // teardown we see it here and never walk freed VMAs:
    //
    //   exit_mmap                      | reaper
    //   set OOM_SKIP                   |
    //   write lock; free; empty tree   |
    //   write unlock                   |
    //                                  | try_read ok
    //                                  | OOM_SKIP? yes -> skip
    if mm.flags().test(MmFlag::OOM_SKIP) {
        tracing::debug!(target: "mm_reaper::skip_task_reaping", mm_id = mm.id(), "skip_task_reaping (OOM_SKIP)");
        return ReapOutcome::Skipped;
    }
    mm_core::sched::point("oom_reap_task_mm:checked").await;
    tracing::debug!(target: "mm_reaper::start_task_reaping", mm_id = mm.id(), "start_task_reaping");
    let start = Instant::now();
    let (complete, pages) = reap_locked(mm, &state, zap).await;
    check_reaped(mm, &state, complete);
    mm_core::sched::point("oom_reap_task_mm:after_reap").await;
    drop(state);
    tracing::info!(
        target: "mm_reaper::finish_task_reaping",
        mm_id = mm.id(),
        pages,
        complete,
        us = start.elapsed().as_micros() as u64,
        "oom_reaper: reaped guest mm {}, now anon-rss {} pages",
        mm.id(),
        mm.anon_rss_pages()
    );
    if complete {
        ReapOutcome::Reaped { pages }
    } else {
        ReapOutcome::Partial { pages }
    }
}

/// `__oom_reap_task_mm`: zap every reapable VMA. The caller holds the mmap
/// lock in read mode (`state`). Returns (complete, pages uncharged).
///
/// I-RP-10, right after a reap that says it completed, still under its read
/// lock and with no yield point in between: `UNSTABLE` is set and no
/// reapable VMA (not shared, not pinned) has a present page left. After
/// `UNSTABLE` no fault populates one (they check it under the page lock),
/// so what is present here was never zapped. What the OOM killer counts on
/// when the reap sets `OOM_SKIP`. Mutation testing showed a reap that
/// freed nothing and reported success passed every other oracle (the
/// victim's own exit frees its memory later). One walk of the victim's
/// page table (~0.1 ms per GiB here, beside a zap of ~60 ms per GiB).
fn check_reaped(mm: &Mm, state: &MmState, complete: bool) {
    if !complete {
        return;
    }
    let page = mm_core::PAGE_SIZE as u64;
    let left: u64 = state
        .vmas()
        .iter()
        .filter(|v| !v.is_shared() && !v.flags().contains(mm_core::VmFlags::PINNED))
        .map(|v| {
            mm.page_table()
                .count_present(v.start() / page, v.end() / page)
        })
        .sum();
    mm_core::sched::check(
        mm.flags().test(MmFlag::UNSTABLE) && left == 0,
        "I-RP-10: a reap reported complete left UNSTABLE unset or pages present",
    );
}

/// A named yield point follows the `UNSTABLE` publish and each VMA's zap,
/// so a race harness can run a fault (or an exit) between any two steps:
/// a reordering of the publish and the zaps is then visible.
pub async fn reap_locked(mm: &Mm, state: &MmState, zap: ZapSplit) -> (bool, u64) {
    // I-RP-4: UNSTABLE before the first zap. The fault path re-checks it
    // under the page lock after finding a PTE empty, so no access ever
    // sees a zero page where the victim's data was (6b31d5955cb2).
    mm.flags().set(MmFlag::UNSTABLE);
    mm_core::sched::point("reap:unstable_set").await;
    let mut complete = true;
    let mut pages = 0;
    // From the top down (2025: "from the other end" than exit_mmap, which
    // zaps upwards, so the two meet instead of fighting over page locks).
    for vma in state.vmas().iter().rev() {
        // I-RP-3: never shared (the memory is not the victim's alone) nor
        // pinned (PFNMAP-like). VM_LOCKED is reaped (since 5.18).
        if vma.is_shared() || vma.flags().contains(mm_core::VmFlags::PINNED) {
            continue;
        }
        let range = vma.start()..vma.end();
        // Per VMA, nonblocking: a secondary MMU that would have to sleep
        // refuses; skip this VMA and report partial (retried later).
        if mm.notify_invalidate_start(range.clone(), false).is_err() {
            complete = false;
            continue;
        }
        match zap_vma(mm, state, vma, zap) {
            Ok(n) => pages += n,
            Err(e) => {
                complete = false;
                tracing::error!(target: "mm_reaper", mm_id = mm.id(), error = %e, "zap failed");
            }
        }
        mm.notify_invalidate_end(range);
        mm_core::sched::point("reap:vma_zapped").await;
    }
    (complete, pages)
}

/// Zaps one VMA, splitting a large one over `zap.threads` threads (scoped:
/// they end before the caller's read lock can). The calling thread zaps the
/// first part itself: under a race harness it is the one whose hook sees
/// the zap's checks and injected failures (the others have none).
fn zap_vma(mm: &Mm, state: &MmState, vma: &mm_core::Vma, zap: ZapSplit) -> mm_core::Result<u64> {
    let cuts = split_points(vma.start(), vma.end(), vma.flags(), zap);
    let part =
        move |(start, end): (u64, u64)| mm.zap_range(state, vma, start, end, ZapReason::Reap);
    if cuts.len() <= 1 {
        return part((vma.start(), vma.end()));
    }
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        let mut inline = Vec::new();
        for &range in &cuts[1..] {
            // A thread the OS refuses (EAGAIN: RLIMIT_NPROC, memory) is no
            // reason to leave the victim unreaped: zap that part here.
            let spawned = if mm_core::sched::fail("fail:zap_thread") {
                None
            } else {
                std::thread::Builder::new()
                    .name("oom_reaper-zap".into())
                    .spawn_scoped(s, move || part(range))
                    .ok()
            };
            match spawned {
                Some(h) => handles.push(h),
                None => inline.push(range),
            }
        }
        let mut results = vec![part(cuts[0])];
        results.extend(inline.into_iter().map(part));
        for h in handles {
            // A panic in a zap thread is a bug in mm-core's zap: pass it on.
            results.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        // Every part was zapped (or failed) before the first error is
        // returned: a failed part makes the reap partial, not the others.
        results.into_iter().sum()
    })
}

/// The parts of `[start, end)` for [`ZapSplit`]: one part unless the split
/// applies; else up to `zap.threads` non-empty, adjacent parts covering it
/// exactly, each inner boundary rounded up to a multiple of the alignment.
fn split_points(start: u64, end: u64, flags: mm_core::VmFlags, zap: ZapSplit) -> Vec<(u64, u64)> {
    let len = end - start;
    // THP-backed VMAs free 2 MiB per PMD and are done before extra threads
    // would start.
    if zap.threads <= 1 || len < zap.min_len || flags.contains(mm_core::VmFlags::HUGEPAGE) {
        return vec![(start, end)];
    }
    let align = zap
        .align_pages
        .get()
        .saturating_mul(mm_core::PAGE_SIZE as u64);
    // No more parts than pages (a thread count beyond that adds nothing).
    let threads = (zap.threads as u64)
        .min(len / mm_core::PAGE_SIZE as u64)
        .max(1);
    let per = len / threads;
    let mut parts = Vec::new();
    let mut from = start;
    for i in 1..=threads {
        let to = if i == threads {
            end
        } else {
            (start + i * per)
                .checked_next_multiple_of(align)
                .map_or(end, |c| c.min(end))
        };
        if to > from {
            parts.push((from, to));
            from = to;
        }
    }
    parts
}

/// Why [`Reaper::spawn`] did not start a thread.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// This reaper's thread already runs (one per reaper).
    #[error("the oom_reaper thread of this reaper is already running")]
    AlreadyRunning,
    /// The OS refused the thread.
    #[error("cannot start the oom_reaper thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// `process_mrelease` errors, with the kernel's errno in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MreleaseError {
    /// ESRCH: no such guest, or it has no address space any more.
    #[error("no such guest {guest} (ESRCH)")]
    NoSuchGuest {
        /// Guest id asked for.
        guest: u64,
    },
    /// EINVAL: the guest is not dying (not killed, not exiting).
    #[error("guest {guest} is not dying (EINVAL)")]
    NotDying {
        /// Guest id.
        guest: u64,
    },
    /// EINTR: interrupted while waiting for the mmap lock.
    #[error("interrupted while waiting for guest {guest}'s mmap lock (EINTR)")]
    Interrupted {
        /// Guest id.
        guest: u64,
    },
    /// EAGAIN: a notifier refused to invalidate without blocking; some
    /// memory was not reaped. Try again.
    #[error("guest {guest} only partly reaped, try again (EAGAIN)")]
    Partial {
        /// Guest id.
        guest: u64,
    },
}

/// What a successful [`mrelease`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MreleaseOutcome {
    /// Reaped now.
    Reaped {
        /// Pages uncharged.
        pages: u64,
    },
    /// Nothing to do: the work was already done (`OOM_SKIP`: the teardown
    /// or the reaper finished it; or an earlier reap left nothing to free).
    AlreadyDone,
}

/// `process_mrelease(pidfd, 0)` with an uninterruptible wait.
pub async fn mrelease(host: &Host, guest: u64) -> Result<MreleaseOutcome, MreleaseError> {
    mrelease_interruptible(host, guest, future::pending::<()>()).await
}

/// Blocking [`mrelease`].
pub fn mrelease_blocking(host: &Host, guest: u64) -> Result<MreleaseOutcome, MreleaseError> {
    future::block_on(mrelease(host, guest))
}

/// `process_mrelease` whose wait for the read lock ends with `Interrupted`
/// when `interrupt` completes first (`mmap_read_lock_killable`).
pub async fn mrelease_interruptible(
    host: &Host,
    guest_id: u64,
    interrupt: impl Future<Output = ()>,
) -> Result<MreleaseOutcome, MreleaseError> {
    let guest = host
        .guest(guest_id)
        .map_err(|_| MreleaseError::NoSuchGuest { guest: guest_id })?;
    // find_lock_task_mm + mmgrab: a COUNT only (since v5.17). A user would
    // make us the one who runs the teardown if the guest exits meanwhile
    // (the v5.15 design; exit_aio would then block the caller).
    let grab = guest
        .mm_grab()
        .ok_or(MreleaseError::NoSuchGuest { guest: guest_id })?;
    if !guest.is_dying() {
        // "Error only if the work has not been done already."
        return if grab.flags().test(MmFlag::OOM_SKIP) {
            Ok(MreleaseOutcome::AlreadyDone)
        } else {
            Err(MreleaseError::NotDying { guest: guest_id })
        };
    }
    mm_core::sched::point("mrelease:before_lock").await;
    let state = future::or(async { Some(grab.lock().read().await) }, async {
        interrupt.await;
        None
    })
    .await
    .ok_or(MreleaseError::Interrupted { guest: guest_id })?;
    // Re-check OOM_SKIP under the read lock "to ensure possible change in
    // exit_mmap is seen" (I-EX-3): a teardown that finished before we got
    // the lock left an empty tree and OOM_SKIP; one that has not started
    // its write phase cannot start it while we hold the lock.
    if grab.flags().test(MmFlag::OOM_SKIP) {
        return Ok(MreleaseOutcome::AlreadyDone);
    }
    mm_core::sched::point("mrelease:checked").await;
    // A reap (ours or the reaper's) ran before: UNSTABLE stays set.
    let reaped_before = grab.flags().test(MmFlag::UNSTABLE);
    // Synchronous and user-requested: use the CPUs we have (the kernel's
    // call runs beside the victim's own exit, which zaps too).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let (complete, pages) = reap_locked(&grab, &state, ZapSplit::with_threads(threads)).await;
    check_reaped(&grab, &state, complete);
    drop(state);
    if complete && pages == 0 && reaped_before {
        // The kernel's second process_mrelease reaps nothing and returns
        // 0; say so by name.
        Ok(MreleaseOutcome::AlreadyDone)
    } else if complete {
        Ok(MreleaseOutcome::Reaped { pages })
    } else {
        Err(MreleaseError::Partial { guest: guest_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_core::VmFlags;

    const P: u64 = mm_core::PAGE_SIZE as u64;

    fn split(threads: usize, min_len: u64, align_pages: u64) -> ZapSplit {
        ZapSplit {
            threads,
            min_len,
            align_pages: NonZeroU64::new(align_pages).unwrap(),
        }
    }

    /// Adjacent, non-empty, in order, covering `[start, end)` exactly.
    fn assert_covers(parts: &[(u64, u64)], start: u64, end: u64) {
        assert_eq!(parts.first().map(|p| p.0), Some(start));
        assert_eq!(parts.last().map(|p| p.1), Some(end));
        for w in parts.windows(2) {
            assert_eq!(w[0].1, w[1].0, "{parts:x?}");
        }
        assert!(parts.iter().all(|&(a, b)| a < b), "{parts:x?}");
    }

    #[test]
    fn test_split_points_cover_the_vma_on_aligned_boundaries() {
        let (start, end) = (0x7f00_0000_1000, 0x7f00_0000_1000 + (256 << 20) + 5 * P);
        for threads in 2..=5 {
            let parts = split_points(start, end, VmFlags::EMPTY, ZapSplit::with_threads(threads));
            assert_covers(&parts, start, end);
            assert_eq!(parts.len(), threads);
            for &(a, _) in &parts[1..] {
                assert_eq!(a % (2 << 20), 0, "inner boundary {a:x} not on 2 MiB");
            }
        }
        // Per page: 14 pages over 3 threads.
        let parts = split_points(
            0x10_0000,
            0x10_0000 + 14 * P,
            VmFlags::EMPTY,
            split(3, 0, 1),
        );
        assert_eq!(
            parts,
            [
                (0x10_0000, 0x10_0000 + 5 * P),
                (0x10_0000 + 5 * P, 0x10_0000 + 10 * P),
                (0x10_0000 + 10 * P, 0x10_0000 + 14 * P)
            ]
        );
    }

    #[test]
    fn test_split_points_one_part_when_the_split_does_not_apply() {
        let (start, end) = (0x20_0000, 0x20_0000 + (200 << 20));
        let one = vec![(start, end)];
        let flags = VmFlags::EMPTY;
        assert_eq!(split_points(start, end, flags, ZapSplit::default()), one);
        assert_eq!(split_points(start, end, flags, split(0, 0, 1)), one);
        assert_eq!(
            split_points(start, start + P, flags, split(4, 0, 1)),
            vec![(start, start + P)]
        );
        assert_eq!(
            split_points(start, end, flags, split(4, end - start + 1, 512)),
            one
        );
        // A VMA of exactly `min_len` is split.
        assert_eq!(
            split_points(start, end, flags, split(4, end - start, 512)).len(),
            4
        );
        assert_eq!(
            split_points(start, end, VmFlags::HUGEPAGE, ZapSplit::with_threads(4)),
            one
        );
        // An alignment beyond the VMA: no inner boundary fits.
        assert_eq!(split_points(start, end, flags, split(4, 0, u64::MAX)), one);
    }

    #[test]
    fn test_split_points_never_more_parts_than_pages() {
        let (start, end) = (0x10_0000, 0x10_0000 + 3 * P);
        let parts = split_points(start, end, VmFlags::EMPTY, split(usize::MAX, 0, 1));
        assert_covers(&parts, start, end);
        assert_eq!(parts.len(), 3);
    }
}
