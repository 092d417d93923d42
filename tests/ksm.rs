//! KSM on real memory: merges free host memory (PSS from /proc), writes
//! after a merge stay private to their guest, ksm_exit's two paths free
//! each slot and each pin exactly once, unmerge restores private pages.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guestmm::ksm::{Ksm, KsmConfig, Run};
use guestmm::{Advice, Host, MapOptions, MmUser, ProcessMemory, Prot, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Page `i` of the shared pattern: identical in every guest, distinct
/// within one guest.
fn shared_page(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    for (k, c) in p.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k as u64).to_le_bytes());
    }
    p
}

fn ksm(pages_to_scan: u64) -> Ksm {
    let k = Ksm::new(KsmConfig {
        pages_to_scan,
        sleep: Duration::ZERO,
        ..KsmConfig::default()
    })
    .expect("ksm");
    k.set_run_blocking(Run::Merge).unwrap();
    k
}

/// What most tests start with: the serial lock (PSS is process-wide), a
/// 1 GiB host and a merging scanner.
fn setup(pages_to_scan: u64) -> (std::sync::MutexGuard<'static, ()>, Host, Ksm) {
    (
        common::serial(),
        Host::with_budget(1 << 30),
        ksm(pages_to_scan),
    )
}

/// A guest with `pages` of the shared pattern in one tracked, mergeable VMA.
fn guest(host: &Host, k: &Ksm, name: &str, pages: u64) -> (MmUser, u64) {
    let mm = host.new_mm(name);
    let addr = map_pattern(&mm, MapOptions::anon(pages * PAGE).tracked(true), 0, false);
    k.madvise_blocking(&mm, addr, pages * PAGE, Advice::Mergeable)
        .unwrap();
    (mm, addr)
}

/// Maps `opts` and writes the shared pattern from page `first` on into
/// all of it (as [`write_pattern`]); returns the address.
fn map_pattern(mm: &MmUser, opts: MapOptions, first: u64, direct: bool) -> u64 {
    let len = opts.len;
    let addr = mm.mmap_blocking(opts).unwrap();
    write_pattern(mm, addr, first, len / PAGE, direct);
    addr
}

/// Guests `{prefix}{g}` for each `g` of `range`, as [`guest`] makes them.
fn make_guests(
    host: &Host,
    k: &Ksm,
    prefix: &str,
    range: std::ops::Range<u64>,
    pages: u64,
) -> Vec<(MmUser, u64)> {
    range
        .map(|g| guest(host, k, &format!("{prefix}{g}"), pages))
        .collect()
}

/// Writes the shared pattern from page `first` on into the `pages` pages
/// at `addr`: through the API (populated and charged), or through the host
/// pointer (never charged) when `direct`.
fn write_pattern(mm: &MmUser, addr: u64, first: u64, pages: u64, direct: bool) {
    for i in 0..pages {
        let (at, page) = (addr + i * PAGE, shared_page(first + i));
        if direct {
            unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), host_ptr(mm, at), PAGE_SIZE) };
        } else {
            mm.write_blocking(at, &page).unwrap();
        }
    }
}

/// Scans until `done` or `max_passes` more full passes (never by time).
/// A new mm with a tracked region of four zero-filled pages, made
/// mergeable: `(mm, address)`.
fn four_zero_pages(host: &Host, k: &Ksm, name: &str) -> (MmUser, u64) {
    let mm = host.new_mm(name);
    let at = mm
        .mmap_blocking(MapOptions::anon(4 * PAGE).tracked(true))
        .unwrap();
    mm.fill_blocking(at, 4 * PAGE, 0).unwrap();
    k.madvise_blocking(&mm, at, 4 * PAGE, Advice::Mergeable)
        .unwrap();
    (mm, at)
}

fn scan_until(k: &Ksm, max_passes: u64, done: impl Fn(&Ksm) -> bool) {
    let stop = k.stats().full_scans + max_passes;
    while !done(k) && k.stats().full_scans < stop {
        k.scan_step_blocking();
    }
}

/// Asserts that the `pages` pages at `addr` hold the shared pattern from
/// page `first` on.
fn assert_pattern(mm: &MmUser, addr: u64, first: u64, pages: u64) {
    for i in 0..pages {
        assert!(
            mm.compare_blocking(addr + i * PAGE, &shared_page(first + i))
                .unwrap(),
            "{}: page {i} at {addr:#x}",
            mm.name()
        );
    }
}

/// Pages `0..pages` of the shared pattern at `a`, the next `pages` at `b`.
fn assert_pattern_pair(mm: &MmUser, (a, b): (u64, u64), pages: u64) {
    assert_pattern(mm, a, 0, pages);
    assert_pattern(mm, b, pages, pages);
}

/// Drops `guests`, lets the scanner free their slots (the barrier path
/// for scanned guests) and checks that the budget is back to zero.
fn teardown<G>(k: &Ksm, host: &Host, guests: G) {
    drop(guests);
    scan_until(k, 2, |k| k.stats().mm_slots == 0);
    assert_eq!(k.stats().mm_slots, 0);
    assert_eq!(host.stats().charged_bytes, 0);
}

/// A bound on every wait of these tests: reaching it is a failure (a hang
/// made visible), never a measurement.
const HANG: Duration = Duration::from_secs(120);

/// Sleeps in 1 ms steps until `cond` holds; panics after [`HANG`].
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + HANG;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "still waiting for {what} after {HANG:?}: {:?}",
            std::thread::current().name()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A guest with `pages` of the shared pattern in one **untracked**
/// mergeable VMA. Page `i` is written through the API (populated and
/// charged) when `api(i)`, else through the host pointer (never charged).
fn untracked_guest(
    host: &Host,
    k: &Ksm,
    name: &str,
    pages: u64,
    api: impl Fn(u64) -> bool,
) -> (MmUser, u64) {
    let mm = host.new_mm(name);
    let addr = mm.mmap_blocking(MapOptions::anon(pages * PAGE)).unwrap();
    for i in 0..pages {
        write_pattern(&mm, addr + i * PAGE, i, 1, !api(i));
    }
    k.madvise_blocking(&mm, addr, pages * PAGE, Advice::Mergeable)
        .unwrap();
    assert_eq!(
        mm_core::ksm::wp_failures(&mm),
        0,
        "no userfaultfd write-protect here"
    );
    (mm, addr)
}

fn host_ptr(mm: &MmUser, addr: u64) -> *mut u8 {
    let v = mm.find_vma_blocking(addr).unwrap();
    v.host_ptr().wrapping_add((addr - v.start()) as usize)
}

#[test]
fn test_merge_lowers_pss_by_duplicate_bytes() {
    let (_serial, host, k) = setup(4096);
    let (guests, pages) = (4u64, 2048u64);
    let gs = make_guests(&host, &k, "g", 0..guests, pages);
    let before = ProcessMemory::current().unwrap().pss;
    let dup = (guests - 1) * pages;
    scan_until(&k, 8, |k| k.stats().pages_sharing >= dup);
    let s = k.stats();
    assert_eq!(s.pages_shared, pages, "{s:?}");
    assert_eq!(s.pages_sharing, dup, "{s:?}");
    // Read every merged page so it is really mapped, and check it.
    let mut buf = vec![0u8; PAGE_SIZE];
    for (mm, addr) in &gs {
        for i in 0..pages {
            mm.read_blocking(addr + i * PAGE, &mut buf).unwrap();
            assert!(buf == shared_page(i), "page {i} changed by the merge");
            let p = host_ptr(mm, addr + i * PAGE);
            assert_eq!(unsafe { p.read_volatile() }, buf[0]);
        }
    }
    let after = ProcessMemory::current().unwrap().pss;
    let saved = before.saturating_sub(after);
    let dup_bytes = dup * PAGE;
    assert!(
        saved * 10 >= dup_bytes * 8,
        "PSS {before} -> {after}: saved {saved} of {dup_bytes} duplicate bytes"
    );
    // The guests are uncharged, the stable pages charged once.
    assert_eq!(host.stats().charged_bytes, pages * PAGE);
    for (mm, _) in &gs {
        let st = k.process_stat(mm.id()).unwrap();
        assert_eq!(st.merging_pages, pages);
    }
    drop(gs);
    // Scanned guests take the barrier path; the scanner frees their slots.
    scan_until(&k, 2, |k| k.stats().mm_slots == 0);
    assert_eq!(k.stats().mm_slots, 0);
    assert_eq!(k.stats().pages_shared, 0, "every stable page freed");
}

