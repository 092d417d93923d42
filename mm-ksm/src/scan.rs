//! ksmd: one batch of the scan (`ksm_do_scan`), the stable and unstable
//! trees, the rmap items, and unmerge-all (`run = 2`). Everything here runs
//! under the scanner mutex (`ksm_thread_mutex`); the step numbers refer to
//! the crate docs.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use mm_core::{
    sched, Budget, KsmMerge, KsmMm, KsmPage, MergeRun, Mm, MmFlag, MmState, VmFlags, PAGE_SIZE,
};
use xxhash_rust::xxh3::xxh3_64;

use crate::{lock, Error, Inner, Result, Slot};

const PAGE: u64 = PAGE_SIZE as u64;
/// Guest bytes covered by one page-table leaf: the unit of one snapshot
/// and the longest merge run.
const LEAF_BYTES: u64 = 512 * PAGE;
/// Pages per snapshot and per merge run: bounds the scanner's buffers
/// (256 KiB). Runs onto consecutive stable pages still end up in one host
/// VMA: the kernel merges adjacent private mappings of consecutive file
/// offsets.
const CHUNK_PAGES: u64 = 64;
/// Smart scan: a page that failed to merge in this many passes starts
/// being skipped (kernel: `SKIP_THRESHOLD`-like ageing).
const SMART_AGE: u8 = 3;
/// Smart scan: at most this many passes skipped in a row.
const SMART_MAX_SKIPS: u8 = 8;

/// One scanned page (`ksm_rmap_item`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RmapItem {
    /// Checksum at the last look (`oldchecksum`); `None` before the first.
    checksum: Option<u64>,
    /// The stable page this page maps (when merged).
    stable: Option<u64>,
    /// Discarded as a zero page and not touched since.
    zero: bool,
    /// Passes without a merge (smart scan).
    age: u8,
    /// Passes left to skip (smart scan).
    skips: u8,
}

/// Memory cost of one rmap item, for `general_profit` (item + key + tree
/// overhead, roughly).
pub(crate) const RMAP_ITEM_BYTES: u64 = std::mem::size_of::<(u64, RmapItem)>() as u64 + 16;

/// The rmap items of one mm, with the counts a slot publishes.
#[derive(Default)]
pub(crate) struct SlotItems {
    map: BTreeMap<u64, RmapItem>,
    merging: u64,
    zero: u64,
}

/// One stable page (`ksm_stable_node`). Holds no page reference: its
/// mappers are counted through the rmap items, and a mapper whose page was
/// copied or zapped is dropped when the scanner next looks (I-KSM-7).
struct StableNode {
    checksum: u64,
    mappers: u64,
    /// The budget charged for this page: of the mm whose charged page
    /// filled it, or, if that page was never charged (touched through the
    /// host pointer of an untracked region), of the first charged page
    /// merged onto it later; `None` while no charge was moved here.
    budget: Option<Arc<Budget>>,
}

/// A run of another mm's pages (the unstable tree's side of a pair) to be
/// merged onto stable pages this batch created, after the current mm's
/// lock is dropped (step 7).
struct Pending {
    mm_id: u64,
    addr: u64,
    n: u64,
    first: u64,
}

/// What one visit of an mm did.
struct Visit {
    scanned: u64,
    /// The walk reached the end of the mm (or the mm is exiting).
    end: bool,
    /// Keep the slot (the mm is alive and has something mergeable).
    keep: bool,
}

/// How a page should be merged (classification before the runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    None,
    Zero,
    Stable(u64),
    Pair(u64, u64),
}

/// The scanner's state: the trees, the rmap items and the cursor address.
#[derive(Default)]
pub(crate) struct Scanner {
    /// Rmap items per mm id.
    items: HashMap<u64, SlotItems>,
    /// The unstable tree: checksum → (mm id, address) seen this pass.
    unstable: HashMap<u64, (u64, u64)>,
    /// The stable tree: stable page id → node ...
    stable: HashMap<u64, StableNode>,
    /// ... and checksum → ids with that content.
    by_sum: HashMap<u64, Vec<u64>>,
    /// Mappers of all stable pages.
    mappers: u64,
    /// `ksm_scan.address`: where the walk of the cursor slot resumes.
    address: u64,
    /// `vm.max_map_count` was hit this pass: no more merges until the next.
    map_limited: bool,
    buf: Vec<u8>,
}

