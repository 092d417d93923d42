//! The merges: runs of classified pages, one `mmap` each (step 4), and
//! the unstable tree's side of a pair in another mm (step 7). Each runs
//! under the read lock of the mm it merges in, after its `users == 0`
//! check.

use mm_core::{sched, BatchOp, BatchOutcome, BatchRun, KsmMerge, MergeRun};

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

/// What to do with a run's outcome once the batch ran (`merge_runs`).
enum Post {
    Zero,
    Stable(StableId),
    /// A pair's first side, filling new stable pages `first..`; the other
    /// side is `(om, oa)`.
    New {
        first: StableId,
        om: MmId,
        oa: GuestAddr,
    },
    /// A same-guest twin joining the pair run planned at chunk index `k`.
    Twin(StableId),
}

/// One planned run of the chunk.
struct Planned {
    /// Chunk index of the run's first page.
    i: usize,
    addr: GuestAddr,
    n: PageCount,
    post: Post,
}

/// Step 4, the merges of one classified chunk at `a`: runs of consecutive
/// hits (onto consecutive stable pages), planned first (map budget, new
/// stable ids), then done in one batch (one write-protect window for the
/// chunk, `mm_core::ksm` `batch.rs`; one `mmap` per run), then recorded.
pub(super) fn merge_runs(
    cx: &mut MmCtx<'_>,
    a: GuestAddr,
    class: &[Class],
    sums: &[u64],
    pending: &mut Vec<Pending>,
) {
    let n = class.len();
    let mut plan: Vec<Planned> = Vec::new();
    // Pages of the chunk a planned run will merge (the map budget's
    // neighbours), and the stable page each planned pair page will map.
    let mut merging = vec![false; n];
    let mut made: Vec<Option<StableId>> = vec![None; n];
    let mut i = 0;
    while i < n {
        let start = a.add_pages(i as u64);
        let run = |f: &dyn Fn(u64, Class) -> bool| {
            (i + 1..n)
                .find(|&j| !f((j - i) as u64, class[j]))
                .unwrap_or(n)
        };
        let (j, post) = match class[i] {
            Class::None | Class::Twin(_) => (i + 1, None),
            Class::Zero => (run(&|_, c| c == Class::Zero), Some(Post::Zero)),
            Class::Stable(id) => {
                let j = run(&|k, c| c == Class::Stable(id.nth(k)));
                // I-KSM-7: a stable page the classification picked may
                // have lost its last mapper since, to a later page of
                // this same chunk whose sharing was broken (zapped and
                // refaulted, or copied: `classify_private` drops its old
                // mapper), and then was freed, its memfd range punched.
                // A merge onto it would map a hole (a zero page's
                // compare even succeeds) that no node counts: a mapper
                // the stable tree does not know of, an uncharged shmem
                // page. Found by the race harness (I-KSM-7 after a
                // failed run = 2: more merged pages than mappers) with
                // zero-filled duplicates and `use_zero_pages` off.
                let live = (0..(j - i) as u64).all(|k| cx.sc.trees.stable.contains_key(&id.nth(k)));
                let ok = live && allowed(cx, a, &merging, i, j, 0);
                (j, ok.then_some(Post::Stable(id)))
            }
            Class::Pair(om, oa) => {
                let j = run(&|k, c| c == Class::Pair(om, oa.add_pages(k)));
                // The other side's maps (at most two: a split and its run)
                // are paid here too, so it is never refused after this
                // side merged.
                let first = allowed(cx, a, &merging, i, j, 2)
                    .then(|| cx.inner.store.alloc((j - i) as u64))
                    .flatten()
                    .map(StableId);
                if let Some(first) = first {
                    for (k, m) in made[i..j].iter_mut().enumerate() {
                        *m = Some(first.nth(k as u64));
                    }
                }
                (j, first.map(|first| Post::New { first, om, oa }))
            }
        };
        if let Some(post) = post {
            merging[i..j].fill(true);
            plan.push(Planned {
                i,
                addr: start,
                n: PageCount((j - i) as u64),
                post,
            });
        }
        i = j;
    }
    // Twins join the stable page their chunk's pair made (one mapping
    // each: their neighbours have other contents).
    for (i, c) in class.iter().enumerate() {
        if let Class::Twin(k) = *c {
            if let Some(id) = made[k] {
                if allowed(cx, a, &merging, i, i + 1, 0) {
                    merging[i] = true;
                    plan.push(Planned {
                        i,
                        addr: a.add_pages(i as u64),
                        n: PageCount(1),
                        post: Post::Twin(id),
                    });
                }
            }
        }
    }
    if plan.is_empty() {
        return;
    }
    let outcomes = run_batch(cx, &plan);
    for (p, out) in plan.iter().zip(outcomes) {
        let (addr, n) = (p.addr, p.n);
        match p.post {
            Post::Zero => after_zero(cx, addr, n, out),
            Post::Stable(first) | Post::Twin(first) => after_stable(cx, addr, n, first, out),
            Post::New { first, om, oa } => {
                let sums = &sums[p.i..p.i + n.0 as usize];
                if !after_new(cx, addr, sums, first, out) {
                    continue;
                }
                if om == MmId::of(cx.mm) {
                    // The other side is in this mm, whose lock we hold:
                    // merge it now (the kernel's try_to_merge_two_pages
                    // does both at once), so it counts at once.
                    merge_stable(cx, oa, n, first, true);
                } else {
                    // Its mapper is promised: counted against
                    // max_page_sharing until step 7 merges it.
                    cx.sc.queue_mappers(first, n.0, true);
                    pending.push(Pending {
                        mm_id: om,
                        addr: oa,
                        n,
                        first,
                    });
                }
            }
        }
    }
}

