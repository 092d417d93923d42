//! Step 4: the visit of one mm, its mergeable VMAs walked from where the
//! last batch stopped (`ksm_scan.address`), one leaf-bounded chunk at a
//! time; step 5 (`remove_trailing_rmap_items`) at its end.

use mm_core::{MmFlag, VmFlags};

use super::merge::Pending;
use super::{classify, MmCtx, Visit, CHUNK_PAGES, LEAF_BYTES};
use crate::types::{GuestAddr, PageCount, PAGE};

/// Step 4: walk the mergeable VMAs of the cursor mm from `sc.address`, at
/// most `budget` pages. The read lock is held and `users` was non-zero
/// after it was taken.
pub(super) async fn scan_mm(cx: &mut MmCtx<'_>, budget: u64, pending: &mut Vec<Pending>) -> Visit {
    let mm = cx.mm;
    let merge_any = mm.flags().test(MmFlag::VM_MERGE_ANY);
    let mut addr = cx.sc.address;
    let mut scanned = 0;
    // Like the kernel, an mm stays registered while it has a VM_MERGEABLE
    // VMA at all (or merge-any): a VMA that is only for a while not
    // mergeable here (PROT_NONE, pinned, not write-protectable)
    // keeps the mm's slot, so that undoing the mprotect brings
    // merging back (issue 12).
    //
    // I-KSM-4 (b): "at all" means anywhere in the tree, not only above the
    // address where the last batch stopped. A batch that stopped inside a
    // region that then left KSM (UNMERGEABLE, munmap) resumes above the
    // mm's other mergeable VMAs: judged from the VMAs above that address
    // alone, the slot of a live mm with a mergeable VMA was freed and the
    // VMA never scanned again (found by the race harness with a region
    // across the 2 MiB leaf boundary; test
    // `ksmd_keeps_the_slot_of_a_mergeable_vma_below_the_resume_address`).
    // The kernel frees a slot only after a walk from address 0 found
    // nothing, at the next visit; this frees it at the visit that finds
    // nothing mergeable anywhere (`drop_all_items` unshares a live mm's
    // pages over its whole address space first).
    let saw = merge_any
        || cx
            .state
            .vmas()
            .iter()
            .any(|v| v.flags().contains(VmFlags::MERGEABLE));
    let vmas: Vec<(GuestAddr, GuestAddr, bool)> = cx
        .state
        .vmas()
        .iter()
        .filter(|v| v.end() > addr.0)
        .filter(|v| merge_any || v.flags().contains(VmFlags::MERGEABLE))
        .map(|v| (GuestAddr(v.start()), GuestAddr(v.end()), v.ksm_capable()))
        .collect();
    for (vs, ve, capable) in vmas {
        let mut a = addr.max(vs);
        // Items between two mergeable VMAs: their pages left KSM.
        cx.sc
            .drop_items_range(cx.inner, mm, cx.state, cx.items, addr, a);
        if !capable {
            // Mergeable but not now: its pages keep their items (a merged
            // page stays merged, as the kernel leaves a KSM page mapped in
            // a VMA it cannot scan), and nothing is read.
            addr = ve;
            continue;
        }
        while a < ve {
            if scanned >= budget {
                cx.sc.address = a;
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
            let leaf_end = GuestAddr((a.0 / LEAF_BYTES + 1) * LEAF_BYTES);
            let e = ve
                .min(leaf_end)
                .min(a.add_pages((budget - scanned).min(CHUNK_PAGES)));
            let n = PageCount((e.0 - a.0) / PAGE);
            classify::scan_chunk(cx, a, n, pending).await;
            scanned += n.0;
            a = e;
        }
        addr = a;
    }
    // 5. remove_trailing_rmap_items.
    cx.sc
        .drop_items_range(cx.inner, mm, cx.state, cx.items, addr, GuestAddr(u64::MAX));
    cx.sc.address = GuestAddr(0);
    Visit {
        scanned,
        end: true,
        keep: saw,
    }
}
