//! Time for protocol code: every sleep and timer of the reaper, the OOM
//! wait and (later) ksmd goes through [`Clock`], so a test or the race
//! harness can replace real time.
//!
//! [`SystemClock`] sleeps on a single timer thread, started lazily at the
//! first sleep (the only thread mm-core starts besides the userfaultfd
//! handler). Its futures are runtime-agnostic: they register their waker
//! with the timer thread and are woken at the deadline.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::types::BoxFuture;

/// A source of time and sleeps.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> Instant;
    /// A future that completes after `d`.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
}

/// Real time, with a shared timer thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

struct Timers {
    heap: Mutex<BinaryHeap<Reverse<(Instant, u64)>>>,
    wakers: Mutex<std::collections::HashMap<u64, Waker>>,
    cv: Condvar,
    next: std::sync::atomic::AtomicU64,
}

fn timers() -> &'static Arc<Timers> {
    static T: OnceLock<Arc<Timers>> = OnceLock::new();
    T.get_or_init(|| {
        let t = Arc::new(Timers {
            heap: Mutex::new(BinaryHeap::new()),
            wakers: Mutex::new(Default::default()),
            cv: Condvar::new(),
            next: std::sync::atomic::AtomicU64::new(0),
        });
        let t2 = t.clone();
        std::thread::Builder::new()
            .name("guestmm-timer".into())
            .spawn(move || timer_loop(&t2))
            .expect("spawn the timer thread");
        t
    })
}

fn timer_loop(t: &Timers) {
    let mut heap = t.heap.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        while let Some(Reverse((when, id))) = heap.peek().copied() {
            if when > now {
                break;
            }
            heap.pop();
            let w = t
                .wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            if let Some(w) = w {
                w.wake();
            }
        }
        heap = match heap.peek() {
            Some(Reverse((when, _))) => {
                let d = when.saturating_duration_since(Instant::now());
                t.cv.wait_timeout(heap, d)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => t.cv.wait(heap).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

struct Sleep {
    deadline: Instant,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(id) = self.id.take() {
                timers()
                    .wakers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
            return Poll::Ready(());
        }
        let t = timers();
        let id = match self.id {
            Some(id) => id,
            None => {
                let id = t.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.id = Some(id);
                t.heap
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Reverse((self.deadline, id)));
                t.cv.notify_one();
                id
            }
        };
        t.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, cx.waker().clone());
        // Re-check: the timer may have fired between the deadline test and
        // the waker registration.
        if Instant::now() >= self.deadline {
            t.wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            timers()
                .wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(Sleep {
            deadline: Instant::now() + d,
            id: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sleep_completes_and_races_with_or() {
        let c = SystemClock;
        futures_lite::future::block_on(c.sleep(Duration::from_millis(5)));
        let start = Instant::now();
        let slow = c.sleep(Duration::from_secs(60));
        let fast = c.sleep(Duration::from_millis(1));
        futures_lite::future::block_on(futures_lite::future::or(slow, fast));
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}