/// Map budget for the run of chunk pages `[i, j)` (`maps.rs`), counting
/// the pages the chunk's planned runs will merge as merged neighbours.
fn allowed(
    cx: &mut MmCtx<'_>,
    a: GuestAddr,
    merging: &[bool],
    i: usize,
    j: usize,
    extra: u64,
) -> bool {
    if cx.sc.map_limited {
        return false;
    }
    let planned = |g: GuestAddr| {
        g.0.checked_sub(a.0)
            .map(|d| (d / crate::types::PAGE) as usize)
            .is_some_and(|k| merging.get(k).copied().unwrap_or(false))
    };
    maps::allow_planned(
        cx,
        a.add_pages(i as u64),
        PageCount((j - i) as u64),
        extra,
        &planned,
    )
}

/// Runs the plan as one batch, sorted by address; the outcomes in plan
/// order.
fn run_batch(cx: &MmCtx<'_>, plan: &[Planned]) -> Vec<mm_core::Result<BatchOutcome>> {
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&k| plan[k].addr);
    let runs: Vec<BatchRun> = order
        .iter()
        .map(|&k| BatchRun {
            addr: plan[k].addr.0,
            n: plan[k].n.0,
            op: match plan[k].post {
                Post::Zero => BatchOp::Zero,
                Post::Stable(id) | Post::Twin(id) => BatchOp::Onto(id.0),
                Post::New { first, .. } => BatchOp::Fill(first.0),
            },
        })
        .collect();
    let done = match cx.ksm() {
        Ok(k) => k.merge_batch(&cx.inner.store, &runs),
        Err(e) => {
            tracing::warn!(target: "mm_ksm", mm_id = cx.mm.id(), error = %e, "merge batch refused");
            // Nothing was done: every run is as it was.
            let changed = || BatchOutcome {
                merge: KsmMerge::Changed,
                charged: Vec::new(),
            };
            return plan.iter().map(|_| Ok(changed())).collect();
        }
    };
    let mut out: Vec<Option<mm_core::Result<BatchOutcome>>> = plan.iter().map(|_| None).collect();
    for (&k, o) in order.iter().zip(done) {
        out[k] = Some(o);
    }
    out.into_iter()
        .map(|o| {
            o.unwrap_or(Ok(BatchOutcome {
                merge: KsmMerge::Changed,
                charged: Vec::new(),
            }))
        })
        .collect()
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

