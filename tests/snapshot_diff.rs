//! Diff snapshot files and chains (issue 15 §1): a full snapshot and three
//! diffs of a dirty-logged guest, with overwrites, new pages, zapped pages
//! (ours and the embedder's), a new VMA, a VMA unmapped and mapped again
//! and an mprotect split between them. Each prefix of the chain, restored
//! lazily into a new guest, reads byte for byte what the source guest held
//! when that file was written (read through the host pointers and through
//! the API; absent pages read zeros), eagerly too (prefetch), and every
//! page is charged once. Each bad chain gets its named error.
//!
//! The source guest's state at each snapshot is captured without touching
//! it: `mincore` says which pages are present, and only those are read.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::{dirty_host, serial, TmpFile, MIB};
use guestmm::{
    Advice, Error, Host, MapOptions, MmUser, Prot, Snapshot, SnapshotError, SnapshotKind, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// The bytes page `addr` holds after a write of generation `gen`.
fn pattern(gen: u8, addr: u64) -> Vec<u8> {
    let p = addr / PAGE;
    let mut v = vec![(p as u8).wrapping_mul(37) ^ gen.wrapping_mul(101) ^ 0x5a; PAGE_SIZE];
    v[..8].copy_from_slice(&addr.to_le_bytes());
    v[8] = gen;
    v
}

fn host_ptr(mm: &MmUser, addr: u64) -> usize {
    let v = mm.find_vma_blocking(addr).unwrap();
    v.host_ptr() as usize + (addr - v.start()) as usize
}

/// A direct write by the embedder (a vCPU) through the host pointer.
fn poke(mm: &MmUser, addr: u64, gen: u8) {
    let v = pattern(gen, addr);
    // SAFETY: one page of a live tracked mapping of `mm`; the write faults
    // into the handler like a vCPU's.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), host_ptr(mm, addr) as *mut u8, PAGE_SIZE) };
}

/// The embedder's own `MADV_DONTNEED` of `[addr, addr + len)` (a balloon).
fn host_dontneed(mm: &MmUser, addr: u64, len: u64) {
    // SAFETY: inside one live mapping of `mm`; discarding is what the test
    // means.
    let rc = unsafe {
        libc::madvise(
            host_ptr(mm, addr) as *mut _,
            len as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// Copies `len` bytes of host memory at `ptr` (a live guest mapping).
fn read_host(ptr: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: the caller's guest mapping is live and readable for
        // `len` bytes; a missing page faults into the handler.
        *b = unsafe { ((ptr + i) as *const u8).read_volatile() };
    }
    out
}

/// A guest's memory at one moment: per VMA `(start, len)`, and the bytes
/// of each present page by address.
#[derive(Debug, Default)]
struct Image {
    layout: Vec<(u64, u64)>,
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Image {
    /// What `mm` holds now, read without populating anything: `mincore`
    /// for presence, then only the present pages.
    fn capture(mm: &MmUser) -> Image {
        let state = futures_lite::future::block_on(mm.lock().read());
        let mut img = Image::default();
        for v in state.vmas().iter() {
            let (start, len, ptr) = (v.start(), v.len(), v.host_ptr() as usize);
            img.layout.push((start, len));
            let mut res = vec![0u8; (len / PAGE) as usize];
            // SAFETY: one byte per page of the live mapping.
            let rc =
                unsafe { libc::mincore(ptr as *mut libc::c_void, len as usize, res.as_mut_ptr()) };
            assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
            for (i, r) in res.iter().enumerate() {
                if r & 1 != 0 {
                    let off = i * PAGE_SIZE;
                    img.pages
                        .insert(start + off as u64, read_host(ptr + off, PAGE_SIZE));
                }
            }
        }
        img
    }

    fn total(&self) -> u64 {
        self.layout.iter().map(|l| l.1).sum()
    }

    fn present_in(&self, start: u64, len: u64) -> u64 {
        self.pages.range(start..start + len).count() as u64
    }

    /// Pages present here and not in `newer`.
    fn lost_in(&self, newer: &Image) -> u64 {
        self.pages
            .keys()
            .filter(|a| !newer.pages.contains_key(a))
            .count() as u64
    }

    fn page(&self, addr: u64) -> Vec<u8> {
        self.pages
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| vec![0u8; PAGE_SIZE])
    }
}

/// The merged view of `snap` has the image's layout and present pages.
fn check_index(snap: &Snapshot, img: &Image) {
    let layout: Vec<(u64, u64)> = snap.vmas().iter().map(|v| (v.start, v.len)).collect();
    assert_eq!(layout, img.layout, "layout of the chain");
    for v in snap.vmas() {
        assert_eq!(
            v.present_pages,
            img.present_in(v.start, v.len),
            "present pages of the VMA at {:#x}",
            v.start
        );
    }
}

/// Every page of `mm` (restored from a chain) equals `img`, read through
/// the host pointers by 2 threads; then again through the API.
fn check_host_then_api(mm: &MmUser, img: &Image, what: &str) {
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                for &(start, len) in &img.layout {
                    let ptr = host_ptr(mm, start);
                    for p in (t..len / PAGE).step_by(2) {
                        let have = read_host(ptr + (p * PAGE) as usize, PAGE_SIZE);
                        let a = start + p * PAGE;
                        assert!(
                            have == img.page(a),
                            "{what}: page {a:#x} differs (host): have {:?} want {:?} in image {}",
                            &have[..16],
                            &img.page(a)[..16],
                            img.pages.contains_key(&a)
                        );
                    }
                }
            });
        }
    });
    check_api(mm, img, what);
}