#[test]
fn test_write_after_merge_is_private() {
    let (_serial, host, k) = setup(4096);
    let pages = 64;
    let gs = make_guests(&host, &k, "w", 0..3, pages);
    scan_until(&k, 8, |k| k.stats().pages_sharing >= 2 * pages);
    assert_eq!(k.stats().pages_sharing, 2 * pages);
    // Guest 0 writes page 5 through the API, guest 1 page 9 directly.
    let (m0, a0) = &gs[0];
    let (m1, a1) = &gs[1];
    m0.write_blocking(a0 + 5 * PAGE, b"guest zero").unwrap();
    unsafe { host_ptr(m1, a1 + 9 * PAGE).write_volatile(0xee) };
    let mut buf = vec![0u8; PAGE_SIZE];
    for (g, (mm, addr)) in gs.iter().enumerate() {
        for i in [5u64, 9] {
            mm.read_blocking(addr + i * PAGE, &mut buf).unwrap();
            let mut want = shared_page(i);
            if g == 0 && i == 5 {
                want[..10].copy_from_slice(b"guest zero");
            }
            if g == 1 && i == 9 {
                want[0] = 0xee;
            }
            assert!(buf == want, "guest {g} page {i}");
        }
    }
    // The next pass notices both copies (API: fault path; direct: pagemap).
    let passes = k.stats().full_scans;
    scan_until(&k, 2, |k| k.stats().full_scans >= passes + 2);
    let s = k.stats();
    assert_eq!(s.pages_sharing + s.pages_shared, 3 * pages - 2, "{s:?}");
    // Charged: the stable pages once, plus the two private copies.
    assert_eq!(host.stats().charged_bytes, (pages + 2) * PAGE);
}

#[test]
fn test_writers_during_scans_no_lost_write_no_leak() {
    let (_serial, host, k) = setup(256);
    let pages = 256u64;
    let guests = 3u64;
    let gs = make_guests(&host, &k, "s", 0..guests, pages);
    let ksmd = k.spawn().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = gs
        .iter()
        .enumerate()
        .map(|(g, (mm, addr))| {
            let (mm, addr, stop) = (mm.clone(), *addr, stop.clone());
            std::thread::spawn(move || {
                // last[i] = the last value this guest wrote to page i.
                let mut last = vec![None::<u64>; pages as usize];
                let mut x = 0x1234_5678u64 + g as u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Only the first half: the rest stays merged.
                    let i = x % (pages / 2);
                    n += 1;
                    // Tag: guest in the top byte, a sequence number below.
                    let v = ((g as u64 + 1) << 56) | n;
                    if x & 1 == 0 {
                        mm.write_blocking(addr + i * PAGE + 64, &v.to_le_bytes())
                            .unwrap();
                    } else {
                        let p = host_ptr(&mm, addr + i * PAGE + 64) as *mut u64;
                        unsafe { p.write_volatile(v) };
                    }
                    last[i as usize] = Some(v);
                    if n % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                (mm, addr, last)
            })
        })
        .collect();
    // Let the scanner make passes while the writers run (progress, not time).
    let start = k.stats().full_scans;
    wait_for("six full scans while the writers run", || {
        k.stats().full_scans >= start + 6
    });
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    ksmd.stop();
    let s = k.stats();
    assert!(s.pages_sharing >= pages, "{s:?}");
    let (mut lost, mut leaks) = (0, 0);
    let mut buf = vec![0u8; PAGE_SIZE];
    for (g, (mm, addr, last)) in results.iter().enumerate() {
        for i in 0..pages {
            mm.read_blocking(addr + i * PAGE, &mut buf).unwrap();
            let word = u64::from_le_bytes(buf[64..72].try_into().unwrap());
            match last[i as usize] {
                Some(v) if word != v => {
                    lost += 1;
                    if word >> 56 != 0 && word >> 56 != g as u64 + 1 {
                        leaks += 1;
                    }
                }
                None if buf != shared_page(i) => leaks += 1,
                _ => {}
            }
            let mut rest = shared_page(i);
            rest[64..72].copy_from_slice(&buf[64..72]);
            assert!(
                buf == rest,
                "guest {g} page {i}: bytes outside the tag changed"
            );
        }
    }
    assert_eq!((lost, leaks), (0, 0), "lost writes, cross-guest leaks");
    drop(results);
    drop(gs);
}

#[test]
fn test_exit_fast_path_frees_slot_and_pin() {
    // Process-wide numbers (PSS) are read by other tests of this binary.
    let (_serial, host, k) = setup(64);
    let (mm, _) = guest(&host, &k, "fast", 16);
    let watch = mm.watch();
    assert!(k.is_registered(mm.id()));
    drop(mm); // not at the cursor, no rmap items: the fast path
    let s = k.stats();
    assert_eq!(
        (s.slots_freed_by_exit, s.slots_freed_by_scanner, s.mm_slots),
        (1, 0, 0)
    );
    assert!(watch.is_freed());
    // With the scanner stopped too.
    k.set_run_blocking(Run::Stop).unwrap();
    let (mm, _) = guest(&host, &k, "fast2", 16);
    let watch = mm.watch();
    drop(mm);
    assert_eq!(k.stats().slots_freed_by_exit, 2);
    assert!(watch.is_freed());
}

#[test]
fn test_exit_barrier_path_scanner_frees_once() {
    // Process-wide numbers (PSS) are read by other tests of this binary.
    let _serial = common::serial();
    let host = Host::with_budget(1 << 30);
    // Small batches: the cursor stops in the middle of the guest.
    let k = ksm(16);
    let (other, _) = guest(&host, &k, "other", 16);
    let (mm, _) = guest(&host, &k, "cursor", 256);
    let id = mm.id();
    let watch = mm.watch();
    for _ in 0..64 {
        if k.process_stat(id).is_some_and(|s| s.rmap_items > 0) {
            break;
        }
        k.scan_step_blocking();
    }
    assert!(
        k.process_stat(id).is_some_and(|s| s.rmap_items > 0),
        "64 batches and the scanner never reached the guest"
    );
    drop(mm); // at the cursor (or with rmap items): barrier, slot kept
    assert!(k.is_registered(id));
    assert!(!watch.is_freed(), "the slot still pins the struct");
    assert_eq!(k.stats().slots_freed_by_exit, 0);
    // The scanner meets it, sees users == 0, frees it.
    let passes = k.stats().full_scans;
    scan_until(&k, 2, |k| !k.is_registered(id));
    assert!(k.stats().full_scans <= passes + 2);
    assert!(!k.is_registered(id));
    assert!(watch.is_freed());
    assert_eq!(k.stats().slots_freed_by_scanner, 1);
    drop(other); // scanned: rmap items, so the barrier path again
    scan_until(&k, 2, |k| k.stats().mm_slots == 0);
    let s = k.stats();
    assert_eq!(s.slots_freed_by_scanner + s.slots_freed_by_exit, 2);
    assert_eq!(s.mm_slots, 0);
}

#[test]
fn test_exit_barrier_path_with_scanner_stopped_then_unmerge() {
    // Process-wide numbers (PSS) are read by other tests of this binary.
    let (_serial, host, k) = setup(4096);
    let (a, _) = guest(&host, &k, "a", 32);
    let (b, _) = guest(&host, &k, "b", 32);
    scan_until(&k, 6, |k| k.stats().pages_sharing >= 32);
    assert_eq!(k.stats().pages_sharing, 32);
    k.set_run_blocking(Run::Stop).unwrap();
    let (ida, wa) = (a.id(), a.watch());
    drop(a); // has rmap items: barrier, left for the scanner
    assert!(k.is_registered(ida) && !wa.is_freed());
    // Unmerge-all frees the exited slot, keeps the live one.
    k.set_run_blocking(Run::Unmerge).unwrap();
    assert!(!k.is_registered(ida));
    assert!(wa.is_freed());
    assert!(k.is_registered(b.id()));
    let s = k.stats();
    assert_eq!(
        (s.pages_shared, s.pages_sharing, s.rmap_items),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.slots_freed_by_scanner, 1);
}

