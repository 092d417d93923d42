//! Snapshots and lazy restore (issue 15): a guest snapshotted and restored
//! lazily into a new guest reads byte-identical memory on first touch,
//! from threads through the host pointer and through the API; every page
//! is charged once; a page zapped after it was served reads zeros; each
//! bad snapshot gets its named error and nothing half-restored stays mapped.
//!
//! The test that needs a process of its own (SIGBUS on a page the file
//! lost under a running restore) re-runs this binary with
//! `GUESTMM_SNAPSHOT_CHILD` set and one test selected.

mod common;

use std::os::unix::fs::FileExt;
use std::process::ExitStatus;
use std::time::Duration;

use common::{serial, TmpFile, MIB};
use guestmm::{
    Advice, Error, Host, HostConfig, MapOptions, MmConfig, MmUser, ProcessMemory, Prot, Snapshot,
    SnapshotError, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;
/// Header length of the version-2 format (the index follows it).
const HEADER: usize = 128;
const CHILD_ENV: &str = "GUESTMM_SNAPSHOT_CHILD";
/// A bound on how long a child may run: reaching it is a failure.
const HANG: Duration = Duration::from_secs(120);

/// The bytes test page `p` of region `r` holds when written.
fn pattern(r: u64, p: u64) -> Vec<u8> {
    let mut v = vec![(p as u8).wrapping_mul(31).wrapping_add(r as u8 + 1); PAGE_SIZE];
    v[..8].copy_from_slice(&p.to_le_bytes());
    v[8] = r as u8;
    v
}

fn host_ptr(mm: &MmUser, addr: u64) -> usize {
    mm.find_vma_blocking(addr).unwrap().host_ptr() as usize
}

/// Copies `len` bytes of host memory at `ptr` (a live guest mapping).
fn read_host(ptr: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: the caller's guest mapping is live and readable for
        // `len` bytes; touching a missing page faults into the handler.
        *b = unsafe { ((ptr + i) as *const u8).read_volatile() };
    }
    out
}

/// A source guest with four VMAs: a tracked region with one-page
/// fault-around (2 of every 3 pages written through the API), a tracked
/// region with the default 2 MiB fault-around (every 5th page written
/// directly), an untracked region (a run written through the API), and a
/// read-only region (written, then mprotected). Returns the guest and the
/// VMA addresses.
fn source_guest(host: &Host) -> (MmUser, Vec<u64>) {
    let mm = host.new_mm("src");
    let a = mm
        .mmap_blocking(MapOptions::anon(8 * MIB).tracked(true).fault_around(PAGE))
        .unwrap();
    for p in (0..8 * MIB / PAGE).filter(|p| p % 3 != 0) {
        mm.write_blocking(a + p * PAGE, &pattern(0, p)).unwrap();
    }
    let b = mm
        .mmap_blocking(MapOptions::anon(6 * MIB).tracked(true))
        .unwrap();
    let bp = host_ptr(&mm, b);
    for p in (0..6 * MIB / PAGE).step_by(5) {
        let v = pattern(1, p);
        // SAFETY: page `p` of the live tracked mapping `b`; the direct
        // write faults into the handler like a vCPU's.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.as_ptr(),
                (bp + (p * PAGE) as usize) as *mut u8,
                v.len(),
            )
        };
    }
    let c = mm.mmap_blocking(MapOptions::anon(2 * MIB)).unwrap();
    for p in 100..300 {
        mm.write_blocking(c + p * PAGE, &pattern(2, p)).unwrap();
    }
    let d = mm.mmap_blocking(MapOptions::anon(MIB)).unwrap();
    for p in (0..MIB / PAGE).step_by(2) {
        mm.write_blocking(d + p * PAGE, &pattern(3, p)).unwrap();
    }
    mm.mprotect_blocking(d, MIB, Prot::READ).unwrap();
    (mm, vec![a, b, c, d])
}

