//! `unmerge_and_remove_all_rmap_items` (run = 2, PROTOCOL §9.7): unshare
//! every merged page of every live mm and drop all rmap items; slots of
//! live mms stay, slots of exiting ones are freed. Runs under the scanner
//! mutex, like the scan.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mm_core::{sched, KsmMm, MmFlag};

use super::{publish, publish_slot, Scanner};
use crate::slots::{lock, Slot};
use crate::types::{GuestAddr, PAGE};
use crate::{Error, Inner, Result};

/// Unmerge-all: every slot from the head of the list, one at a time.
pub(crate) async fn unmerge_all(inner: &Inner, sc: &mut Scanner) -> Result<()> {
    {
        let mut list = lock(&inner.list);
        list.cursor = list.order.first().map(|s| s.id());
    }
    loop {
        let slot = {
            let list = lock(&inner.list);
            match list.cursor.and_then(|c| list.position(c)) {
                Some(i) => list.order[i].clone(),
                None => break,
            }
        };
        if let Err(e) = unmerge_slot(inner, sc, slot).await {
            lock(&inner.list).cursor = None;
            publish(inner, sc);
            return Err(e);
        }
        sched::point("ksm_unmerge:slot_done").await;
    }
    sc.trees.unstable.clear();
    sc.address = GuestAddr(0);
    sc.items.retain(|_, v| !v.map.is_empty());
    // ksm_scan.seqnr = 0.
    inner.counters.full_scans.store(0, Ordering::Relaxed);
    publish(inner, sc);
    Ok(())
}

/// One slot of unmerge-all: unshare a live mm's pages, drop its rmap
/// items, move the cursor on; free the slot if the mm is exiting. Takes
/// the slot by value, as the scan does: our reference goes before the
/// slot-list lock (I-KSM-5).
async fn unmerge_slot(inner: &Inner, sc: &mut Scanner, slot: Arc<Slot>) -> Result<()> {
    let id = slot.id();
    // Room for the copies before the read lock (break_ksm allocates):
    // this may OOM-kill and wait for a victim's exit while we hold the
    // scanner mutex, which is safe only because ksm_exit never takes it
    // (seed 3). Holding no mmap lock here, the wait cannot block the
    // victim's write-lock barrier either.
    let merging = sc.items.get(&id).map_or(0, |it| it.merging);
    slot.mm
        .reserve(merging * PAGE)
        .await
        .map_err(Error::mm(id.0))?;
    let state = slot.mm.lock().read().await;
    sched::point("ksm_unmerge:read_locked").await;
    // ksm_test_exit right after the read lock (I-KSM-2).
    let alive = slot.mm.users() > 0;
    let mut items = sc.items.remove(&id).unwrap_or_default();
    if alive {
        let ranges: Vec<(u64, u64)> = state.vmas().iter().map(|v| (v.start(), v.len())).collect();
        for (s, len) in ranges {
            if let Err(source) = KsmMm::new(&slot.mm, &state).and_then(|k| k.unshare(s, len)) {
                publish_slot(&slot, &items);
                sc.items.insert(id, items);
                drop(state);
                return Err(Error::Mm {
                    mm_id: id.0,
                    source,
                });
            }
        }
    }
    // Unshared above (alive), so this only forgets; an item whose page
    // still could not be unshared stays with its mapper.
    let all_gone = sc.drop_all_items(inner, &slot.mm, &state, &mut items);
    publish_slot(&slot, &items);
    if !all_gone {
        sc.items.insert(id, items);
    }
    let mut list = lock(&inner.list);
    list.advance(id);
    if alive {
        // I-KSM-5, as in the scan: the mmap lock (and our use of the
        // slot) first, the list lock last.
        drop(state);
        drop(slot);
        drop(list);
    } else {
        inner.slots.remove(&id);
        list.unlink(id);
        drop(list);
        slot.mm.flags().clear(MmFlag::VM_MERGE_ANY);
        slot.mm.flags().clear(MmFlag::VM_MERGEABLE);
        drop(state);
        inner
            .counters
            .slots_freed_by_scanner
            .fetch_add(1, Ordering::Relaxed);
        // mmdrop: the last Arc of the removed slot.
        drop(slot);
    }
    Ok(())
}
