//! Tracked shared memfd-backed regions (issue 15 §3, `tracked/` step 10):
//! a page is charged once, when it enters the memfd, whoever touches it
//! first (threads through the host pointer, the access API); a DONTNEED of
//! the mapping keeps the contents and the charge, and the next touch is a
//! `MINOR` fault mapped back with `UFFDIO_CONTINUE`; munmap and exit punch
//! the pages out of the memfd and uncharge them. The kernel's view is read
//! from `/proc/self/smaps` (`Rss` of the host mapping: shmem pages) and `mincore`
//! (page-cache residency of the memfd), not only from guestmm's counters.
//!
//! The same tests run on a full descriptor and on a `UFFD_USER_MODE_ONLY`
//! one (`MmConfig::user_mode_only_uffd`: what an ordinary user gets here);
//! `.ci/unprivileged-tests` runs them as a user too.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use common::{serial, MIB};
use guestmm::{Advice, Error, Host, HostConfig, MapOptions, MmConfig, MmUser, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

fn host(budget: u64, user_mode_only: bool) -> Host {
    Host::new(HostConfig {
        mm: MmConfig {
            user_mode_only_uffd: user_mode_only,
            ..MmConfig::default()
        },
        ..HostConfig::with_budget(budget)
    })
}

fn host_ptr(mm: &MmUser, addr: u64) -> usize {
    let v = mm.find_vma_blocking(addr).unwrap();
    v.host_ptr() as usize + (addr - v.start()) as usize
}

/// `Rss` of the host mappings overlapping `[start, start + len)`
/// (`/proc/self/smaps`): the memfd's pages mapped there (a shared
/// mapping's resident pages are all shmem: `RssShmem` in `status` terms).
fn rss_shmem(start: usize, len: u64) -> u64 {
    let end = start + len as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        // A mapping's header: "lo-hi perms offset dev inode path".
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = lo < end && hi > start;
                continue;
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("Rss:") {
                let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                total += kb * 1024;
            }
        }
    }
    total
}

/// Pages of `[p, p + len)` in the memfd's page cache (`mincore` reports
/// page-cache residency for a shared mapping, mapped here or not).
fn in_memfd(p: usize, len: usize) -> u64 {
    let mut v = vec![0u8; len / PAGE_SIZE];
    let r = unsafe { libc::mincore(p as *mut _, len, v.as_mut_ptr()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    v.iter().filter(|b| **b & 1 != 0).count() as u64
}

fn byte_of(page: u64) -> u8 {
    (page % 251) as u8 + 1
}

/// Threads write one byte per page through the host pointer while the API
/// writes another byte of every third page.
fn touch_from_threads_and_api(mm: &MmUser, addr: u64, len: u64) {
    let p = host_ptr(mm, addr);
    let pages = len / PAGE;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in (t..pages).step_by(4) {
                    unsafe { ((p + (i * PAGE) as usize) as *mut u8).write_volatile(byte_of(i)) };
                }
            });
        }
        let mm = mm.clone();
        // From the end down, to meet the threads in the middle.
        s.spawn(move || {
            for i in (0..pages).filter(|i| i % 3 == 0).rev() {
                mm.write_blocking(addr + i * PAGE + 8, &[0xee]).unwrap();
            }
        });
    });
}

/// Every page reads what `touch_from_threads_and_api` wrote, through the
/// host pointer from several threads (`MINOR` faults after a DONTNEED).
fn check_contents_from_threads(mm: &MmUser, addr: u64, len: u64) {
    let p = host_ptr(mm, addr);
    let pages = len / PAGE;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in (t..pages).step_by(4) {
                    let at = p + (i * PAGE) as usize;
                    let b0 = unsafe { (at as *const u8).read_volatile() };
                    let b8 = unsafe { ((at + 8) as *const u8).read_volatile() };
                    assert_eq!(b0, byte_of(i), "page {i}");
                    assert_eq!(b8, if i % 3 == 0 { 0xee } else { 0 }, "page {i}");
                }
            });
        }
    });
}