#[test]
fn test_exit_while_scanner_runs_each_slot_freed_once() {
    // Process-wide numbers (PSS) are read by other tests of this binary.
    let (_serial, host, k) = setup(32);
    let ksmd = k.spawn().unwrap();
    let mut watches = Vec::new();
    let rounds = 24;
    for r in 0..rounds {
        let (mm, _) = guest(&host, &k, &format!("e{r}"), 48 + (r % 5) * 16);
        watches.push(mm.watch());
        // Let the scanner get into it a varying amount (progress-based).
        let target = k.stats().pages_scanned + (r % 4) * 40;
        wait_for("the scanner to get into the guest", || {
            k.stats().pages_scanned >= target
        });
        drop(mm);
    }
    // The scanner frees the slow-path slots on its next visits.
    wait_for("the scanner to free every slot", || k.stats().mm_slots == 0);
    ksmd.stop();
    let s = k.stats();
    assert_eq!(
        s.slots_freed_by_exit + s.slots_freed_by_scanner,
        rounds,
        "{s:?}"
    );
    assert!(watches.iter().all(|w| w.is_freed()));
    assert_eq!((s.pages_shared, s.rmap_items), (0, 0), "{s:?}");
}

#[test]
fn test_unmerge_restores_private_pages() {
    let (_serial, host, k) = setup(4096);
    let pages = 128;
    let gs = make_guests(&host, &k, "u", 0..3, pages);
    scan_until(&k, 8, |k| k.stats().pages_sharing >= 2 * pages);
    assert_eq!(host.stats().charged_bytes, pages * PAGE);
    k.set_run_blocking(Run::Unmerge).unwrap();
    let s = k.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (0, 0), "{s:?}");
    assert_eq!(host.stats().charged_bytes, 3 * pages * PAGE);
    let mut buf = vec![0u8; PAGE_SIZE];
    for (mm, addr) in &gs {
        assert_eq!(mm.anon_rss_pages(), pages);
        for i in 0..pages {
            mm.read_blocking(addr + i * PAGE, &mut buf).unwrap();
            assert!(buf == shared_page(i));
        }
    }
    // Private again: a write stays in its guest.
    gs[0].0.fill_blocking(gs[0].1, PAGE, 0x77).unwrap();
    gs[1].0.read_blocking(gs[1].1, &mut buf).unwrap();
    assert!(buf == shared_page(0));
    // Slots of live guests stay; merging again works.
    assert_eq!(k.stats().mm_slots, 3);
    k.set_run_blocking(Run::Merge).unwrap();
    scan_until(&k, 8, |k| k.stats().pages_sharing >= 2 * pages - 2);
    assert!(k.stats().pages_sharing >= 2 * pages - 2);
}

#[test]
fn test_zap_of_merged_pages_reads_zeros_and_zero_pages() {
    // Process-wide numbers (PSS) are read by other tests of this binary.
    let (_serial, host, k) = setup(4096);
    k.set_use_zero_pages(true);
    let (a, aa) = guest(&host, &k, "za", 32);
    let (b, ab) = guest(&host, &k, "zb", 32);
    // Eight zero pages in b (written as zeros: populated).
    b.fill_blocking(ab + 16 * PAGE, 8 * PAGE, 0).unwrap();
    scan_until(&k, 6, |k| {
        k.stats().ksm_zero_pages >= 8 && k.stats().pages_sharing >= 24
    });
    let s = k.stats();
    assert_eq!(s.ksm_zero_pages, 8, "{s:?}");
    let mut buf = vec![1u8; PAGE_SIZE];
    b.read_blocking(ab + 16 * PAGE, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 0));
    // DONTNEED of merged pages: zeros, not the stable page.
    a.madvise_blocking(aa, 4 * PAGE, Advice::DontNeed).unwrap();
    a.read_blocking(aa + PAGE, &mut buf).unwrap();
    assert!(
        buf.iter().all(|x| *x == 0),
        "zapped merged page must read zeros"
    );
    unsafe { host_ptr(&a, aa + 2 * PAGE).write_volatile(3) };
    b.read_blocking(ab + 2 * PAGE, &mut buf).unwrap();
    assert!(buf == shared_page(2));
    drop((a, b));
}

#[test]
fn test_bad_input_is_an_error() {
    // Process-wide numbers (PSS) are read by other tests of this binary.
    let _serial = common::serial();
    let host = Host::with_budget(1 << 30);
    let k = Ksm::new(KsmConfig::default()).unwrap();
    assert!(k.set_pages_to_scan(0).is_err());
    assert!(k.set_max_page_sharing(1).is_err());
    assert!(Ksm::new(KsmConfig {
        pages_to_scan: 0,
        ..KsmConfig::default()
    })
    .is_err());
    let mm = host.new_mm("bad");
    let addr = mm.mmap_blocking(MapOptions::anon(4 * PAGE)).unwrap();
    let e = k.madvise_blocking(&mm, addr + 1, PAGE, Advice::Mergeable);
    assert!(matches!(e, Err(guestmm::ksm::Error::Mm { .. })), "{e:?}");
    assert!(k
        .madvise_blocking(&mm, addr + (1 << 40), PAGE, Advice::Mergeable)
        .is_err());
    // Untracked mergeable memory merges too (registered for write-protect
    // only): four identical pages of one guest join one stable page
    // (issue 12: twins, as in the kernel; they used to pair up, 2 + 2).
    k.madvise_blocking(&mm, addr, 4 * PAGE, Advice::Mergeable)
        .unwrap();
    mm.fill_blocking(addr, 4 * PAGE, 9).unwrap();
    k.set_run_blocking(Run::Merge).unwrap();
    for _ in 0..4 {
        k.scan_step_blocking();
    }
    assert_eq!(k.stats().pages_sharing, 3, "{:?}", k.stats());
    assert_eq!(mm_core::ksm::wp_failures(&mm), 0);
    assert!(mm.compare_blocking(addr, &[9u8; 4 * PAGE_SIZE]).unwrap());
}

#[test]
fn test_user_write_protect_and_merge_never_mix() {
    // Process-wide numbers (PSS) are read by other tests of this binary.
    let (_serial, host, k) = setup(4096);
    let pages = 16;
    // Guest a: its pages are write-protected by the user before any scan.
    let (a, aa) = guest(&host, &k, "wp", pages);
    a.write_protect_blocking(aa, pages * PAGE).unwrap();
    let (b, ba) = guest(&host, &k, "b", pages);
    let (c, ca) = guest(&host, &k, "c", pages);
    scan_until(&k, 6, |k| k.stats().pages_sharing >= pages);
    // b and c merged with each other; a's protected pages were left alone
    // (merging would have unprotected them and woken their writers).
    assert_eq!(k.stats().pages_sharing, pages, "{:?}", k.stats());
    assert_eq!(k.stats().pages_shared, pages, "{:?}", k.stats());
    a.write_unprotect_blocking(aa, pages * PAGE).unwrap();
    // Write-protecting merged pages is refused with a named error, not a
    // later deadlock, and leaves nothing protected behind.
    let e = b.write_protect_blocking(ba, pages * PAGE).unwrap_err();
    assert!(matches!(e, guestmm::Error::NotAllowed { .. }), "{e:?}");
    b.write_blocking(ba, b"still writable").unwrap();
    c.write_blocking(ca + PAGE, b"also").unwrap();
}