fn zero_sum() -> u64 {
    static Z: OnceLock<u64> = OnceLock::new();
    *Z.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

impl Scanner {
    fn add_mapper(&mut self, id: u64) {
        if let Some(n) = self.stable.get_mut(&id) {
            n.mappers += 1;
            self.mappers += 1;
        }
    }

    /// Drops one mapper; a stable page nobody maps is freed (its hole
    /// punched) and uncharged.
    fn drop_mapper(&mut self, inner: &Inner, id: u64) {
        let Some(n) = self.stable.get_mut(&id) else {
            return;
        };
        n.mappers -= 1;
        self.mappers -= 1;
        if n.mappers > 0 {
            return;
        }
        let n = self.stable.remove(&id).expect("found above");
        if let Some(v) = self.by_sum.get_mut(&n.checksum) {
            v.retain(|x| *x != id);
            if v.is_empty() {
                self.by_sum.remove(&n.checksum);
            }
        }
        if let Err(e) = inner.store.release(id) {
            tracing::warn!(target: "mm_ksm", id, error = %e, "stable page release failed");
        }
        if let Some(b) = &n.budget {
            b.uncharge(PAGE);
        }
        inner
            .counters
            .stable_pages_freed
            .fetch_add(1, Ordering::Relaxed);
        tracing::trace!(target: "mm_ksm::ksm_remove_ksm_page", id, "ksm_remove_ksm_page");
    }

    /// Frees a stable page that ended up with no mapper (the merge that
    /// created it recorded none): released like `drop_mapper` does.
    fn release_if_unmapped(&mut self, inner: &Inner, id: u64) {
        if self.stable.get(&id).is_some_and(|n| n.mappers == 0) {
            // drop_mapper's accounting expects one mapper to drop.
            if let Some(n) = self.stable.get_mut(&id) {
                n.mappers = 1;
            }
            self.mappers += 1;
            self.drop_mapper(inner, id);
        }
    }

    fn new_node(&mut self, id: u64, checksum: u64, budget: Option<Arc<Budget>>) {
        self.stable.insert(
            id,
            StableNode {
                checksum,
                mappers: 0,
                budget,
            },
        );
        self.by_sum.entry(checksum).or_default().push(id);
    }

    /// A stable page with this checksum and room for one more mapper,
    /// counting the mappers `planned` for it earlier in the same chunk
    /// (classified, not merged yet): without them a run of identical pages
    /// would all pick the same page and overshoot `max_page_sharing`.
    fn find_stable(&self, checksum: u64, max: u64, planned: &HashMap<u64, u64>) -> Option<u64> {
        self.by_sum.get(&checksum)?.iter().copied().find(|id| {
            self.stable
                .get(id)
                .is_some_and(|n| n.mappers + planned.get(id).copied().unwrap_or(0) < max)
        })
    }

    /// Forgets what `item` held: its mapper, its zero page.
    fn forget_item(&mut self, inner: &Inner, items: &mut SlotItems, item: RmapItem) {
        if let Some(id) = item.stable {
            items.merging -= 1;
            self.drop_mapper(inner, id);
        }
        if item.zero {
            items.zero -= 1;
        }
    }

    /// Removes the rmap items of `[lo, hi)` (pages no longer in a mergeable
    /// VMA). With `state` (the mm is alive, its lock held) a page that still
    /// maps its stable page is unshared first: its mapper is about to be
    /// dropped, and a stable page without mappers is freed.
    fn drop_items_range(
        &mut self,
        inner: &Inner,
        mm: &Mm,
        state: Option<&MmState>,
        items: &mut SlotItems,
        lo: u64,
        hi: u64,
    ) {
        if lo >= hi {
            return;
        }
        let keys: Vec<u64> = items.map.range(lo..hi).map(|(k, _)| *k).collect();
        for k in keys {
            let it = items.map[&k];
            if let (Some(_), Some(state)) = (it.stable, state) {
                if let Err(e) = KsmMm::new(mm, state).and_then(|ksm| ksm.unshare(k, PAGE)) {
                    // Keep the item (and the mapper): freeing the stable
                    // page under a mapping would lose its contents.
                    tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr = k, error = %e, "unshare failed");
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
    /// read zeros (issue 16, the `teardown_vs_ksm` data-loss input). A live
    /// mm (`users > 0`) has every merged page unshared first, over its
    /// whole address space, not only from where the walk resumed; an
    /// exiting one is not touched (its exit_mmap zaps everything, and
    /// ksm_exit's write-lock barrier keeps that from starting before we
    /// unlock). Returns whether every item went: a page whose unshare
    /// failed keeps its item, and the caller must keep the slot.
    fn drop_all_items(
        &mut self,
        inner: &Inner,
        mm: &Mm,
        state: &MmState,
        items: &mut SlotItems,
    ) -> bool {
        if mm.users() > 0 {
            self.drop_items_range(inner, mm, Some(state), items, 0, u64::MAX);
        } else {
            for (_, it) in std::mem::take(&mut items.map) {
                self.forget_item(inner, items, it);
            }
        }
        let empty = items.map.is_empty();
        debug_assert!(!empty || (items.merging, items.zero) == (0, 0));
        empty
    }

    fn record_merged(&mut self, items: &mut SlotItems, addr: u64, id: u64) {
        let it = items.map.entry(addr).or_default();
        if let Some(old) = it.stable {
            debug_assert_eq!(old, id, "a merged page was merged again");
            return;
        }
        it.stable = Some(id);
        it.age = 0;
        it.skips = 0;
        items.merging += 1;
        self.add_mapper(id);
    }
}

fn publish_slot(slot: &Slot, items: &SlotItems) {
    // SeqCst: read by ksm_exit's fast-path test under the slot-list lock;
    // the list lock taken after this store orders it anyway.
    slot.rmap_items
        .store(items.map.len() as u64, Ordering::SeqCst);
    slot.merging_pages.store(items.merging, Ordering::Relaxed);
    slot.zero_pages.store(items.zero, Ordering::Relaxed);
}

fn publish(inner: &Inner, sc: &Scanner) {
    let c = &inner.counters;
    let shared = sc.stable.len() as u64;
    c.pages_shared.store(shared, Ordering::Relaxed);
    c.pages_sharing
        .store(sc.mappers.saturating_sub(shared), Ordering::Relaxed);
    c.pages_unshared
        .store(sc.unstable.len() as u64, Ordering::Relaxed);
    let (items, zero) = sc
        .items
        .values()
        .fold((0, 0), |(a, z), s| (a + s.map.len() as u64, z + s.zero));
    c.rmap_items.store(items, Ordering::Relaxed);
    c.ksm_zero_pages.store(zero, Ordering::Relaxed);
}

/// Moves the cursor past `id` (under the slot-list lock); returns whether
/// the pass is complete (the cursor is back at the head).
fn advance(list: &mut crate::ScanList, id: u64) -> bool {
    let next = list
        .position(id)
        .and_then(|i| list.order.get(i + 1))
        .map(|s| s.id());
    list.cursor = next;
    next.is_none()
}

/// `ksm_do_scan`: up to `budget` pages (steps 2-7).
pub(crate) async fn do_scan(inner: &Inner, sc: &mut Scanner, budget: u64) -> u64 {
    let mut scanned = 0;
    while scanned < budget {
        // 2. The slot at the cursor; a new pass at the head.
        let (slot, new_pass) = {
            let mut list = lock(&inner.list);
            if list.order.is_empty() {
                list.cursor = None;
                break;
            }
            let new_pass = list.cursor.is_none();
            if new_pass {
                list.cursor = Some(list.order[0].id());
            }
            // I-KSM-6: re-validate the cursor before using its slot (a
            // racing exit may have emptied the list; the cursor slot itself
            // is never removed by exit).
            let Some(i) = list.cursor.and_then(|c| list.position(c)) else {
                list.cursor = None;
                break;
            };
            (list.order[i].clone(), new_pass)
        };
        if new_pass {
            // The unstable tree is reset at the start of every pass: its
            // entries are only trusted within one pass (I-KSM-7).
            sc.unstable.clear();
            sc.address = 0;
            sc.map_limited = false;
            tracing::debug!(target: "mm_ksm::ksm_start_scan", seq = inner.counters.full_scans.load(Ordering::Relaxed), "ksm_start_scan");
        }
        sched::point("ksm:got_slot").await;

        // 3. Read lock, then users == 0 before any VMA (I-KSM-2).
        let state = slot.mm.lock().read().await;
        sched::point("ksm:read_locked").await;
        let id = slot.id();
        let mut items = sc.items.remove(&id).unwrap_or_default();
        let mut pending = Vec::new();
        let visit = if slot.mm.users() == 0 {
            Visit {
                scanned: 0,
                end: true,
                keep: false,
            }
        } else {
            scan_mm(
                inner,
                sc,
                &slot,
                &state,
                &mut items,
                budget - scanned,
                &mut pending,
            )
            .await
        };
        scanned += visit.scanned;
        if visit.end {
            // The walk of this mm is over, however it ended (users == 0
            // before or during the walk, nothing mergeable left): the next
            // slot's walk starts at 0, never at where this one stopped.
            sc.address = 0;
        }
        sched::point("ksm:visited").await;

        // 5-6. Leave the slot. Exiting, or nothing mergeable left: free it
        // once every rmap item is gone (a live mm's pages unshared first).
        let free_slot =
            visit.end && !visit.keep && sc.drop_all_items(inner, &slot.mm, &state, &mut items);
        let pass_done = if free_slot {
            publish_slot(&slot, &items);
            let done = {
                let mut list = lock(&inner.list);
                let done = advance(&mut list, id);
                inner.slots.remove(&id);
                if let Some(i) = list.position(id) {
                    list.order.remove(i);
                }
                // Under the list lock, like Ksm::enter's set: a racing
                // enter of this (live) mm then either finds our slot or
                // inserts its own after this clear, so a slot never exists
                // without the flag ksm_exit tests (else its grab leaks).
                slot.mm.flags().clear(MmFlag::VM_MERGEABLE);
                done
            };
            drop(state);
            sched::point("ksm:slot_removed").await;
            inner
                .counters
                .slots_freed_by_scanner
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "mm_ksm", mm_id = id, "ksm slot freed by the scanner");
            // mmdrop: the last Arc of the slot (list and hash let go above).
            drop(slot);
            done
        } else {
            publish_slot(&slot, &items);
            sc.items.insert(id, items);
            if visit.end {
                let mut list = lock(&inner.list);
                let done = advance(&mut list, id);
                // I-KSM-5: the mmap lock first, then the slot-list lock.
                // After the list unlock, with the cursor past this slot,
                // ksm_exit may take its fast path and free the mm struct
                // (mmdrop); an mmap unlock after that would touch freed
                // memory. Our reference to the slot (the kernel's `mm`
                // pointer) goes with the mmap lock, so the fast path can
                // check that nobody still uses what it frees.
                drop(state);
                drop(slot);
                drop(list);
                done
            } else {
                // The slot stays at the cursor: exit leaves it to us.
                drop(state);
                drop(slot);
                false
            }
        };
        sched::point("ksm:slot_unlocked").await;

        // 7. The other side of the pairs, one mm lock at a time.
        merge_pending(inner, sc, pending).await;

        if pass_done {
            inner.counters.full_scans.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "mm_ksm::ksm_stop_scan", seq = inner.counters.full_scans.load(Ordering::Relaxed), "ksm_stop_scan");
            // scan_get_next_rmap_item returns NULL at the end of a pass.
            break;
        }
    }
    inner
        .counters
        .pages_scanned
        .fetch_add(scanned, Ordering::Relaxed);
    publish(inner, sc);
    scanned
}

/// Step 4: walk the mergeable VMAs of the cursor mm from `sc.address`.
async fn scan_mm(
    inner: &Inner,
    sc: &mut Scanner,
    slot: &Slot,
    state: &MmState,
    items: &mut SlotItems,
    budget: u64,
    pending: &mut Vec<Pending>,
) -> Visit {
    let mm: &Mm = &slot.mm;
    let merge_any = mm.flags().test(MmFlag::VM_MERGE_ANY);
    let mut addr = sc.address;
    let mut scanned = 0;
    let mut saw = merge_any;
    let vmas: Vec<(u64, u64)> = state
        .vmas()
        .iter()
        .filter(|v| v.end() > addr)
        .filter(|v| (merge_any || v.flags().contains(VmFlags::MERGEABLE)) && v.ksm_capable())
        .map(|v| (v.start(), v.end()))
        .collect();
    for (vs, ve) in vmas {
        saw = true;
        let mut a = addr.max(vs);
        sc.drop_items_range(inner, mm, Some(state), items, addr, a);
        while a < ve {
            if scanned >= budget {
                sc.address = a;
                return Visit {
                    scanned,
                    end: false,
                    keep: true,
                };
            }
            // ksm_test_exit before every leaf: the last user may have gone
            // while we hold the read lock (its barrier waits for us).
            if mm.users() == 0 {
                return Visit {
                    scanned,
                    end: true,
                    keep: false,
                };
            }
            let leaf_end = (a / LEAF_BYTES + 1) * LEAF_BYTES;
            let e = ve
                .min(leaf_end)
                .min(a + (budget - scanned).min(CHUNK_PAGES) * PAGE);
            scan_chunk(inner, sc, mm, state, items, a, e, pending).await;
            scanned += (e - a) / PAGE;
            a = e;
        }
        addr = a;
    }
    // 5. remove_trailing_rmap_items.
    sc.drop_items_range(inner, mm, Some(state), items, addr, u64::MAX);
    sc.address = 0;
    Visit {
        scanned,
        end: true,
        keep: saw,
    }
}

/// Step 4 for one leaf-bounded chunk `[a, e)`: snapshot, classify, merge.
#[allow(clippy::too_many_arguments)]
async fn scan_chunk(
    inner: &Inner,
    sc: &mut Scanner,
    mm: &Mm,
    state: &MmState,
    items: &mut SlotItems,
    a: u64,
    e: u64,
    pending: &mut Vec<Pending>,
) {
    let n = ((e - a) / PAGE) as usize;
    let smart = inner.smart_scan.load(Ordering::Relaxed);
    let use_zero = inner.use_zero_pages.load(Ordering::Relaxed);
    let max_sharing = inner.max_page_sharing.load(Ordering::Relaxed);
    let mut skipped = 0;
    let want: Vec<bool> = (0..n)
        .map(|i| {
            let Some(it) = items.map.get_mut(&(a + i as u64 * PAGE)) else {
                return true;
            };
            if !smart || it.stable.is_some() || it.zero || it.checksum.is_none() {
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
    inner
        .counters
        .pages_skipped
        .fetch_add(skipped, Ordering::Relaxed);
    let mut buf = std::mem::take(&mut sc.buf);
    buf.resize(n * PAGE_SIZE, 0);
    let mut out = vec![KsmPage::Absent; n];
    if let Err(e) = KsmMm::new(mm, state).and_then(|ksm| ksm.snapshot(a, &want, &mut buf, &mut out))
    {
        tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr = a, error = %e, "snapshot failed");
        sc.buf = buf;
        return;
    }
    let mut class = vec![Class::None; n];
    let mut sums = vec![0u64; n];
    // Mappers this chunk will add to each stable page (max_page_sharing).
    let mut planned: HashMap<u64, u64> = HashMap::new();
    for i in 0..n {
        let addr = a + i as u64 * PAGE;
        match out[i] {
            KsmPage::Absent => {
                if let Some(it) = items.map.remove(&addr) {
                    sc.forget_item(inner, items, it);
                }
            }
            KsmPage::Zero => {
                let it = items.map.entry(addr).or_default();
                if !it.zero {
                    it.zero = true;
                    items.zero += 1;
                }
            }
            KsmPage::Stable(id) => {
                let it = items.map.entry(addr).or_default();
                if it.stable != Some(id) {
                    // Not a merge we recorded (cannot happen while items are
                    // only dropped after an unshare): unshare rather than
                    // leave a mapping the stable tree does not count.
                    debug_assert!(false, "unrecorded merged page {addr:#x}");
                    let _ = KsmMm::new(mm, state).and_then(|ksm| ksm.unshare(addr, PAGE));
                }
            }
            KsmPage::Private => {
                let it = items.map.entry(addr).or_default();
                let mut it_v = *it;
                if let Some(old) = it_v.stable.take() {
                    // Sharing broken (copied by a write, or zapped and
                    // refaulted): drop the mapper.
                    items.merging -= 1;
                    sc.drop_mapper(inner, old);
                }
                if it_v.zero {
                    it_v.zero = false;
                    items.zero -= 1;
                }
                let done = |it_v: RmapItem, items: &mut SlotItems| {
                    items.map.insert(addr, it_v);
                };
                if !want[i] {
                    done(it_v, items);
                    continue;
                }
                let page = &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                let sum = xxh3_64(page);
                sums[i] = sum;
                if it_v.checksum != Some(sum) {
                    // Volatile (or first seen): remember and wait a pass.
                    it_v.checksum = Some(sum);
                    it_v.age = 0;
                    it_v.skips = 0;
                    done(it_v, items);
                    continue;
                }
                done(it_v, items);
                if sc.map_limited {
                    continue;
                }
                if use_zero && sum == zero_sum() && page.iter().all(|b| *b == 0) {
                    class[i] = Class::Zero;
                } else if let Some(id) = sc.find_stable(sum, max_sharing, &planned) {
                    *planned.entry(id).or_default() += 1;
                    class[i] = Class::Stable(id);
                } else {
                    match sc.unstable.entry(sum) {
                        Entry::Occupied(o) if *o.get() != (mm.id(), addr) => {
                            let (om, oa) = o.remove();
                            class[i] = Class::Pair(om, oa);
                        }
                        Entry::Occupied(_) => {}
                        Entry::Vacant(v) => {
                            v.insert((mm.id(), addr));
                        }
                    }
                }
            }
        }
    }
    sc.buf = buf;
    // The read lock is still held: a last mmput may have run meanwhile, but
    // ksm_exit's barrier waits for this reader, so exit_mmap cannot begin
    // before these merges are done (I-LO-2).
    sched::point("ksm:chunk_classified").await;

    // Runs of consecutive hits: one mmap each.
    let mut i = 0;
    while i < n {
        let start = a + i as u64 * PAGE;
        let run = |f: &dyn Fn(usize, Class) -> bool| {
            (i + 1..n).find(|&j| !f(j - i, class[j])).unwrap_or(n)
        };
        match class[i] {
            Class::None => {
                i += 1;
            }
            Class::Zero => {
                let j = run(&|_, c| c == Class::Zero);
                merge_zero(inner, sc, mm, state, items, start, (j - i) as u64);
                i = j;
            }
            Class::Stable(id) => {
                let j = run(&|k, c| c == Class::Stable(id + k as u64));
                merge_stable(inner, sc, mm, state, items, start, (j - i) as u64, id);
                i = j;
            }
            Class::Pair(om, oa) => {
                let j = run(&|k, c| c == Class::Pair(om, oa + k as u64 * PAGE));
                let k = (j - i) as u64;
                if let Some(first) = merge_new(inner, sc, mm, state, items, start, &sums[i..j]) {
                    pending.push(Pending {
                        mm_id: om,
                        addr: oa,
                        n: k,
                        first,
                    });
                }
                i = j;
            }
        }
    }
}

fn map_limit(inner: &Inner, sc: &mut Scanner, mm: &Mm) {
    if !sc.map_limited {
        tracing::warn!(target: "mm_ksm", mm_id = mm.id(), "vm.max_map_count reached: merging stops until the next pass");
    }
    sc.map_limited = true;
    inner
        .counters
        .map_limit_hits
        .fetch_add(1, Ordering::Relaxed);
}

fn merge_zero(
    inner: &Inner,
    sc: &mut Scanner,
    mm: &Mm,
    state: &MmState,
    items: &mut SlotItems,
    addr: u64,
    n: u64,
) {
    match KsmMm::new(mm, state).and_then(|ksm| ksm.zero(addr, n)) {
        Ok(KsmMerge::Merged) => {
            for k in 0..n {
                let it = items.map.entry(addr + k * PAGE).or_default();
                if !it.zero {
                    it.zero = true;
                    items.zero += 1;
                }
                it.age = 0;
            }
        }
        Ok(KsmMerge::MapLimit) => map_limit(inner, sc, mm),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr, error = %e, "zero-page merge failed")
        }
    }
}

/// Merges `n` pages from `addr` onto existing stable pages `first..`
/// (`try_to_merge_with_ksm_page`); a changed run is retried page by page.
#[allow(clippy::too_many_arguments)]
fn merge_stable(
    inner: &Inner,
    sc: &mut Scanner,
    mm: &Mm,
    state: &MmState,
    items: &mut SlotItems,
    addr: u64,
    n: u64,
    first: u64,
) {
    if sc.map_limited {
        return;
    }
    let mut charged = vec![false; n as usize];
    match KsmMm::new(mm, state).and_then(|ksm| {
        ksm.merge(
            MergeRun {
                addr,
                n,
                store: &inner.store,
                first,
                fill: false,
            },
            &mut charged,
        )
    }) {
        Ok(KsmMerge::Merged) => {
            // Budget: a charged page's charge moves to a stable page that
            // has none yet (it was filled by a never-charged page), else it
            // is given back; a never-charged page gives nothing back.
            let mut give_back = 0;
            for k in 0..n {
                sc.record_merged(items, addr + k * PAGE, first + k);
                if !charged[k as usize] {
                    continue;
                }
                match sc.stable.get_mut(&(first + k)) {
                    Some(node) if node.budget.is_none() => {
                        node.budget = Some(mm.budget().clone());
                    }
                    _ => give_back += 1,
                }
            }
            let _ = KsmMm::new(mm, state).map(|ksm| ksm.uncharge(give_back));
            tracing::trace!(target: "mm_ksm::ksm_merge_with_ksm_page", mm_id = mm.id(), addr, pages = n, stable = first, "ksm_merge_with_ksm_page");
        }
        Ok(KsmMerge::Changed) if n > 1 => {
            for k in 0..n {
                merge_stable(inner, sc, mm, state, items, addr + k * PAGE, 1, first + k);
            }
        }
        Ok(KsmMerge::MapLimit) => map_limit(inner, sc, mm),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr, error = %e, "merge failed")
        }
    }
}