fn shared_region_is_charged_once(user_mode_only: bool) {
    let _g = serial();
    const LEN: u64 = 16 * MIB;
    let pages = LEN / PAGE;
    let host = host(256 * MIB, user_mode_only);
    let guest = host.create_guest("shared");
    let mm = guest.mm().unwrap();
    let addr = mm
        .mmap_blocking(MapOptions::shared(LEN).tracked(true))
        .unwrap();
    let p = host_ptr(&mm, addr);
    let st = mm.tracked_stats().unwrap();
    // Asked for, or the fallback of an unprivileged process.
    assert!(st.user_mode_only || !user_mode_only, "{st:?}");
    assert_eq!(host.stats().charged_bytes, 0);
    assert_eq!(rss_shmem(p, LEN), 0);

    // First touches from four threads and the API at once: each page is
    // charged exactly once, whoever got there first.
    touch_from_threads_and_api(&mm, addr, LEN);
    assert_eq!(host.stats().charged_bytes, LEN, "charged once per page");
    assert_eq!(mm.shmem_rss_pages(), pages);
    assert_eq!(mm.anon_rss_pages(), 0);
    let st = mm.tracked_stats().unwrap();
    assert!(st.pages_faulted > 0, "the handler served touches: {st:?}");
    assert_eq!(st.overcommit_bytes, 0, "{st:?}");
    // The kernel agrees: every page is mapped here and in the memfd.
    assert_eq!(rss_shmem(p, LEN), LEN);
    assert_eq!(in_memfd(p, LEN as usize), pages);
    check_contents_from_threads(&mm, addr, LEN);

    // DONTNEED through the API: this mapping's PTEs go, the pages stay in
    // the memfd and charged (shared memory semantics).
    mm.madvise_blocking(addr, LEN, Advice::DontNeed).unwrap();
    assert_eq!(host.stats().charged_bytes, LEN);
    assert_eq!(rss_shmem(p, LEN), 0, "DONTNEED dropped the mapping's PTEs");
    assert_eq!(
        in_memfd(p, LEN as usize),
        pages,
        "contents stay in the memfd"
    );
    let before = mm.tracked_stats().unwrap();
    assert_eq!(before.foreign_removes, 0, "our DONTNEED is our own");
    // Re-touch from threads: MINOR faults, mapped back with CONTINUE, the
    // same bytes, no second charge.
    check_contents_from_threads(&mm, addr, LEN);
    let after = mm.tracked_stats().unwrap();
    assert!(
        after.pages_continued >= before.pages_continued + pages,
        "MINOR faults served with UFFDIO_CONTINUE: {after:?}"
    );
    assert_eq!(after.pages_faulted, before.pages_faulted, "{after:?}");
    assert_eq!(host.stats().charged_bytes, LEN);
    assert_eq!(rss_shmem(p, LEN), LEN);

    // DONTNEED again, then read everything through the API: the accessor's
    // copy takes MINOR faults while it holds the page locks; the handler
    // maps them without waiting for those locks.
    // (A handler that waited for those locks would take BUSY_TIMEOUT,
    // 100 ms, per page: 32 pages first, so that a regression fails fast.)
    mm.madvise_blocking(addr, LEN, Advice::DontNeed).unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = vec![0u8; LEN as usize];
    mm.read_blocking(addr, &mut buf[..(32 * PAGE) as usize])
        .unwrap();
    let st = mm.tracked_stats().unwrap();
    assert_eq!(st.busy_breaks, 0, "no fault waited for a page lock: {st:?}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    mm.read_blocking(addr, &mut buf).unwrap();
    for i in 0..pages {
        assert_eq!(buf[(i * PAGE) as usize], byte_of(i), "page {i}");
    }
    assert_eq!(mm.tracked_stats().unwrap().busy_breaks, 0);
    assert_eq!(host.stats().charged_bytes, LEN);

    // munmap of the first half: its pages leave the memfd and are
    // uncharged (the host range stays reserved, PROT_NONE, while the other
    // half maps the region).
    mm.munmap_blocking(addr, LEN / 2).unwrap();
    assert_eq!(host.stats().charged_bytes, LEN / 2);
    assert_eq!(mm.shmem_rss_pages(), pages / 2);
    assert_eq!(
        in_memfd(p, (LEN / 2) as usize),
        0,
        "punched out of the memfd"
    );
    assert_eq!(
        in_memfd(p + (LEN / 2) as usize, (LEN / 2) as usize),
        pages / 2
    );
    // Exit: the rest goes, the budget is back to 0.
    drop(mm);
    guest.exit_blocking();
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn shared_region_is_charged_once_full_descriptor() {
    shared_region_is_charged_once(false);
}

#[test]
fn shared_region_is_charged_once_user_mode_only() {
    shared_region_is_charged_once(true);
}

/// The embedder's own DONTNEED of a shared region (a vhost-user backend,
/// a balloon): the contents stay in the memfd, so nothing is uncharged,
/// and the next touch reads them back.
#[test]
fn embedder_dontneed_keeps_contents_and_charge() {
    let _g = serial();
    let host = host(64 * MIB, false);
    let mm = host.new_mm("embedder");
    let addr = mm
        .mmap_blocking(MapOptions::shared(4 * MIB).tracked(true))
        .unwrap();
    let p = host_ptr(&mm, addr);
    for i in 0..1024u64 {
        unsafe { ((p + (i * PAGE) as usize) as *mut u8).write_volatile(byte_of(i)) };
    }
    assert_eq!(host.stats().charged_bytes, 4 * MIB);
    let r = unsafe { libc::madvise(p as *mut _, (4 * MIB) as usize, libc::MADV_DONTNEED) };
    assert_eq!(r, 0);
    // The REMOVE was read before madvise returned; it is classified just
    // after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while mm.tracked_stats().unwrap().foreign_removes == 0 {
        assert!(std::time::Instant::now() < deadline, "REMOVE never seen");
        std::thread::yield_now();
    }
    assert_eq!(rss_shmem(p, 4 * MIB), 0);
    for i in 0..1024u64 {
        let b = unsafe { ((p + (i * PAGE) as usize) as *const u8).read_volatile() };
        assert_eq!(b, byte_of(i), "page {i}");
    }
    assert_eq!(host.stats().charged_bytes, 4 * MIB);
    assert_eq!(rss_shmem(p, 4 * MIB), 4 * MIB);
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

/// A small fault-around: reads and writes through the API and the host
/// pointer interleave on the same windows; the charge stays one per page
/// and a read of a never-touched page reads zeros (a zeroed memfd page).
#[test]
fn api_reads_and_direct_writes_share_pages() {
    let _g = serial();
    let host = host(64 * MIB, false);
    let mm = host.new_mm("mixed");
    const LEN: u64 = 8 * MIB;
    let addr = mm
        .mmap_blocking(MapOptions::shared(LEN).tracked(true).fault_around(64 << 10))
        .unwrap();
    let p = host_ptr(&mm, addr);
    let mut b = [0xffu8; 16];
    mm.read_blocking(addr + 5 * PAGE, &mut b).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(
        host.stats().charged_bytes,
        PAGE,
        "a read populates one page"
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in (0..LEN / PAGE).rev() {
                unsafe { ((p + (i * PAGE) as usize + 1) as *mut u8).write_volatile(7) };
            }
        });
        for i in (0..LEN / PAGE).step_by(5) {
            let mut b = [0u8; 2];
            mm.read_blocking(addr + i * PAGE, &mut b).unwrap();
        }
    });
    assert_eq!(host.stats().charged_bytes, LEN);
    assert!(mm.compare_blocking(addr + 5 * PAGE, &[0, 7, 0]).unwrap());
    assert_eq!(rss_shmem(p, LEN), LEN);
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

