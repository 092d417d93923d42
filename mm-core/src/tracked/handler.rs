//! One mm's part of the handler (steps 3-6, 9): its queues on the shard
//! thread that serves it (`pool.rs` reads and routes the messages),
//! resolving queued faults and running the pressure path as a polled
//! future.

use super::*;

/// Wakes the shard thread's `poll` when a pressure future can make
/// progress.
pub(super) struct ShardWaker(pub(super) Arc<Shard>);

impl Wake for ShardWaker {
    fn wake(self: Arc<Self>) {
        self.0.wake();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake();
    }
}

type Pressure = BoxFuture<'static, bool>;

struct Queued {
    addr: usize,
    /// When the handler first found the faulting page locked.
    busy_since: Option<Instant>,
}

/// One mm's queues between rounds on its shard thread (`pool.rs`): the
/// per-mm half of the old per-mm handler loop. Exists only while the mm
/// has work pending.
pub(super) struct Handler {
    t: Arc<Tracker>,
    /// Wakes the loop's `poll` when the pressure future can progress.
    waker: Waker,
    faults: VecDeque<Queued>,
    /// Foreign REMOVE / UNMAP ranges whose pages are still to be cleared.
    removes: Vec<(usize, usize)>,
    /// Foreign UNMAP ranges to drop from the registry.
    unmaps: Vec<(usize, usize)>,
    /// Pages served without their lock (`resolve_busy`), to be charged once
    /// the lock is free and the PTE is still empty.
    settle: Vec<usize>,
    /// The pressure path in progress (step 4), polled between rounds.
    pressure: Option<Pressure>,
}

impl Handler {
    pub(super) fn new(t: Arc<Tracker>, waker: Waker) -> Handler {
        Handler {
            t,
            waker,
            faults: VecDeque::new(),
            removes: Vec::new(),
            unmaps: Vec::new(),
            settle: Vec::new(),
            pressure: None,
        }
    }

    /// Work that needs a retry in 1 ms (the shard's `poll` blocks without
    /// a timeout when no mm has any).
    pub(super) fn has_work(&self) -> bool {
        !(self.faults.is_empty() && self.removes.is_empty() && self.settle.is_empty())
    }

    /// A pressure future is pending (woken through the shard's waker).
    pub(super) fn pressure_in_flight(&self) -> bool {
        self.pressure.is_some()
    }

    /// One round after a read (the old loop's body): foreign removes,
    /// settlements, then the queued faults unless the pressure path is
    /// still pending.
    pub(super) fn round(&mut self, mm: &dyn FaultTarget) {
        self.forget_foreign(mm);
        let t = self.t.clone();
        self.settle.retain(|&a| !mm.settle(&t, a));
        if self.pressure_pending() {
            return;
        }
        self.serve_faults(mm);
    }

    /// Sorts the messages of one read: missing faults are queued, WP faults
    /// stay blocked (step 7), our own zaps' REMOVE/UNMAP are ignored and
    /// foreign ones queued for clearing (step 6).
    pub(super) fn classify(&mut self, events: &[Event]) {
        let t = &self.t;
        for ev in events {
            match *ev {
                Event::PageFault { wp: true, .. } => {
                    // Step 7: left blocked until write_unprotect wakes it.
                    t.counters.wp_faults.fetch_add(1, Ordering::Relaxed);
                }
                Event::PageFault { addr, .. } => self.faults.push_back(Queued {
                    addr,
                    busy_since: None,
                }),
                Event::Remove { start, end } => {
                    if !t.is_self_zap(start, end) {
                        t.counters.foreign_removes.fetch_add(1, Ordering::Relaxed);
                        // A shared region's DONTNEED drops only this
                        // mapping's PTEs; the pages stay in the memfd,
                        // charged (step 10): nothing to clear.
                        if !t.is_shared(start) {
                            // Discarded pages of a lazy restore read zeros now.
                            t.discarded(start, end);
                            self.removes.push((start, end));
                        }
                    }
                }
                Event::Unmap { start, end } if t.is_self_zap(start, end) => {
                    // A KSM merge mapping the stable page over tracked pages
                    // (`ksm/merge.rs`): the pages are accounted by the merge,
                    // and the registry keeps the range (a zap maps
                    // anonymous memory back and registers it again).
                }
                Event::Unmap { start, end } => {
                    t.counters.foreign_removes.fetch_add(1, Ordering::Relaxed);
                    // A shared region's pages stay in its memfd (and
                    // charged) until our munmap or exit punches them out.
                    if !t.is_shared(start) {
                        self.removes.push((start, end));
                    }
                    self.unmaps.push((start, end));
                }
                Event::Other(_) => {}
            }
        }
    }

