//! Named yield points.
//!
//! Every mmap-lock acquire and release, flag publish and protocol step calls
//! [`point`] (async context) or [`note`] (a guard's `Drop`). Without the
//! `sched` feature both compile to nothing. The deterministic race harness
//! (feature `sched`) turns each point into a place where the executor may
//! switch to another actor; the names show up in its traces, so they read
//! `function:step`.

use std::future::Future;

/// A yield point in async protocol code, e.g. `point("exit_mmap:after_unmap")`.
#[inline(always)]
pub fn point(name: &'static str) -> impl Future<Output = ()> {
    let _ = name;
    std::future::ready(())
}

/// A step that cannot yield (a guard release in `Drop`); recorded for traces.
#[inline(always)]
pub fn note(name: &'static str) {
    let _ = name;
}