/// What a tracked shared region does not support gets a named error.
#[test]
fn unsupported_combinations_get_named_errors() {
    let _g = serial();
    let h = host(64 * MIB, false);
    let mm = h.new_mm("bad");
    assert!(matches!(
        mm.mmap_blocking(MapOptions::shared(2 * MIB).hugepage(true).tracked(true)),
        Err(Error::NotAllowed { .. })
    ));
    let a = mm
        .mmap_blocking(MapOptions::shared(2 * MIB).tracked(true))
        .unwrap();
    assert!(matches!(
        mm.write_protect_blocking(a, PAGE),
        Err(Error::NotAllowed { addr, .. }) if addr == a
    ));
    assert!(matches!(
        mm.madvise_blocking(a, 2 * MIB, Advice::Mergeable),
        Err(Error::NotAllowed { addr, .. }) if addr == a
    ));
    assert!(matches!(
        mm.madvise_blocking(a, 2 * MIB, Advice::HugePage),
        Err(Error::NotAllowed { addr, .. }) if addr == a
    ));
    let dirty = common::dirty_host(64 * MIB);
    let dm = dirty.new_mm("dirty");
    assert!(matches!(
        dm.mmap_blocking(MapOptions::shared(2 * MIB).tracked(true)),
        Err(Error::NotAllowed { .. })
    ));
    drop(mm);
    assert_eq!(h.stats().charged_bytes, 0);
}