fn check_api(mm: &MmUser, img: &Image, what: &str) {
    let mut buf = vec![0u8; PAGE_SIZE];
    for &(start, len) in &img.layout {
        for a in (start..start + len).step_by(PAGE_SIZE) {
            mm.read_blocking(a, &mut buf).unwrap();
            assert!(buf == img.page(a), "{what}: page {a:#x} differs (API)");
        }
    }
}

/// The source guest and the chain written from it, with the source's
/// image at each file.
struct Chain {
    files: Vec<TmpFile>,
    images: Vec<Image>,
}

fn build_chain(tag: &str) -> Chain {
    let host = dirty_host(256 * MIB);
    let mm = host.new_mm("src");
    let mut files = Vec::new();
    let mut images = Vec::new();
    let snap = |mm: &MmUser, n: usize, files: &mut Vec<TmpFile>, images: &mut Vec<Image>| {
        let f = TmpFile::new(&format!("diff-{tag}-{n}"));
        let st = if n == 0 {
            mm.snapshot_to_file_blocking(&f.0).unwrap()
        } else {
            mm.snapshot_diff_to_file_blocking(&f.0).unwrap()
        };
        let img = Image::capture(mm);
        let want = if n == 0 {
            SnapshotKind::Full
        } else {
            SnapshotKind::Diff
        };
        assert_eq!(st.kind, want);
        // The writer saves exactly what is present (a full file) and marks
        // absent exactly what the previous file had present and is gone.
        if let Some(prev) = images.last() {
            let prev: &Image = prev;
            assert_eq!(
                st.absent_pages,
                prev.lost_in(&img),
                "file {n}: absent marks"
            );
            let new = img
                .pages
                .keys()
                .filter(|a| !prev.pages.contains_key(a))
                .count() as u64;
            assert!(st.pages >= new, "file {n}: {} saved < {new} new", st.pages);
            assert!(
                st.pages < img.pages.len() as u64,
                "file {n}: a diff saves less than everything"
            );
        } else {
            assert_eq!(st.pages, img.pages.len() as u64, "full file: present pages");
            assert_eq!(st.absent_pages, 0);
        }
        files.push(f);
        images.push(img);
    };

    // Full: A (one-page fault-around) 2 of 3 pages through the API; B (2
    // MiB fault-around) every 5th page directly.
    let a = mm
        .mmap_blocking(MapOptions::anon(8 * MIB).tracked(true).fault_around(PAGE))
        .unwrap();
    let b = mm
        .mmap_blocking(MapOptions::anon(6 * MIB).tracked(true))
        .unwrap();
    for p in (0..8 * MIB / PAGE).filter(|p| p % 3 != 0) {
        mm.write_blocking(a + p * PAGE, &pattern(0, a + p * PAGE))
            .unwrap();
    }
    for p in (0..4 * MIB / PAGE).step_by(5) {
        poke(&mm, b + p * PAGE, 0);
    }
    snap(&mm, 0, &mut files, &mut images);

    // Diff 1: overwrites, new pages, our zap of A's [1, 1.5) MiB, the
    // embedder's DONTNEED of B's [2, 3) MiB, direct writes into B's
    // never-touched last 2 MiB.
    for p in (0..8 * MIB / PAGE).filter(|p| p % 7 == 0) {
        mm.write_blocking(a + p * PAGE, &pattern(1, a + p * PAGE))
            .unwrap();
    }
    mm.madvise_blocking(a + MIB, MIB / 2, Advice::DontNeed)
        .unwrap();
    host_dontneed(&mm, b + 2 * MIB, MIB);
    for p in (4 * MIB / PAGE..6 * MIB / PAGE).step_by(31) {
        poke(&mm, b + p * PAGE, 1);
    }
    snap(&mm, 1, &mut files, &mut images);

    // Diff 2: some zapped pages come back, a new VMA C, B's pages written
    // in diff 1 are discarded again, one page of A is discarded by the
    // embedder.
    for p in (256..300).step_by(2) {
        mm.write_blocking(a + p * PAGE, &pattern(2, a + p * PAGE))
            .unwrap();
    }
    let c = mm
        .mmap_blocking(MapOptions::anon(2 * MIB).tracked(true).fault_around(PAGE))
        .unwrap();
    for p in 0..200 {
        mm.write_blocking(c + p * PAGE, &pattern(2, c + p * PAGE))
            .unwrap();
    }
    host_dontneed(&mm, b + 4 * MIB, MIB);
    host_dontneed(&mm, a + 7 * PAGE, PAGE);
    snap(&mm, 2, &mut files, &mut images);

    // Diff 3: C unmapped and mapped again at the same address with fewer
    // pages (its old pages must be absent, not C's old bytes), A split by
    // an mprotect of its last 2 MiB (read-only), more writes to A and B.
    mm.munmap_blocking(c, 2 * MIB).unwrap();
    let c2 = mm
        .mmap_blocking(
            MapOptions::anon(2 * MIB)
                .at(c)
                .tracked(true)
                .fault_around(PAGE),
        )
        .unwrap();
    assert_eq!(c2, c);
    for p in (0..100).step_by(3) {
        mm.write_blocking(c + p * PAGE, &pattern(3, c + p * PAGE))
            .unwrap();
    }
    for p in (1000..1100).filter(|p| p % 2 == 0) {
        poke(&mm, a + p * PAGE, 3);
    }
    mm.mprotect_blocking(a + 6 * MIB, 2 * MIB, Prot::READ)
        .unwrap();
    poke(&mm, b + PAGE, 3);
    snap(&mm, 3, &mut files, &mut images);
    assert_eq!(images[3].layout.len(), 4, "A split in two, B, C");

    // The source's memory at the last file, through the API: the image.
    check_api(&mm, &images[3], "source");
    Chain { files, images }
}

