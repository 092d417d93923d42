//! The merges: runs of classified pages, one `mmap` each (step 4), and
//! the unstable tree's side of a pair in another mm (step 7). Each runs
//! under the read lock of the mm it merges in, after its `users == 0`
//! check.

use mm_core::{sched, KsmMerge, MergeRun};

use super::classify::Class;
use super::maps;
use super::{publish_slot, MmCtx, Scanner};
use crate::types::{GuestAddr, MmId, PageCount, StableId};
use crate::Inner;

/// A run of another mm's pages (the unstable tree's side of a pair) to be
/// merged onto stable pages this batch created, after the current mm's
/// lock is dropped (step 7).
pub(super) struct Pending {
    mm_id: MmId,
    addr: GuestAddr,
    n: PageCount,
    first: StableId,
}

/// Step 4, the merges of one classified chunk at `a`: runs of consecutive
/// hits, one `mmap` each (onto consecutive stable pages).
pub(super) fn merge_runs(
    cx: &mut MmCtx<'_>,
    a: GuestAddr,
    class: &[Class],
    sums: &[u64],
    pending: &mut Vec<Pending>,
) {
    let n = class.len();
    let me = MmId::of(cx.mm);
    // The stable page each `Pair` page of the chunk now maps (for twins).
    let mut made: Vec<Option<StableId>> = vec![None; n];
    let mut i = 0;
    while i < n {
        let start = a.add_pages(i as u64);
        let run = |f: &dyn Fn(u64, Class) -> bool| {
            (i + 1..n)
                .find(|&j| !f((j - i) as u64, class[j]))
                .unwrap_or(n)
        };
        let j = match class[i] {
            Class::None | Class::Twin(_) => i + 1,
            Class::Zero => {
                let j = run(&|_, c| c == Class::Zero);
                merge_zero(cx, start, PageCount((j - i) as u64));
                j
            }
            Class::Stable(id) => {
                let j = run(&|k, c| c == Class::Stable(id.nth(k)));
                merge_stable(cx, start, PageCount((j - i) as u64), id, false);
                j
            }
            Class::Pair(om, oa) => {
                let j = run(&|k, c| c == Class::Pair(om, oa.add_pages(k)));
                let len = PageCount((j - i) as u64);
                if let Some(first) = merge_new(cx, start, &sums[i..j]) {
                    for (k, m) in made[i..j].iter_mut().enumerate() {
                        *m = Some(first.nth(k as u64));
                    }
                    if om == me {
                        // The other side is in this mm, whose lock we hold:
                        // merge it now (the kernel's try_to_merge_two_pages
                        // does both at once), so it counts at once.
                        merge_stable(cx, oa, len, first, true);
                    } else {
                        // Its mapper is promised: counted against
                        // max_page_sharing until step 7 merges it.
                        cx.sc.queue_mappers(first, len.0, true);
                        pending.push(Pending {
                            mm_id: om,
                            addr: oa,
                            n: len,
                            first,
                        });
                    }
                }
                j
            }
        };
        i = j;
    }
    // Twins join the stable page their chunk's pair made (one mapping
    // each: their neighbours have other contents).
    for (i, c) in class.iter().enumerate() {
        if let Class::Twin(k) = *c {
            if let Some(id) = made[k] {
                merge_stable(cx, a.add_pages(i as u64), PageCount(1), id, false);
            }
        }
    }
}

fn map_limit(cx: &mut MmCtx<'_>) {
    if !cx.sc.map_limited {
        tracing::warn!(target: "mm_ksm", mm_id = cx.mm.id(), "vm.max_map_count reached: merging stops until the next pass");
    }
    cx.sc.map_limited = true;
    cx.inner
        .counters
        .map_limit_hits
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Discards `n` all-zero pages from `addr` (`use_zero_pages`).
fn merge_zero(cx: &mut MmCtx<'_>, addr: GuestAddr, n: PageCount) {
    match cx.ksm().and_then(|k| k.zero(addr.0, n.0)) {
        Ok(KsmMerge::Merged) => {
            for k in 0..n.0 {
                let it = cx.items.map.entry(addr.add_pages(k));
                if !it.zero() {
                    it.set_zero(true);
                    cx.items.zero += 1;
                }
                it.age = 0;
            }
        }
        Ok(KsmMerge::MapLimit) => map_limit(cx),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(target: "mm_ksm", mm_id = cx.mm.id(), addr = addr.0, error = %e, "zero-page merge failed")
        }
    }
}