/// Every VMA's bytes, read through the API.
fn contents(mm: &MmUser, addrs: &[u64]) -> Vec<Vec<u8>> {
    addrs
        .iter()
        .map(|&a| {
            let len = mm.find_vma_blocking(a).unwrap().len();
            let mut buf = vec![0u8; len as usize];
            mm.read_blocking(a, &mut buf).unwrap();
            buf
        })
        .collect()
}

fn total_len(snap: &Snapshot) -> u64 {
    snap.vmas().iter().map(|v| v.len).sum()
}

#[test]
fn test_snapshot_restore_threads_and_api_byte_identical() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _g = serial();
    let file = TmpFile::new("snap-identical");
    let src_host = Host::with_budget(256 * MIB);
    let (src, addrs) = source_guest(&src_host);
    let stats = src.snapshot_to_file_blocking(&file.0).unwrap();
    assert_eq!(stats.vmas, 4);
    // The snapshot saves what the kernel has present: at least the written
    // pages, and of the one-page fault-around region exactly them.
    let snap = Snapshot::open(&file.0).unwrap();
    let written0 = (0..8 * MIB / PAGE).filter(|p| p % 3 != 0).count() as u64;
    assert_eq!(snap.vmas()[0].present_pages, written0);
    assert!(snap.vmas()[1].present_pages >= 6 * 512 / 5);
    assert_eq!(snap.vmas()[2].present_pages, 200);
    assert_eq!(snap.vmas()[3].present_pages, 128);
    assert_eq!(snap.vmas()[3].prot, Prot::READ);
    assert!(snap.vmas()[0].tracked && !snap.vmas()[2].tracked);
    assert_eq!(snap.vmas()[0].fault_around, PAGE);
    // A sparse file: its blocks are about the saved pages, not the layout.
    let blocks = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&file.0).unwrap().blocks() * 512
    };
    assert!(
        blocks < (stats.pages + 64) * PAGE,
        "{blocks} bytes allocated"
    );
    let want = contents(&src, &addrs);
    let total = total_len(&snap);

    // Restored guest 1: read through the host pointers by 4 threads, each
    // taking every 4th page (so they fault in the same windows at once).
    let host1 = Host::with_budget(256 * MIB);
    let mm1 = host1.new_mm("restored-direct");
    let anon0 = ProcessMemory::current().unwrap().anonymous;
    let got = mm1.restore_blocking(&snap).unwrap();
    assert_eq!(got, addrs, "restored at the recorded addresses");
    assert_eq!(host1.stats().charged_bytes, 0, "nothing read up front");
    let ptrs: Vec<(usize, u64)> = addrs
        .iter()
        .map(|&a| (host_ptr(&mm1, a), mm1.find_vma_blocking(a).unwrap().len()))
        .collect();
    std::thread::scope(|s| {
        for k in 0..4u64 {
            let (ptrs, want) = (&ptrs, &want);
            s.spawn(move || {
                for (r, &(ptr, len)) in ptrs.iter().enumerate() {
                    for p in (k..len / PAGE).step_by(4) {
                        let off = (p * PAGE) as usize;
                        let have = read_host(ptr + off, PAGE_SIZE);
                        assert!(
                            have == want[r][off..off + PAGE_SIZE],
                            "region {r} page {p} differs (direct read)"
                        );
                    }
                }
            });
        }
    });
    // Every page served once (snapshot data or zeros), charged once.
    assert_eq!(host1.stats().charged_bytes, total);
    assert_eq!(mm1.resident_bytes_blocking().unwrap(), total);
    let anon1 = ProcessMemory::current().unwrap().anonymous;
    assert!(
        anon1.abs_diff(anon0 + total) < 8 * MIB,
        "Anonymous grew by {} for {total} restored bytes",
        anon1 as i64 - anon0 as i64
    );
    let t = mm1.tracked_stats().unwrap();
    assert_eq!(t.pages_faulted + t.pages_populated_api, total / PAGE);
    // Touching it all again (API and host) charges nothing more.
    assert_eq!(contents(&mm1, &addrs), want);
    assert_eq!(host1.stats().charged_bytes, total);

    // Restored guest 2: first touch through the API (reads COPY the
    // snapshot's bytes), from 4 threads.
    let host2 = Host::with_budget(256 * MIB);
    let mm2 = host2.new_mm("restored-api");
    mm2.restore_blocking(&snap).unwrap();
    std::thread::scope(|s| {
        for k in 0..4u64 {
            let (mm2, addrs, want) = (&mm2, &addrs, &want);
            s.spawn(move || {
                for (r, &a) in addrs.iter().enumerate() {
                    let len = want[r].len() as u64;
                    for p in (k..len / PAGE).step_by(4) {
                        let mut buf = vec![0u8; PAGE_SIZE];
                        mm2.read_blocking(a + p * PAGE, &mut buf).unwrap();
                        let off = (p * PAGE) as usize;
                        assert!(
                            buf == want[r][off..off + PAGE_SIZE],
                            "region {r} page {p} differs (API read)"
                        );
                    }
                }
            });
        }
    });
    assert_eq!(host2.stats().charged_bytes, total);
    assert_eq!(mm2.resident_bytes_blocking().unwrap(), total);
    let ptr = host_ptr(&mm2, addrs[0]);
    assert_eq!(read_host(ptr, 8 * MIB as usize), want[0]);
    assert_eq!(host2.stats().charged_bytes, total);
    drop((mm1, mm2));
    assert_eq!(host1.stats().charged_bytes, 0);
    assert_eq!(host2.stats().charged_bytes, 0);
}