#[test]
fn test_diff_chain_restores_byte_identical() {
    let _g = serial();
    let chain = build_chain("chain");
    let paths: Vec<&PathBuf> = chain.files.iter().map(|f| &f.0).collect();
    // Each diff is small: much smaller than the full file's data.
    let full = Snapshot::open(paths[0]).unwrap();
    assert_eq!(full.chain_len(), 1);

    // Every prefix of the chain, restored lazily: first touch through the
    // host pointers, each page charged once.
    for n in 0..paths.len() {
        let snap = Snapshot::open_chain(&paths[..=n]).unwrap();
        assert_eq!(snap.chain_len(), n + 1);
        let img = &chain.images[n];
        check_index(&snap, img);
        let host = Host::with_budget(256 * MIB);
        let mm = host.new_mm("restored");
        mm.restore_blocking(&snap).unwrap();
        assert_eq!(host.stats().charged_bytes, 0, "nothing read up front");
        check_host_then_api(&mm, img, &format!("chain of {}", n + 1));
        assert_eq!(host.stats().charged_bytes, img.total(), "each page once");
        let t = mm.tracked_stats().unwrap();
        assert_eq!(t.pages_faulted + t.pages_populated_api, img.total() / PAGE);
        drop(mm);
        assert_eq!(host.stats().charged_bytes, 0);
    }

    let snap = Snapshot::open_chain(&paths).unwrap();
    let img = &chain.images[3];
    let data: u64 = snap.vmas().iter().map(|v| v.present_pages).sum();
    assert_eq!(data, img.pages.len() as u64);

    // Lazily, first touch through the API (from one thread), then the host.
    let host = Host::with_budget(256 * MIB);
    let mm = host.new_mm("restored-api");
    mm.restore_blocking(&snap).unwrap();
    check_api(&mm, img, "API first");
    assert_eq!(host.stats().charged_bytes, img.total());
    check_host_then_api(&mm, img, "API first");
    assert_eq!(host.stats().charged_bytes, img.total());
    drop(mm);

    // Eagerly: a prefetch of everything populates exactly the pages with
    // data (charged once each), then every read matches.
    let host = Host::with_budget(256 * MIB);
    let mm = host.new_mm("restored-eager");
    mm.restore_blocking(&snap).unwrap();
    let mut asked = 0;
    for &(start, len) in &img.layout {
        asked += mm.prefetch_restored_blocking(start, len).unwrap();
    }
    assert_eq!(asked, data);
    assert_eq!(host.stats().charged_bytes, data * PAGE);
    assert_eq!(mm.resident_bytes_blocking().unwrap(), data * PAGE);
    for &(start, len) in &img.layout {
        assert_eq!(mm.prefetch_restored_blocking(start, len).unwrap(), 0);
    }
    check_host_then_api(&mm, img, "eager");
    assert_eq!(host.stats().charged_bytes, img.total());
}