/// Makes new stable pages from the run at `addr` (the current page of an
/// unstable-tree pair, `try_to_merge_two_pages` + `stable_tree_insert`);
/// returns the first stable id for the other side.
#[allow(clippy::too_many_arguments)]
fn merge_new(
    inner: &Inner,
    sc: &mut Scanner,
    mm: &Mm,
    state: &MmState,
    items: &mut SlotItems,
    addr: u64,
    sums: &[u64],
) -> Option<u64> {
    if sc.map_limited {
        return None;
    }
    let n = sums.len() as u64;
    let first = inner.store.alloc(n)?;
    // Ids that end up unused (the merge did not happen) are released at
    // once: punching a hole that was never filled is harmless, and the
    // store's allocated-minus-released count stays the pages in use.
    let release = |inner: &Inner| {
        for k in 0..n {
            let _ = inner.store.release(first + k);
        }
    };
    let mut charged = vec![false; n as usize];
    match KsmMm::new(mm, state).and_then(|ksm| {
        ksm.merge(
            MergeRun {
                addr,
                n,
                store: &inner.store,
                first,
                fill: true,
            },
            &mut charged,
        )
    }) {
        Ok(KsmMerge::Merged) => {
            for (k, sum) in sums.iter().enumerate() {
                // The filling page's charge (if it had one) moves to the
                // stable page: nothing is uncharged here.
                let budget = charged[k].then(|| mm.budget().clone());
                let k = k as u64;
                sc.new_node(first + k, *sum, budget);
                sc.record_merged(items, addr + k * PAGE, first + k);
                // Every new node has this run's page as its mapper; one
                // without (cannot happen while record_merged adds one) would
                // never be freed by drop_mapper.
                sc.release_if_unmapped(inner, first + k);
            }
            tracing::trace!(target: "mm_ksm::ksm_merge_one_page", mm_id = mm.id(), addr, pages = n, stable = first, "ksm_merge_one_page");
            Some(first)
        }
        Ok(KsmMerge::MapLimit) => {
            release(inner);
            map_limit(inner, sc, mm);
            None
        }
        Ok(_) => {
            release(inner);
            None
        }
        Err(e) => {
            release(inner);
            tracing::warn!(target: "mm_ksm", mm_id = mm.id(), addr, error = %e, "merge failed");
            None
        }
    }
}