#[test]
fn test_untracked_merge_lowers_pss_by_duplicate_bytes() {
    let (_serial, host, k) = setup(4096);
    let (guests, pages) = (4u64, 2048u64);
    // Every page written through the host pointer: nothing charged.
    let gs: Vec<(MmUser, u64)> = (0..guests)
        .map(|g| untracked_guest(&host, &k, &format!("u{g}"), pages, |_| false))
        .collect();
    assert_eq!(host.stats().charged_bytes, 0);
    let before = ProcessMemory::current().unwrap().pss;
    let dup = (guests - 1) * pages;
    scan_until(&k, 8, |k| k.stats().pages_sharing >= dup);
    let s = k.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (pages, dup), "{s:?}");
    let mut buf = vec![0u8; PAGE_SIZE];
    for (mm, addr) in &gs {
        for i in 0..pages {
            mm.read_blocking(addr + i * PAGE, &mut buf).unwrap();
            assert!(buf == shared_page(i), "page {i} changed by the merge");
            let p = host_ptr(mm, addr + i * PAGE);
            assert_eq!(unsafe { p.add(8).read_volatile() }, buf[8]);
        }
    }
    let after = ProcessMemory::current().unwrap().pss;
    let saved = before.saturating_sub(after);
    let dup_bytes = dup * PAGE;
    assert!(
        saved * 10 >= dup_bytes * 8,
        "PSS {before} -> {after}: saved {saved} of {dup_bytes} duplicate bytes"
    );
    // Never charged, so nothing was uncharged either (no underflow), and
    // reading merged pages charges nothing.
    assert_eq!(host.stats().charged_bytes, 0);
    for (mm, _) in &gs {
        assert_eq!(k.process_stat(mm.id()).unwrap().merging_pages, pages);
        let t = mm.tracked_stats().expect("write-protect tracker started");
        assert!(t.handler_alive && t.write_protect, "{t:?}");
        assert_eq!(t.pages_faulted, 0, "no MISSING mode: {t:?}");
    }
    drop(gs);
    scan_until(&k, 2, |k| k.stats().mm_slots == 0);
    assert_eq!(k.stats().pages_shared, 0, "every stable page freed");
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_untracked_write_after_merge_is_private() {
    let (_serial, host, k) = setup(4096);
    let pages = 64;
    let gs: Vec<(MmUser, u64)> = (0..3)
        .map(|g| untracked_guest(&host, &k, &format!("uw{g}"), pages, |_| false))
        .collect();
    scan_until(&k, 8, |k| k.stats().pages_sharing >= 2 * pages);
    assert_eq!(k.stats().pages_sharing, 2 * pages);
    // Guest 0 writes page 3 through the host pointer (the kernel copies it:
    // not charged, as any direct touch of an untracked region); guest 1
    // writes page 5 through the API (copied and charged).
    unsafe {
        host_ptr(&gs[0].0, gs[0].1 + 3 * PAGE)
            .add(100)
            .write_volatile(0xee)
    };
    gs[1]
        .0
        .write_blocking(gs[1].1 + 5 * PAGE + 7, b"mine")
        .unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for (g, (mm, addr)) in gs.iter().enumerate() {
        for i in [3u64, 5] {
            mm.read_blocking(addr + i * PAGE, &mut buf).unwrap();
            let mut want = shared_page(i);
            if g == 0 && i == 3 {
                want[100] = 0xee;
            }
            if g == 1 && i == 5 {
                want[7..11].copy_from_slice(b"mine");
            }
            assert!(
                buf == want,
                "guest {g} page {i}: another guest's write leaked"
            );
        }
    }
    assert_eq!(host.stats().charged_bytes, PAGE, "only the API copy");
    // The next pass sees both copies (API: the fault path; direct: pagemap).
    let passes = k.stats().full_scans;
    scan_until(&k, 2, |k| k.stats().full_scans >= passes + 2);
    let s = k.stats();
    assert_eq!(s.pages_sharing + s.pages_shared, 3 * pages - 2, "{s:?}");
    teardown(&k, &host, gs);
}

#[test]
fn test_untracked_budget_returns_to_zero() {
    let (_serial, host, k) = setup(4096);
    let pages = 64;
    // a: every page through the API (charged); b: through the host
    // pointer (never charged); c: every other page each way.
    let (a, aa) = untracked_guest(&host, &k, "ba", pages, |_| true);
    let (b, ba) = untracked_guest(&host, &k, "bb", pages, |_| false);
    let (c, ca) = untracked_guest(&host, &k, "bc", pages, |i| i % 2 == 0);
    let charged = (pages + pages / 2) * PAGE;
    assert_eq!(host.stats().charged_bytes, charged);
    scan_until(&k, 8, |k| k.stats().pages_sharing >= 2 * pages);
    let s = k.stats();
    assert_eq!(
        (s.pages_shared, s.pages_sharing),
        (pages, 2 * pages),
        "{s:?}"
    );
    // Each stable page holds at most one charge; the charges of the other
    // charged copies went back. Every stable page has a charged mapper
    // (a's), so every stable page is charged once.
    assert_eq!(host.stats().charged_bytes, pages * PAGE);
    // DONTNEED of merged pages through the API: zeros, nothing uncharged
    // that was not charged.
    b.madvise_blocking(ba, 8 * PAGE, Advice::DontNeed).unwrap();
    let mut buf = vec![1u8; PAGE_SIZE];
    b.read_blocking(ba + 2 * PAGE, &mut buf).unwrap();
    assert!(
        buf.iter().all(|x| *x == 0),
        "zapped merged page must read zeros"
    );
    // Unmerge everything: every page becomes a charged private copy.
    k.set_run_blocking(Run::Unmerge).unwrap();
    for (mm, addr, skip) in [(&a, aa, 0), (&b, ba, 8), (&c, ca, 0)] {
        assert_pattern(mm, addr + skip * PAGE, skip, pages - skip);
    }
    assert_eq!(k.stats().pages_shared, 0);
    drop((a, b, c));
    assert_eq!(host.stats().charged_bytes, 0, "budget back to 0 after exit");
}

/// Guests whose VMAs are never madvised, in an untracked and a tracked
/// region; `set_merge_any` alone makes them merge.
#[test]
fn test_merge_any_merges_vmas_never_madvised() {
    let (_serial, host, k) = setup(4096);
    let pages = 1024u64;
    let mut gs = Vec::new();
    for g in 0..3 {
        let mm = host.new_mm(&format!("any{g}"));
        let u = map_pattern(&mm, MapOptions::anon(pages * PAGE), 0, true);
        let t = map_pattern(
            &mm,
            MapOptions::anon(pages * PAGE).tracked(true),
            pages,
            false,
        );
        k.set_merge_any_blocking(&mm, true).unwrap();
        assert!(k.is_registered(mm.id()));
        gs.push((mm, u, t));
    }
    // An mmap after merge-any is on is a candidate from the start.
    let late = gs[0].0.mmap_blocking(MapOptions::anon(4 * PAGE)).unwrap();
    gs[0].0.fill_blocking(late, 4 * PAGE, 0x77).unwrap();
    let before = ProcessMemory::current().unwrap().pss;
    // The four `late` pages of one guest are twins: one stable page, three
    // sharing (issue 12).
    let dup = 2 * 2 * pages;
    scan_until(&k, 8, |k| k.stats().pages_sharing >= dup + 3);
    let s = k.stats();
    assert_eq!(s.pages_sharing, dup + 3, "{s:?}");
    let after = ProcessMemory::current().unwrap().pss;
    let saved = before.saturating_sub(after);
    assert!(
        saved * 10 >= dup * PAGE * 8,
        "PSS {before} -> {after}: saved {saved} of {} duplicate bytes",
        dup * PAGE
    );
    for (mm, u, t) in &gs {
        assert_pattern_pair(mm, (*u, *t), pages);
    }
    teardown(&k, &host, gs);
}

/// Merge-any off unmerges the pages of VMAs that were never madvised and
/// keeps the madvised ones merged.
#[test]
fn test_merge_any_off_unmerges_only_unmadvised() {
    let (_serial, host, k) = setup(4096);
    let pages = 128u64;
    let mut gs = Vec::new();
    for g in 0..2 {
        let mm = host.new_mm(&format!("off{g}"));
        let m = map_pattern(&mm, MapOptions::anon(pages * PAGE), 0, false);
        let n = map_pattern(&mm, MapOptions::anon(pages * PAGE), pages, false);
        k.madvise_blocking(&mm, m, pages * PAGE, Advice::Mergeable)
            .unwrap();
        k.set_merge_any_blocking(&mm, true).unwrap();
        gs.push((mm, m, n));
    }
    scan_until(&k, 8, |k| k.stats().pages_sharing >= 2 * pages);
    assert_eq!(k.stats().pages_sharing, 2 * pages);
    let (mm0, m0, n0) = &gs[0];
    let merged_pss = ProcessMemory::current().unwrap().pss;
    k.set_merge_any_blocking(mm0, false).unwrap();
    // The never-madvised VMA of guest 0 has private copies again (PSS up
    // by about its size); the madvised one is still merged.
    let unmerged_pss = ProcessMemory::current().unwrap().pss;
    assert!(
        unmerged_pss >= merged_pss + pages * PAGE * 8 / 10,
        "PSS {merged_pss} -> {unmerged_pss}: not unmerged"
    );
    let passes = k.stats().full_scans;
    scan_until(&k, 2, |k| k.stats().full_scans >= passes + 2);
    let st = k.process_stat(mm0.id()).unwrap();
    assert_eq!(
        st.merging_pages, pages,
        "the madvised VMA stays merged: {st:?}"
    );
    assert_eq!(k.stats().pages_sharing, pages, "{:?}", k.stats());
    assert_pattern_pair(mm0, (*m0, *n0), pages);
    teardown(&k, &host, gs);
}

