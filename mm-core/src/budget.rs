//! The byte budget guests share (a memcg analogue): charged by the fault
//! path, uncharged by every zap. Bottom layer: knows no mm and no host.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;

/// Shared byte budget. Counters only grow and shrink by what was really
/// populated / freed; they never go negative (checked on every uncharge).
#[derive(Debug)]
pub struct Budget {
    limit: AtomicU64,
    charged: AtomicU64,
    pub(crate) peak: AtomicU64,
    pub(crate) failures: AtomicU64,
}

/// A charge that did not fit.
#[derive(Debug, Clone, Copy)]
pub struct OverBudget {
    /// Bytes asked for.
    pub requested: u64,
    /// Bytes charged at the time.
    pub charged: u64,
    /// The limit.
    pub budget: u64,
}

impl OverBudget {
    pub(crate) fn into_error(self) -> Error {
        Error::OutOfMemory {
            requested: self.requested,
            charged: self.charged,
            budget: self.budget,
        }
    }
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Self {
        Budget {
            limit: AtomicU64::new(limit),
            charged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Charges `bytes` if they fit under the limit.
    pub fn try_charge(&self, bytes: u64) -> std::result::Result<(), OverBudget> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.charged.load(Ordering::Relaxed);
        // An allocation failure injected by the race harness: the same
        // refusal as a charge over the limit.
        if crate::sched::fail("fail:charge") {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(OverBudget {
                requested: bytes,
                charged: cur,
                budget: limit,
            });
        }
        loop {
            // An impossible request (past u64) fits no budget, not even an
            // unlimited one: refused, never saturated.
            let new = match cur.checked_add(bytes) {
                Some(new) if new <= limit => new,
                _ => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(OverBudget {
                        requested: bytes,
                        charged: cur,
                        budget: limit,
                    });
                }
            };
            // Relaxed: the budget is a counter, not a publication; the pages
            // it stands for are published by the page locks.
            match self
                .charged
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(new, Ordering::Relaxed);
                    return Ok(());
                }
                Err(c) => cur = c,
            }
        }
    }

    /// Returns `bytes` that an embedder charged with
    /// [`try_charge`](Self::try_charge). More than is charged is
    /// [`Error::Uncharge`] and changes nothing.
    pub fn try_uncharge(&self, bytes: u64) -> std::result::Result<(), Error> {
        let mut cur = self.charged.load(Ordering::Relaxed);
        loop {
            let Some(new) = cur.checked_sub(bytes) else {
                return Err(Error::Uncharge {
                    requested: bytes,
                    charged: cur,
                });
            };
            // Relaxed: a counter, as in try_charge.
            match self
                .charged
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(c) => cur = c,
            }
        }
    }

    /// Returns `bytes` that mm-core's own paths charged (a zap, a merge).
    /// Below zero is a bug of ours: repaired, logged, and a panic in debug
    /// builds.
    pub(crate) fn uncharge(&self, bytes: u64) {
        let prev = self.charged.fetch_sub(bytes, Ordering::Relaxed);
        if prev < bytes {
            // Never negative: repair and report (a double uncharge is a bug).
            self.charged.fetch_add(bytes - prev, Ordering::Relaxed);
            tracing::error!(target: "mm_core::host", prev, bytes, "budget uncharged below zero");
            debug_assert!(
                std::thread::panicking(),
                "budget underflow: {prev} - {bytes}"
            );
        }
    }

    /// Bytes charged now.
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
}
