//! The stable tree (stable pages and their mappers), the rmap items, and
//! the rule that ties them: **an rmap item is dropped only after its page
//! was unshared** (the item holds its stable page's mapper, and a stable
//! page without mappers is punched). Everything here runs under the scanner
//! mutex.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mm_core::{Budget, KsmMm, Mm, MmState};

use super::Scanner;
use crate::types::{GuestAddr, MmId, StableId, PAGE};
use crate::Inner;

use super::items::ItemMap;
pub(crate) use super::items::RmapItem;

/// Memory cost of one rmap item, for `general_profit` (the packed item in
/// its block; the block's map entry is shared by 64 pages).
pub(crate) const RMAP_ITEM_BYTES: u64 = std::mem::size_of::<RmapItem>() as u64;

/// The rmap items of one mm, by page address, with the counts a slot
/// publishes.
#[derive(Default)]
pub(crate) struct SlotItems {
    pub(super) map: ItemMap,
    /// Items with `stable` set.
    pub(super) merging: u64,
    /// Items with `zero` set.
    pub(super) zero: u64,
}

/// One stable page (`ksm_stable_node`). Holds no page reference: its
/// mappers are counted through the rmap items, and a mapper whose page was
/// copied or zapped is dropped when the scanner next looks (I-KSM-7).
pub(super) struct StableNode {
    checksum: u64,
    mappers: u64,
    /// Mappers promised but not merged yet: the other side of a pair,
    /// queued until the current mm's lock is dropped (step 7). Counted
    /// against `max_page_sharing` like the mappers, else later chunks of
    /// the same visit would fill the page and the queued merge overshoot.
    pub(super) queued: u64,
    /// The budget charged for this page: of the mm whose charged page
    /// filled it, or, if that page was never charged (touched through the
    /// host pointer of an untracked region), of the first charged page
    /// merged onto it later; `None` while no charge was moved here.
    pub(super) budget: Option<Arc<Budget>>,
}

/// The trees. The unstable one (checksum → the first page seen with it
/// this pass) is reset at the start of every pass and never trusted: a hit
/// is compared byte for byte inside the merge's write-protect window.
#[derive(Default)]
pub(super) struct Trees {
    /// The unstable tree: checksum → (mm, address) seen this pass.
    pub(super) unstable: HashMap<u64, (MmId, GuestAddr)>,
    /// The stable tree: stable page → node ...
    pub(super) stable: HashMap<StableId, StableNode>,
    /// ... and checksum → stable pages with that content.
    pub(super) by_sum: HashMap<u64, Vec<StableId>>,
    /// Mappers of all stable pages.
    pub(super) mappers: u64,
}

impl Scanner {
    fn add_mapper(&mut self, id: StableId) {
        if let Some(n) = self.trees.stable.get_mut(&id) {
            n.mappers += 1;
            self.trees.mappers += 1;
        }
    }

    /// Drops one mapper; a stable page nobody maps is freed (its hole
    /// punched) and uncharged.
    pub(super) fn drop_mapper(&mut self, inner: &Inner, id: StableId) {
        let t = &mut self.trees;
        let Some(n) = t.stable.get_mut(&id) else {
            return;
        };
        n.mappers -= 1;
        t.mappers -= 1;
        if n.mappers > 0 {
            return;
        }
        let n = t.stable.remove(&id).expect("found above");
        if let Some(v) = t.by_sum.get_mut(&n.checksum) {
            v.retain(|x| *x != id);
            if v.is_empty() {
                t.by_sum.remove(&n.checksum);
            }
        }
        if let Err(e) = inner.store.release(id.0) {
            tracing::warn!(target: "mm_ksm", id = id.0, error = %e, "stable page release failed");
        }
        if let Some(b) = &n.budget {
            if let Err(e) = b.try_uncharge(PAGE) {
                // The page's charge was moved here by a merge: a bug.
                tracing::error!(target: "mm_ksm", id = id.0, error = %e, "stable page uncharge");
                debug_assert!(false, "stable page uncharge: {e}");
            }
        }
        inner
            .counters
            .stable_pages_freed
            .fetch_add(1, Ordering::Relaxed);
        tracing::trace!(target: "mm_ksm::ksm_remove_ksm_page", id = id.0, "ksm_remove_ksm_page");
    }

    /// Frees a stable page that ended up with no mapper (the merge that
    /// created it recorded none): released like `drop_mapper` does.
    pub(super) fn release_if_unmapped(&mut self, inner: &Inner, id: StableId) {
        if let Some(n) = self.trees.stable.get_mut(&id) {
            if n.mappers == 0 {
                // drop_mapper's accounting expects one mapper to drop.
                n.mappers = 1;
                self.trees.mappers += 1;
                self.drop_mapper(inner, id);
            }
        }
    }

    pub(super) fn new_node(&mut self, id: StableId, checksum: u64, budget: Option<Arc<Budget>>) {
        self.trees.stable.insert(
            id,
            StableNode {
                checksum,
                mappers: 0,
                queued: 0,
                budget,
            },
        );
        self.trees.by_sum.entry(checksum).or_default().push(id);
    }