/// Review finding (a): a slot freed early (its mm exited while the cursor
/// stood inside it) must not leave the walk address behind for the next
/// slot, whose lower VMAs would be skipped (and the slot freed for having
/// "nothing mergeable").
#[test]
fn test_freed_slot_resets_the_walk_address() {
    let (_serial, host, k) = setup(16);
    let (a, _) = guest(&host, &k, "big", 256);
    let (b, _) = guest(&host, &k, "small", 16);
    k.scan_step_blocking(); // 16 pages into a
    drop(a); // at the cursor: barrier path, the scanner frees the slot
    k.scan_step_blocking(); // frees a, then walks b in the same batch
    assert!(k.is_registered(b.id()), "b dropped after a stale walk");
    assert_eq!(k.process_stat(b.id()).unwrap().rmap_items, 16);
}

/// Review finding (b): `max_page_sharing` holds within one chunk.
#[test]
fn test_max_page_sharing_within_one_chunk() {
    let (_serial, host, k) = setup(4096);
    let max = 3;
    k.set_max_page_sharing(max).unwrap();
    let (_a, _) = guest(&host, &k, "ma", 1);
    let (_b, _) = guest(&host, &k, "mb", 1);
    scan_until(&k, 4, |k| k.stats().pages_sharing >= 1);
    assert_eq!(k.stats().pages_sharing, 1);
    // Four more copies of the same page in one chunk of one guest.
    let c = host.new_mm("mc");
    let ca = c
        .mmap_blocking(MapOptions::anon(4 * PAGE).tracked(true))
        .unwrap();
    for i in 0..4 {
        c.write_blocking(ca + i * PAGE, &shared_page(0)).unwrap();
    }
    k.madvise_blocking(&c, ca, 4 * PAGE, Advice::Mergeable)
        .unwrap();
    let passes = k.stats().full_scans;
    scan_until(&k, 6, |k| k.stats().full_scans >= passes + 6);
    let s = k.stats();
    // Six mappers of one content, at most three per stable page.
    assert_eq!(s.pages_shared + s.pages_sharing, 6, "{s:?}");
    assert!(
        s.pages_sharing <= s.pages_shared * (max - 1),
        "a stable page has more than {max} mappers: {s:?}"
    );
}

/// Review finding (d): one `ksm_exit` hook per mm, however often it leaves
/// KSM and enters again.
#[test]
fn test_reenter_registers_one_exit_hook() {
    let (_serial, host, k) = setup(4096);
    let (mm, addr) = guest(&host, &k, "re", 4);
    for _ in 0..3 {
        k.madvise_blocking(&mm, addr, 4 * PAGE, Advice::Unmergeable)
            .unwrap();
        // Nothing mergeable left: the scanner frees the slot.
        scan_until(&k, 2, |k| !k.is_registered(mm.id()));
        assert!(!k.is_registered(mm.id()));
        k.madvise_blocking(&mm, addr, 4 * PAGE, Advice::Mergeable)
            .unwrap();
        assert!(k.is_registered(mm.id()));
    }
    assert_eq!(mm.exit_hook_count(), 1);
    drop(mm);
    assert_eq!(k.stats().mm_slots, 0);
}

/// Review finding M2: scanning untracked mergeable memory nobody touched
/// must not build page tables for it (a leaf per 2 MiB, never charged,
/// kept until teardown); a touched chunk gets its leaf.
#[test]
fn test_untracked_scan_of_untouched_memory_allocates_no_page_tables() {
    let (_serial, host, k) = setup(1 << 16);
    let mm = host.new_mm("sparse");
    let len = 64 << 20; // 32 leaves' worth
    let a = mm.mmap_blocking(MapOptions::anon(len)).unwrap();
    k.madvise_blocking(&mm, a, len, Advice::Mergeable).unwrap();
    let before = mm.page_table().nodes();
    scan_until(&k, 3, |k| k.stats().full_scans >= 3);
    assert_eq!(
        mm.page_table().nodes(),
        before,
        "untouched untracked memory got page-table nodes"
    );
    // One direct touch: that chunk's leaf appears (and only a few nodes).
    unsafe { *host_ptr(&mm, a + (8 << 20)) = 7 };
    let full = k.stats().full_scans;
    scan_until(&k, 3, |k| k.stats().full_scans >= full + 2);
    let grown = mm.page_table().nodes() - before;
    assert!(
        (1..=4).contains(&grown),
        "{grown} nodes for one touched page"
    );
}

/// Sets up the data-loss window of issue 16: guests `a` and `b` share 64
/// merged pages, and a batch of 16 pages leaves the walk inside `a`
/// (`ksm_scan.address` > 0). Returns `(a, a_addr, b)`.
fn merged_pair_with_walk_inside_a(host: &Host, k: &Ksm) -> (MmUser, u64, MmUser) {
    let (a, a_addr) = guest(host, k, "a", 64);
    let (b, _) = guest(host, k, "b", 64);
    scan_until(k, 8, |k| k.stats().pages_sharing >= 64);
    assert_eq!(k.stats().pages_sharing, 64, "{:?}", k.stats());
    // Finish the pass, so the next batch starts at the head (`a`).
    scan_until(k, 1, |_| false);
    k.set_pages_to_scan(16).unwrap();
    k.scan_step_blocking(); // pages 0..16 of a; the walk stops at page 16
    (a, a_addr, b)
}

/// After `b` exits and the scanner drops its items, `a` must still read its
/// own contents on every page.
fn a_keeps_its_pages(k: &Ksm, a: &MmUser, a_addr: u64, b: MmUser) {
    let b_id = b.id();
    drop(b);
    k.set_pages_to_scan(4096).unwrap();
    scan_until(k, 4, |k| !k.is_registered(b_id));
    assert!(!k.is_registered(b_id));
    let mut buf = vec![0u8; PAGE_SIZE];
    for i in 0..64 {
        a.read_blocking(a_addr + i * PAGE, &mut buf).unwrap();
        assert!(
            buf == shared_page(i),
            "page {i} lost its contents (read {:#x}..): an rmap item was dropped before its page was unshared",
            buf[0]
        );
    }
}

/// Issue 16 §1 (the `teardown_vs_ksm` data-loss input): a guest whose
/// mergeable VMAs all stop being mergeable while the walk is inside it.
/// The scanner used to unshare only the pages at or after the walk address
/// and drop the lower pages' rmap items anyway; when the other mapper
/// exited, the stable pages were punched and the guest read zeros.
#[test]
fn test_nothing_mergeable_left_mid_walk_unshares_every_page() {
    let (_serial, host, k) = setup(4096);
    let (a, a_addr, b) = merged_pair_with_walk_inside_a(&host, &k);
    // PROT_NONE: the VMA stays MERGEABLE but cannot merge (not
    // ksm_capable), and its pages still map the stable pages.
    a.mprotect_blocking(a_addr, 64 * PAGE, Prot::NONE).unwrap();
    k.scan_step_blocking();
    // Issue 12: a VMA that is only for a while not mergeable keeps the mm
    // registered, with its merged pages and their items.
    assert!(k.is_registered(a.id()), "the slot of a was freed");
    a.mprotect_blocking(a_addr, 64 * PAGE, Prot::READ | Prot::WRITE)
        .unwrap();
    a_keeps_its_pages(&k, &a, a_addr, b);
}

/// The same window through mm-core's own `madvise(UNMERGEABLE)` (not the
/// KSM wrapper): the pages are unshared under the same write lock that
/// clears `VM_MERGEABLE`, as the kernel's `ksm_madvise` does, so no scan
/// can see the flag gone with merged pages left.
#[test]
fn test_mm_madvise_unmergeable_mid_walk_keeps_contents() {
    let (_serial, host, k) = setup(4096);
    let (a, a_addr, b) = merged_pair_with_walk_inside_a(&host, &k);
    a.madvise_blocking(a_addr, 64 * PAGE, Advice::Unmergeable)
        .unwrap();
    k.scan_step_blocking();
    a_keeps_its_pages(&k, &a, a_addr, b);
}

