//! Named yield points, and the hook the deterministic race harness uses.
//!
//! Every mmap-lock acquire and release, flag publish and protocol step calls
//! [`point`] (async context) or [`note`] (a guard's `Drop`, a sync step).
//! Without the `sched` feature both compile to nothing.
//!
//! With `sched`, a thread may install a [`Hook`] (the harness does, on its
//! single-threaded executor). Then [`point`] reports the step to the hook
//! and, if the hook says so, returns `Pending` once after waking itself, so
//! the executor can poll another actor before this one continues: every
//! point is a place where the input chooses the interleaving. Code that runs
//! outside an installed hook (real threads, production) is unaffected.
//!
//! [`check`] lets protocol code state an invariant at the place where a
//! broken protocol would first be visible (a page table touched after
//! `free_pgtables`); the hook records the violation with the current step.

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
    }

    thread_local! {
        static HOOK: RefCell<Option<Rc<dyn Hook>>> = const { RefCell::new(None) };
    }

    /// Installs `hook` on this thread until the returned guard drops.
    pub fn install(hook: Rc<dyn Hook>) -> Installed {
        HOOK.with(|h| *h.borrow_mut() = Some(hook));
        Installed(())
    }

    /// Removes the hook when dropped.
    #[derive(Debug)]
    pub struct Installed(());

    impl Drop for Installed {
        fn drop(&mut self) {
            HOOK.with(|h| *h.borrow_mut() = None);
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
pub use imp::{install, Hook, Installed};

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
    debug_assert!(ok, "protocol invariant broken: {what}");
    tracing::error!(target: "mm_core::sched", what, "protocol invariant broken");
}