#[test]
fn test_zapped_after_served_reads_zeros() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _g = serial();
    let file = TmpFile::new("snap-zap");
    let src_host = Host::with_budget(64 * MIB);
    let src = src_host.new_mm("src");
    let a = src
        .mmap_blocking(MapOptions::anon(4 * MIB).tracked(true))
        .unwrap();
    for p in 0..4 * MIB / PAGE {
        src.write_blocking(a + p * PAGE, &pattern(0, p)).unwrap();
    }
    src.snapshot_to_file_blocking(&file.0).unwrap();
    let snap = Snapshot::open(&file.0).unwrap();

    let host = Host::with_budget(64 * MIB);
    let mm = host.new_mm("restored");
    mm.restore_blocking(&snap).unwrap();
    let ptr = host_ptr(&mm, a);
    let zero = vec![0u8; PAGE_SIZE];
    // API: served, discarded, read again: zeros, charged once at a time.
    let mut buf = vec![0u8; PAGE_SIZE];
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(buf, pattern(0, 0));
    mm.madvise_blocking(a, PAGE, Advice::DontNeed).unwrap();
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(buf, zero, "a served page refaults as zeros");
    // Direct: served by the handler, discarded by the embedder's own
    // madvise (a foreign REMOVE), touched again: zeros.
    let p1 = ptr + MIB as usize;
    assert_eq!(read_host(p1, PAGE_SIZE), pattern(0, 256));
    // SAFETY: one page of the live restored mapping; the embedder's own
    // discard, as a balloon driver's.
    let rc = unsafe { libc::madvise(p1 as *mut _, PAGE_SIZE, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(read_host(p1, PAGE_SIZE), zero);
    // A page discarded before it was ever served reads zeros too, and a
    // prefetch does not bring the snapshot's bytes back over it.
    mm.madvise_blocking(a + 2 * MIB, PAGE, Advice::DontNeed)
        .unwrap();
    let asked = mm.prefetch_restored_blocking(a, 4 * MIB).unwrap();
    assert!(asked < 4 * MIB / PAGE, "prefetch skips served pages");
    assert_eq!(read_host(ptr + 2 * MIB as usize, PAGE_SIZE), zero);
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(buf, zero);
    // Everything else is the snapshot's.
    for p in (0..4 * MIB / PAGE).filter(|&p| p != 0 && p != 256 && p != 512) {
        mm.read_blocking(a + p * PAGE, &mut buf).unwrap();
        assert!(buf == pattern(0, p), "page {p}");
    }
    assert_eq!(host.stats().charged_bytes, 4 * MIB);
}

#[test]
fn test_prefetch_threads_serve_each_page_once() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _g = serial();
    let file = TmpFile::new("snap-prefetch");
    let src_host = Host::with_budget(64 * MIB);
    let src = src_host.new_mm("src");
    let a = src
        .mmap_blocking(MapOptions::anon(16 * MIB).tracked(true).fault_around(PAGE))
        .unwrap();
    let written: Vec<u64> = (0..16 * MIB / PAGE).filter(|p| p % 4 != 1).collect();
    for &p in &written {
        src.write_blocking(a + p * PAGE, &pattern(0, p)).unwrap();
    }
    src.snapshot_to_file_blocking(&file.0).unwrap();
    let snap = Snapshot::open(&file.0).unwrap();
    let host = Host::with_budget(64 * MIB);
    let mm = host.new_mm("restored");
    mm.restore_blocking(&snap).unwrap();
    // Two prefetch threads over overlapping halves, racing a reader.
    let ptr = host_ptr(&mm, a);
    std::thread::scope(|s| {
        s.spawn(|| mm.prefetch_restored_blocking(a, 12 * MIB).unwrap());
        s.spawn(|| {
            mm.prefetch_restored_blocking(a + 4 * MIB, 12 * MIB)
                .unwrap()
        });
        s.spawn(|| {
            for p in (0..16 * MIB / PAGE).step_by(7) {
                let have = read_host(ptr + (p * PAGE) as usize, PAGE_SIZE);
                let want = if p % 4 == 1 {
                    vec![0; PAGE_SIZE]
                } else {
                    pattern(0, p)
                };
                assert!(have == want, "page {p}");
            }
        });
    });
    // The data pages are all present now, plus the zero pages the reader's
    // one-page faults served: each charged once.
    let zero_touched = (0..16 * MIB / PAGE)
        .step_by(7)
        .filter(|p| p % 4 == 1)
        .count() as u64;
    assert_eq!(
        host.stats().charged_bytes,
        (written.len() as u64 + zero_touched) * PAGE
    );
    assert_eq!(mm.prefetch_restored_blocking(a, 16 * MIB).unwrap(), 0);
    for p in 0..16 * MIB / PAGE {
        let have = read_host(ptr + (p * PAGE) as usize, PAGE_SIZE);
        let want = if p % 4 == 1 {
            vec![0; PAGE_SIZE]
        } else {
            pattern(0, p)
        };
        assert!(have == want, "page {p}");
    }
    assert_eq!(host.stats().charged_bytes, 16 * MIB);
}

