//! ksmd: one batch of the scan (`ksm_do_scan`) and unmerge-all (`run = 2`).
//! Everything here runs under the scanner mutex (`ksm_thread_mutex`); the
//! step numbers refer to the crate docs.
//!
//! * this file: the [`Scanner`] state and the batch, steps 2-3 and 5-6
//!   (which slot, its read lock and `users == 0`, leaving it);
//! * `walk.rs`: step 4, the visit of one mm's mergeable VMAs;
//! * `classify.rs`: step 4 for one chunk: smart scan, snapshot, checksums,
//!   tree lookups;
//! * `merge.rs`: step 4's runs of hits, and step 7 (the other mm's side);
//! * `stable.rs`: the stable and unstable trees and the rmap items;
//! * `unmerge.rs`: `unmerge_and_remove_all_rmap_items`.

mod classify;
mod items;
mod maps;
mod merge;
mod stable;
mod unmerge;
mod walk;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use mm_core::{sched, KsmMm, Mm, MmFlag, MmState, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_64;

pub(crate) use self::maps::max_map_count;
use self::maps::MapBudget;
use self::merge::Pending;
pub(crate) use self::stable::RMAP_ITEM_BYTES;
use self::stable::{SlotItems, Trees};
pub(crate) use self::unmerge::unmerge_all;
use crate::slots::{lock, Slot};
use crate::types::{GuestAddr, MmId, PAGE};
use crate::Inner;

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

/// The scanner's state: the trees, the rmap items and the cursor address.
#[derive(Default)]
pub(crate) struct Scanner {
    /// Rmap items per mm.
    items: HashMap<MmId, SlotItems>,
    trees: Trees,
    /// `ksm_scan.address`: where the walk of the cursor slot resumes.
    address: GuestAddr,
    /// `vm.max_map_count` was hit this pass: no more merges until the next.
    map_limited: bool,
    /// The host map-count budget (`maps.rs`).
    maps: MapBudget,
    buf: Vec<u8>,
}

/// One mm under its read lock, as the walk and the merges see it: the
/// scanner, the mm, its lock state and its rmap items (taken out of
/// `Scanner::items` for the visit).
struct MmCtx<'a> {
    inner: &'a Inner,
    sc: &'a mut Scanner,
    mm: &'a Mm,
    state: &'a MmState,
    items: &'a mut SlotItems,
    /// The mm's KSM domain folded into every tree key (`Slot::salt`).
    salt: u64,
}

impl<'a> MmCtx<'a> {
    /// The context of one visit of `mm`, whose lock guard derefs to `state`.
    fn new(
        inner: &'a Inner,
        sc: &'a mut Scanner,
        mm: &'a Mm,
        state: &'a MmState,
        items: &'a mut SlotItems,
        salt: u64,
    ) -> Self {
        MmCtx {
            inner,
            sc,
            mm,
            state,
            items,
            salt,
        }
    }

    /// mm-core's KSM mechanism for this mm, under the lock whose state
    /// the visit holds (`ForeignLock` cannot happen: both come from the
    /// same slot).
    fn ksm(&self) -> mm_core::Result<KsmMm<'_>> {
        KsmMm::new(self.mm, self.state)
    }
}

/// What one visit of an mm did.
struct Visit {
    scanned: u64,
    /// The walk reached the end of the mm (or the mm is exiting).
    end: bool,
    /// Keep the slot (the mm is alive and has something mergeable).
    keep: bool,
}