fn chain_err(paths: &[&PathBuf]) -> SnapshotError {
    match Snapshot::open_chain(paths) {
        Err(Error::Snapshot { source, .. }) => source,
        other => panic!("expected a snapshot error, got {other:?}"),
    }
}

#[test]
fn test_bad_chains_get_named_errors() {
    let _g = serial();
    let chain = build_chain("bad");
    let [f, d1, d2, d3] = [0, 1, 2, 3].map(|i| &chain.files[i].0);
    assert!(Snapshot::open_chain(&[f, d1, d2, d3]).is_ok());

    // A diff without its full base, alone or with its successors.
    assert!(matches!(
        Snapshot::open(d1),
        Err(Error::Snapshot {
            source: SnapshotError::NoBase { .. },
            ..
        })
    ));
    assert!(matches!(chain_err(&[d1, d2]), SnapshotError::NoBase { .. }));
    // A missing middle link, files out of order.
    assert!(matches!(
        chain_err(&[f, d2, d3]),
        SnapshotError::WrongParent { link: 1, .. }
    ));
    assert!(matches!(
        chain_err(&[f, d1, d3]),
        SnapshotError::WrongParent { link: 2, .. }
    ));
    assert!(matches!(
        chain_err(&[f, d2, d1]),
        SnapshotError::WrongParent { link: 1, .. }
    ));
    // A full snapshot where a diff belongs.
    assert!(matches!(
        chain_err(&[f, f]),
        SnapshotError::NotADiff { link: 1 }
    ));

    // A wrong parent: a diff of another guest's full snapshot.
    let host = dirty_host(64 * MIB);
    let other = host.new_mm("other");
    let x = other
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    other.write_blocking(x, b"other").unwrap();
    let (g, gd) = (
        TmpFile::new("diff-other-full"),
        TmpFile::new("diff-other-diff"),
    );
    other.snapshot_to_file_blocking(&g.0).unwrap();
    other.write_blocking(x + PAGE, b"more").unwrap();
    let st = other.snapshot_diff_to_file_blocking(&gd.0).unwrap();
    assert_eq!((st.pages, st.absent_pages), (1, 0));
    assert!(Snapshot::open_chain(&[&g.0, &gd.0]).is_ok());
    match chain_err(&[f, &gd.0]) {
        SnapshotError::WrongParent {
            link: 1,
            parent,
            expected,
        } => {
            assert_eq!(expected, Snapshot::open(f).unwrap().id());
            assert_eq!(parent, Snapshot::open(&g.0).unwrap().id());
        }
        e => panic!("expected WrongParent, got {e:?}"),
    }

    // A truncated diff: named, before anything is mapped.
    let len = std::fs::metadata(d2).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d2)
        .unwrap()
        .set_len(len - PAGE)
        .unwrap();
    assert!(matches!(
        chain_err(&[f, d1, d2]),
        SnapshotError::Truncated { need, .. } if need == len
    ));
    // Cut inside its header.
    std::fs::OpenOptions::new()
        .write(true)
        .open(d2)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(matches!(
        chain_err(&[f, d1, d2]),
        SnapshotError::Truncated {
            len: 100,
            need: 128
        }
    ));
    // A flipped bit in a diff's parent id: the checksum catches it.
    let mut head = [0u8; 128];
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d1)
        .unwrap();
    file.read_exact_at(&mut head, 0).unwrap();
    head[85] ^= 1;
    file.write_all_at(&head, 0).unwrap();
    assert!(matches!(
        chain_err(&[f, d1]),
        SnapshotError::BadChecksum { .. }
    ));
}

