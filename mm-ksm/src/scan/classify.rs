//! Step 4 for one leaf-bounded chunk: which pages to read (smart scan),
//! the snapshot (each page copied out under its page lock), and the
//! classification of each page by checksum: volatile, an all-zero page, a
//! hit in the stable tree, a pair in the unstable tree. The merges of the
//! resulting runs are in `merge.rs`.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use mm_core::{sched, KsmPage, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_64;

use super::merge::{self, Pending};
use super::{zero_sum, MmCtx, SMART_AGE, SMART_MAX_SKIPS};
use crate::types::{GuestAddr, MmId, PageCount, StableId, PAGE};

/// How a page should be merged (classification before the runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    None,
    Zero,
    Stable(StableId),
    /// The unstable tree's page with the same contents, in this or another
    /// mm.
    Pair(MmId, GuestAddr),
    /// The same contents as page `k` of this chunk, a `Pair` whose new
    /// stable page this page joins (same-guest twins: 10 identical pages
    /// make one stable page with 10 mappers, as in the kernel, not 5
    /// pairs).
    Twin(usize),
}

/// The knobs, read once per chunk.
struct Knobs {
    use_zero: bool,
    max_sharing: u64,
}

/// Step 4 for the chunk of `n` pages at `a`: snapshot, classify, merge.
pub(super) async fn scan_chunk(
    cx: &mut MmCtx<'_>,
    a: GuestAddr,
    n: PageCount,
    pending: &mut Vec<Pending>,
) {
    let n = n.0 as usize;
    let knobs = Knobs {
        use_zero: cx.inner.use_zero_pages.load(Ordering::Relaxed),
        max_sharing: cx.inner.max_page_sharing.load(Ordering::Relaxed),
    };
    let want = smart_skip(cx, a, n);
    let mut buf = std::mem::take(&mut cx.sc.buf);
    buf.resize(n * PAGE_SIZE, 0);
    let mut out = vec![KsmPage::Absent; n];
    if let Err(e) = cx
        .ksm()
        .and_then(|k| k.snapshot(a.0, &want, &mut buf, &mut out))
    {
        tracing::warn!(target: "mm_ksm", mm_id = cx.mm.id(), addr = a.0, error = %e, "snapshot failed");
        cx.sc.buf = buf;
        return;
    }
    let mut class = vec![Class::None; n];
    let mut sums = vec![0u64; n];
    // Mappers this chunk will add to each stable page (max_page_sharing),
    // and the stable pages its pairs will create, by checksum: the pair's
    // page and the mappers planned for it so far.
    let mut plan = Plan::default();
    for i in 0..n {
        let addr = a.add_pages(i as u64);
        let page = want[i].then(|| &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        (class[i], sums[i]) = match out[i] {
            KsmPage::Private => classify_private(cx, i, addr, page, &knobs, &mut plan),
            other => {
                note_page(cx, addr, other);
                (Class::None, 0)
            }
        };
    }
    cx.sc.buf = buf;
    // The read lock is still held: a last mmput may have run meanwhile, but
    // ksm_exit's barrier waits for this reader, so exit_mmap cannot begin
    // before these merges are done (I-LO-2).
    sched::point("ksm:chunk_classified").await;
    merge::merge_runs(cx, a, &class, &sums, pending);
}

/// What the classification of one chunk has promised so far.
#[derive(Default)]
struct Plan {
    /// Mappers the chunk will add to existing stable pages.
    planned: HashMap<StableId, u64>,
    /// Stable pages the chunk's pairs will create: checksum -> (index of
    /// the pair's page, mappers planned: the pair's two pages and the
    /// twins so far).
    fresh: HashMap<u64, (usize, u64)>,
}

/// Smart scan: which pages of the chunk to read. A page that did not
/// merge for `SMART_AGE` passes is skipped for up to `SMART_MAX_SKIPS`.
fn smart_skip(cx: &mut MmCtx<'_>, a: GuestAddr, n: usize) -> Vec<bool> {
    let smart = cx.inner.smart_scan.load(Ordering::Relaxed);
    let mut skipped = 0;
    let want = (0..n)
        .map(|i| {
            let Some(it) = cx.items.map.get_mut(&a.add_pages(i as u64)) else {
                return true;
            };
            if !smart || it.stable().is_some() || it.zero() || it.same_checksum(0).is_none() {
                return true;
            }
            if it.skips > 0 {
                it.skips -= 1;
                skipped += 1;
                return false;
            }
            let age = it.age;
            it.age = it.age.saturating_add(1);
            if age >= SMART_AGE {
                it.skips = age.min(SMART_MAX_SKIPS);
            }
            true
        })
        .collect();
    cx.inner
        .counters
        .pages_skipped
        .fetch_add(skipped, Ordering::Relaxed);
    want
}

/// A page that is absent, a zero page or merged: bring its rmap item up
/// to date.
fn note_page(cx: &mut MmCtx<'_>, addr: GuestAddr, page: KsmPage) {
    let items = &mut *cx.items;
    match page {
        KsmPage::Absent => {
            if let Some(it) = items.map.remove(&addr) {
                cx.sc.forget_item(cx.inner, items, it);
            }
        }
        KsmPage::Zero => {
            let it = items.map.entry(addr);
            if !it.zero() {
                it.set_zero(true);
                items.zero += 1;
            }
        }
        KsmPage::Stable(id) => {
            let it = items.map.entry(addr);
            if it.stable() != Some(StableId(id)) {
                // Not a merge we recorded (cannot happen while items are
                // only dropped after an unshare): unshare rather than
                // leave a mapping the stable tree does not count.
                debug_assert!(false, "unrecorded merged page {:#x}", addr.0);
                let _ = cx.ksm().and_then(|k| k.unshare(addr.0, PAGE));
            }
        }
        KsmPage::Private => unreachable!("classified by classify_private"),
    }
}

/// A private page: its sharing, if any, was broken (copied by a write, or
/// zapped and refaulted); if it was read (`page`), checksum it and look it
/// up. Returns its class and checksum.
fn classify_private(
    cx: &mut MmCtx<'_>,
    i: usize,
    addr: GuestAddr,
    page: Option<&[u8]>,
    knobs: &Knobs,
    plan: &mut Plan,
) -> (Class, u64) {
    let items = &mut *cx.items;
    let mut it = *items.map.entry(addr);
    if let Some(old) = it.set_stable(None) {
        items.merging -= 1;
        cx.sc.drop_mapper(cx.inner, old);
    }
    if it.zero() {
        it.set_zero(false);
        items.zero -= 1;
    }
    let Some(page) = page else {
        items.map.insert(addr, it);
        return (Class::None, 0);
    };
    let sum = xxh3_64(page);
    if it.same_checksum(sum) != Some(true) {
        // Volatile (or first seen): remember and wait a pass.
        it.set_checksum(sum);
        it.age = 0;
        it.skips = 0;
        items.map.insert(addr, it);
        return (Class::None, sum);
    }
    items.map.insert(addr, it);
    if cx.sc.map_limited {
        return (Class::None, sum);
    }
    let zero = knobs.use_zero && sum == zero_sum() && page.iter().all(|b| *b == 0);
    // Tenant domains: the trees are keyed by the checksum with the mm's
    // domain folded in (a bijection per domain), so equal contents in two
    // domains never meet; a key that collides across domains has other
    // contents, which the merge's byte compare refuses.
    let sum = sum ^ cx.salt;
    let class = if zero {
        Class::Zero
    } else if let Some(id) = cx.sc.find_stable(sum, knobs.max_sharing, &plan.planned) {
        *plan.planned.entry(id).or_default() += 1;
        Class::Stable(id)
    } else if let Some((k, planned)) = plan
        .fresh
        .get_mut(&sum)
        .filter(|(_, planned)| *planned < knobs.max_sharing)
    {
        *planned += 1;
        Class::Twin(*k)
    } else {
        let me = (MmId::of(cx.mm), addr);
        match cx.sc.trees.unstable.entry(sum) {
            Entry::Occupied(o) if *o.get() != me => {
                let (om, oa) = o.remove();
                plan.fresh.insert(sum, (i, 2));
                Class::Pair(om, oa)
            }
            Entry::Occupied(_) => Class::None,
            Entry::Vacant(v) => {
                v.insert(me);
                Class::None
            }
        }
    };
    (class, sum)
}