    /// A stable page with this checksum and room for one more mapper,
    /// counting the mappers `planned` for it earlier in the same chunk
    /// (classified, not merged yet) and those `queued` by pairs (step 7):
    /// without them a run of identical pages would all pick the same page
    /// and overshoot `max_page_sharing`.
    pub(super) fn find_stable(
        &self,
        checksum: u64,
        max: u64,
        planned: &HashMap<StableId, u64>,
    ) -> Option<StableId> {
        let t = &self.trees;
        t.by_sum.get(&checksum)?.iter().copied().find(|id| {
            t.stable
                .get(id)
                .is_some_and(|n| n.mappers + n.queued + planned.get(id).copied().unwrap_or(0) < max)
        })
    }

    /// One more (`add`) or one less queued mapper on each of the `n`
    /// stable pages from `first`.
    pub(super) fn queue_mappers(&mut self, first: StableId, n: u64, add: bool) {
        for k in 0..n {
            if let Some(node) = self.trees.stable.get_mut(&first.nth(k)) {
                node.queued = if add {
                    node.queued + 1
                } else {
                    node.queued.saturating_sub(1)
                };
            }
        }
    }

    /// Forgets what `item` held: its mapper, its zero page.
    pub(super) fn forget_item(&mut self, inner: &Inner, items: &mut SlotItems, item: RmapItem) {
        if let Some(id) = item.stable() {
            items.merging -= 1;
            self.drop_mapper(inner, id);
        }
        if item.zero() {
            items.zero -= 1;
        }
    }

    /// Removes the rmap items of `[lo, hi)` (pages no longer in a mergeable
    /// VMA) of a live mm whose lock is held: a page that still maps its
    /// stable page is unshared first, since its mapper is about to be
    /// dropped and a stable page without mappers is freed.
    pub(super) fn drop_items_range(
        &mut self,
        inner: &Inner,
        mm: &Mm,
        state: &MmState,
        items: &mut SlotItems,
        lo: GuestAddr,
        hi: GuestAddr,
    ) {
        if lo >= hi {
            return;
        }
        for k in items.map.keys_in(lo, hi) {
            let Some(&it) = items.map.get(&k) else {
                continue;
            };
            if it.stable().is_some() {
                if let Err(e) = KsmMm::new(mm, state).and_then(|ksm| ksm.unshare(k.0, PAGE)) {
                    // Keep the item (and the mapper): freeing the stable
                    // page under a mapping would lose its contents.
                    tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr = k.0, error = %e, "unshare failed");
                    continue;
                }
            }
            items.map.remove(&k);
            self.forget_item(inner, items, it);
        }
    }

    /// Drops every rmap item of `mm` (its read lock held), keeping the
    /// rule that an item is dropped only after its page was unshared: the
    /// item holds the stable page's mapper, and a stable page without
    /// mappers is punched, so a page of a live mm still mapping it would
    /// read zeros. A live mm (`users > 0`) has every merged page unshared
    /// first, over its whole address space, not only from where the walk
    /// resumed; an exiting one is not touched (its exit_mmap zaps
    /// everything, and ksm_exit's write-lock barrier keeps that from
    /// starting before we unlock). Returns whether every item went: a page
    /// whose unshare failed keeps its item, and the caller must keep the
    /// slot.
    pub(super) fn drop_all_items(
        &mut self,
        inner: &Inner,
        mm: &Mm,
        state: &MmState,
        items: &mut SlotItems,
    ) -> bool {
        if mm.users() > 0 {
            let all = (GuestAddr(0), GuestAddr(u64::MAX));
            self.drop_items_range(inner, mm, state, items, all.0, all.1);
        } else {
            for it in items.map.take_all() {
                self.forget_item(inner, items, it);
            }
        }
        let empty = items.map.is_empty();
        debug_assert!(!empty || (items.merging, items.zero) == (0, 0));
        empty
    }

    /// Records that the page at `addr` now maps stable page `id`.
    pub(super) fn record_merged(&mut self, items: &mut SlotItems, addr: GuestAddr, id: StableId) {
        let it = items.map.entry(addr);
        if let Some(old) = it.stable() {
            debug_assert_eq!(old, id, "a merged page was merged again");
            return;
        }
        it.set_stable(Some(id));
        it.age = 0;
        it.skips = 0;
        items.merging += 1;
        self.add_mapper(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::host_and_ksm;

    /// A stable page left with no mapper is freed (hole punched, its
    /// charge given back).
    #[test]
    fn test_unmapped_stable_page_released_and_uncharged() {
        let (host, k) = host_and_ksm();
        let inner = &k.inner;
        let mut sc = Scanner::default();
        host.budget().try_charge(PAGE).unwrap();
        let id = StableId(inner.store.alloc(1).unwrap());
        sc.new_node(id, 7, Some(host.budget().clone()));
        sc.release_if_unmapped(inner, id);
        assert!(sc.trees.stable.is_empty() && sc.trees.by_sum.is_empty());
        assert_eq!(sc.trees.mappers, 0);
        assert_eq!(inner.store.counts(), (1, 1));
        assert_eq!(host.budget().charged(), 0);
    }
}
