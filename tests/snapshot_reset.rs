//! The dirty log, the in-memory snapshot and the reset (issue 17), on real
//! memory: after each reset the guest's pages equal the snapshot's byte for
//! byte, the pages absent at snapshot time are absent again (mincore), and
//! the budget and the region's RSS (from /proc/self/smaps) are back where
//! they were.

mod common;

use common::{dirty_host, serial, MIB};
use guestmm::{Advice, Error, Host, MapOptions, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Rss of the host mappings overlapping `[ptr, ptr+len)`, from
/// /proc/self/smaps, in bytes.
fn range_rss(ptr: usize, len: usize) -> u64 {
    let maps = procfs::process::Process::myself()
        .expect("/proc/self")
        .smaps()
        .expect("smaps");
    maps.iter()
        .filter(|m| (m.address.0 as usize) < ptr + len && (m.address.1 as usize) > ptr)
        .map(|m| m.extension.map.get("Rss").copied().unwrap_or(0))
        .sum()
}

/// Which pages of `[ptr, ptr+len)` are resident (mincore).
fn resident(ptr: usize, len: usize) -> Vec<bool> {
    let mut v = vec![0u8; len / PAGE_SIZE];
    // SAFETY: `v` has one byte per page of the range, a live mapping.
    let r = unsafe { libc::mincore(ptr as *mut libc::c_void, len, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().map(|b| b & 1 != 0).collect()
}

/// A direct write by the embedder (a vCPU, JIT code) through the host pointer.
fn poke(ptr: usize, off: usize, byte: u8) {
    // SAFETY: inside the live tracked mapping; the uffd handler serves a
    // missing page.
    unsafe { std::ptr::write_volatile((ptr + off) as *mut u8, byte) }
}

/// A direct read of a resident page (never faults: checked by the caller).
fn peek_page(ptr: usize, off: usize) -> Vec<u8> {
    let mut out = vec![0u8; PAGE_SIZE];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: a resident page of the live mapping.
        *b = unsafe { std::ptr::read_volatile((ptr + off + i) as *const u8) };
    }
    out
}

/// Every page equals the snapshot's and presence matches; budget and
/// RSS as at snapshot time.
fn assert_back(
    host: &Host,
    snap: &guestmm::GuestSnapshot,
    addr: u64,
    ptr: usize,
    len: usize,
    charged: u64,
    rss: u64,
) {
    assert_eq!(host.stats().charged_bytes, charged, "budget back");
    assert_eq!(range_rss(ptr, len), rss, "RSS of the region back (smaps)");
    let res = resident(ptr, len);
    for (i, r) in res.iter().enumerate() {
        let a = addr + i as u64 * PAGE;
        assert_eq!(*r, snap.was_present(a), "page {i}: presence");
        if *r {
            let got = peek_page(ptr, i * PAGE_SIZE);
            assert!(
                got.as_slice() == snap.page(a).unwrap(),
                "page {i}: bytes differ from the snapshot"
            );
        }
    }
}

#[test]
fn reset_puts_back_every_byte_budget_and_rss() {
    let _g = serial();
    let host = dirty_host(256 * MIB);
    let guest = host.create_guest("fuzzee");
    let mm = guest.mm().unwrap();
    let len = 8 * MIB as usize;
    // One page per fault (no fault-around), for a sparse guest.
    let addr = mm
        .mmap_blocking(
            MapOptions::anon(len as u64)
                .tracked(true)
                .fault_around(PAGE),
        )
        .unwrap();
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
    // Half of the pages populated, with a pattern: direct and API writes.
    for p in (0..len / PAGE_SIZE).step_by(2) {
        poke(ptr, p * PAGE_SIZE + 7, p as u8 ^ 0x5a);
    }
    mm.write_blocking(addr + 3 * PAGE + 100, b"written through the API")
        .unwrap();
    let snap = mm.snapshot_blocking().unwrap();
    assert_eq!(snap.present_pages(), (len / PAGE_SIZE / 2 + 1) as u64);
    let charged = host.stats().charged_bytes;
    let rss = range_rss(ptr, len);
    assert_eq!(rss, snap.present_pages() * PAGE, "RSS is the present pages");

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..20 {
        // Dirty present pages, populate absent ones, zap a few (API and
        // the embedder's own madvise).
        // Some rounds write more runs than reset protects one ioctl each.
        let n = if round % 5 == 2 { 300 } else { 1 + next() % 64 };
        for _ in 0..n {
            let p = (next() % (len / PAGE_SIZE) as u64) as usize;
            poke(ptr, p * PAGE_SIZE + (next() % PAGE) as usize, next() as u8);
        }
        if round % 3 == 0 {
            let p = (next() % (len / PAGE_SIZE) as u64) & !1;
            mm.madvise_blocking(addr + p * PAGE, PAGE, Advice::DontNeed)
                .unwrap();
        }
        if round % 4 == 1 {
            let p = (next() % (len / PAGE_SIZE) as u64) & !1;
            // SAFETY: a page of the live mapping; the handler reads the
            // REMOVE message and uncharges it.
            let r = unsafe {
                libc::madvise(
                    (ptr + p as usize * PAGE_SIZE) as *mut libc::c_void,
                    PAGE_SIZE,
                    libc::MADV_DONTNEED,
                )
            };
            assert_eq!(r, 0);
        }
        mm.write_blocking(addr + (next() % (len as u64 - 64)), b"api write")
            .unwrap();
        let st = mm.reset_blocking(&snap).unwrap();
        assert!(st.pages_restored + st.pages_discarded > 0, "{st:?}");
        assert_back(&host, &snap, addr, ptr, len, charged, rss);
    }
    // A reset with nothing written changes nothing.
    let st = mm.reset_blocking(&snap).unwrap();
    assert_eq!(st, guestmm::ResetStats::default());
    assert_back(&host, &snap, addr, ptr, len, charged, rss);
    drop(snap);
    assert_eq!(
        host.stats().charged_bytes,
        charged - rss,
        "snapshot uncharged on drop"
    );
    drop(mm);
    guest.exit_blocking();
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn take_dirty_reports_each_write_once() {
    let host = dirty_host(64 * MIB);
    let guest = host.create_guest("log");
    let mm = guest.mm().unwrap();
    let addr = mm
        .mmap_blocking(MapOptions::anon(4 * MIB).tracked(true))
        .unwrap();
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
    // The first harvest reports every page never protected yet: the
    // populated ones and the holes (protected from then on).
    poke(ptr, 0, 1);
    let first = mm.take_dirty_blocking(addr, 4 * MIB).unwrap();
    assert_eq!(first, vec![addr..addr + 4 * MIB]);
    assert!(mm.take_dirty_blocking(addr, 4 * MIB).unwrap().is_empty());
    // A page populated since counts as written: it came in unprotected.
    poke(ptr, 3 * MIB as usize, 1);
    let d = mm.take_dirty_blocking(addr, 4 * MIB).unwrap();
    assert!(
        !d.is_empty() && d.iter().all(|r| r.start >= addr + 2 * MIB),
        "{d:?}"
    );
    assert!(mm.take_dirty_blocking(addr, 4 * MIB).unwrap().is_empty());
    poke(ptr, 5 * PAGE_SIZE + 1, 2);
    poke(ptr, 6 * PAGE_SIZE, 3);
    poke(ptr, 9 * PAGE_SIZE, 4);
    mm.write_blocking(addr + 11 * PAGE, b"x").unwrap();
    let d = mm.take_dirty_blocking(addr, 4 * MIB).unwrap();
    assert_eq!(
        d,
        vec![
            addr + 5 * PAGE..addr + 7 * PAGE,
            addr + 9 * PAGE..addr + 10 * PAGE,
            addr + 11 * PAGE..addr + 12 * PAGE
        ]
    );
    assert!(mm.take_dirty_blocking(addr, 4 * MIB).unwrap().is_empty());
}

#[test]
fn dirty_log_refusals_are_named_errors() {
    // Without the dirty log.
    let plain = Host::with_budget(64 * MIB);
    let g = plain.create_guest("plain");
    let mm = g.mm().unwrap();
    let a = mm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    assert!(matches!(
        mm.take_dirty_blocking(a, MIB),
        Err(Error::NotAllowed { .. })
    ));
    assert!(matches!(
        mm.snapshot_blocking(),
        Err(Error::NotAllowed { .. })
    ));

    let host = dirty_host(64 * MIB);
    let guest = host.create_guest("dirty");
    let mm = guest.mm().unwrap();
    let a = mm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    // The synchronous write-protect users are refused.
    assert!(matches!(
        mm.madvise_blocking(a, MIB, Advice::Mergeable),
        Err(Error::NotAllowed { .. })
    ));
    assert!(matches!(
        mm.write_protect_blocking(a, MIB),
        Err(Error::NotAllowed { .. })
    ));
    // An untracked mapping has no log.
    let u = mm.mmap_blocking(MapOptions::anon(MIB)).unwrap();
    assert!(matches!(
        mm.take_dirty_blocking(u, MIB),
        Err(Error::NotTracked { .. })
    ));
    assert!(matches!(
        mm.snapshot_blocking(),
        Err(Error::NotTracked { .. })
    ));
    mm.munmap_blocking(u, MIB).unwrap();

    mm.write_blocking(a, b"before").unwrap();
    let snap = mm.snapshot_blocking().unwrap();
    // A layout change since the snapshot: refused, nothing changed.
    let extra = mm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    mm.write_blocking(a, b"after!").unwrap();
    assert!(matches!(
        mm.reset_blocking(&snap),
        Err(Error::SnapshotLayout { .. })
    ));
    let mut buf = [0u8; 6];
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    mm.munmap_blocking(extra, MIB).unwrap();
    mm.reset_blocking(&snap).unwrap();
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(&buf, b"before");

    // Another guest's snapshot.
    let other = host.create_guest("other");
    let omm = other.mm().unwrap();
    omm.mmap_blocking(MapOptions::anon(MIB).tracked(true).at(a))
        .unwrap();
    assert!(matches!(
        omm.reset_blocking(&snap),
        Err(Error::InvalidArgument { .. })
    ));
    // A killed guest: an error, never zeroed memory.
    guest.kill();
    assert!(matches!(
        mm.reset_blocking(&snap),
        Err(Error::Killed { .. })
    ));
}