    /// The embedder's own madvise/munmap: clear and uncharge what we can
    /// lock now, keep the rest for the next round. An unmapped range is no
    /// longer registered (the kernel dropped it); its pages were cleared
    /// here or are retried page by page.
    fn forget_foreign(&mut self, mm: &dyn FaultTarget) {
        let mut left = Vec::new();
        for (s, e) in self.removes.drain(..) {
            mm.forget(&self.t, s, e, &mut left);
        }
        self.removes = left;
        for (s, e) in self.unmaps.drain(..) {
            // The kernel dropped the registration: drop the routing entry
            // too (only ours: the munmapper returned when we read the
            // message, and the range may already be another mm's).
            self.t.forget_registry(s, e);
            self.t.shard.unroute(s, e, &self.t.me);
        }
    }

    /// Polls the pressure future in progress; true while it is pending
    /// (the queued faults wait, messages keep being read).
    fn pressure_pending(&mut self) -> bool {
        let Some(p) = self.pressure.as_mut() else {
            return false;
        };
        match p.as_mut().poll(&mut Context::from_waker(&self.waker)) {
            Poll::Pending => true,
            Poll::Ready(freed) => {
                self.pressure = None;
                self.pressure_done(freed);
                false
            }
        }
    }

    fn pressure_done(&mut self, freed: bool) {
        // Relaxed: only the shard thread serving this mm touches it.
        if freed {
            self.t.failed_rounds.store(0, Ordering::Relaxed);
        } else {
            self.t.failed_rounds.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One pass over the queued faults (steps 3-5); stops at the first
    /// that needs memory and starts the pressure path for it (step 4).
    fn serve_faults(&mut self, mm: &dyn FaultTarget) {
        let t = self.t.clone();
        let n = self.faults.len();
        for _ in 0..n {
            let Some(mut q) = self.faults.pop_front() else {
                break;
            };
            test_hooks::before_fault(&t);
            let fail_open = self.t.failed_rounds.load(Ordering::Relaxed) >= PRESSURE_ROUNDS;
            let force = q.busy_since.is_some_and(|s| s.elapsed() >= busy_timeout());
            match mm.resolve(&t, q.addr, fail_open, force) {
                Outcome::Charged => {
                    // A real charge succeeded: memory is back, leave
                    // fail-open. Not on `Served`: a page served over budget
                    // (or a poison, a refault of a charged page) says nothing
                    // about room, and resetting there would cost every
                    // further fault a full pressure cycle (up to `oom_wait`
                    // each with an OOM victim pending).
                    self.t.failed_rounds.store(0, Ordering::Relaxed);
                }
                Outcome::Served => {}
                Outcome::Unlocked => self.settle.push(q.addr),
                Outcome::Busy => {
                    q.busy_since.get_or_insert_with(Instant::now);
                    self.faults.push_back(q);
                }
                Outcome::NeedMemory(bytes) => {
                    self.faults.push_front(q);
                    self.start_pressure(mm, bytes);
                    break;
                }
            }
        }
    }

    /// Starts the pressure path for `bytes` as a future polled between
    /// rounds, so messages keep being read while reclaim waits (step 4).
    fn start_pressure(&mut self, mm: &dyn FaultTarget, bytes: u64) {
        self.t
            .counters
            .pressure_runs
            .fetch_add(1, Ordering::Relaxed);
        let mut fut: Pressure = mm.pressure(bytes);
        match fut.as_mut().poll(&mut Context::from_waker(&self.waker)) {
            // Retried on the next round (1 ms).
            Poll::Ready(freed) => self.pressure_done(freed),
            Poll::Pending => self.pressure = Some(fut),
        }
    }
}

pub(super) use test_hooks::after_read;

/// Unit-test injection points of the handler loop (`tracked/tests.rs`),
/// named here so the loop itself carries no test code; no-ops outside
/// `cfg(test)`.
mod test_hooks {
    use super::*;

    /// After a read of messages: with `hold_after_read`, wait until the
    /// zappers whose REMOVE was just read have popped their `self_zap`
    /// entry before the messages are classified.
    #[cfg(test)]
    pub(in crate::tracked) fn after_read(t: &Tracker, events: &[Event]) {
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
    }

    #[cfg(not(test))]
    pub(in crate::tracked) fn after_read(_t: &Tracker, _events: &[Event]) {}

    /// Before each queued fault: with `panic_next_fault`, panic (step 9).
    #[cfg(test)]
    pub(super) fn before_fault(t: &Tracker) {
        if t.panic_next_fault.swap(false, Ordering::SeqCst) {
            panic!("injected handler panic");
        }
    }

    #[cfg(not(test))]
    pub(super) fn before_fault(_t: &Tracker) {}
}
