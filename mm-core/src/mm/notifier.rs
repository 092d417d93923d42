//! Secondary MMUs (`mmu_notifier`) and scanner exit hooks (`ksm_exit`).

use std::ops::Range;
use std::sync::Arc;

use super::*;

/// A secondary MMU that mirrors this mm (a KVM memslot, vhost, an IOMMU):
/// the `mmu_notifier` analogue.
pub trait MmNotifier: Send + Sync {
    /// The mm is being torn down (`mmu_notifier_release`): drop every
    /// translation now. Called once, first in `exit_mmap`, with no lock held;
    /// the notifier is unhooked afterwards.
    fn release(&self, mm: &Mm);

    /// Guest range `range` is about to lose its pages. `blockable == false`
    /// (the reaper) means the callee must not sleep and may refuse with
    /// [`WouldBlock`]; the caller then skips the range and retries later.
    fn invalidate_range_start(
        &self,
        range: Range<u64>,
        blockable: bool,
    ) -> std::result::Result<(), WouldBlock> {
        let _ = (range, blockable);
        Ok(())
    }

    /// The pages of `range` are gone.
    fn invalidate_range_end(&self, range: Range<u64>) {
        let _ = range;
    }
}

/// A notifier refused a nonblocking invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("mmu notifier would block")]
pub struct WouldBlock;

/// A background scanner registered with an mm (KSM, a khugepaged analogue)
/// that must be told before the teardown, the `ksm_exit` hook.
pub trait ExitHook: Send + Sync {
    /// Called from the last `mmput` with `users` already 0, before
    /// `exit_mmap` (I-KSM-3). May take the mmap lock (the write-lock
    /// barrier), never a scanner mutex (I-KSM-1).
    fn exit<'a>(&'a self, mm: &'a Mm) -> BoxFuture<'a, ()>;
}

impl Mm {
    /// Registers a secondary MMU.
    pub fn register_notifier(&self, n: Arc<dyn MmNotifier>) {
        lock_list(&self.notifiers).push(n);
    }

    /// Registers a scanner exit hook (`ksm_exit`).
    pub fn add_exit_hook(&self, h: Arc<dyn ExitHook>) {
        lock_list(&self.exit_hooks).push(h);
    }

    /// Scanner exit hooks registered so far.
    pub fn exit_hook_count(&self) -> usize {
        lock_list(&self.exit_hooks).len()
    }

    /// `mmu_notifier_invalidate_range_start[_nonblock]` over every notifier.
    /// On refusal the ones already started are ended again.
    pub fn notify_invalidate_start(
        &self,
        range: Range<u64>,
        blockable: bool,
    ) -> std::result::Result<(), WouldBlock> {
        let ns = lock_list(&self.notifiers).clone();
        for (i, n) in ns.iter().enumerate() {
            if let Err(e) = n.invalidate_range_start(range.clone(), blockable) {
                for done in &ns[..i] {
                    done.invalidate_range_end(range.clone());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// `mmu_notifier_invalidate_range_end`.
    pub fn notify_invalidate_end(&self, range: Range<u64>) {
        let ns = lock_list(&self.notifiers).clone();
        for n in &ns {
            n.invalidate_range_end(range.clone());
        }
    }

    pub(crate) fn take_notifiers(&self) -> Vec<Arc<dyn MmNotifier>> {
        std::mem::take(&mut *lock_list(&self.notifiers))
    }
}