/// DONTNEED through the API, direct writes and reads from two threads and
/// API reads, all at once on the same windows: every read sees 0 (never
/// written) or the page's byte, and at the end each page is charged once
/// (EAGAIN retries of fills racing our REMOVE messages, CONTINUE of pages
/// a DONTNEED just unmapped, API copies taking MINOR faults under their
/// locks). No fault may wait for a page lock (`busy_breaks == 0`): our
/// DONTNEED holds the PTE locks (`Mm::discard_shared`), so it never
/// unmaps a page an accessor filled and has not copied yet; without them
/// the accessor's copy faulted on a page it held locked, and the handler
/// served it only after `BUSY_TIMEOUT` (100 ms), hundreds of times.
#[test]
fn dontneed_races_touches_and_api() {
    let _g = serial();
    const LEN: u64 = 8 * MIB;
    let pages = LEN / PAGE;
    let host = host(64 * MIB, false);
    let mm = host.new_mm("race");
    let addr = mm
        .mmap_blocking(MapOptions::shared(LEN).tracked(true))
        .unwrap();
    let p = host_ptr(&mm, addr);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let zapper = {
            let mm = mm.clone();
            let stop = &stop;
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let chunk = (n * 7) % (LEN / (2 * MIB));
                    mm.madvise_blocking(addr + chunk * 2 * MIB, 2 * MIB, Advice::DontNeed)
                        .unwrap();
                    n += 1;
                }
                n
            })
        };
        let reader = {
            let mm = mm.clone();
            let stop = &stop;
            s.spawn(move || {
                let mut buf = vec![0u8; (64 * PAGE) as usize];
                let mut k = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let first = (k * 61) % (pages - 64);
                    mm.read_blocking(addr + first * PAGE, &mut buf).unwrap();
                    for j in 0..64 {
                        let b = buf[(j * PAGE) as usize];
                        assert!(b == 0 || b == byte_of(first + j), "page {}", first + j);
                    }
                    k += 1;
                }
            })
        };
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    for _pass in 0..3 {
                        for i in (t..pages).step_by(2) {
                            let at = (p + (i * PAGE) as usize) as *mut u8;
                            unsafe { at.write_volatile(byte_of(i)) };
                            assert_eq!(unsafe { at.read_volatile() }, byte_of(i), "page {i}");
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(zapper.join().unwrap() > 0);
        reader.join().unwrap();
    });
    let st = mm.tracked_stats().unwrap();
    assert_eq!(st.busy_breaks, 0, "{st:?}");
    assert_eq!(host.stats().charged_bytes, LEN, "each page charged once");
    assert_eq!(mm.shmem_rss_pages(), pages);
    check_page_bytes(&mm, addr, pages);
    mm.munmap_blocking(addr, LEN).unwrap();
    assert_eq!(host.stats().charged_bytes, 0);
    assert_eq!(mm.shmem_rss_pages(), 0);
}

/// Every page holds its byte at offset 0 (read through the API).
fn check_page_bytes(mm: &MmUser, addr: u64, pages: u64) {
    let mut buf = vec![0u8; (pages * PAGE) as usize];
    mm.read_blocking(addr, &mut buf).unwrap();
    for i in 0..pages {
        assert_eq!(buf[(i * PAGE) as usize], byte_of(i), "page {i}");
    }
}