/// A small valid snapshot file (two VMAs) to corrupt.
fn small_snapshot(file: &TmpFile) -> (Vec<u8>, u64) {
    let host = Host::with_budget(64 * MIB);
    let mm = host.new_mm("small");
    let a = mm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    mm.write_blocking(a, b"first").unwrap();
    let b = mm.mmap_blocking(MapOptions::anon(MIB)).unwrap();
    mm.write_blocking(b + 3 * PAGE, b"second").unwrap();
    let st = mm.snapshot_to_file_blocking(&file.0).unwrap();
    let mut head = vec![0u8; 2 * PAGE_SIZE];
    let f = std::fs::File::open(&file.0).unwrap();
    f.read_exact_at(&mut head, 0).unwrap();
    (head, st.file_len)
}

fn rewrite(file: &TmpFile, head: &[u8], fix_checksum: bool) {
    let mut head = head.to_vec();
    if fix_checksum {
        let index_len = u64::from_le_bytes(head[24..32].try_into().unwrap()) as usize;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&head[..48]);
        h.update(&[0u8; 8]);
        h.update(&head[56..HEADER + index_len]);
        head[48..56].copy_from_slice(&h.digest().to_le_bytes());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap();
    f.write_all_at(&head, 0).unwrap();
}

fn open_err(file: &TmpFile) -> SnapshotError {
    match Snapshot::open(&file.0) {
        Err(Error::Snapshot { source, .. }) => source,
        other => panic!("expected a snapshot error, got {other:?}"),
    }
}