/// One `Ksm` per mm, one host per `Ksm` (the first enter binds it);
/// entering twice is one slot.
#[test]
fn test_one_ksm_per_mm_and_one_host_per_ksm() {
    let _serial = common::serial();
    let (h1, h2) = (Host::with_budget(64 << 20), Host::with_budget(64 << 20));
    let (k1, k2) = (ksm(64), ksm(64));
    let a = h1.new_mm("a");
    let b = h2.new_mm("b");
    let a2 = h1.new_mm("a2");
    k1.enter(&a).unwrap();
    k1.enter(&a).unwrap();
    assert_eq!(k1.stats().mm_slots, 1, "entering twice is one slot");
    assert!(matches!(
        k2.enter(&a),
        Err(guestmm::ksm::Error::OtherKsm { mm_id }) if mm_id == a.id()
    ));
    assert!(matches!(
        k1.enter(&b),
        Err(guestmm::ksm::Error::OtherHost { mm_id }) if mm_id == b.id()
    ));
    // k2's refused enter bound nothing: it takes host 2, then refuses host 1.
    k2.enter(&b).unwrap();
    assert!(matches!(
        k2.enter(&a2),
        Err(guestmm::ksm::Error::OtherHost { .. })
    ));
    k1.enter(&a2).unwrap();
    assert_eq!((k1.stats().mm_slots, k2.stats().mm_slots), (2, 1));
}

/// The physical frames behind the `pages` pages at `addr` of `mm`, from
/// `/proc/self/pagemap` (as the kernel's KSM selftests count them); `None`
/// when PFNs are hidden (not root): the caller skips with one line.
fn frames(mm: &MmUser, addr: u64, pages: u64) -> Option<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut out = Vec::new();
    for i in 0..pages {
        let va = host_ptr(mm, addr + i * PAGE) as u64;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, va / PAGE * 8).ok()?;
        let e = u64::from_le_bytes(e);
        let pfn = e & ((1 << 55) - 1);
        if e >> 63 == 0 {
            out.push(0); // not present
        } else if pfn == 0 {
            return None;
        } else {
            out.push(pfn);
        }
    }
    Some(out)
}

/// How many times each present frame is mapped among `frames`.
fn frame_mappers(frames: &[u64]) -> std::collections::HashMap<u64, u64> {
    let mut m = std::collections::HashMap::new();
    for f in frames.iter().filter(|f| **f != 0) {
        *m.entry(*f).or_default() += 1;
    }
    m
}

/// A guest with `pages` pages in one **untracked** mergeable VMA, page `i`
/// written through the host pointer with `content(i)` (a seed of
/// [`shared_page`]).
fn guest_with(
    host: &Host,
    k: &Ksm,
    name: &str,
    pages: u64,
    content: impl Fn(u64) -> u64,
) -> (MmUser, u64) {
    let mm = host.new_mm(name);
    let addr = mm.mmap_blocking(MapOptions::anon(pages * PAGE)).unwrap();
    for i in 0..pages {
        let page = shared_page(content(i));
        unsafe {
            std::ptr::copy_nonoverlapping(page.as_ptr(), host_ptr(&mm, addr + i * PAGE), PAGE_SIZE)
        };
    }
    k.madvise_blocking(&mm, addr, pages * PAGE, Advice::Mergeable)
        .unwrap();
    (mm, addr)
}

/// Issue 12 bug 1 (ksm_tests.c `check_ksm_merge` with `max_page_sharing`):
/// a pair formed through the unstable tree queues its other side until the
/// end of the visit; later chunks of the same visit must not fill the new
/// stable page to the limit meanwhile (seen: 5 mappers for 4). Checked by
/// the counters and by the frames behind the pages (pagemap).
#[test]
fn test_max_page_sharing_counts_queued_pair_mappers() {
    let (_serial, host, k) = setup(4096);
    let max = 4;
    k.set_max_page_sharing(max).unwrap();
    // a: one page of content 7; b: 127 pages of it (two chunks): 128
    // mappers, 32 full stable pages.
    let (a, aa) = guest_with(&host, &k, "qa", 1, |_| 7);
    let (b, ba) = guest_with(&host, &k, "qb", 127, |_| 7);
    scan_until(&k, 6, |_| false);
    let s = k.stats();
    assert_eq!(s.pages_shared + s.pages_sharing, 128, "{s:?}");
    assert!(
        s.pages_sharing <= s.pages_shared * (max - 1),
        "a stable page has more than {max} mappers: {s:?}"
    );
    let Some(mut f) = frames(&a, aa, 1) else {
        eprintln!("skipped: pagemap PFNs need root (frame count not checked)");
        return;
    };
    f.extend(frames(&b, ba, 127).unwrap());
    let m = frame_mappers(&f);
    assert_eq!(m.values().sum::<u64>(), 128);
    assert!(
        m.values().all(|c| *c <= max),
        "a frame mapped more than {max} times: {:?}",
        m.values().max()
    );
    assert_eq!(m.len() as u64, s.pages_shared, "frames = pages_shared");
    drop((a, b));
}

/// Issue 12, same-guest twins (ksm_tests.c `check_ksm_merge`, 10 pages):
/// identical pages of one guest join one stable page: pages_shared 1,
/// pages_sharing 9, one frame; 2 MiB of identical pages (limit 256): 2 and
/// 510, two frames.
#[test]
fn test_same_guest_twins_join_one_stable_page() {
    let (_serial, host, k) = setup(4096);
    let (g, ga) = guest_with(&host, &k, "twins", 10, |_| 3);
    scan_until(&k, 4, |_| false);
    let s = k.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 9), "{s:?}");
    if let Some(f) = frames(&g, ga, 10) {
        assert_eq!(frame_mappers(&f).len(), 1, "{f:?}");
    } else {
        eprintln!("skipped: pagemap PFNs need root (frame count not checked)");
    }
    drop(g);
    scan_until(&k, 2, |k| k.stats().mm_slots == 0);
    let (g, ga) = guest_with(&host, &k, "twins2m", 512, |_| 5);
    scan_until(&k, 4, |_| false);
    let s = k.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (2, 510), "{s:?}");
    if let Some(f) = frames(&g, ga, 512) {
        let m = frame_mappers(&f);
        assert_eq!(m.len(), 2, "frames");
        assert!(m.values().all(|c| *c == 256), "{m:?}");
    }
    drop(g);
}

/// Issue 12 bug 2 (ksm_functional_tests.c: `test_prot_none`, mlock): a
/// guest whose only mergeable VMA is for a while not mergeable here
/// (PROT_NONE) stays registered, as the kernel keeps such an mm; once the
/// protection is undone its pages merge.
#[test]
fn test_temporarily_unmergeable_vma_keeps_the_mm_registered() {
    let (_serial, host, k) = setup(4096);
    let (a, aa) = guest_with(&host, &k, "pa", 16, |i| 100 + i);
    let (b, ba) = guest_with(&host, &k, "pb", 16, |i| 100 + i);
    a.mprotect_blocking(aa, 16 * PAGE, Prot::NONE).unwrap();
    scan_until(&k, 4, |_| false);
    assert!(
        k.is_registered(a.id()),
        "PROT_NONE dropped the guest from KSM"
    );
    assert_eq!(k.stats().pages_sharing, 0);
    a.mprotect_blocking(aa, 16 * PAGE, Prot::READ | Prot::WRITE)
        .unwrap();
    // b's pages aged meanwhile: smart scan skips them for a few passes.
    scan_until(&k, 24, |k| k.stats().pages_sharing >= 16);
    assert_eq!(k.stats().pages_sharing, 16, "{:?}", k.stats());
    if let (Some(fa), Some(fb)) = (frames(&a, aa, 16), frames(&b, ba, 16)) {
        assert_eq!(fa, fb, "each page of a shares b's frame");
    } else {
        eprintln!("skipped: pagemap PFNs need root (frame count not checked)");
    }
    drop((a, b));
}

/// Issue 12, tenant domains: two guests in one domain share frames; a
/// guest in another domain with the same bytes never does (pagemap), and
/// joining a second domain is an error.
#[test]
fn test_domains_never_share_frames() {
    let (_serial, host, k) = setup(4096);
    let mk = |name: &str, domain| {
        let mm = host.new_mm(name);
        k.enter_domain(&mm, domain).unwrap();
        let addr = mm.mmap_blocking(MapOptions::anon(16 * PAGE)).unwrap();
        for i in 0..16 {
            let page = shared_page(200 + i);
            unsafe {
                std::ptr::copy_nonoverlapping(
                    page.as_ptr(),
                    host_ptr(&mm, addr + i * PAGE),
                    PAGE_SIZE,
                )
            };
        }
        k.madvise_blocking(&mm, addr, 16 * PAGE, Advice::Mergeable)
            .unwrap();
        (mm, addr)
    };
    let (a, aa) = mk("t1a", 1);
    let (b, ba) = mk("t1b", 1);
    let (c, ca) = mk("t2c", 2);
    assert!(matches!(
        k.enter_domain(&c, 1),
        Err(guestmm::ksm::Error::OtherDomain { domain: 2, .. })
    ));
    scan_until(&k, 6, |k| k.stats().pages_sharing >= 16);
    scan_until(&k, 2, |_| false);
    let s = k.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (16, 16), "{s:?}");
    assert_eq!(k.process_stat(c.id()).unwrap().merging_pages, 0);
    match (frames(&a, aa, 16), frames(&b, ba, 16), frames(&c, ca, 16)) {
        (Some(fa), Some(fb), Some(fc)) => {
            assert_eq!(fa, fb, "one domain: shared frames");
            assert!(
                fc.iter().all(|f| !fa.contains(f)),
                "a frame shared across domains"
            );
        }
        _ => eprintln!("skipped: pagemap PFNs need root (frame count not checked)"),
    }
    drop((a, b, c));
}

