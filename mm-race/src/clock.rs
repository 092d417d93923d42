//! Virtual time: sleeps complete in deadline order when the executor has
//! nothing else to run, so the reaper's delay and retries cost nothing and
//! replay exactly.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use mm_core::{BoxFuture, Clock};

#[derive(Debug)]
struct State {
    base: Instant,
    now: Duration,
    timers: Vec<(Duration, Waker)>,
}

/// A clock whose time only moves when the executor advances it.
#[derive(Debug, Clone)]
pub struct VirtualClock {
    st: Arc<Mutex<State>>,
}

impl Default for VirtualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualClock {
    /// Time 0.
    pub fn new() -> Self {
        VirtualClock {
            st: Arc::new(Mutex::new(State {
                base: Instant::now(),
                now: Duration::ZERO,
                timers: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Jumps to the earliest pending deadline and wakes its sleepers.
    /// Returns false if nothing sleeps.
    pub fn advance(&self) -> bool {
        let mut st = self.lock();
        let Some(next) = st.timers.iter().map(|t| t.0).min() else {
            return false;
        };
        st.now = st.now.max(next);
        let now = st.now;
        let (due, rest): (Vec<_>, Vec<_>) = st.timers.drain(..).partition(|t| t.0 <= now);
        st.timers = rest;
        drop(st);
        for (_, w) in due {
            w.wake();
        }
        true
    }
}

struct Sleep {
    clock: VirtualClock,
    until: Duration,
}

impl Future for Sleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.clock.lock();
        if st.now >= self.until {
            return Poll::Ready(());
        }
        st.timers.push((self.until, cx.waker().clone()));
        Poll::Pending
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Instant {
        let st = self.lock();
        st.base + st.now
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        let until = self.lock().now + d;
        Box::pin(Sleep {
            clock: self.clone(),
            until,
        })
    }
}