/// Step 7: the unstable side of this batch's pairs, each under its own
/// mm's read lock and `users == 0` check.
async fn merge_pending(inner: &Inner, sc: &mut Scanner, pending: Vec<Pending>) {
    for p in pending {
        // The slot cannot be freed meanwhile: ksm_exit's fast path needs no
        // rmap items (this mm has the unstable-tree item), and only the
        // scanner (us, holding the scanner mutex) frees the others.
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
        if (p.first..p.first + p.n).any(|id| !sc.stable.contains_key(&id)) {
            continue;
        }
        let mut items = sc.items.remove(&p.mm_id).unwrap_or_default();
        merge_stable(
            inner, sc, &slot.mm, &state, &mut items, p.addr, p.n, p.first,
        );
        publish_slot(&slot, &items);
        sc.items.insert(p.mm_id, items);
        drop(state);
    }
}

/// `unmerge_and_remove_all_rmap_items` (run = 2, PROTOCOL §9.7): unshare
/// every merged page of every live mm, drop all rmap items; slots of live
/// mms stay, slots of exiting ones are freed.
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
        let id = slot.id();
        // Room for the copies before the read lock (break_ksm allocates):
        // this may OOM-kill and wait for a victim's exit while we hold the
        // scanner mutex, which is safe only because ksm_exit never takes it
        // (seed 3). Holding no mmap lock here, the wait cannot block the
        // victim's write-lock barrier either.
        let merging = sc.items.get(&id).map_or(0, |it| it.merging);
        if let Err(source) = slot.mm.reserve(merging * PAGE).await {
            lock(&inner.list).cursor = None;
            publish(inner, sc);
            return Err(Error::Mm { mm_id: id, source });
        }
        let state = slot.mm.lock().read().await;
        sched::point("ksm_unmerge:read_locked").await;
        // ksm_test_exit right after the read lock (I-KSM-2).
        let alive = slot.mm.users() > 0;
        let mut items = sc.items.remove(&id).unwrap_or_default();
        if alive {
            let ranges: Vec<(u64, u64)> =
                state.vmas().iter().map(|v| (v.start(), v.len())).collect();
            for (s, len) in ranges {
                if let Err(source) =
                    KsmMm::new(&slot.mm, &state).and_then(|ksm| ksm.unshare(s, len))
                {
                    publish_slot(&slot, &items);
                    sc.items.insert(id, items);
                    drop(state);
                    lock(&inner.list).cursor = None;
                    publish(inner, sc);
                    return Err(Error::Mm { mm_id: id, source });
                }
            }
        }
        // Unshared above (alive), so this only forgets; an item whose page
        // still could not be unshared stays with its mapper.
        if !sc.drop_all_items(inner, &slot.mm, &state, &mut items) {
            publish_slot(&slot, &items);
            sc.items.insert(id, items);
        } else {
            publish_slot(&slot, &items);
        }
        {
            let mut list = lock(&inner.list);
            advance(&mut list, id);
            if alive {
                // I-KSM-5, as in the scan: the mmap lock (and our use of
                // the slot) first, the list lock at the end of this block.
                drop(state);
                drop(slot);
            } else {
                inner.slots.remove(&id);
                if let Some(i) = list.position(id) {
                    list.order.remove(i);
                }
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
        }
        sched::point("ksm_unmerge:slot_done").await;
    }
    sc.unstable.clear();
    sc.address = 0;
    sc.items.retain(|_, v| !v.map.is_empty());
    // ksm_scan.seqnr = 0.
    inner.counters.full_scans.store(0, Ordering::Relaxed);
    publish(inner, sc);
    Ok(())
}