/// Issue 12, the map-count budget: with no headroom above the reserve,
/// no merge spends a host map, `KsmStats` says how many pages were left
/// unmerged for want of maps, and zero pages are still discarded (they
/// cost none); with room again, the pages merge.
#[test]
fn test_map_budget_refuses_and_reports() {
    let (_serial, host, k) = setup(4096);
    k.set_map_reserve(1 << 40);
    let (a, aa) = guest_with(&host, &k, "ba", 128, |i| 300 + i);
    let (b, ba) = guest_with(&host, &k, "bb", 128, |i| 300 + i);
    // Host maps over a's and b's guest RAM (one each: nothing merged).
    let guest_maps = || {
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        [(&a, aa), (&b, ba)]
            .iter()
            .map(|(mm, addr)| {
                let lo = host_ptr(mm, *addr) as u64;
                let hi = lo + 128 * PAGE;
                text.lines()
                    .filter(|l| {
                        let r = l.split_whitespace().next().unwrap();
                        let (s, e) = r.split_once('-').unwrap();
                        let s = u64::from_str_radix(s, 16).unwrap();
                        let e = u64::from_str_radix(e, 16).unwrap();
                        s < hi && e > lo
                    })
                    .count()
            })
            .sum::<usize>()
    };
    let (z, za) = guest_with(&host, &k, "bz", 4, |_| 0);
    let zero = vec![0u8; PAGE_SIZE];
    for i in 0..4 {
        unsafe {
            std::ptr::copy_nonoverlapping(zero.as_ptr(), host_ptr(&z, za + i * PAGE), PAGE_SIZE)
        };
    }
    scan_until(&k, 4, |_| false);
    let s = k.stats();
    assert_eq!(s.pages_sharing, 0, "{s:?}");
    // b's pages, whose pairs with a's were refused: the pages they would
    // have saved.
    assert_eq!(s.pages_unmerged_map_budget, 128, "{s:?}");
    assert!(s.map_budget_refusals > 0 && s.map_limit_hits == 0, "{s:?}");
    assert_eq!(s.ksm_zero_pages, 4, "zero pages cost no map: {s:?}");
    assert_eq!(guest_maps(), 2, "maps were spent");
    k.set_map_reserve(1024);
    scan_until(&k, 4, |k| k.stats().pages_sharing >= 128);
    let s = k.stats();
    assert_eq!(s.pages_sharing, 128, "{s:?}");
    scan_until(&k, 1, |_| false);
    assert_eq!(k.stats().pages_unmerged_map_budget, 0);
    drop((a, b, z));
}

/// The value of smaps field `key` (e.g. `"VmFlags:"`) of every host
/// mapping inside `[addr, addr + len)` of `mm` (/proc/self/smaps): one
/// entry per host VMA.
fn smaps_field(mm: &MmUser, addr: u64, len: u64, key: &str) -> Vec<String> {
    let (lo, hi) = (
        host_ptr(mm, addr) as usize,
        host_ptr(mm, addr) as usize + len as usize,
    );
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                {
                    inside = s < hi && e > lo;
                    continue;
                }
            }
        }
        if let (true, Some(f)) = (inside, line.strip_prefix(key)) {
            out.push(f.trim().to_owned());
        }
    }
    out
}

/// Issue 12 departure: the kernel merges pages of `VM_LOCKED` VMAs (and
/// keeps the KSM page mlocked); ours never merged them. Two mlocked guests
/// with the same pages (and zero pages) merge onto shared frames, every
/// host mapping of the range stays locked (smaps `lo`: the merge's new
/// mapping is locked again, on fault, without copying the page), and a
/// write after the merge stays private.
#[test]
fn test_mlocked_vmas_merge_and_stay_locked() {
    let (_serial, host, k) = setup(4096);
    k.set_use_zero_pages(true);
    // Pages 12..16 are zero pages; the rest the shared pattern.
    let content = |i| if i >= 12 { u64::MAX } else { 300 + i };
    let (a, aa) = guest_with(&host, &k, "la", 16, content);
    let (b, ba) = guest_with(&host, &k, "lb", 16, content);
    for (mm, at) in [(&a, aa), (&b, ba)] {
        mm.fill_blocking(at + 12 * PAGE, 4 * PAGE, 0).unwrap();
        mm.mlock_blocking(at, 16 * PAGE).unwrap();
    }
    scan_until(&k, 8, |k| {
        k.stats().pages_sharing >= 12 && k.stats().ksm_zero_pages >= 8
    });
    let s = k.stats();
    assert_eq!(
        (s.pages_sharing, s.ksm_zero_pages),
        (12, 8),
        "mlocked pages merge: {s:?}"
    );
    if let (Some(fa), Some(fb)) = (frames(&a, aa, 12), frames(&b, ba, 12)) {
        assert_eq!(fa, fb, "each page of a shares b's frame");
    } else {
        eprintln!("skipped: pagemap PFNs need root (frame count not checked)");
    }
    for (mm, at) in [(&a, aa), (&b, ba)] {
        let flags = smaps_field(mm, at, 16 * PAGE, "VmFlags:");
        assert!(flags.len() > 1, "merges mapped new host VMAs: {flags:?}");
        assert!(
            flags.iter().all(|f| f.split(' ').any(|x| x == "lo")),
            "every host mapping of an mlocked range stays locked: {flags:?}"
        );
    }
    let mut buf = vec![0u8; PAGE_SIZE];
    unsafe { host_ptr(&a, aa + 3 * PAGE).write_volatile(0x5a) };
    b.read_blocking(ba + 3 * PAGE, &mut buf).unwrap();
    assert!(buf == shared_page(303), "a's write stays in a");
    a.read_blocking(aa + 13 * PAGE, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 0));
    a.munlock_blocking(aa, 16 * PAGE).unwrap();
    drop((a, b));
}

/// The `AnonHugePages` of the host mappings inside `[addr, addr + len)`.
fn anon_huge_bytes(mm: &MmUser, addr: u64, len: u64) -> u64 {
    smaps_field(mm, addr, len, "AnonHugePages:")
        .iter()
        .map(|v| v.trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024)
        .sum()
}

/// Issue 12 departure: the kernel splits a huge page to merge its 4 KiB
/// pages; ours never merged `MADV_HUGEPAGE` ranges. Two guests with the
/// same 2 MiB in huge-page VMAs merge every page onto one frame each
/// (pagemap), a write through the API to one merged page copies only that
/// page (the block faults 4 KiB pages once a merge split it), and the
/// budget holds what is left charged.
#[test]
fn test_huge_page_vmas_merge() {
    let (_serial, host, k) = setup(4096);
    let pages = 512;
    let huge = |name: &str| {
        let mm = host.new_mm(name);
        let addr = mm
            .mmap_blocking(MapOptions::anon(pages * PAGE).hugepage(true))
            .unwrap();
        write_pattern(&mm, addr, 700, pages, false);
        k.madvise_blocking(&mm, addr, pages * PAGE, Advice::Mergeable)
            .unwrap();
        (mm, addr)
    };
    let ((a, aa), (b, ba)) = (huge("ha"), huge("hb"));
    if anon_huge_bytes(&a, aa, pages * PAGE) == 0 {
        eprintln!(
            "note: the host gave no huge page (THP off or fragmented); merging 4 KiB pages only"
        );
    }
    assert_eq!(host.stats().charged_bytes, 2 * pages * PAGE);
    scan_until(&k, 8, |k| k.stats().pages_sharing >= pages);
    let s = k.stats();
    assert_eq!(s.pages_sharing, pages, "huge-page VMAs merge: {s:?}");
    assert_eq!(
        anon_huge_bytes(&a, aa, pages * PAGE),
        0,
        "the huge page was split"
    );
    if let (Some(fa), Some(fb)) = (frames(&a, aa, pages), frames(&b, ba, pages)) {
        assert_eq!(fa, fb, "each page of a shares b's frame");
    } else {
        eprintln!("skipped: pagemap PFNs need root (frame count not checked)");
    }
    // One page written through the API: only that page is copied.
    a.fill_blocking(aa + 7 * PAGE, PAGE, 0x42).unwrap();
    assert_eq!(host.stats().charged_bytes, (pages + 1) * PAGE);
    if let (Some(fa), Some(fb)) = (frames(&a, aa, pages), frames(&b, ba, pages)) {
        let differ: Vec<usize> = (0..pages as usize).filter(|i| fa[*i] != fb[*i]).collect();
        assert_eq!(
            differ,
            vec![7],
            "only the written page left the stable frame"
        );
    }
    assert_pattern(&b, ba, 700, pages);
    let mut buf = vec![0u8; PAGE_SIZE];
    a.read_blocking(aa + 7 * PAGE, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 0x42));
    a.read_blocking(aa + 8 * PAGE, &mut buf).unwrap();
    assert!(buf == shared_page(708));
    teardown(&k, &host, (a, b));
}

