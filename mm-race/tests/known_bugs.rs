//! Production bugs the race harness ran into and that are not fixed yet,
//! each as a sequential reproducer (`#[ignore]`d, so that `cargo test`
//! stays green; run with `cargo test -p mm-race --test known_bugs --
//! --ignored`). The harness avoids the situation meanwhile (its comment
//! names the test).

use std::time::Duration;

use futures_lite::future::block_on;
use mm_core::{Advice, Host, HostConfig, MapOptions, PAGE_SIZE};
use mm_ksm::{Ksm, KsmConfig, Run};

const P: u64 = PAGE_SIZE as u64;

/// I-KSM-4 (b), PROTOCOL §9.4 step 6: ksmd frees the slot of a live mm
/// only when a full walk of its VMAs found no `VM_MERGEABLE` one (the
/// kernel frees it when `ksm_scan.address == 0` after the walk: the walk
/// started at 0). mm-ksm's `scan_mm` (walk.rs) decides "saw a mergeable
/// VMA" only among the VMAs that end above the address where the previous
/// batch stopped. So when a batch stops inside a mergeable region, the
/// region then leaves KSM (`madvise(UNMERGEABLE)` or `munmap`) and the mm's
/// only other mergeable VMA lies below that address, the next visit finds
/// none, and ksmd frees the slot of a live mm that still has a mergeable
/// VMA: that VMA is never scanned again (until madvise enters it anew).
/// Found by `teardown_vs_ksm` with guest 0's untouched mergeable region
/// mapped below a region across the 2 MiB leaf boundary (I-KSM-4's "live
/// mms keep their slots" check after run = 2).
#[test]
#[ignore = "known bug: ksmd frees a live mm's slot when its mergeable VMAs lie below the resume address"]
fn ksmd_keeps_the_slot_of_a_mergeable_vma_below_the_resume_address() {
    let host = Host::new(HostConfig::with_budget(1 << 30));
    let ksm = Ksm::new(KsmConfig {
        pages_to_scan: 2,
        sleep: Duration::ZERO,
        ..KsmConfig::default()
    })
    .unwrap();
    let guest = host.create_guest("g");
    let mm = guest.mm().unwrap();
    // An untouched mergeable page at the mmap floor, then a populated
    // mergeable region above it.
    let low = block_on(mm.mmap(MapOptions::anon(P).tracked(true))).unwrap();
    let high = block_on(mm.mmap(MapOptions::anon(8 * P).at(2 << 20).tracked(true))).unwrap();
    assert!(low < high);
    for i in 0..8 {
        block_on(mm.fill(high + i * P, P, 0x5a)).unwrap();
    }
    block_on(ksm.madvise(&mm, low, P, Advice::Mergeable)).unwrap();
    block_on(ksm.madvise(&mm, high, 8 * P, Advice::Mergeable)).unwrap();
    block_on(ksm.set_run(Run::Merge)).unwrap();
    // One batch of 2 pages: the low page and the first high one; it stops
    // inside the high region.
    block_on(ksm.scan_step());
    block_on(ksm.madvise(&mm, high, 8 * P, Advice::Unmergeable)).unwrap();
    block_on(ksm.scan_step());
    assert!(
        ksm.is_registered(mm.id()),
        "ksmd freed the slot of a live mm that still has a mergeable VMA (below where its last batch stopped)"
    );
    block_on(mm.exit());
    block_on(guest.exit());
}
