//! The registry: slots (`ksm_mm_slot`), the ordered scan list and its
//! cursor, `__ksm_enter` and `__ksm_exit` (PROTOCOL §9.5). The scanner
//! (`scan/`) frees slots too; the rules both sides keep are written here,
//! and each site names its counterpart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use mm_core::{sched, BoxFuture, ExitHook, Mm, MmFlag, MmGrab, MmUser};

use crate::types::MmId;
use crate::{Error, Inner, Result, Run};

/// One registered mm (`ksm_mm_slot`).
pub(crate) struct Slot {
    /// The pin taken by `__ksm_enter` (`mmgrab`); dropped exactly once,
    /// with the slot.
    pub(crate) mm: MmGrab,
    /// Rmap items of this mm, published by the scanner before it moves the
    /// cursor past the slot; read by `ksm_exit` for its fast-path test.
    pub(crate) rmap_items: AtomicU64,
    /// The KSM domain (tenant) the mm joined at `enter`: pages never merge
    /// across domains. 0 is the default domain.
    pub(crate) domain: u64,
}

impl Slot {
    pub(crate) fn id(&self) -> MmId {
        MmId::of(&self.mm)
    }

    /// The domain folded into the trees' keys: `domain * an odd constant`,
    /// a bijection on `u64`, 0 for the default domain.
    pub(crate) fn salt(&self) -> u64 {
        self.domain.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// The ordered scan list and its cursor, under the slot-list lock
/// (`ksm_mmlist_lock`): a std mutex held only briefly, never across an
/// await, taken inside an mmap read lock (never the other way round).
#[derive(Default)]
pub(crate) struct ScanList {
    pub(crate) order: Vec<Arc<Slot>>,
    /// Mm id of the slot being scanned; `None` = at the head (between
    /// passes).
    pub(crate) cursor: Option<MmId>,
}

impl ScanList {
    pub(crate) fn position(&self, id: MmId) -> Option<usize> {
        self.order.iter().position(|s| s.id() == id)
    }

    /// Takes `id` out of the order (its hash entry is the caller's).
    pub(crate) fn unlink(&mut self, id: MmId) {
        if let Some(i) = self.position(id) {
            self.order.remove(i);
        }
    }

    /// Moves the cursor past `id`; returns whether the pass is complete
    /// (the cursor is back at the head).
    pub(crate) fn advance(&mut self, id: MmId) -> bool {
        let next = self
            .position(id)
            .and_then(|i| self.order.get(i + 1))
            .map(|s| s.id());
        self.cursor = next;
        next.is_none()
    }
}

pub(crate) fn lock(m: &Mutex<ScanList>) -> MutexGuard<'_, ScanList> {
    // The list is only pushed, removed from and re-pointed under the lock;
    // a panic cannot leave it half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `__ksm_enter`: registers `mm` (idempotent). The slot pins the mm struct
/// with a grab (never a user); `VM_MERGEABLE` is set and the `ksm_exit`
/// hook registered, once per mm: an mm whose slot the scanner freed and
/// that enters again keeps its one hook.
pub(crate) fn enter(inner: &Arc<Inner>, mm: &MmUser, run: Run, domain: Option<u64>) -> Result<()> {
    let id = MmId::of(mm);
    let was_empty;
    let needs_hook;
    {
        let mut list = lock(&inner.list);
        if let Some(s) = inner.slots.get(&id) {
            return match domain {
                Some(d) if d != s.domain => Err(Error::OtherDomain {
                    mm_id: id.0,
                    domain: s.domain,
                }),
                _ => Ok(()),
            };
        }
        // The host is bound by the first successful enter, under the list
        // lock (so two first enters cannot bind two hosts).
        if let Some(b) = inner.host_budget.get() {
            if !Arc::ptr_eq(b, mm.budget()) {
                return Err(Error::OtherHost { mm_id: id.0 });
            }
        }
        // Under our list lock: our scanner clears the flag only under it
        // (when it frees our slot), so a flag set while we hold no slot is
        // another Ksm's. Tested and set at once: two instances racing to
        // enter cannot both win.
        if mm.flags().test_and_set(MmFlag::VM_MERGEABLE) {
            return Err(Error::OtherKsm { mm_id: id.0 });
        }
        let _ = inner.host_budget.set(mm.budget().clone());
        needs_hook = inner.hooked.insert(id, ()).is_none();
        let slot = Arc::new(Slot {
            mm: mm.grab(),
            rmap_items: AtomicU64::new(0),
            domain: domain.unwrap_or(0),
        });
        was_empty = list.order.is_empty();
        inner.slots.insert(id, slot.clone());
        // Merge/stop: just behind the cursor (list_add_tail(slot, cursor)),
        // so a new mm is not scanned at once; at the head that is the end
        // of the list. Unmerge: at the tail, so the unmerge pass does not
        // miss it.
        let at = match (run, list.cursor.and_then(|c| list.position(c))) {
            (Run::Unmerge, _) | (_, None) => list.order.len(),
            (_, Some(c)) => c,
        };
        list.order.insert(at, slot);
        // VM_MERGEABLE was set above, under the list lock: the scanner
        // clears it under the same lock when it frees a slot
        // (scan::leave_slot), so the two cannot interleave into a slot
        // without the flag (ksm_exit would skip it and its grab would leak).
    }
    if needs_hook {
        mm.add_exit_hook(Arc::new(KsmExitHook(Arc::downgrade(inner))));
    }
    tracing::debug!(target: "mm_ksm::ksm_enter", mm_id = id.0, "ksm_enter");
    if was_empty {
        inner.wake.notify(usize::MAX);
    }
    Ok(())
}

/// The `ksm_exit` hook registered on every entered mm. Holds the scanner
/// weakly: a dropped `Ksm` leaves nothing to do.
struct KsmExitHook(Weak<Inner>);

impl ExitHook for KsmExitHook {
    fn exit<'a>(&'a self, mm: &'a Mm) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(inner) = self.0.upgrade() {
                ksm_exit(&inner, mm).await;
            }
        })
    }
}