/// The embedder punches pages out of the memfd behind our back
/// (`MADV_REMOVE` on the host pointer; its REMOVE message looks like a
/// DONTNEED's): the next touch gets a zeroed page, not charged again (the
/// pages stayed charged: an over-count until munmap, never an
/// under-count), also for an API read whose copy takes that fault while it
/// holds the page locks; munmap brings the budget back to 0.
#[test]
fn embedder_punch_refills_zeros_without_second_charge() {
    let _g = serial();
    const LEN: u64 = 4 * MIB;
    let host = host(64 * MIB, false);
    let mm = host.new_mm("punch");
    let addr = mm
        .mmap_blocking(MapOptions::shared(LEN).tracked(true))
        .unwrap();
    let p = host_ptr(&mm, addr);
    for i in 0..LEN / PAGE {
        unsafe { ((p + (i * PAGE) as usize) as *mut u8).write_volatile(byte_of(i)) };
    }
    assert_eq!(host.stats().charged_bytes, LEN);
    let r = unsafe { libc::madvise(p as *mut _, MIB as usize, libc::MADV_REMOVE) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(in_memfd(p, MIB as usize), 0, "punched");
    // A direct touch of the first page, an API read of the next 16.
    let b = unsafe { (p as *const u8).read_volatile() };
    assert_eq!(b, 0);
    let mut buf = vec![0xffu8; (16 * PAGE) as usize];
    mm.read_blocking(addr + PAGE, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    // Untouched pages keep their bytes.
    assert!(mm
        .compare_blocking(addr + MIB, &[byte_of(MIB / PAGE)])
        .unwrap());
    assert_eq!(host.stats().charged_bytes, LEN);
    mm.munmap_blocking(addr, LEN).unwrap();
    assert_eq!(host.stats().charged_bytes, 0);
}

/// `f` on a thread of its own (a guest's direct touch, which blocks in
/// its fault until the handler answers), bounded: a fault never answered
/// fails the test instead of hanging it.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("a direct touch was not answered in 60 s")
}

/// A device backend maps the region's memfd ([`guestmm::Vma::memfd`], what
/// vhost-user's `SET_MEM_TABLE` hands it) and shares pages with the guest
/// both ways. A page the backend writes into a hole is charged when the
/// guest first touches it (its fault finds the page in the memfd and maps
/// it), once; munmap punches the backend's pages too.
fn device_backend_shares_the_memfd(user_mode_only: bool) {
    let host = host(64 * MIB, user_mode_only);
    let mm = host.new_mm("vhost");
    const PAGES: u64 = 64;
    const LEN: u64 = PAGES * PAGE;
    let addr = mm
        .mmap_blocking(
            MapOptions::shared(LEN)
                .tracked(true)
                .fault_around(16 * PAGE),
        )
        .unwrap();
    let p = host_ptr(&mm, addr);
    assert!(
        mm.mmap_blocking(MapOptions::anon(LEN))
            .map(|a| mm.find_vma_blocking(a).unwrap().memfd().is_none())
            .unwrap(),
        "private memory has no memfd"
    );
    // The backend's own mapping of the memfd, as a vhost-user device
    // process maps what SET_MEM_TABLE sent it.
    let vma = mm.find_vma_blocking(addr).unwrap();
    let (fd, off) = vma.memfd().expect("a shared region has a memfd");
    let fd = fd.try_clone_to_owned().unwrap();
    use std::os::fd::AsRawFd as _;
    let dev = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off as libc::off_t,
        )
    };
    assert_ne!(dev, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    let dev = dev as usize;
    // The backend writes page 40 (a hole: nobody touched it): in the
    // memfd now, not charged.
    unsafe { ((dev + 40 * PAGE_SIZE) as *mut u8).write_volatile(0xd0) };
    assert_eq!(host.stats().charged_bytes, 0);
    // A guest thread reads it through the host pointer: the fault maps
    // the backend's page (not a zero page) and charges its window once.
    let got = bounded(move || unsafe { ((p + 40 * PAGE_SIZE) as *const u8).read_volatile() });
    assert_eq!(got, 0xd0, "the guest saw a fresh page, not the backend's");
    assert_eq!(host.stats().charged_bytes, 16 * PAGE, "one window");
    assert!(mm.compare_blocking(addr + 40 * PAGE, &[0xd0]).unwrap());
    // The guest writes (a thread, the API); the backend reads.
    bounded(move || unsafe { ((p + 3 * PAGE_SIZE) as *mut u8).write_volatile(0x33) });
    mm.write_blocking(addr + 50 * PAGE, &[0x55]).unwrap();
    unsafe {
        assert_eq!(((dev + 3 * PAGE_SIZE) as *const u8).read_volatile(), 0x33);
        assert_eq!(((dev + 50 * PAGE_SIZE) as *const u8).read_volatile(), 0x55);
    }
    assert_eq!(
        host.stats().charged_bytes,
        32 * PAGE + PAGE,
        "two windows and a page"
    );
    // munmap punches the memfd: nothing charged, the backend reads zeros.
    mm.munmap_blocking(addr, LEN).unwrap();
    assert_eq!(host.stats().charged_bytes, 0);
    assert_eq!(in_memfd(dev, LEN as usize), 0, "pages left in the memfd");
    unsafe {
        assert_eq!(((dev + 40 * PAGE_SIZE) as *const u8).read_volatile(), 0);
        libc::munmap(dev as *mut _, LEN as usize);
    }
}

#[test]
fn device_backend_shares_the_memfd_full_descriptor() {
    let _g = serial();
    device_backend_shares_the_memfd(false);
}

#[test]
fn device_backend_shares_the_memfd_user_mode_only() {
    let _g = serial();
    device_backend_shares_the_memfd(true);
}