#[test]
fn test_bad_snapshots_get_named_errors() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let file = TmpFile::new("snap-bad");
    let (head, len) = small_snapshot(&file);
    assert!(Snapshot::open(&file.0).is_ok());

    // Truncated: shorter than the header, then shorter than recorded.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap()
        .set_len(30)
        .unwrap();
    assert!(matches!(
        open_err(&file),
        SnapshotError::Truncated { len: 30, need: 64 }
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap();
    f.set_len(len - PAGE).unwrap();
    rewrite(&file, &head, false);
    assert!(matches!(open_err(&file), SnapshotError::Truncated { need, .. } if need == len));
    f.set_len(len).unwrap();
    rewrite(&file, &head, false);
    assert!(Snapshot::open(&file.0).is_ok());

    // Wrong magic, wrong version, wrong page size.
    let mut h = head.clone();
    h[0] = b'X';
    rewrite(&file, &h, true);
    assert!(matches!(open_err(&file), SnapshotError::BadMagic { .. }));
    let mut h = head.clone();
    h[8] = 3;
    rewrite(&file, &h, true);
    assert!(matches!(
        open_err(&file),
        SnapshotError::BadVersion {
            found: 3,
            supported: 2
        }
    ));
    let mut h = head.clone();
    h[13] = 0x20; // 8192
    rewrite(&file, &h, true);
    assert!(matches!(
        open_err(&file),
        SnapshotError::BadPageSize { found: 8192, .. }
    ));

    // A flipped bit in the index: bad checksum.
    let mut h = head.clone();
    h[HEADER + 7] ^= 0x10;
    rewrite(&file, &h, false);
    assert!(matches!(open_err(&file), SnapshotError::BadChecksum { .. }));

    // An index entry pointing past the end: data, then bitmap.
    let mut h = head.clone();
    h[HEADER + 16..HEADER + 24].copy_from_slice(&(len - PAGE).to_le_bytes()); // VMA 0 data_off
    rewrite(&file, &h, true);
    assert!(matches!(
        open_err(&file),
        SnapshotError::IndexPastEnd {
            vma: 0,
            what: "data",
            ..
        }
    ));
    let mut h = head.clone();
    h[HEADER + 96..HEADER + 104].copy_from_slice(&(1u64 << 40).to_le_bytes()); // VMA 1 bitmap_off
    rewrite(&file, &h, true);
    assert!(matches!(
        open_err(&file),
        SnapshotError::IndexPastEnd {
            vma: 1,
            what: "bitmap",
            ..
        }
    ));
    // A huge index length: refused before any allocation.
    let mut h = head.clone();
    h[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    rewrite(&file, &h, false);
    assert!(matches!(
        open_err(&file),
        SnapshotError::IndexPastEnd { what: "index", .. }
    ));

    // A malformed layout: overlapping VMAs.
    let mut h = head.clone();
    let a0 = u64::from_le_bytes(h[HEADER..HEADER + 8].try_into().unwrap());
    h[HEADER + 64..HEADER + 72].copy_from_slice(&(a0 + PAGE).to_le_bytes());
    rewrite(&file, &h, true);
    assert!(matches!(
        open_err(&file),
        SnapshotError::BadLayout { vma: 1, .. }
    ));

    rewrite(&file, &head, false);
    assert!(Snapshot::open(&file.0).is_ok());
}

#[test]
fn test_layout_that_does_not_fit_maps_nothing() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let file = TmpFile::new("snap-fit");
    small_snapshot(&file);
    let snap = Snapshot::open(&file.0).unwrap();
    let (a, b) = (snap.vmas()[0].start, snap.vmas()[1].start);
    let host = Host::with_budget(64 * MIB);

    // The second VMA overlaps a mapping of the guest: nothing is mapped.
    let mm = host.new_mm("busy");
    mm.mmap_blocking(MapOptions::anon(PAGE).at(b + PAGE))
        .unwrap();
    match mm.restore_blocking(&snap) {
        Err(Error::Snapshot {
            source: SnapshotError::BadLayout { vma: 1, reason, .. },
            ..
        }) => assert!(reason.contains("overlaps"), "{reason}"),
        other => panic!("expected BadLayout, got {other:?}"),
    }
    assert!(mm.find_vma_blocking(a).is_err(), "VMA 0 left mapped");
    assert_eq!(
        futures_lite::future::block_on(mm.lock().read())
            .vmas()
            .len(),
        1
    );

    // Outside a smaller guest address space.
    let small_host = Host::new(HostConfig {
        mm: MmConfig {
            va_limit: b,
            ..MmConfig::default()
        },
        ..HostConfig::with_budget(64 * MIB)
    });
    let small = small_host.new_mm("small");
    match small.restore_blocking(&snap) {
        Err(Error::Snapshot {
            source: SnapshotError::BadLayout { vma: 1, .. },
            ..
        }) => {}
        other => panic!("expected BadLayout, got {other:?}"),
    }
    assert!(futures_lite::future::block_on(small.lock().read())
        .vmas()
        .is_empty());

    // A source mapped with the wrong length is refused.
    let src = snap.source(0).unwrap();
    let mut opts = MapOptions::anon(MIB).restore_from(src);
    opts.len = 2 * MIB;
    assert!(matches!(
        mm.mmap_blocking(opts),
        Err(Error::InvalidArgument { .. })
    ));
    // And a fitting restore works on the same guest after all that.
    mm.munmap_blocking(b + PAGE, PAGE).unwrap();
    mm.restore_blocking(&snap).unwrap();
    assert!(mm.compare_blocking(a, b"first").unwrap());
    assert!(mm.compare_blocking(b + 3 * PAGE, b"second").unwrap());
}

#[test]
fn test_truncated_under_restore_api_error() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let file = TmpFile::new("snap-trunc-api");
    let host = Host::with_budget(64 * MIB);
    let src = host.new_mm("src");
    let a = src
        .mmap_blocking(MapOptions::anon(4 * MIB).tracked(true))
        .unwrap();
    for p in 0..4 * MIB / PAGE {
        src.write_blocking(a + p * PAGE, &pattern(0, p)).unwrap();
    }
    src.snapshot_to_file_blocking(&file.0).unwrap();
    drop(src);
    let snap = Snapshot::open(&file.0).unwrap();
    let mm = host.new_mm("restored");
    mm.restore_blocking(&snap).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(buf, pattern(0, 0));
    // The file loses its second half under the running restore.
    let data_off = snap.vmas()[0].data_off;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap()
        .set_len(data_off + 2 * MIB)
        .unwrap();
    // Before the cut: still the snapshot's bytes.
    mm.read_blocking(a + 2 * MIB - PAGE, &mut buf).unwrap();
    assert_eq!(buf, pattern(0, 511));
    // After it: a named error, never zeros; nothing charged for it.
    let charged = host.stats().charged_bytes;
    match mm.read_blocking(a + 3 * MIB, &mut buf) {
        Err(Error::Snapshot {
            source: SnapshotError::DataLost { addr },
            ..
        }) => assert_eq!(addr, a + 3 * MIB),
        other => panic!("expected DataLost, got {other:?}"),
    }
    assert_eq!(host.stats().charged_bytes, charged);
}

