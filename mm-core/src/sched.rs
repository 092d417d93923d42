//! Named yield points, and the hook the deterministic race harness uses.
//!
//! Every mmap-lock acquire and release, flag publish and protocol step calls
//! [`point`] (async context) or [`note`] (a guard's `Drop`, a sync step).
//! Without the `sched` feature both compile to nothing.
//!
//! With `sched`, a thread may install a `Hook` (the harness does, on its
//! single-threaded executor). Then [`point`] reports the step to the hook
//! and, if the hook says so, returns `Pending` once after waking itself, so
//! the executor can poll another actor before this one continues: every
//! point is a place where the input chooses the interleaving. Code that runs
//! outside an installed hook (real threads, production) is unaffected.
//!
//! [`check`] lets protocol code state an invariant at the place where a
//! broken protocol would first be visible (a page table touched after
//! `free_pgtables`); the hook records the violation with the current step.
//! A thread with no hook (the harness's OS-threads mode) can still have its
//! violations recorded: `record_unhooked` turns on a process-global
//! fallback recorder instead of the debug assertion.
//!
//! [`fail`] marks a fallible site (a host mmap, a populate, a budget
//! charge): the hook may ask it to fail (Nth-failure injection), and the
//! site then takes the error path a real failure would take.

use std::future::Future;

#[cfg(feature = "sched")]
mod imp {
    use std::cell::RefCell;
    use std::future::Future;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::task::{Context, Poll};

    /// What a harness installs on its thread.
    pub trait Hook {
        /// A named step was reached; return true to yield here.
        fn step(&self, name: &'static str) -> bool;
        /// An invariant was broken at the current step.
        fn violation(&self, what: &'static str);
        /// A fallible site is reached: return true to make it fail as the
        /// real operation would (default: never).
        fn fail(&self, name: &'static str) -> bool {
            let _ = name;
            false
        }
    }

    thread_local! {
        static HOOK: RefCell<Option<Rc<dyn Hook>>> = const { RefCell::new(None) };
    }

    /// Installs `hook` on this thread until the returned guard drops (the
    /// hook installed before, if any, is then put back).
    pub fn install(hook: Rc<dyn Hook>) -> Installed {
        let prev = HOOK.with(|h| h.borrow_mut().replace(hook));
        Installed(prev)
    }

    /// Puts the previous hook back when dropped.
    pub struct Installed(Option<Rc<dyn Hook>>);

    impl std::fmt::Debug for Installed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Installed").finish_non_exhaustive()
        }
    }

    impl Drop for Installed {
        fn drop(&mut self) {
            let prev = self.0.take();
            HOOK.with(|h| *h.borrow_mut() = prev);
        }
    }

    /// Violations of threads with no hook, while a [`Recording`] is live.
    static UNHOOKED: std::sync::Mutex<Option<Vec<&'static str>>> = std::sync::Mutex::new(None);

    fn unhooked() -> std::sync::MutexGuard<'static, Option<Vec<&'static str>>> {
        UNHOOKED.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the process-global fallback recorder: until the returned
    /// guard drops, a [`check`](super::check) that fails on a thread with no
    /// hook is recorded (and logged) instead of tripping the debug
    /// assertion. For a harness running actors on plain OS threads; one
    /// recording at a time per process (a second one shares the list).
    pub fn record_unhooked() -> Recording {
        unhooked().get_or_insert_with(Vec::new).clear();
        Recording(())
    }

    /// A live fallback recording (see [`record_unhooked`]).
    #[derive(Debug)]
    pub struct Recording(());

    impl Recording {
        /// The violations recorded so far (and clears them).
        pub fn take(&self) -> Vec<&'static str> {
            unhooked().as_mut().map(std::mem::take).unwrap_or_default()
        }
    }

    impl Drop for Recording {
        fn drop(&mut self) {
            *unhooked() = None;
        }
    }

    /// Records `what` if a recording is live; false if none is.
    pub(super) fn record(what: &'static str) -> bool {
        match unhooked().as_mut() {
            Some(v) => {
                v.push(what);
                true
            }
            None => false,
        }
    }

    pub(super) fn current() -> Option<Rc<dyn Hook>> {
        HOOK.with(|h| h.borrow().clone())
    }

    pub(super) struct Point {
        pub(super) name: &'static str,
        pub(super) yielded: bool,
    }

    impl Future for Point {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.yielded {
                return Poll::Ready(());
            }
            self.yielded = true;
            match current() {
                Some(h) if h.step(self.name) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        }
    }
}