/// `n` all-zero pages from `addr` were discarded, or not (`use_zero_pages`).
fn after_zero(
    cx: &mut MmCtx<'_>,
    addr: GuestAddr,
    n: PageCount,
    out: mm_core::Result<BatchOutcome>,
) {
    match out.map(|o| o.merge) {
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
/// (`try_to_merge_with_ksm_page`), alone (not in a chunk's batch): the
/// other side of a pair, a retry. `prepaid`: the maps were paid for by the
/// pair that made the stable pages (`maps.rs`), else the budget is asked
/// here.
fn merge_stable(cx: &mut MmCtx<'_>, addr: GuestAddr, n: PageCount, first: StableId, prepaid: bool) {
    if cx.sc.map_limited || (!prepaid && !maps::allow(cx, addr, n, 0)) {
        return;
    }
    let mut charged = vec![false; n.0 as usize];
    let run = MergeRun {
        addr: addr.0,
        n: n.0,
        store: &cx.inner.store,
        first: first.0,
        fill: false,
    };
    let out = cx
        .ksm()
        .and_then(|k| k.merge(run, &mut charged))
        .map(|merge| BatchOutcome { merge, charged });
    after_stable(cx, addr, n, first, out);
}

/// Records a merge onto existing stable pages; a changed run of several
/// pages is retried page by page.
fn after_stable(
    cx: &mut MmCtx<'_>,
    addr: GuestAddr,
    n: PageCount,
    first: StableId,
    out: mm_core::Result<BatchOutcome>,
) {
    let mm = cx.mm;
    match out {
        Ok(BatchOutcome {
            merge: KsmMerge::Merged,
            charged,
        }) => {
            // Budget: a charged page's charge moves to a stable page that
            // has none yet (it was filled by a never-charged page), else it
            // is given back; a never-charged page gives nothing back.
            let mut give_back = 0;
            for k in 0..n.0 {
                cx.sc
                    .record_merged(cx.items, addr.add_pages(k), first.nth(k));
                if !charged.get(k as usize).copied().unwrap_or(false) {
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
        Ok(BatchOutcome {
            merge: KsmMerge::Changed,
            ..
        }) if n.0 > 1 => {
            for k in 0..n.0 {
                merge_stable(cx, addr.add_pages(k), PageCount(1), first.nth(k), true);
            }
        }
        Ok(BatchOutcome {
            merge: KsmMerge::MapLimit,
            ..
        }) => map_limit(cx),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr = addr.0, error = %e, "merge failed")
        }
    }
}

/// Records new stable pages `first..` filled by the run at `addr`, or
/// releases their ids if the merge did not happen; whether it did.
fn after_new(
    cx: &mut MmCtx<'_>,
    addr: GuestAddr,
    sums: &[u64],
    first: StableId,
    out: mm_core::Result<BatchOutcome>,
) -> bool {
    let (inner, mm) = (cx.inner, cx.mm);
    let n = sums.len() as u64;
    // Ids that end up unused (the merge did not happen) are released at
    // once: punching a hole that was never filled is harmless, and the
    // store's allocated-minus-released count stays the pages in use.
    let release = || {
        for k in 0..n {
            let _ = inner.store.release(first.nth(k).0);
        }
    };
    match out {
        Ok(BatchOutcome {
            merge: KsmMerge::Merged,
            charged,
        }) => {
            for (k, sum) in sums.iter().enumerate() {
                // The filling page's charge (if it had one) moves to the
                // stable page: nothing is uncharged here.
                let budget = charged
                    .get(k)
                    .copied()
                    .unwrap_or(false)
                    .then(|| mm.budget().clone());
                let id = first.nth(k as u64);
                cx.sc.new_node(id, *sum, budget);
                cx.sc.record_merged(cx.items, addr.add_pages(k as u64), id);
                // Every new node has this run's page as its mapper; one
                // without (cannot happen while record_merged adds one) would
                // never be freed by drop_mapper.
                cx.sc.release_if_unmapped(inner, id);
            }
            tracing::trace!(target: "mm_ksm::ksm_merge_one_page", mm_id = mm.id(), addr = addr.0, pages = n, stable = first.0, "ksm_merge_one_page");
            true
        }
        Ok(BatchOutcome {
            merge: KsmMerge::MapLimit,
            ..
        }) => {
            release();
            map_limit(cx);
            false
        }
        Ok(_) => {
            release();
            false
        }
        Err(e) => {
            release();
            tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr = addr.0, error = %e, "merge failed");
            false
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
        // A pair run of two pages, never populated: the plan allocates two
        // stable ids, the batch finds the pages absent (Changed).
        let other = Class::Pair(MmId(u64::MAX), GuestAddr(0x4000_0000));
        let next = Class::Pair(MmId(u64::MAX), GuestAddr(0x4000_1000));
        let mut pending = Vec::new();
        merge_runs(
            &mut cx,
            GuestAddr(addr),
            &[other, next],
            &[1, 2],
            &mut pending,
        );
        assert!(pending.is_empty(), "no other side queued");
        assert_eq!(k.inner.store.counts(), (2, 2), "allocated ids not released");
        assert!(sc.trees.stable.is_empty() && items.map.is_empty());
        drop(state);
    }
}