#[test]
fn truncated_under_restore_sigbus_child() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("truncated_under_restore_sigbus_child") {
        return;
    }
    let file = TmpFile::new("snap-trunc-child");
    let host = Host::with_budget(64 * MIB);
    let src = host.new_mm("src");
    let a = src
        .mmap_blocking(MapOptions::anon(4 * MIB).tracked(true))
        .unwrap();
    for p in 0..4 * MIB / PAGE {
        src.write_blocking(a + p * PAGE, &pattern(0, p)).unwrap();
    }
    src.snapshot_to_file_blocking(&file.0).unwrap();
    drop(src);
    let snap = Snapshot::open(&file.0).unwrap();
    let mm = host.new_mm("restored");
    mm.restore_blocking(&snap).unwrap();
    let ptr = host_ptr(&mm, a);
    assert_eq!(read_host(ptr, PAGE_SIZE), pattern(0, 0));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap()
        .set_len(snap.vmas()[0].data_off + 2 * MIB)
        .unwrap();
    drop(file); // the child exits by signal: remove it now
    eprintln!("child: truncated, touching");
    let v = read_host(ptr + 3 * MIB as usize, 1);
    eprintln!("child: read {v:?} instead of SIGBUS");
    std::process::exit(3);
}

#[test]
fn test_truncated_under_restore_sigbus() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let poison = {
        let host = Host::with_budget(8 * MIB);
        let mm = host.new_mm("probe");
        mm.mmap_blocking(MapOptions::anon(MIB).tracked(true))
            .unwrap();
        mm.tracked_stats().unwrap().poison
    };
    if !poison {
        eprintln!("skipped: no UFFDIO_POISON (the toucher blocks instead of SIGBUS)");
        return;
    }
    let st = run_child("truncated_under_restore_sigbus_child");
    assert_eq!(st.signal(), Some(libc::SIGBUS), "child ended with {st:?}");
}

