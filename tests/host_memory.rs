//! Claims about host memory, checked with the kernel's own numbers
//! (/proc/self/smaps_rollup, mincore), never with the library's counters.

mod common;

use common::{near, rss, serial, MIB};
use guestmm::{Advice, Host, MapOptions};

const SIZE: u64 = 256 * MIB;
/// Slack for allocator noise and page-table pages.
const TOL: u64 = 16 * MIB;

fn touched(host: &Host) -> (guestmm::MmUser, u64, u64) {
    let mm = host.new_mm("rss");
    let before = rss();
    let a = mm.mmap_blocking(MapOptions::anon(SIZE)).unwrap();
    mm.fill_blocking(a, SIZE, 0x5a).unwrap();
    let after = rss();
    assert!(
        near(after - before, SIZE, TOL),
        "touching 256 MiB raised RSS by {} MiB",
        (after - before) / MIB
    );
    assert_eq!(
        mm.resident_bytes_blocking().unwrap(),
        SIZE,
        "mincore agrees"
    );
    (mm, a, before)
}

#[test]
fn test_rss_falls_after_dontneed() {
    let _s = serial();
    let host = Host::with_budget(1 << 30);
    let (mm, a, before) = touched(&host);
    mm.madvise_blocking(a, SIZE, Advice::DontNeed).unwrap();
    assert!(
        near(rss(), before, TOL),
        "RSS after DONTNEED: {} MiB over",
        (rss().saturating_sub(before)) / MIB
    );
    assert_eq!(mm.resident_bytes_blocking().unwrap(), 0);
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_rss_falls_after_munmap() {
    let _s = serial();
    let host = Host::with_budget(1 << 30);
    let (mm, a, before) = touched(&host);
    mm.munmap_blocking(a, SIZE).unwrap();
    assert!(near(rss(), before, TOL));
    assert_eq!(host.stats().charged_bytes, 0);
    assert!(mm.vmas_blocking().is_empty());
}

#[test]
fn test_rss_falls_after_teardown() {
    let _s = serial();
    let host = Host::with_budget(1 << 30);
    let (mm, _a, before) = touched(&host);
    let grab = mm.grab();
    drop(mm);
    assert!(near(rss(), before, TOL));
    assert_eq!(host.stats().charged_bytes, 0);
    assert_eq!(grab.rss_pages(), 0);
}

/// Maps 64 MiB with `opts` in a fresh mm, lets `populate` write all of it
/// (from the start address), and checks that RSS rose by 64 MiB and that
/// the mm's teardown gives it back.
fn assert_teardown_frees(opts: MapOptions, populate: impl FnOnce(&guestmm::MmUser, u64)) {
    let _s = serial();
    let host = Host::with_budget(1 << 30);
    let mm = host.new_mm("teardown");
    let before = rss();
    let a = mm.mmap_blocking(opts).unwrap();
    populate(&mm, a);
    assert!(near(rss() - before, 64 * MIB, TOL));
    drop(mm);
    assert!(near(rss(), before, TOL));
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_direct_touches_are_freed_by_teardown() {
    // An embedder (a vCPU, JIT code) writes through the host pointer without
    // the API: the library never charged those pages, but teardown still
    // returns them to the host.
    assert_teardown_frees(MapOptions::anon(64 * MIB), |mm, a| {
        let vma = mm.find_vma_blocking(a).unwrap();
        // SAFETY: the VMA is mapped read-write, 64 MiB long, and `mm` (a
        // user reference) keeps it mapped for the duration of the write.
        unsafe { std::ptr::write_bytes(vma.host_ptr(), 1, 64 * MIB as usize) };
    });
}

#[test]
fn test_shared_memfd_freed_by_teardown() {
    assert_teardown_frees(MapOptions::shared(64 * MIB), |mm, a| {
        mm.fill_blocking(a, 64 * MIB, 2).unwrap()
    });
}
