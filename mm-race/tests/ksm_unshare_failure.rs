//! The error path of unmerge-all (`run = 2`, PROTOCOL §9.7) when the
//! host refuses a copy-back (`MADV_POPULATE_WRITE` of the unshare, failed
//! by the harness's Nth-failure injection: `fail:madvise(POPULATE_WRITE)
//! unshare` in mm-core `ksm/unshare.rs`). What must hold after it: the
//! error comes back and `run` falls back to stop; a page that could not be
//! unshared keeps its merged contents, its rmap item and its stable page's
//! mapper (I-KSM-7: else a later pass frees the stable page under it); a
//! second `run = 2` with the host healthy unmerges everything.

use std::time::Duration;

use futures_lite::future::block_on;
use mm_core::{Advice, Host, MapOptions, MmUser, PAGE_SIZE};
use mm_ksm::{Ksm, KsmConfig, Run};
use mm_race::exec::Sim;

const P: u64 = PAGE_SIZE as u64;
const PAGES: u64 = 4;

fn unshare_site(name: &str) -> bool {
    name == "fail:madvise(POPULATE_WRITE) unshare"
}

/// A guest with `PAGES` pages of `0x5a` in one tracked mergeable region.
fn guest(host: &Host, k: &Ksm, name: &str) -> (MmUser, u64) {
    let mm = host.new_mm(name);
    let at = block_on(mm.mmap(MapOptions::anon(PAGES * P).tracked(true))).unwrap();
    block_on(mm.fill(at, PAGES * P, 0x5a)).unwrap();
    block_on(k.madvise(&mm, at, PAGES * P, Advice::Mergeable)).unwrap();
    (mm, at)
}

fn merging(k: &Ksm, mm: &MmUser) -> u64 {
    k.process_stat(mm.id()).map_or(0, |s| s.merging_pages)
}

#[test]
fn failed_unmerge_all_keeps_the_items_of_the_pages_it_could_not_unshare() {
    let host = Host::with_budget(1 << 30);
    let k = Ksm::new(KsmConfig {
        pages_to_scan: 64,
        sleep: Duration::ZERO,
        use_zero_pages: false,
        ..KsmConfig::default()
    })
    .unwrap();
    block_on(k.set_run(Run::Merge)).unwrap();
    let guests = [guest(&host, &k, "a"), guest(&host, &k, "b")];
    for _ in 0..8 {
        if guests.iter().all(|(mm, _)| merging(&k, mm) == PAGES) {
            break;
        }
        block_on(k.scan_step());
    }
    for (mm, _) in &guests {
        assert_eq!(merging(&k, mm), PAGES, "{}: not merged", mm.name());
    }

    // The first copy-back of run = 2 fails (the first slot's only run).
    let mut sim = Sim::new(&[]);
    sim.fail_sites(unshare_site);
    sim.fail_nth(1);
    let hook = sim.install();
    let res = block_on(k.set_run(Run::Unmerge));
    drop(hook);
    assert!(
        matches!(&res, Err(mm_ksm::Error::Mm { source: mm_core::Error::Host { source, .. }, .. })
            if source.kind() == std::io::ErrorKind::OutOfMemory),
        "run = 2 should fail with the injected ENOMEM: {res:?}"
    );
    assert_eq!(
        k.run_mode(),
        Run::Stop,
        "a failed run = 2 stops the scanner"
    );
    let st = k.stats();
    let mut merged = 0;
    for (mm, at) in &guests {
        let m = merging(&k, mm);
        merged += m;
        // Every page merged still has its rmap item.
        let items = k.process_stat(mm.id()).map_or(0, |s| s.rmap_items);
        assert!(
            items >= m,
            "{}: {m} merged pages, {items} rmap items",
            mm.name()
        );
        let mut b = vec![0u8; (PAGES * P) as usize];
        block_on(mm.read(*at, &mut b)).unwrap();
        assert!(b.iter().all(|x| *x == 0x5a), "{}: contents lost", mm.name());
    }
    assert!(merged > 0, "the failed unshare left its pages merged");
    assert!(
        st.pages_shared + st.pages_sharing >= merged,
        "{merged} merged pages, {} mappers",
        st.pages_shared + st.pages_sharing
    );

    // The host healthy again: unmerge-all finishes the job.
    block_on(k.set_run(Run::Unmerge)).unwrap();
    let st = k.stats();
    assert_eq!(
        (st.pages_shared, st.pages_sharing, st.rmap_items),
        (0, 0, 0)
    );
    for (mm, at) in &guests {
        assert_eq!(merging(&k, mm), 0, "{}: still merged", mm.name());
        let mut b = vec![0u8; (PAGES * P) as usize];
        block_on(mm.read(*at, &mut b)).unwrap();
        assert!(b.iter().all(|x| *x == 0x5a), "{}: contents lost", mm.name());
    }
}