#[test]
fn test_diff_needs_a_dirty_log_and_a_base() {
    let _g = serial();
    let file = TmpFile::new("diff-refused");
    // No dirty log.
    let plain = Host::with_budget(64 * MIB);
    let mm = plain.new_mm("plain");
    mm.mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    mm.snapshot_to_file_blocking(&file.0).unwrap();
    assert!(matches!(
        mm.snapshot_diff_to_file_blocking(&file.0),
        Err(Error::NotAllowed { .. })
    ));

    let host = dirty_host(64 * MIB);
    let mm = host.new_mm("logged");
    let a = mm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    mm.write_blocking(a, b"x").unwrap();
    // No full snapshot yet.
    assert!(matches!(
        mm.snapshot_diff_to_file_blocking(&file.0),
        Err(Error::NoDiffBase { .. })
    ));
    mm.snapshot_to_file_blocking(&file.0).unwrap();
    // Nothing changed: an empty diff.
    let d = TmpFile::new("diff-refused-empty");
    let st = mm.snapshot_diff_to_file_blocking(&d.0).unwrap();
    assert_eq!((st.pages, st.absent_pages), (0, 0));
    // Someone else harvested the log: the next diff could miss pages.
    mm.write_blocking(a + PAGE, b"y").unwrap();
    assert_eq!(mm.take_dirty_blocking(a, MIB).unwrap().len(), 1);
    match mm.snapshot_diff_to_file_blocking(&d.0) {
        Err(Error::NoDiffBase { why }) => assert!(why.contains("harvested"), "{why}"),
        other => panic!("expected NoDiffBase, got {other:?}"),
    }
    // A full snapshot starts a new chain.
    let f2 = TmpFile::new("diff-refused-full2");
    mm.snapshot_to_file_blocking(&f2.0).unwrap();
    mm.write_blocking(a + 2 * PAGE, b"z").unwrap();
    assert_eq!(mm.snapshot_diff_to_file_blocking(&d.0).unwrap().pages, 1);
    let snap = Snapshot::open_chain(&[&f2.0, &d.0]).unwrap();
    let m2 = Host::with_budget(64 * MIB).new_mm("r");
    m2.restore_blocking(&snap).unwrap();
    for (off, want) in [(0, b"x"), (PAGE, b"y"), (2 * PAGE, b"z")] {
        assert!(m2.compare_blocking(a + off, want).unwrap());
    }

    // A snapshot file harvests the log: an in-memory snapshot taken before
    // it cannot be reset to (the reset would miss the writes before the
    // file), and one taken after it can.
    let mem = mm.snapshot_blocking().unwrap();
    mm.write_blocking(a, b"w").unwrap();
    mm.snapshot_to_file_blocking(&f2.0).unwrap();
    match mm.reset_blocking(&mem) {
        Err(Error::SnapshotLayout { why }) => assert!(why.contains("snapshot file"), "{why}"),
        other => panic!("expected SnapshotLayout, got {other:?}"),
    }
    assert!(mm.compare_blocking(a, b"w").unwrap(), "nothing reset");
    let mem = mm.snapshot_blocking().unwrap();
    mm.write_blocking(a, b"v").unwrap();
    mm.reset_blocking(&mem).unwrap();
    assert!(mm.compare_blocking(a, b"w").unwrap());
    drop(mem);

    // An untracked VMA keeps no log: no diff (the full file still works).
    mm.mmap_blocking(MapOptions::anon(MIB)).unwrap();
    assert!(matches!(
        mm.snapshot_diff_to_file_blocking(&d.0),
        Err(Error::NotTracked { .. })
    ));
    mm.snapshot_to_file_blocking(&f2.0).unwrap();
    assert!(matches!(
        mm.snapshot_diff_to_file_blocking(&d.0),
        Err(Error::NotTracked { .. })
    ));
}

