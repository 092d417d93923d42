//! `DirtyBitmap` against real writes: through the host pointer by another
//! thread (as a vCPU or JIT code would), and through vm-memory (as a
//! device would); `AtomicBitmap` semantics (`dirty_at`, `get_and_reset`).
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{tracked_available, Fixture, PAGE};
use mm_vm_memory::{DirtyBitmap, Error, GuestMemoryMm, MmRegion};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGES: u64 = 256;

/// A dirty-tracked region of `PAGES` pages at guest address 0, or `None`
/// (one `skipped:` line) without `WP_ASYNC` / `PAGEMAP_SCAN`.
fn tracked_region(f: &Fixture, test: &str) -> Option<GuestMemoryMm<DirtyBitmap>> {
    let a = f.map(PAGES * PAGE, false).unwrap();
    match MmRegion::dirty_tracked(&f.user, a, PAGES * PAGE, GuestAddress(0)) {
        Ok(r) => Some(GuestMemoryMm::from_regions(vec![r]).unwrap()),
        Err(e @ Error::Unsupported { .. }) => {
            eprintln!("skipped: {test}: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn bits(words: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (w, &x) in words.iter().enumerate() {
        for b in 0..64 {
            if x & (1 << b) != 0 {
                v.push((w * 64 + b) as u64);
            }
        }
    }
    v
}

/// Writes one byte at page `p` of the region through its host pointer,
/// from another thread.
fn direct_write(host: usize, pages: Vec<u64>) {
    std::thread::spawn(move || {
        for p in pages {
            // SAFETY: inside the region (p < PAGES), which the caller keeps.
            unsafe { std::ptr::write_volatile((host as *mut u8).add((p * PAGE + 7) as usize), 1) };
        }
    })
    .join()
    .unwrap();
}

#[test]
fn test_direct_and_device_writes_are_dirty() {
    let f = Fixture::new(1 << 30);
    let Some(mem) = tracked_region(&f, "test_direct_and_device_writes_are_dirty") else {
        return;
    };
    let r = mem.find_region(GuestAddress(0)).unwrap();
    let bm = r.bitmap_ref();
    assert_eq!(bm.len(), PAGES as usize);
    assert!(bm.sees_direct_writes());
    // A fresh region is clean.
    assert!(bits(&bm.get_and_reset().unwrap()).is_empty());

    let host = r.host_ptr() as usize;
    direct_write(host, vec![3, 17, 64, 200]);
    mem.write_obj(5u32, GuestAddress(100 * PAGE + 12)).unwrap(); // a device
    mem.write_slice(&[1u8; 2], GuestAddress(150 * PAGE - 1))
        .unwrap(); // across two pages

    // dirty_at, as AtomicBitmap's: both sources, byte offsets.
    for p in [3u64, 17, 64, 200, 100, 149, 150] {
        assert!(bm.dirty_at((p * PAGE + 100) as usize), "page {p}");
        assert!(
            r.bitmap().dirty_at((p * PAGE) as usize),
            "page {p} via slice"
        );
    }
    for p in [0u64, 4, 63, 65, 199, 255] {
        assert!(!bm.dirty_at((p * PAGE) as usize), "page {p} is clean");
    }
    // A read is not a write (exact only with WP_UNPOPULATED).
    let _: u64 = mem.read_obj(GuestAddress(30 * PAGE)).unwrap();
    if bm.exact_for_unpopulated() {
        assert!(!bm.dirty_at((30 * PAGE) as usize));
    }

    let mut got = bits(&bm.get_and_reset().unwrap());
    got.retain(|&p| bm.exact_for_unpopulated() || p != 30);
    assert_eq!(got, vec![3, 17, 64, 100, 149, 150, 200]);
    // get_and_reset cleared both sources: the kernel protected the pages
    // again, so the same pages are clean until written again.
    assert!(bits(&bm.get_and_reset().unwrap()).is_empty());
    assert!(!bm.dirty_at((3 * PAGE) as usize));
    direct_write(host, vec![3]);
    assert!(bm.dirty_at((3 * PAGE) as usize));
    assert_eq!(bits(&bm.get_and_reset().unwrap()), vec![3]);

    // reset(): everything clean.
    direct_write(host, vec![9, 10]);
    bm.mark_dirty((11 * PAGE) as usize, 1);
    bm.reset().unwrap();
    assert!(bits(&bm.get_and_reset().unwrap()).is_empty());
}

/// What vm-memory's own `AtomicBitmap` misses: direct writes.
#[test]
fn test_atomic_bitmap_misses_direct_writes() {
    let f = Fixture::new(1 << 30);
    let a = f.map(PAGES * PAGE, false).unwrap();
    let r = MmRegion::<AtomicBitmap>::new(&f.user, a, PAGES * PAGE, GuestAddress(0)).unwrap();
    direct_write(r.host_ptr() as usize, vec![3]);
    assert!(!r.bitmap_ref().dirty_at((3 * PAGE) as usize));
    r.write_obj(1u8, vm_memory::MemoryRegionAddress(4 * PAGE))
        .unwrap();
    assert!(r.bitmap_ref().dirty_at((4 * PAGE) as usize));
}

/// A writer thread writes each page of a 16 MiB region exactly once while
/// the harvester collects in a loop: every page must be reported by some
/// harvest (no write lost between the scan and the re-protection; a
/// rewrite would hide a loss, hence once per page).
#[test]
fn test_concurrent_writer_loses_nothing() {
    const N: u64 = 4096;
    let f = Fixture::new(1 << 30);
    let a = f.map(N * PAGE, false).unwrap();
    let bm = match DirtyBitmap::new(&f.user, a, N * PAGE) {
        Ok(b) => b,
        Err(e @ Error::Unsupported { .. }) => {
            eprintln!("skipped: test_concurrent_writer_loses_nothing: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // Populate first, so that the writes below are write-protect faults
    // on present pages (the case a harvest races with).
    f.user.fill_blocking(a, N * PAGE, 1).unwrap();
    bm.reset().unwrap();
    let host = f.user.find_vma_blocking(a).unwrap().host_ptr() as usize;
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            let p = (i * 1031) % N; // 1031 is prime: a permutation
                                    // SAFETY: inside the region, which outlives this thread.
            unsafe { std::ptr::write_volatile((host as *mut u64).add((p * PAGE / 8) as usize), i) };
            for _ in 0..200 {
                std::hint::spin_loop();
            }
        }
        done2.store(true, Ordering::Release);
    });
    let mut seen = vec![false; N as usize];
    let mut harvests = 0u64;
    // Bounded: the writer ends after N writes.
    while !done.load(Ordering::Acquire) {
        for p in bits(&bm.get_and_reset().unwrap()) {
            seen[p as usize] = true;
        }
        harvests += 1;
    }
    writer.join().unwrap();
    for p in bits(&bm.get_and_reset().unwrap()) {
        seen[p as usize] = true;
    }
    let lost: Vec<usize> = (0..N as usize).filter(|&p| !seen[p]).collect();
    assert!(
        lost.is_empty(),
        "{} pages lost over {harvests} harvests: {:?}",
        lost.len(),
        &lost[..lost.len().min(8)]
    );
    assert!(harvests > 1);
}

/// A tracked region is registered with mm-core's userfaultfd: the kernel
/// side cannot be added (named error); `marks_only` is AtomicBitmap.
#[test]
fn test_tracked_region_is_busy_marks_only_works() {
    let f = Fixture::new(1 << 30);
    if !tracked_available(&f, "test_tracked_region_is_busy_marks_only_works") {
        return;
    }
    let a = f.map(16 * PAGE, true).unwrap();
    match DirtyBitmap::new(&f.user, a, 16 * PAGE) {
        Err(Error::DirtyTrackingBusy { .. }) => {}
        Err(e @ Error::Unsupported { .. }) => {
            eprintln!("skipped: test_tracked_region_is_busy_marks_only_works: {e}");
            return;
        }
        other => panic!("{other:?}"),
    }
    let r = MmRegion::with_bitmap(
        &f.user,
        a,
        16 * PAGE,
        GuestAddress(0),
        DirtyBitmap::marks_only((16 * PAGE) as usize),
    )
    .unwrap();
    assert!(!r.bitmap_ref().sees_direct_writes());
    r.write_obj(1u8, vm_memory::MemoryRegionAddress(5 * PAGE))
        .unwrap();
    assert_eq!(bits(&r.bitmap_ref().get_and_reset().unwrap()), vec![5]);
    assert!(bits(&r.bitmap_ref().get_and_reset().unwrap()).is_empty());
}

/// Pages written before the bitmap was created start clean (the whole
/// range is write-protected at creation).
#[test]
fn test_starts_clean_over_populated_memory() {
    let f = Fixture::new(1 << 30);
    let a = f.map(16 * PAGE, false).unwrap();
    f.user.fill_blocking(a, 16 * PAGE, 0xee).unwrap();
    let bm = match DirtyBitmap::new(&f.user, a, 16 * PAGE) {
        Ok(b) => b,
        Err(e @ Error::Unsupported { .. }) => {
            eprintln!("skipped: test_starts_clean_over_populated_memory: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert!((0..16).all(|p| !bm.is_page_dirty(p)));
    f.user.write_blocking(a + 6 * PAGE, b"x").unwrap();
    assert!(bm.is_page_dirty(6));
    assert_eq!(bits(&bm.get_and_reset().unwrap()), vec![6]);
}

/// A tracked region of a guest with a dirty log: the bitmap reads the
/// guest's own log (no `DirtyTrackingBusy`), direct writes from another
/// thread and device writes both reported, exactly, and the harvest
/// protects again.
#[test]
fn test_tracked_region_of_a_dirty_logged_guest_uses_its_log() {
    let host = mm_core::Host::new(mm_core::HostConfig {
        mm: mm_core::MmConfig {
            dirty_log: true,
            ..mm_core::MmConfig::default()
        },
        ..mm_core::HostConfig::with_budget(1 << 30)
    });
    let guest = host.create_guest("dirty-logged");
    let user = guest.mm().unwrap();
    let a = match user.mmap_blocking(mm_core::MapOptions::anon(PAGES * PAGE).tracked(true)) {
        Ok(a) => a,
        Err(e @ mm_core::Error::Unsupported { .. }) => {
            eprintln!("skipped: test_tracked_region_of_a_dirty_logged_guest_uses_its_log: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    user.fill_blocking(a, PAGES * PAGE, 0x11).unwrap();
    let r = MmRegion::dirty_tracked(&user, a, PAGES * PAGE, GuestAddress(0)).unwrap();
    let bm = r.bitmap_ref();
    assert!(bm.sees_direct_writes());
    assert!(
        (0..PAGES as usize).all(|p| !bm.is_page_dirty(p)),
        "starts clean"
    );
    let host_ptr = user.find_vma_blocking(a).unwrap().host_ptr() as usize;
    direct_write(host_ptr, vec![3, 4, 200]);
    r.write_obj(7u8, vm_memory::MemoryRegionAddress(9 * PAGE))
        .unwrap();
    assert!(bm.is_page_dirty(3) && bm.is_page_dirty(200) && !bm.is_page_dirty(5));
    assert_eq!(bits(&bm.get_and_reset().unwrap()), vec![3, 4, 9, 200]);
    assert!(bits(&bm.get_and_reset().unwrap()).is_empty());
    direct_write(host_ptr, vec![5]);
    assert_eq!(bits(&bm.get_and_reset().unwrap()), vec![5]);
    drop(r);
    drop(user);
    guest.exit_blocking();
}