#[cfg(feature = "sched")]
pub use imp::{install, record_unhooked, Hook, Installed, Recording};

/// A yield point in async protocol code, e.g. `point("exit_mmap:after_unmap")`.
#[cfg(not(feature = "sched"))]
#[inline(always)]
pub fn point(name: &'static str) -> impl Future<Output = ()> {
    let _ = name;
    std::future::ready(())
}

/// A yield point in async protocol code, e.g. `point("exit_mmap:after_unmap")`.
#[cfg(feature = "sched")]
pub fn point(name: &'static str) -> impl Future<Output = ()> {
    imp::Point {
        name,
        yielded: false,
    }
}

/// A step that cannot yield (a guard release in `Drop`); recorded for traces.
#[inline(always)]
pub fn note(name: &'static str) {
    #[cfg(feature = "sched")]
    if let Some(h) = imp::current() {
        h.step(name);
    }
    let _ = name;
}

/// States an invariant of the protocol; under a harness a broken one is
/// recorded as a finding, elsewhere it is a debug assertion.
#[inline(always)]
pub fn check(ok: bool, what: &'static str) {
    if ok {
        return;
    }
    #[cfg(feature = "sched")]
    if let Some(h) = imp::current() {
        h.violation(what);
        return;
    }
    #[cfg(feature = "sched")]
    if imp::record(what) {
        tracing::error!(target: "mm_core::sched", what, "protocol invariant broken (recorded)");
        return;
    }
    debug_assert!(ok, "protocol invariant broken: {what}");
    tracing::error!(target: "mm_core::sched", what, "protocol invariant broken");
}

/// A fallible site (host mmap, populate, budget charge, ...): true if the
/// installed hook injects a failure here, and the caller must then take the
/// same error path a real failure takes. Always false without the `sched`
/// feature or without a hook.
#[inline(always)]
pub fn fail(name: &'static str) -> bool {
    #[cfg(feature = "sched")]
    if let Some(h) = imp::current() {
        return h.fail(name);
    }
    let _ = name;
    false
}

/// An async mutex whose order of acquisition depends only on the order in
/// which its users are polled, under a harness.
///
/// `async_lock::Mutex` switches a waiter to a "starvation" mode once it has
/// waited 0.5 ms of *real* time, and the mode changes who gets the lock
/// next. In the race harness, where actors run one at a time and some do
/// real syscalls (KSM's merges), that made the lock order, and so the
/// interleaving of an input, depend on the machine's speed: 1-4 of 100
/// identical `teardown_vs_ksm` inputs ran a different number of steps (a
/// ksmd batch taking the scanner mutex before or after the admin's
/// unmerge-all). Under an installed hook a waiter here tries the lock,
/// listens for the next release and sleeps until it comes: no time
/// involved. Without a hook it is `async_lock::Mutex`, fairness included.
#[derive(Debug, Default)]
pub struct Mutex<T> {
    inner: async_lock::Mutex<T>,
    released: event_listener::Event,
}

impl<T> Mutex<T> {
    /// A new unlocked mutex.
    pub fn new(value: T) -> Mutex<T> {
        Mutex {
            inner: async_lock::Mutex::new(value),
            released: event_listener::Event::new(),
        }
    }

    /// Locks the mutex (see the type's docs for the harness case).
    pub async fn lock(&self) -> MutexGuard<'_, T> {
        let guard = |g| MutexGuard {
            guard: Some(g),
            released: &self.released,
        };
        if !hooked() {
            return guard(self.inner.lock().await);
        }
        loop {
            if let Some(g) = self.inner.try_lock() {
                return guard(g);
            }
            // Listen first, then retry: a release in between is not lost.
            let l = self.released.listen();
            if let Some(g) = self.inner.try_lock() {
                return guard(g);
            }
            l.await;
        }
    }

    /// Locks the mutex if it is free.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        self.inner.try_lock().map(|g| MutexGuard {
            guard: Some(g),
            released: &self.released,
        })
    }
}

/// A held [`Mutex`]; the release wakes the harness's waiters.
#[derive(Debug)]
pub struct MutexGuard<'a, T> {
    guard: Option<async_lock::MutexGuard<'a, T>>,
    released: &'a event_listener::Event,
}

impl<T> std::ops::Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_deref().expect("held until drop")
    }
}

impl<T> std::ops::DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_deref_mut().expect("held until drop")
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.released.notify(usize::MAX);
    }
}

/// Is a harness hook installed on this thread?
#[inline(always)]
fn hooked() -> bool {
    #[cfg(feature = "sched")]
    if imp::current().is_some() {
        return true;
    }
    false
}