/// Merges `n` pages from `addr` onto existing stable pages `first..`
/// (`try_to_merge_with_ksm_page`); a changed run is retried page by page.
/// `prepaid`: the maps were paid for by the pair that made the stable
/// pages (`maps.rs`), else the budget is asked here.
fn merge_stable(cx: &mut MmCtx<'_>, addr: GuestAddr, n: PageCount, first: StableId, prepaid: bool) {
    if cx.sc.map_limited || (!prepaid && !maps::allow(cx, addr, n, 0)) {
        return;
    }
    let mm = cx.mm;
    let mut charged = vec![false; n.0 as usize];
    let run = MergeRun {
        addr: addr.0,
        n: n.0,
        store: &cx.inner.store,
        first: first.0,
        fill: false,
    };
    match cx.ksm().and_then(|k| k.merge(run, &mut charged)) {
        Ok(KsmMerge::Merged) => {
            // Budget: a charged page's charge moves to a stable page that
            // has none yet (it was filled by a never-charged page), else it
            // is given back; a never-charged page gives nothing back.
            let mut give_back = 0;
            for k in 0..n.0 {
                cx.sc
                    .record_merged(cx.items, addr.add_pages(k), first.nth(k));
                if !charged[k as usize] {
                    continue;
                }
                match cx.sc.trees.stable.get_mut(&first.nth(k)) {
                    Some(node) if node.budget.is_none() => {
                        node.budget = Some(mm.budget().clone());
                    }
                    _ => give_back += 1,
                }
            }
            if let Ok(k) = cx.ksm() {
                k.uncharge(give_back);
            }
            tracing::trace!(target: "mm_ksm::ksm_merge_with_ksm_page", mm_id = mm.id(), addr = addr.0, pages = n.0, stable = first.0, "ksm_merge_with_ksm_page");
        }
        Ok(KsmMerge::Changed) if n.0 > 1 => {
            for k in 0..n.0 {
                merge_stable(cx, addr.add_pages(k), PageCount(1), first.nth(k), true);
            }
        }
        Ok(KsmMerge::MapLimit) => map_limit(cx),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr = addr.0, error = %e, "merge failed")
        }
    }
}

/// Makes new stable pages from the run at `addr` (the current page of an
/// unstable-tree pair, `try_to_merge_two_pages` + `stable_tree_insert`);
/// returns the first stable page for the other side.
fn merge_new(cx: &mut MmCtx<'_>, addr: GuestAddr, sums: &[u64]) -> Option<StableId> {
    let n = sums.len() as u64;
    // The other side's maps (at most two: a split and its run) are paid
    // here too, so it is never refused after this side merged.
    if cx.sc.map_limited || !maps::allow(cx, addr, PageCount(n), 2) {
        return None;
    }
    let (inner, mm) = (cx.inner, cx.mm);
    let first = StableId(inner.store.alloc(n)?);
    // Ids that end up unused (the merge did not happen) are released at
    // once: punching a hole that was never filled is harmless, and the
    // store's allocated-minus-released count stays the pages in use.
    let release = || {
        for k in 0..n {
            let _ = inner.store.release(first.nth(k).0);
        }
    };
    let mut charged = vec![false; n as usize];
    let run = MergeRun {
        addr: addr.0,
        n,
        store: &inner.store,
        first: first.0,
        fill: true,
    };
    match cx.ksm().and_then(|k| k.merge(run, &mut charged)) {
        Ok(KsmMerge::Merged) => {
            for (k, sum) in sums.iter().enumerate() {
                // The filling page's charge (if it had one) moves to the
                // stable page: nothing is uncharged here.
                let budget = charged[k].then(|| mm.budget().clone());
                let id = first.nth(k as u64);
                cx.sc.new_node(id, *sum, budget);
                cx.sc.record_merged(cx.items, addr.add_pages(k as u64), id);
                // Every new node has this run's page as its mapper; one
                // without (cannot happen while record_merged adds one) would
                // never be freed by drop_mapper.
                cx.sc.release_if_unmapped(inner, id);
            }
            tracing::trace!(target: "mm_ksm::ksm_merge_one_page", mm_id = mm.id(), addr = addr.0, pages = n, stable = first.0, "ksm_merge_one_page");
            Some(first)
        }
        Ok(KsmMerge::MapLimit) => {
            release();
            map_limit(cx);
            None
        }
        Ok(_) => {
            release();
            None
        }
        Err(e) => {
            release();
            tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr = addr.0, error = %e, "merge failed");
            None
        }
    }
}