fn zero_sum() -> u64 {
    static Z: OnceLock<u64> = OnceLock::new();
    *Z.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

fn publish_slot(slot: &Slot, items: &SlotItems) {
    // SeqCst: read by ksm_exit's fast-path test under the slot-list lock;
    // the list lock taken after this store orders it anyway.
    slot.rmap_items
        .store(items.map.len() as u64, Ordering::SeqCst);
}

fn publish(inner: &Inner, sc: &Scanner) {
    let c = &inner.counters;
    let shared = sc.trees.stable.len() as u64;
    c.pages_shared.store(shared, Ordering::Relaxed);
    c.pages_sharing
        .store(sc.trees.mappers.saturating_sub(shared), Ordering::Relaxed);
    c.pages_unshared
        .store(sc.trees.unstable.len() as u64, Ordering::Relaxed);
    let (items, zero) = sc
        .items
        .values()
        .fold((0, 0), |(a, z), s| (a + s.map.len() as u64, z + s.zero));
    c.rmap_items.store(items, Ordering::Relaxed);
    c.ksm_zero_pages.store(zero, Ordering::Relaxed);
}

/// `ksm_do_scan`: up to `budget` pages (steps 2-7).
pub(crate) async fn do_scan(inner: &Inner, sc: &mut Scanner, budget: u64) -> u64 {
    let mut scanned = 0;
    let reserve = inner.map_reserve.load(Ordering::Relaxed);
    sc.maps.refresh(reserve, false);
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
            sc.trees.unstable.clear();
            sc.address = GuestAddr(0);
            sc.map_limited = false;
            sc.maps.refresh(reserve, true);
            sc.maps.starved = 0;
            tracing::debug!(target: "mm_ksm::ksm_start_scan", seq = inner.counters.full_scans.load(Ordering::Relaxed), "ksm_start_scan");
        }
        sched::point("ksm:got_slot").await;

        // 3-6.
        let mut pending = Vec::new();
        let (n, pass_done) = visit_slot(inner, sc, slot, budget - scanned, &mut pending).await;
        scanned += n;
        sched::point("ksm:slot_unlocked").await;

        // 7. The other side of the pairs, one mm lock at a time.
        merge::merge_pending(inner, sc, pending).await;

        if pass_done {
            inner
                .counters
                .pages_unmerged_map_budget
                .store(sc.maps.starved, Ordering::Relaxed);
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

/// Steps 3-6 for the cursor slot: read lock, `users == 0`, the walk,
/// leaving the slot. Takes the slot by value: when and under which lock
/// our reference goes is part of the protocol (I-KSM-5). Returns the pages
/// scanned and whether the pass is complete.
async fn visit_slot(
    inner: &Inner,
    sc: &mut Scanner,
    slot: Arc<Slot>,
    budget: u64,
    pending: &mut Vec<Pending>,
) -> (u64, bool) {
    // 3. Read lock, then users == 0 before any VMA (I-KSM-2).
    let state = slot.mm.lock().read().await;
    sched::point("ksm:read_locked").await;
    let id = slot.id();
    let mut items = sc.items.remove(&id).unwrap_or_default();
    let visit = if slot.mm.users() == 0 {
        Visit {
            scanned: 0,
            end: true,
            keep: false,
        }
    } else {
        let mut cx = MmCtx::new(inner, &mut *sc, &slot.mm, &state, &mut items, slot.salt());
        walk::scan_mm(&mut cx, budget, pending).await
    };
    if visit.end {
        // The walk of this mm is over, however it ended (users == 0
        // before or during the walk, nothing mergeable left): the next
        // slot's walk starts at 0, never at where this one stopped.
        sc.address = GuestAddr(0);
    }
    sched::point("ksm:visited").await;

    // 5-6. Leave the slot. Exiting, or nothing mergeable left: free it
    // once every rmap item is gone (a live mm's pages unshared first).
    let free_slot =
        visit.end && !visit.keep && sc.drop_all_items(inner, &slot.mm, &state, &mut items);
    publish_slot(&slot, &items);
    let pass_done = if free_slot {
        let done = unlink_slot(inner, &slot);
        drop(state);
        sched::point("ksm:slot_removed").await;
        inner
            .counters
            .slots_freed_by_scanner
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(target: "mm_ksm", mm_id = id.0, "ksm slot freed by the scanner");
        // mmdrop: the last Arc of the slot (list and hash let go above).
        drop(slot);
        done
    } else {
        sc.items.insert(id, items);
        if visit.end {
            let mut list = lock(&inner.list);
            let done = list.advance(id);
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
    (visit.scanned, pass_done)
}

/// Step 6, freeing: under the slot-list lock, moves the cursor past the
/// slot and removes it from the list and the hash. Returns whether the
/// pass is complete.
fn unlink_slot(inner: &Inner, slot: &Slot) -> bool {
    let id = slot.id();
    let mut list = lock(&inner.list);
    let done = list.advance(id);
    inner.slots.remove(&id);
    list.unlink(id);
    // Under the list lock, like slots::enter's set: a racing enter of this
    // (live) mm then either finds our slot or inserts its own after this
    // clear, so a slot never exists without the flag ksm_exit tests (else
    // its grab leaks).
    slot.mm.flags().clear(MmFlag::VM_MERGEABLE);
    done
}
