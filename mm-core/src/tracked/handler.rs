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

pub(super) fn handler_main(t: Arc<Tracker>, mm: Weak<Mm>) {
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
        test_hooks::after_read(t, &events);
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
            test_hooks::before_fault(t);
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