/// Issue 12 departure: per-guest counters (`ksm_stat`) were the scanner's
/// and stayed stale after an unmerge until its next visit. They are read
/// from the guest's page table now: `MADV_UNMERGEABLE`, a zap of merged or
/// zero pages and a write to a zero page show at once.
#[test]
fn test_per_guest_counters_right_after_unmerge_and_zap() {
    let (_serial, host, k) = setup(4096);
    k.set_use_zero_pages(true);
    let (a, aa) = guest(&host, &k, "ca", 16);
    let (b, ba) = guest(&host, &k, "cb", 16);
    for (mm, at) in [(&a, aa), (&b, ba)] {
        mm.fill_blocking(at + 8 * PAGE, 4 * PAGE, 0).unwrap();
    }
    scan_until(&k, 8, |k| {
        k.stats().pages_sharing >= 12 && k.stats().ksm_zero_pages >= 8
    });
    let stat = |mm: &MmUser| {
        let s = k.process_stat(mm.id()).unwrap();
        (s.merging_pages, s.zero_pages)
    };
    assert_eq!((stat(&a), stat(&b)), ((12, 4), (12, 4)));
    k.madvise_blocking(&a, aa, 16 * PAGE, Advice::Unmergeable)
        .unwrap();
    assert_eq!(stat(&a), (0, 0), "a's counters right after its unmerge");
    assert_eq!(stat(&b), (12, 4), "b still maps the stable pages");
    // b: two merged pages and one zero page zapped, one zero page written.
    b.madvise_blocking(ba, 2 * PAGE, Advice::DontNeed).unwrap();
    b.madvise_blocking(ba + 8 * PAGE, PAGE, Advice::DontNeed)
        .unwrap();
    b.fill_blocking(ba + 9 * PAGE, PAGE, 7).unwrap();
    assert_eq!(stat(&b), (10, 2));
    assert_pattern(&a, aa, 0, 8);
    assert_pattern(&b, ba + 2 * PAGE, 2, 6);
    teardown(&k, &host, (a, b));
}

/// I-KSM-4 (b): ksmd keeps the slot of a live mm while it has a mergeable
/// VMA anywhere, not only above where its last batch stopped. A batch
/// stops inside the upper region, which then leaves KSM; the next visit
/// resumes above the lower mergeable VMA. mm-ksm judged "still mergeable"
/// from the VMAs above that address alone and freed the slot: the lower
/// VMA was never scanned again (found by the race harness's KSM targets
/// with a region across the 2 MiB leaf boundary). And once nothing is
/// mergeable anywhere, the slot goes.
#[test]
fn ksmd_keeps_the_slot_of_a_mergeable_vma_below_the_resume_address() {
    let (_serial, host, k) = setup(2);
    let mm = host.new_mm("resume");
    let id = mm.id();
    // An untouched mergeable page at the mmap floor, then a populated
    // mergeable region above it.
    let low = mm
        .mmap_blocking(MapOptions::anon(PAGE).tracked(true))
        .unwrap();
    let high = map_pattern(
        &mm,
        MapOptions::anon(8 * PAGE).at(2 << 20).tracked(true),
        0,
        false,
    );
    assert!(low < high);
    k.madvise_blocking(&mm, low, PAGE, Advice::Mergeable)
        .unwrap();
    k.madvise_blocking(&mm, high, 8 * PAGE, Advice::Mergeable)
        .unwrap();
    // One batch of 2 pages: the low page and the first high one; it stops
    // inside the high region.
    k.scan_step_blocking();
    k.madvise_blocking(&mm, high, 8 * PAGE, Advice::Unmergeable)
        .unwrap();
    k.scan_step_blocking();
    assert!(
        k.is_registered(id),
        "ksmd freed the slot of a live mm that still has a mergeable VMA (below where its last batch stopped)"
    );
    // Nothing mergeable left anywhere: the next visit frees the slot.
    k.madvise_blocking(&mm, low, PAGE, Advice::Unmergeable)
        .unwrap();
    scan_until(&k, 2, |k| !k.is_registered(id));
    assert!(!k.is_registered(id), "a slot with nothing mergeable stayed");
}

/// A stable page a chunk's classification picked for one page, and whose
/// last mapper a later page of the same chunk then dropped (its sharing
/// broken: zapped and refaulted), is freed before the chunk's merges run:
/// no page may be merged onto it. With zero-filled duplicates the merge's
/// compare even succeeded against the punched hole, and the page mapped a
/// stable page the tree no longer counted (more merged pages than mappers,
/// an uncharged shmem page; found by the race harness's I-KSM-7 check).
#[test]
fn ksmd_never_merges_onto_a_stable_page_freed_in_the_same_chunk() {
    let (_serial, host, k) = setup(4);
    // Zero-filled duplicates merge onto a stable page, as any others.
    k.set_use_zero_pages(false);
    let (mm, at) = four_zero_pages(&host, &k, "refault");
    let merging = |k: &Ksm| k.process_stat(mm.id()).map_or(0, |s| s.merging_pages);
    scan_until(&k, 8, |k| merging(k) == 4);
    assert_eq!(merging(&k), 4, "the four zero-filled pages merged");
    assert_eq!(k.stats().pages_shared, 1);
    // Every page's sharing broken behind the scanner's back: zapped and
    // populated again, before ksmd looks. The next visit drops each old
    // mapper as it meets the page, after it classified the first page onto
    // the stable page (which still had three mappers then).
    mm.madvise_blocking(at, 4 * PAGE, Advice::DontNeed).unwrap();
    mm.fill_blocking(at, 4 * PAGE, 0).unwrap();
    for _ in 0..4 {
        k.scan_step_blocking();
        let st = k.stats();
        assert!(
            merging(&k) <= st.pages_shared + st.pages_sharing,
            "{} merged pages, {} mappers: a page merged onto a freed stable page",
            merging(&k),
            st.pages_shared + st.pages_sharing
        );
    }
    for i in 0..4 {
        assert!(mm
            .compare_blocking(at + i * PAGE, &[0u8; PAGE_SIZE])
            .unwrap());
    }
}

/// `MADV_UNMERGEABLE` of a guest whose only KSM pages are discarded zero
/// pages: their marks go, and `ksm_stat`'s `zero_pages` reads 0 at once
/// (the unshare looked only at leaves with a merged page, and left the
/// marks of a leaf of zero pages; found by the race harness).
#[test]
fn test_unmergeable_drops_the_zero_marks_of_a_leaf_of_zero_pages() {
    let (_serial, host, k) = setup(4096);
    k.set_use_zero_pages(true);
    let (mm, at) = four_zero_pages(&host, &k, "zeros");
    let zero = |k: &Ksm| k.process_stat(mm.id()).map_or(0, |s| s.zero_pages);
    scan_until(&k, 8, |k| zero(k) == 4);
    assert_eq!(zero(&k), 4, "the zero pages were merged");
    k.madvise_blocking(&mm, at, 4 * PAGE, Advice::Unmergeable)
        .unwrap();
    assert_eq!(zero(&k), 0, "zero marks left after the unmerge");
    for i in 0..4 {
        assert!(mm
            .compare_blocking(at + i * PAGE, &[0u8; PAGE_SIZE])
            .unwrap());
    }
}