/// Step 7: the unstable side of this batch's pairs, each under its own
/// mm's read lock and `users == 0` check.
pub(super) async fn merge_pending(inner: &Inner, sc: &mut Scanner, pending: Vec<Pending>) {
    for p in pending {
        // The slot cannot be freed meanwhile: ksm_exit's fast path needs no
        // rmap items (this mm has the unstable-tree item), and only the
        // scanner (us, holding the scanner mutex) frees the others.
        // The promised mappers become real (or are given up) here.
        sc.queue_mappers(p.first, p.n.0, false);
        let Some(slot) = inner.slots.get(&p.mm_id).map(|s| s.clone()) else {
            continue;
        };
        let state = slot.mm.lock().read().await;
        sched::point("ksm:pair_read_locked").await;
        if slot.mm.users() == 0 {
            continue;
        }
        // The first half's mm may have exited while we waited for this
        // lock, dropping its items and with them the stable pages this run
        // would map (their memfd range punched). Mapping a freed stable
        // page would read a hole that allocates an uncharged shmem page:
        // skip the run, the next pass pairs these pages again.
        if (0..p.n.0).any(|k| !sc.trees.stable.contains_key(&p.first.nth(k))) {
            continue;
        }
        let mut items = sc.items.remove(&p.mm_id).unwrap_or_default();
        let mut cx = MmCtx::new(inner, &mut *sc, &slot.mm, &state, &mut items, slot.salt());
        merge_stable(&mut cx, p.addr, p.n, p.first, true);
        publish_slot(&slot, &items);
        sc.items.insert(p.mm_id, items);
        drop(state);
    }
}

#[cfg(test)]
mod tests {
    use mm_core::MapOptions;

    use super::*;
    use crate::scan::SlotItems;
    use crate::test_util::host_and_ksm;
    use crate::types::PAGE;

    /// The stable ids of a pair run whose merge did not happen (the page
    /// changed) are released, not left allocated.
    #[test]
    fn test_unused_stable_ids_released() {
        let (host, k) = host_and_ksm();
        let mm = host.new_mm("c");
        let addr = mm
            .mmap_blocking(MapOptions::anon(4 * PAGE).tracked(true))
            .unwrap();
        let mut sc = Scanner::default();
        sc.maps.refresh(0, true); // the map budget of a batch start
        let mut items = SlotItems::default();
        let state = futures_lite::future::block_on(mm.lock().read());
        let mut cx = MmCtx::new(&k.inner, &mut sc, &mm, &state, &mut items, 0);
        // Never populated: the merge finds the pages absent (Changed).
        let first = merge_new(&mut cx, GuestAddr(addr), &[1, 2]);
        assert_eq!(first, None);
        assert_eq!(k.inner.store.counts(), (2, 2), "allocated ids not released");
        assert!(sc.trees.stable.is_empty() && items.map.is_empty());
        drop(state);
    }
}