/// Runs test `name` of this binary in a child process; killed (and
/// failed) after [`HANG`].
fn run_child(name: &str) -> ExitStatus {
    common::run_child(CHILD_ENV, name, HANG)
}

#[test]
fn test_partial_munmap_keeps_the_rest_restored() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let file = TmpFile::new("snap-split");
    let host = Host::with_budget(64 * MIB);
    let src = host.new_mm("src");
    let a = src
        .mmap_blocking(MapOptions::anon(4 * MIB).tracked(true))
        .unwrap();
    for p in 0..4 * MIB / PAGE {
        src.write_blocking(a + p * PAGE, &pattern(0, p)).unwrap();
    }
    src.snapshot_to_file_blocking(&file.0).unwrap();
    drop(src);
    let snap = Snapshot::open(&file.0).unwrap();
    let mm = host.new_mm("restored");
    mm.restore_blocking(&snap).unwrap();
    // A hole in the middle splits the registry entry: the upper part keeps
    // its source from the right page on.
    mm.munmap_blocking(a + MIB, MIB).unwrap();
    let ptr = host_ptr(&mm, a);
    for p in (0..4 * MIB / PAGE)
        .filter(|p| !(256..512).contains(p))
        .step_by(3)
    {
        let have = read_host(ptr + (p * PAGE) as usize, PAGE_SIZE);
        assert!(have == pattern(0, p), "page {p}");
    }
    let mut buf = vec![0u8; PAGE_SIZE];
    mm.read_blocking(a + 3 * MIB + PAGE, &mut buf).unwrap();
    assert_eq!(buf, pattern(0, 769));
}

