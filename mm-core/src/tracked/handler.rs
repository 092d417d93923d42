//! The handler thread (steps 1, 3-6, 9): reads the userfaultfd, resolves
//! queued faults, runs the pressure path as a polled future.

use super::*;

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

pub(super) fn handler_main(t: Arc<Tracker>, mm: Weak<dyn FaultTarget>) {
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

type Pressure = BoxFuture<'static, bool>;

struct Queued {
    addr: usize,
    /// When the handler first found the faulting page locked.
    busy_since: Option<Instant>,
}

fn handler_loop(t: &Arc<Tracker>, mm_weak: &Weak<dyn FaultTarget>) -> std::io::Result<()> {
    let mut h = Handler {
        t: t.clone(),
        waker: Waker::from(Arc::new(HandlerWaker(t.clone()))),
        faults: VecDeque::new(),
        removes: Vec::new(),
        unmaps: Vec::new(),
        settle: Vec::new(),
        pressure: None,
        failed_rounds: 0,
    };
    let mut events = Vec::new();
    let raw = t.with_uffd(|u| Ok(u.raw()))?;
    loop {
        uffd::poll_readable(&[raw, t.wake.raw()], h.poll_timeout())?;
        t.wake.drain();
        if t.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        events.clear();
        // Before the read (step 6): a zap that ended before this point had
        // its REMOVE read in an earlier round.
        t.clear_retired_zaps();
        t.with_uffd(|u| u.read_events(&mut events))?;
        test_hooks::after_read(t, &events);
        h.classify(&events);
        let Some(mm) = mm_weak.upgrade() else {
            return Ok(());
        };
        h.forget_foreign(&*mm);
        h.settle.retain(|&a| !mm.settle(t, a));
        if h.pressure_pending() {
            continue;
        }
        h.serve_faults(&*mm);
        drop(mm);
    }
}

/// The handler loop's queues between rounds.
struct Handler {
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
    /// Pressure runs in a row that freed nothing (fail-open at
    /// [`PRESSURE_ROUNDS`]).
    failed_rounds: u32,
}

impl Handler {
    /// Block in `poll` until a message when idle, else retry every 1 ms.
    fn poll_timeout(&self) -> i32 {
        if self.faults.is_empty() && self.removes.is_empty() && self.settle.is_empty() {
            -1
        } else {
            1
        }
    }

    /// Sorts the messages of one read: missing faults are queued, WP faults
    /// stay blocked (step 7), our own zaps' REMOVE/UNMAP are ignored and
    /// foreign ones queued for clearing (step 6).
    fn classify(&mut self, events: &[Event]) {
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
                        self.removes.push((start, end));
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
                    self.removes.push((start, end));
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
            self.t.forget_registry(s, e);
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
        if freed {
            self.failed_rounds = 0;
        } else {
            self.failed_rounds += 1;
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
            let fail_open = self.failed_rounds >= PRESSURE_ROUNDS;
            let force = q.busy_since.is_some_and(|s| s.elapsed() >= BUSY_TIMEOUT);
            match mm.resolve(&t, q.addr, fail_open, force) {
                Outcome::Charged => {
                    // A real charge succeeded: memory is back, leave
                    // fail-open. Not on `Served`: a page served over budget
                    // (or a poison, a refault of a charged page) says nothing
                    // about room, and resetting there would cost every
                    // further fault a full pressure cycle (up to `oom_wait`
                    // each with an OOM victim pending).
                    self.failed_rounds = 0;
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

/// Unit-test injection points of the handler loop (`tracked/tests.rs`),
/// named here so the loop itself carries no test code; no-ops outside
/// `cfg(test)`.
mod test_hooks {
    use super::*;

    /// After a read of messages: with `hold_after_read`, wait until the
    /// zappers whose REMOVE was just read have popped their `self_zap`
    /// entry before the messages are classified.
    #[cfg(test)]
    pub(super) fn after_read(t: &Tracker, events: &[Event]) {
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
    pub(super) fn after_read(_t: &Tracker, _events: &[Event]) {}

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