/// What `ksm_exit` decided under the slot-list lock.
enum ExitPath {
    /// No slot: the scanner already freed it.
    None,
    /// Removed here; free it after the unlock.
    Fast(Arc<Slot>),
    /// Left to the scanner: barrier.
    Slow,
}

/// `ksm_exit`'s decision, under the slot-list lock: which path frees the
/// slot of the exiting mm `id`.
fn exit_path(inner: &Inner, id: MmId) -> ExitPath {
    let mut list = lock(&inner.list);
    match inner.slots.get(&id).map(|s| s.clone()) {
        None => ExitPath::None,
        // At the cursor: the scanner is (or will be) inside this mm;
        // exit must not free the slot under it.
        Some(_) if list.cursor == Some(id) => ExitPath::Slow,
        Some(slot) if slot.rmap_items.load(Ordering::SeqCst) == 0 => {
            // Fast path: nothing of this mm is in the scanner's trees.
            inner.slots.remove(&id);
            list.unlink(id);
            ExitPath::Fast(slot)
        }
        Some(_) => {
            // Move it right after the cursor: the scanner meets it next,
            // sees users == 0 and frees it.
            if let Some(i) = list.position(id) {
                let s = list.order.remove(i);
                let at = match list.cursor.and_then(|c| list.position(c)) {
                    Some(c) => c + 1,
                    None => 0,
                };
                list.order.insert(at, s);
            }
            ExitPath::Slow
        }
    }
}

