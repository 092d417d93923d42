//! [`GuestLimiter`]: wasmtime's `ResourceLimiter` asking the guestmm host
//! before a `memory.grow`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use wasmtime::{ResourceLimiter, Trap};

use crate::GuestShared;

/// A `ResourceLimiter` for one guest's store. Before a linear memory grows
/// it asks the host for the new bytes with `Mm::reserve`: the pressure path
/// runs as an allocation would (the reclaim plug-ins, then the OOM killer,
/// which kills the *largest* guest, then a bounded wait for the reaper), so
/// a grow over budget kills the biggest instance instead of failing the
/// smallest. If no room comes back the grow fails (`memory.grow` returns
/// -1); if this guest was the one killed, the grow traps.
///
/// The bytes are only reserved, not charged: pages are charged when first
/// touched (tracked regions), so untouched growth costs nothing, as in the
/// kernel.
#[derive(Debug)]
pub struct GuestLimiter {
    pub(crate) shared: Arc<GuestShared>,
}

impl GuestLimiter {
    fn killed_trap(&self) -> wasmtime::Error {
        tracing::debug!(target: "mm_wasmtime", guest = self.shared.guest_id, "memory.grow of a killed guest: trap");
        wasmtime::Error::new(Trap::Interrupt)
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if self.shared.killed.load(Ordering::SeqCst) {
            return Err(self.killed_trap());
        }
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let delta = desired.saturating_sub(current) as u64;
        let reserved = futures_lite::future::block_on(self.shared.mm.reserve(delta));
        // The OOM killer may have chosen this very guest while we waited.
        if self.shared.killed.load(Ordering::SeqCst) {
            return Err(self.killed_trap());
        }
        match reserved {
            Ok(()) => {
                self.shared.approved.store(desired as u64, Ordering::SeqCst);
                Ok(true)
            }
            Err(e) => {
                tracing::debug!(target: "mm_wasmtime", guest = self.shared.guest_id, error = %e, "memory.grow refused: no room after the pressure path");
                Ok(false)
            }
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables live in wasmtime's own heap, outside guestmm's budget.
        Ok(true)
    }
}
