//! Small types shared by every layer: the boxed future of protocol hooks
//! and the pressure hook the middle layer calls (implemented by the top).

use std::future::Future;
use std::pin::Pin;

/// Locks a std mutex, taking the data of a poisoned one: every std mutex
/// in guestmm guards a list or a few counters that a panicking holder
/// leaves valid, and the protocol must go on (an exit, a reap) after an
/// embedder's hook panicked. Held only to push, take or clone, never
/// across an await.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A boxed, sendable future (for hooks called from protocol code).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The pressure path, injected into every [`Mm`](crate::Mm) by whoever
/// creates it (the [`Host`](crate::Host): reclaim plug-ins, then the OOM
/// killer, then a bounded wait). The middle layer (fault path, tracked
/// handler, [`Mm::reserve`](crate::Mm::reserve)) calls it with **no lock
/// held** when a charge does not fit; it never names the host.
pub(crate) trait Pressure: Send + Sync {
    /// Tries to make `bytes` fit the budget. `requester` is the mm whose
    /// task allocates (`None`: a host thread, such as KSM's unmerge).
    /// Returns true when the caller should retry its charge.
    fn relieve(&self, bytes: u64, requester: Option<u64>) -> BoxFuture<'_, bool>;

    /// Hard budget (`MmConfig::hard_budget`): the pressure path freed
    /// nothing for mm `requester`'s fault, so its guest is killed instead of
    /// overcommitting. Must not block (called from the userfaultfd handler).
    fn kill_requester(&self, requester: u64);
}