/// A version-1 file (this crate's format before diffs) still opens and
/// restores, as a full snapshot.
#[test]
fn test_version_1_file_still_restores() {
    let _g = serial();
    let file = TmpFile::new("diff-v1");
    let host = Host::with_budget(64 * MIB);
    let mm = host.new_mm("src");
    let a = mm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true).fault_around(PAGE))
        .unwrap();
    for p in (0..MIB / PAGE).step_by(3) {
        mm.write_blocking(a + p * PAGE, &pattern(0, a + p * PAGE))
            .unwrap();
    }
    mm.snapshot_to_file_blocking(&file.0).unwrap();
    // Rewrite it as version 1: a 64-byte header, the index right after it
    // (bitmap offsets 64 lower), kind 0 was `flags`, no absent offsets.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file.0)
        .unwrap();
    let mut head = vec![0u8; 128];
    f.read_exact_at(&mut head, 0).unwrap();
    let index_len = u64::from_le_bytes(head[24..32].try_into().unwrap()) as usize;
    let mut index = vec![0u8; index_len];
    f.read_exact_at(&mut index, 128).unwrap();
    let nr = u32::from_le_bytes(head[16..20].try_into().unwrap()) as usize;
    for k in 0..nr {
        let r = &mut index[k * 64..(k + 1) * 64];
        let off = u64::from_le_bytes(r[32..40].try_into().unwrap()) - 64;
        r[32..40].copy_from_slice(&off.to_le_bytes());
    }
    let mut v1 = head[..64].to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&v1[..48]);
    h.update(&[0u8; 8]);
    h.update(&v1[56..64]);
    h.update(&index);
    v1[48..56].copy_from_slice(&h.digest().to_le_bytes());
    v1.extend_from_slice(&index);
    v1.extend_from_slice(&[0u8; 64]);
    f.write_all_at(&v1, 0).unwrap();

    let snap = Snapshot::open(&file.0).unwrap();
    assert_eq!(snap.id(), 0, "a version-1 file has no id");
    assert_eq!(snap.vmas()[0].present_pages, (MIB / PAGE).div_ceil(3));
    let m2 = Host::with_budget(64 * MIB).new_mm("r");
    m2.restore_blocking(&snap).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..MIB / PAGE {
        m2.read_blocking(a + p * PAGE, &mut buf).unwrap();
        let want = if p % 3 == 0 {
            pattern(0, a + p * PAGE)
        } else {
            vec![0; PAGE_SIZE]
        };
        assert!(buf == want, "page {p}");
    }
}