/// A snapshot of a shared memfd VMA saves every page its memfd holds:
/// pages this mapping dropped with DONTNEED (still in the memfd) and a
/// page a device backend wrote through its own mapping of the memfd and
/// the guest never touched; holes stay out of the file. Before, presence
/// came from pagemap (mapped pages only) and the file lost both. Both
/// descriptors: the pages are read from the memfd, never through the
/// mapping (a user-mode-only descriptor would refuse the kernel's fault).
#[test]
fn snapshot_of_a_shared_region_saves_every_memfd_page() {
    let _g = serial();
    for user_mode_only in [false, true] {
        let host = Host::new(HostConfig {
            mm: MmConfig {
                user_mode_only_uffd: user_mode_only,
                ..MmConfig::default()
            },
            ..HostConfig::with_budget(64 * MIB)
        });
        let mm = host.new_mm("shared");
        const PAGES: u64 = 32;
        let addr = mm
            .mmap_blocking(
                MapOptions::shared(PAGES * PAGE)
                    .tracked(true)
                    .fault_around(PAGE),
            )
            .unwrap();
        // Pages 0..4 written through the API, then dropped from the
        // mapping (they stay in the memfd).
        for p in 0..4 {
            mm.write_blocking(addr + p * PAGE, &pattern(0, p)).unwrap();
        }
        mm.madvise_blocking(addr, 4 * PAGE, Advice::DontNeed)
            .unwrap();
        // Page 9: mapped and written through the API.
        mm.write_blocking(addr + 9 * PAGE, &pattern(0, 9)).unwrap();
        // Page 20: written by a device backend's own mapping of the memfd.
        let vma = mm.find_vma_blocking(addr).unwrap();
        let (fd, off) = vma.memfd().unwrap();
        let dev = std::fs::File::from(fd.try_clone_to_owned().unwrap());
        dev.write_all_at(&pattern(0, 20), off + 20 * PAGE).unwrap();
        let f = TmpFile::new("shared-snap");
        let stats = mm.snapshot_to_file_blocking(&f.0).unwrap();
        assert_eq!(stats.pages, 6, "{stats:?}");
        let snap = Snapshot::open(&f.0).unwrap();
        let v = &snap.vmas()[0];
        assert_eq!(v.present_pages, 6);
        let file = std::fs::File::open(&f.0).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in [0, 1, 2, 3, 9, 20] {
            file.read_exact_at(&mut buf, v.data_off + p * PAGE).unwrap();
            assert!(
                buf == pattern(0, p),
                "page {p} (user_mode_only {user_mode_only})"
            );
        }
        // A hole is not in the file (the data region is sparse: zeros).
        file.read_exact_at(&mut buf, v.data_off + 5 * PAGE).unwrap();
        assert!(buf.iter().all(|b| *b == 0));

        // Restored lazily into a new guest as a tracked shared region:
        // nothing read up front; a thread's touch and the API read the
        // snapshot's bytes; each page is charged once, and a page served,
        // dropped with DONTNEED and touched again keeps its bytes (it is
        // in the memfd), while one never served still comes from the file.
        let host2 = Host::new(HostConfig {
            mm: MmConfig {
                user_mode_only_uffd: user_mode_only,
                ..MmConfig::default()
            },
            ..HostConfig::with_budget(64 * MIB)
        });
        let mm2 = host2.new_mm("restored-shared");
        let got = mm2.restore_blocking(&snap).unwrap();
        assert_eq!(got, vec![addr]);
        assert_eq!(host2.stats().charged_bytes, 0, "nothing read up front");
        let v2 = mm2.find_vma_blocking(addr).unwrap();
        assert!(v2.is_shared() && v2.memfd().is_some());
        let p2 = v2.host_ptr() as usize;
        let first = std::thread::spawn(move || {
            let mut b = vec![0u8; PAGE_SIZE];
            // SAFETY: page 0 of the restored guest's live shared mapping.
            unsafe { std::ptr::copy_nonoverlapping(p2 as *const u8, b.as_mut_ptr(), PAGE_SIZE) };
            b
        })
        .join()
        .unwrap();
        assert!(first == pattern(0, 0), "a thread's first touch");
        assert_eq!(
            host2.stats().charged_bytes,
            PAGE,
            "fault-around of one page"
        );
        for p in [1, 2, 3, 9, 20] {
            let mut b = vec![0u8; PAGE_SIZE];
            mm2.read_blocking(addr + p * PAGE, &mut b).unwrap();
            assert!(b == pattern(0, p), "page {p} through the API");
        }
        let mut b = vec![1u8; PAGE_SIZE];
        mm2.read_blocking(addr + 5 * PAGE, &mut b).unwrap();
        assert!(
            b.iter().all(|x| *x == 0),
            "a page the snapshot lacks reads zeros"
        );
        assert_eq!(host2.stats().charged_bytes, 7 * PAGE);
        // DONTNEED keeps the shared pages: still the snapshot's bytes, no
        // second charge.
        mm2.madvise_blocking(addr, PAGES * PAGE, Advice::DontNeed)
            .unwrap();
        let mut b = vec![0u8; PAGE_SIZE];
        mm2.read_blocking(addr + 9 * PAGE, &mut b).unwrap();
        assert!(b == pattern(0, 9));
        assert_eq!(host2.stats().charged_bytes, 7 * PAGE);
        drop(mm2);
        assert_eq!(host2.stats().charged_bytes, 0);
    }
}