#[cfg(test)]
mod tests {
    use mm_core::{Host, MapOptions};

    use super::*;
    use crate::{Ksm, KsmConfig};

    /// Review finding (c): the stable ids of a pair run whose merge did not
    /// happen (the page changed) are released, not left allocated.
    #[test]
    fn test_unused_stable_ids_released() {
        let host = Host::with_budget(64 << 20);
        let k = Ksm::new(KsmConfig::default()).unwrap();
        let inner = &k.inner;
        let mm = host.new_mm("c");
        let addr = mm
            .mmap_blocking(MapOptions::anon(4 * PAGE).tracked(true))
            .unwrap();
        let mut sc = Scanner::default();
        let mut items = SlotItems::default();
        let state = futures_lite::future::block_on(mm.lock().read());
        // Never populated: the merge finds the pages absent (Changed).
        let first = merge_new(inner, &mut sc, &mm, &state, &mut items, addr, &[1, 2]);
        assert_eq!(first, None);
        assert_eq!(inner.store.counts(), (2, 2), "allocated ids not released");
        assert!(sc.stable.is_empty() && items.map.is_empty());
        drop(state);
    }

    /// A stable page left with no mapper is freed (hole punched, its
    /// charge given back).
    #[test]
    fn test_unmapped_stable_page_released_and_uncharged() {
        let host = Host::with_budget(64 << 20);
        let k = Ksm::new(KsmConfig::default()).unwrap();
        let inner = &k.inner;
        let mut sc = Scanner::default();
        host.budget().try_charge(PAGE).unwrap();
        let id = inner.store.alloc(1).unwrap();
        sc.new_node(id, 7, Some(host.budget().clone()));
        sc.release_if_unmapped(inner, id);
        assert!(sc.stable.is_empty() && sc.by_sum.is_empty());
        assert_eq!(sc.mappers, 0);
        assert_eq!(inner.store.counts(), (1, 1));
        assert_eq!(host.budget().charged(), 0);
    }
}