/// `__ksm_exit` (PROTOCOL §9.5). `users` is already 0.
async fn ksm_exit(inner: &Inner, mm: &Mm) {
    debug_assert_eq!(mm.users(), 0);
    let id = MmId::of(mm);
    // The hook runs once per mm: forget it (mm ids are never reused).
    inner.hooked.remove(&id);
    // Only mms that entered (MMF_VM_MERGEABLE).
    if !mm.flags().test(MmFlag::VM_MERGEABLE) {
        return;
    }
    sched::point("ksm_exit:start").await;
    let path = exit_path(inner, id);
    match path {
        ExitPath::None => {
            tracing::debug!(target: "mm_ksm::ksm_exit", mm_id = id.0, path = "gone", "ksm_exit");
        }
        ExitPath::Fast(slot) => {
            mm.flags().clear(MmFlag::VM_MERGE_ANY);
            mm.flags().clear(MmFlag::VM_MERGEABLE);
            inner
                .counters
                .slots_freed_by_exit
                .fetch_add(1, Ordering::Relaxed);
            sched::point("ksm_exit:fast").await;
            // mmdrop: the slot's grab goes with the last Arc (this one; the
            // list and the hash no longer hold it, and the scanner only
            // holds the cursor slot or slots with rmap items, and lets go
            // of a slot with its mmap lock, before the list lock).
            // Oracle of I-KSM-5: anyone else still holding it would be
            // using a freed mm in the kernel.
            sched::check(
                Arc::strong_count(&slot) == 1,
                "I-KSM-5: ksm_exit freed a slot (mmdrop) that ksmd still uses: its mmap unlock would touch a freed mm",
            );
            drop(slot);
            tracing::debug!(target: "mm_ksm::ksm_exit", mm_id = id.0, path = "fast", "ksm_exit");
        }
        ExitPath::Slow => {
            sched::point("ksm_exit:barrier").await;
            // The write-lock barrier (I-LO-2): users == 0 was published
            // before it (by the last mmput), and the scanner re-checks it
            // after every read lock. This waits for a scanner still inside;
            // any later one backs out without touching the VMAs.
            //
            //   ksm_exit                        | ksmd
            //                                   | read lock; users == 0? no
            //   users = 0 (mmput)               | merging a run ...
            //   write lock (waits)              | ... read unlock
            //   write unlock; exit_mmap         | read lock; users == 0? yes:
            //                                   |   back out, free the slot
            drop(mm.lock().write().await);
            sched::point("ksm_exit:after_barrier").await;
            tracing::debug!(target: "mm_ksm::ksm_exit", mm_id = id.0, path = "barrier", "ksm_exit");
        }
    }
}

#[cfg(test)]
mod tests {
    use mm_core::MapOptions;

    use super::*;
    use crate::test_util::host_and_ksm;
    use crate::types::PAGE;

    /// `ksm_exit`: no rmap items and not at the cursor → the fast path
    /// frees the slot; with rmap items → the barrier path leaves it to the
    /// scanner, which frees it at its next visit.
    #[test]
    fn test_exit_fast_path_vs_slow_path() {
        let (host, k) = host_and_ksm();
        let map = |name: &str| {
            let mm = host.new_mm(name);
            let a = mm
                .mmap_blocking(MapOptions::anon(4 * PAGE).tracked(true))
                .unwrap();
            mm.fill_blocking(a, 4 * PAGE, 1).unwrap();
            k.enter(&mm).unwrap();
            mm
        };
        let fast = map("fast");
        let (id, watch) = (fast.id(), fast.watch());
        drop(fast);
        let s = k.stats();
        assert_eq!((s.slots_freed_by_exit, s.mm_slots), (1, 0), "{s:?}");
        assert!(!k.is_registered(id) && watch.is_freed());

        let slow = map("slow");
        let (id, watch) = (slow.id(), slow.watch());
        k.inner
            .slots
            .get(&MmId(id))
            .unwrap()
            .rmap_items
            .store(4, Ordering::SeqCst);
        drop(slow);
        assert_eq!(k.stats().slots_freed_by_exit, 1, "slow path frees nothing");
        assert!(k.is_registered(id), "left for the scanner");
        assert!(!watch.is_freed(), "the slot still pins the struct");
        k.set_run_blocking(Run::Merge).unwrap();
        k.scan_step_blocking();
        assert!(!k.is_registered(id));
        assert!(watch.is_freed());
        assert_eq!(k.stats().slots_freed_by_scanner, 1);
    }
}
