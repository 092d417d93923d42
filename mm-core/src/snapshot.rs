//! Snapshots of a guest's memory and their lazy restore (issue 15).
//!
//! [`MmUser::snapshot_to_file`] writes the present pages of every VMA of a paused
//! guest to a sparse file ([`MmUser::snapshot_diff_to_file`] only what
//! changed since the previous one); [`Snapshot::open`] validates one
//! ([`Snapshot::open_chain`] a full one and its diffs; every bad
//! input gets its named [`SnapshotError`], before anything is mapped);
//! [`MmUser::restore`] maps its whole layout into another guest as tracked
//! regions (or [`Snapshot::map_options`] one VMA at a time), reading
//! nothing up front: the userfaultfd handler and the access path serve
//! each missing page from the file on first touch (`tracked/source.rs`).
//!
//! # Which pages are saved
//!
//! The kernel's view, not the library's counters (except with a dirty log,
//! below): a page is saved when
//! `/proc/self/pagemap` says it is present or swapped in the VMA's host
//! range. For a shared memfd VMA it is every page the memfd holds
//! (`lseek` `SEEK_DATA`/`SEEK_HOLE`: in the page cache or swapped out,
//! mapped here or not: a DONTNEED of the mapping keeps the page, and a
//! device backend mapping the memfd may have written pages the guest never
//! touched), read from the memfd itself, not through the mapping. It is
//! restored lazily as a tracked shared region: each page is copied into
//! the new memfd on first touch (`UFFDIO_COPY` on shmem), charged once,
//! and stays there over a DONTNEED of the mapping.
//!
//! # Diff snapshots and chains
//!
//! On a guest with a dirty log ([`MmConfig::dirty_log`](crate::MmConfig::dirty_log)) every snapshot
//! file also harvests the log ([`MmUser::take_dirty`]'s `PAGEMAP_SCAN`)
//! under the same mmap write lock, before any page is read, and the mm
//! remembers the file's id and which pages it had present. Then
//! [`MmUser::snapshot_diff_to_file`] writes a **diff**: the pages present
//! now and written (or newly populated) since the previous file, and an
//! **absent** mark for each page the previous file had present that is not
//! present now (zapped, discarded by the embedder's `MADV_DONTNEED`,
//! unmapped and mapped again). [`Snapshot::open_chain`] opens a full file
//! and its diffs, oldest first, and presents the merged view: each page of
//! the newest layout comes from the newest file that saved it, unless a
//! newer file marks it absent (or did not map it): then it is absent (zeros
//! when touched), never an older file's bytes. [`Snapshot::open`] is the
//! chain of one file. The merged view restores exactly like a full
//! snapshot taken at the last diff (`tests/snapshot_diff.rs`).
//!
//! Guarantees and limits:
//!
//! - **The guest must be paused** (no vCPU, no JIT code writing its memory)
//!   while a snapshot file is written, full or diff, as for a full one. A
//!   page written during the call is still never lost from the chain (the
//!   harvest comes first, so such a write is logged for the next diff), but
//!   the file is then not one moment of the guest.
//! - **One consumer of the log.** A diff is relative to the last snapshot
//!   file only while nobody else harvested the log: after
//!   [`MmUser::take_dirty`] (a vm-memory `DirtyBitmap` included),
//!   [`MmUser::snapshot`] or [`MmUser::reset`] a diff gets
//!   [`Error::NoDiffBase`] until a full file is written. So does a diff
//!   before any full file, and after a snapshot file that failed half-way
//!   (its harvest already consumed the log).
//! - **Every VMA must keep a dirty log** (tracked, on a live tracker) for a
//!   diff ([`Error::NotTracked`], [`Error::TrackerDead`],
//!   [`Error::NotAllowed`] without `MmConfig::dirty_log`); a full file of a
//!   guest with an untracked VMA is written as before, but no diff can
//!   follow it.
//! - **A chain is checked before anything is mapped**: every file as
//!   [`Snapshot::open`] checks one, the first must be full
//!   ([`SnapshotError::NoBase`]), each later one a diff
//!   ([`SnapshotError::NotADiff`]) whose parent id is the id of the file
//!   before it ([`SnapshotError::WrongParent`]: a wrong parent, a missing
//!   link, files out of order). Ids are 128 random bits per file.
//! - Memory: the mm keeps one bit per page of the last file's layout; an
//!   open chain of more than one file keeps two bytes per page (which file
//!   holds it) besides the bitmaps.
//!
//! # Which pages a dirty-logged guest saves
//!
//! For a VMA with a dirty log, presence is read from the mm's page table
//! (as [`MmUser::snapshot`] does), not from pagemap: the log's
//! write-protect markers on never-populated pages read as swapped entries
//! in `/proc/self/pagemap`, and reading such a page for the file would
//! populate (and charge) it.
//!
//! # File format, version 2
//!
//! All integers little-endian. The file is sparse: only the saved pages
//! of each VMA are written, each at its page offset inside the VMA's data
//! area, so that page `i` of VMA `k` is at `data_off[k] + i * 4096` and a
//! restore copies a run of pages with one `UFFDIO_COPY` straight from a
//! read-only mapping of the file. Unsaved pages are holes (never read: the
//! bitmap says they are not in the file).
//!
//! ```text
//! 0        header (128 bytes)
//!            0  magic        [u8; 8] = "GMMSNAP\0"
//!            8  version      u32 = 2
//!           12  page_size    u32 = 4096
//!           16  nr_vmas      u32
//!           20  kind         u32   0 full, 1 diff
//!           24  index_len    u64   bytes of the index, from offset 128
//!           32  data_start   u64   first data byte (2 MiB aligned)
//!           40  file_len     u64   the file's length as written
//!           48  checksum     u64   XXH3-64 of header (this field zeroed)
//!                                  and index
//!           56  reserved     u64 = 0
//!           64  id           u128  random, this file's snapshot id
//!           80  parent       u128  a diff: the id of the snapshot file it
//!                                  is a diff of; a full one: 0
//!           96  reserved     [u8; 32] = 0
//! 128      index: nr_vmas records of 64 bytes, ascending guest address
//!            0  guest_start  u64
//!            8  len          u64   bytes, page aligned
//!           16  data_off     u64   file offset of the VMA's page 0
//!           24  present      u64   pages saved (the bitmap's popcount)
//!           32  bitmap_off   u64   file offset of the saved bitmap
//!           40  fault_around u64   of a tracked region (else 2 MiB)
//!           48  prot u8 (1 read, 2 write, 4 exec), kind u8 (0 private
//!               anonymous, 1 shared memfd), flags u8 (1 tracked,
//!               2 hugepage, 4 pinned), 5 bytes 0
//!           56  absent_off   u64   a diff: file offset of the absent
//!                                  bitmap; a full one: 0
//!          then the saved bitmaps, then (a diff) the absent bitmaps:
//!          ceil(len / 4096 / 64) u64 words per VMA, bit i of word i / 64
//!          = page i saved (absent); no page is both
//! data_start  VMA 0's data area: len bytes, holes where not saved
//!          (each area starts 2 MiB aligned)
//! file_len
//! ```
//!
//! A full file saves every present page, and a page it does not save is
//! absent. A diff saves the pages written since its parent; a page it
//! neither saves nor marks absent is the parent's (in the merged view of
//! the chain up to the parent), and a page outside its layout is absent.
//!
//! **Version 1** (still read, as a full snapshot that no diff can follow:
//! it has no id): the same with a 64-byte header (no id, parent and second
//! reserved field; the index at offset 64), `kind` must be 0 (it was a
//! reserved `flags` field) and each record's last field is a reserved 0.
//!
//! The data is written first, with one `pwrite` per run of saved pages
//! straight from guest memory, then the header and index, so a file cut
//! short by a crash has no valid header. The file is not fsynced.
//!
//! # Guarantees of a lazy restore
//!
//! - Nothing is read at `mmap`: the file is mapped read-only `MAP_PRIVATE`
//!   in the host process and each missing page is copied from it
//!   (`UFFDIO_COPY`, per fault-around run) when first touched, or filled
//!   with zeros when the snapshot has no data for it. Either way it is
//!   charged to the budget once, like any first touch.
//! - A page that was served (or discarded: `madvise(DONTNEED)`, ours or the
//!   embedder's) once is from then on an ordinary anonymous page: zapped,
//!   it refaults as zeros, never as snapshot data again.
//! - The file must not change while a restore from it is mapped. If it is
//!   **truncated**, a COPY from the lost part fails with `EFAULT`: the
//!   handler poisons that page (`UFFDIO_POISON`), so its toucher gets
//!   `SIGBUS` (contained to the thread with [`contain`](crate::contain)),
//!   never zeros, and the access API gets [`SnapshotError::DataLost`]. If
//!   it is **overwritten** in place, the pages not yet served read the new
//!   bytes (a `MAP_PRIVATE` mapping sees later writes to pages it has not
//!   copied); nothing detects that. Served pages are never affected.
//! - If the tracker's handler dies (`tracked/` step 9) the regions degrade
//!   to untracked and a direct touch of a page never served reads zeros
//!   (the kernel serves it); the access API refuses with
//!   [`Error::TrackerDead`] instead.
//! - [`MmUser::restore`] maps every VMA or none: on any error the VMAs it
//!   mapped are unmapped again.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_lite::future::block_on;

use crate::error::{Access, Error, Result, SnapshotError};
use crate::mm::{check_range, present_runs, written_runs, DiffBase, MapKind, MapOptions, MmUser};
use crate::sys::{self, FileMapping, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::tracked::{Segment, SnapshotSource, DEFAULT_FAULT_AROUND};
use crate::vma::{Prot, VmFlags};

/// The first eight bytes of a snapshot file.
pub const MAGIC: [u8; 8] = *b"GMMSNAP\0";
/// The format version this build writes (it also reads
/// [`MIN_VERSION`]`..=VERSION`).
pub const VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const MIN_VERSION: u32 = 1;
/// Header length of version 2; version 1's is 64.
const HEADER_LEN: u64 = 128;
const HEADER_LEN_V1: u64 = 64;
const RECORD_LEN: u64 = 64;
/// Each VMA's data area starts at a multiple of this.
const DATA_ALIGN: u64 = HUGE_PAGE_SIZE as u64;
/// Largest index `open` reads (bitmaps of 2 TiB of guest memory): a bad
/// header must not make it allocate the file's size.
const MAX_INDEX: u64 = 64 << 20;
/// What `open` reads first: the header and the index of up to 8 GiB of
/// guest memory.
const FIRST_READ: u64 = 256 << 10;
const PAGE: u64 = PAGE_SIZE as u64;

const KIND_FULL: u32 = 0;
const KIND_DIFF: u32 = 1;

const FLAG_TRACKED: u8 = 1;
const FLAG_HUGEPAGE: u8 = 2;
const FLAG_PINNED: u8 = 4;

/// Full snapshot or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Every present page; a page not saved is absent.
    Full,
    /// The pages written since its parent, and the pages that became
    /// absent since (see the module docs).
    Diff,
}

/// One VMA of a snapshot, as its index records it (of a chain: as the
/// newest file records it, with the merged view's page count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotVma {
    /// Guest address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Protection.
    pub prot: Prot,
    /// Backing.
    pub kind: MapKind,
    /// Was a tracked region (a restore is always tracked: the lazy path
    /// needs the userfaultfd).
    pub tracked: bool,
    /// Had `MADV_HUGEPAGE` (a restored region is 4 KiB: tracked regions are).
    pub hugepage: bool,
    /// Was pinned.
    pub pinned: bool,
    /// Fault-around of the tracked region (the default for others).
    pub fault_around: u64,
    /// Pages with data (of a chain: in any of its files, after the absent
    /// marks).
    pub present_pages: u64,
    /// File offset of the VMA's page 0 (in the newest file of a chain).
    pub data_off: u64,
}

/// What [`MmUser::snapshot_to_file`] or
/// [`MmUser::snapshot_diff_to_file`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The file's snapshot id (the parent id of the next diff).
    pub id: u128,
    /// VMAs recorded.
    pub vmas: usize,
    /// Pages saved (present; of a diff: present and written since).
    pub pages: u64,
    /// Pages a diff marks absent (present in its parent, not now).
    pub absent_pages: u64,
    /// The file's (sparse) length.
    pub file_len: u64,
    /// `pwrite` calls of data (one per run of saved pages).
    pub writes: u64,
}

/// One validated snapshot file.
#[derive(Debug)]
struct SnapFile {
    path: Arc<PathBuf>,
    map: Arc<FileMapping>,
    file_len: u64,
    kind: SnapshotKind,
    /// 0 for a version-1 file (no id).
    id: u128,
    parent: u128,
    vmas: Vec<SnapshotVma>,
    /// Per VMA: bit `i` = page `i` is in this file.
    saved: Vec<Box<[u64]>>,
    /// Per VMA (a diff): bit `i` = page `i` is absent from here on.
    absent: Vec<Box<[u64]>>,
}

/// Where one VMA of the merged view reads its pages: `(file, VMA of that
/// file)` per segment, and each page's segment (`None`: one file).
#[derive(Debug)]
struct Sources {
    segments: Vec<(usize, usize)>,
    owner: Option<Box<[u16]>>,
}

/// An open, validated snapshot (one full file, or a full file and its
/// diffs: [`open_chain`](Self::open_chain)): the restore source of one or
/// more guests. The files stay mapped read-only while this value or any
/// region restored from it lives.
#[derive(Debug)]
pub struct Snapshot {
    /// Oldest (the full base) first.
    files: Vec<SnapFile>,
    /// The newest file's layout, with the merged page counts.
    vmas: Vec<SnapshotVma>,
    /// Per VMA: bit `i` = page `i` has data in the merged view.
    present: Vec<Box<[u64]>>,
    sources: Vec<Sources>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le128(b: &[u8], at: usize) -> u128 {
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(w)
}

/// XXH3-64 of the header (of either version's length) with its checksum
/// field zeroed, and the index.
fn checksum(header: &[u8], index: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&header[..48]);
    h.update(&[0u8; 8]);
    h.update(&header[56..]);
    h.update(index);
    h.digest()
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

fn bit(words: &[u64], i: usize) -> bool {
    words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn popcount(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Guest runs inside `[start, start + pages * PAGE)` as a bitmap.
fn runs_to_bitmap(runs: &[Range<u64>], start: u64, pages: usize) -> Vec<u64> {
    let mut out = vec![0u64; pages.div_ceil(64)];
    for r in runs {
        let (a, b) = ((r.start - start) / PAGE, (r.end - start) / PAGE);
        for p in a as usize..(b as usize).min(pages) {
            out[p / 64] |= 1 << (p % 64);
        }
    }
    out
}

/// A fresh snapshot id: 128 random bits (never 0, which means "none").
fn new_id() -> Result<u128> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(Error::host("read(/dev/urandom)"))?;
    Ok(u128::from_le_bytes(b).max(1))
}

impl SnapFile {
    /// Opens and validates one snapshot file: header, checksum, every
    /// index entry against the file's length. Reads only the header and
    /// index; maps the file read-only.
    fn open(path: &Path) -> Result<SnapFile> {
        let path = path.to_path_buf();
        let bad = |source| Error::Snapshot {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(Error::host("open(snapshot)"))?;
        let len = file
            .metadata()
            .map_err(Error::host("fstat(snapshot)"))?
            .len();
        if len < HEADER_LEN_V1 {
            return Err(bad(SnapshotError::Truncated {
                len,
                need: HEADER_LEN_V1,
            }));
        }
        // One read for the header and, usually, the whole index (32 KiB of
        // bitmaps per GiB of guest): on a cold cache each read is a disk
        // round trip before the restore is usable.
        let mut head = vec![0u8; len.min(FIRST_READ) as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(Error::host("pread(snapshot)"))?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&head[..8]);
        if magic != MAGIC {
            return Err(bad(SnapshotError::BadMagic { found: magic }));
        }
        let version = le32(&head, 8);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(bad(SnapshotError::BadVersion {
                found: version,
                supported: VERSION,
            }));
        }
        let header_len = if version == 1 {
            HEADER_LEN_V1
        } else {
            HEADER_LEN
        };
        if len < header_len {
            return Err(bad(SnapshotError::Truncated {
                len,
                need: header_len,
            }));
        }
        let header = head[..header_len as usize].to_vec();
        let page_size = le32(&header, 12);
        if page_size != PAGE_SIZE as u32 {
            return Err(bad(SnapshotError::BadPageSize {
                found: page_size,
                expected: PAGE_SIZE as u32,
            }));
        }
        let nr = u64::from(le32(&header, 16));
        let index_len = le64(&header, 24);
        let data_start = le64(&header, 32);
        let file_len = le64(&header, 40);
        let sum = le64(&header, 48);
        if index_len > MAX_INDEX {
            return Err(bad(SnapshotError::IndexPastEnd {
                vma: 0,
                what: "index",
                end: header_len.saturating_add(index_len),
                limit: header_len + MAX_INDEX,
            }));
        }
        let index_end = header_len + index_len;
        if len < index_end || len < file_len {
            return Err(bad(SnapshotError::Truncated {
                len,
                need: index_end.max(file_len),
            }));
        }
        let mut index = vec![0u8; index_len as usize];
        let have = (head.len() - header_len as usize).min(index.len());
        index[..have].copy_from_slice(&head[header_len as usize..header_len as usize + have]);
        if have < index.len() {
            file.read_exact_at(&mut index[have..], header_len + have as u64)
                .map_err(Error::host("pread(snapshot)"))?;
        }
        let computed = checksum(&header, &index);
        if computed != sum {
            return Err(bad(SnapshotError::BadChecksum {
                found: sum,
                computed,
            }));
        }
        // The checksum matched: what follows is the writer's own layout,
        // or a file crafted to match; every offset is still checked.
        let kind = match le32(&header, 20) {
            KIND_FULL => SnapshotKind::Full,
            KIND_DIFF if version >= 2 => SnapshotKind::Diff,
            found => return Err(bad(SnapshotError::BadKind { found })),
        };
        let (id, parent) = if version >= 2 {
            (le128(&header, 64), le128(&header, 80))
        } else {
            (0, 0)
        };
        if nr * RECORD_LEN > index_len {
            return Err(bad(SnapshotError::IndexPastEnd {
                vma: 0,
                what: "records",
                end: header_len + nr * RECORD_LEN,
                limit: index_end,
            }));
        }
        if file_len < index_end || data_start < index_end || data_start > file_len {
            return Err(bad(SnapshotError::IndexPastEnd {
                vma: 0,
                what: "data start",
                end: data_start,
                limit: file_len,
            }));
        }
        let mut vmas = Vec::with_capacity(nr as usize);
        let mut saved = Vec::with_capacity(nr as usize);
        let mut absent = Vec::with_capacity(nr as usize);
        let mut prev_end = 0u64;
        for k in 0..nr as usize {
            let r = &index[k * RECORD_LEN as usize..(k + 1) * RECORD_LEN as usize];
            let (start, vlen, data_off) = (le64(r, 0), le64(r, 8), le64(r, 16));
            let (present, bitmap_off, fault_around) = (le64(r, 24), le64(r, 32), le64(r, 40));
            let (prot, vkind, flags) = (r[48], r[49], r[50]);
            let absent_off = le64(r, 56);
            let layout = |reason| {
                bad(SnapshotError::BadLayout {
                    vma: k,
                    addr: start,
                    len: vlen,
                    reason,
                })
            };
            if vlen == 0 || start % PAGE != 0 || vlen % PAGE != 0 {
                return Err(layout("empty or not page aligned"));
            }
            let end = start.checked_add(vlen).ok_or_else(|| layout("overflows"))?;
            if k > 0 && start < prev_end {
                return Err(layout("overlaps or precedes the previous VMA"));
            }
            prev_end = end;
            if prot > 7 || vkind > 1 || flags > 7 {
                return Err(layout("unknown protection, kind or flags"));
            }
            if !fault_around.is_power_of_two() || !(PAGE..=DATA_ALIGN).contains(&fault_around) {
                return Err(layout(
                    "fault-around is not a power of two in 4 KiB..=2 MiB",
                ));
            }
            if data_off % PAGE != 0 {
                return Err(layout("data offset not page aligned"));
            }
            let data_end = data_off.saturating_add(vlen);
            if data_off < data_start || data_end > file_len {
                return Err(bad(SnapshotError::IndexPastEnd {
                    vma: k,
                    what: "data",
                    end: data_end,
                    limit: file_len,
                }));
            }
            let pages = vlen / PAGE;
            let words = pages.div_ceil(64);
            // A bitmap of this VMA at `off` inside the index, bits past
            // the last page cleared (they mean nothing).
            let read_bitmap = |off: u64, what| -> Result<Box<[u64]>> {
                let bm_end = off.saturating_add(words * 8);
                if off < header_len + nr * RECORD_LEN || bm_end > index_end {
                    return Err(bad(SnapshotError::IndexPastEnd {
                        vma: k,
                        what,
                        end: bm_end,
                        limit: index_end,
                    }));
                }
                let at = (off - header_len) as usize;
                let mut bitmap: Box<[u64]> = (0..words as usize)
                    .map(|w| le64(&index, at + w * 8))
                    .collect();
                if pages % 64 != 0 {
                    if let Some(last) = bitmap.last_mut() {
                        *last &= (1u64 << (pages % 64)) - 1;
                    }
                }
                Ok(bitmap)
            };
            let bitmap = read_bitmap(bitmap_off, "bitmap")?;
            if popcount(&bitmap) != present {
                return Err(layout("present-page count does not match its bitmap"));
            }
            let gone = match kind {
                SnapshotKind::Diff => read_bitmap(absent_off, "absent bitmap")?,
                SnapshotKind::Full if absent_off != 0 => {
                    return Err(layout("an absent bitmap in a full snapshot"));
                }
                SnapshotKind::Full => Box::default(),
            };
            if gone.iter().zip(bitmap.iter()).any(|(a, b)| a & b != 0) {
                return Err(layout("a page both saved and marked absent"));
            }
            vmas.push(SnapshotVma {
                start,
                len: vlen,
                prot: prot_from_bits(prot),
                kind: if vkind == 1 {
                    MapKind::SharedMemfd
                } else {
                    MapKind::AnonPrivate
                },
                tracked: flags & FLAG_TRACKED != 0,
                hugepage: flags & FLAG_HUGEPAGE != 0,
                pinned: flags & FLAG_PINNED != 0,
                fault_around,
                present_pages: present,
                data_off,
            });
            saved.push(bitmap);
            absent.push(gone);
        }
        let map_len = usize::try_from(file_len.max(PAGE).next_multiple_of(PAGE)).map_err(|_| {
            Error::Overflow {
                addr: 0,
                len: file_len,
            }
        })?;
        let map = FileMapping::new(&file, map_len).map_err(Error::host("mmap(snapshot)"))?;
        Ok(SnapFile {
            path: Arc::new(path),
            map: Arc::new(map),
            file_len,
            kind,
            id,
            parent,
            vmas,
            saved,
            absent,
        })
    }

    /// The index of the VMA containing guest address `addr`, searching
    /// from `*cursor` (callers ask in ascending order).
    fn vma_at(&self, addr: u64, cursor: &mut usize) -> Option<usize> {
        while *cursor < self.vmas.len() && self.vmas[*cursor].start + self.vmas[*cursor].len <= addr
        {
            *cursor += 1;
        }
        let v = self.vmas.get(*cursor)?;
        (v.start <= addr).then_some(*cursor)
    }
}

impl Snapshot {
    /// Opens and validates the full snapshot at `path`: header, checksum,
    /// every index entry against the file's length. Reads only the header
    /// and index; maps the file read-only. A diff alone gets
    /// [`SnapshotError::NoBase`]: open it with its chain
    /// ([`open_chain`](Self::open_chain)).
    pub fn open(path: impl AsRef<Path>) -> Result<Snapshot> {
        Self::open_chain(&[path.as_ref()])
    }

    /// Opens a chain of snapshot files, oldest first: a full snapshot and
    /// the diffs written after it, each a diff of the one before (module
    /// docs). Each file is validated as [`open`](Self::open) validates
    /// one, then the chain ([`SnapshotError::NoBase`],
    /// [`SnapshotError::NotADiff`], [`SnapshotError::WrongParent`]), before
    /// anything is mapped into a guest. The result presents the merged
    /// view: the newest file's layout, each page from the newest file that
    /// saved it unless a later file marks it absent. Reads the headers and
    /// indexes only.
    pub fn open_chain<P: AsRef<Path>>(paths: &[P]) -> Result<Snapshot> {
        if paths.is_empty() {
            return Err(Error::InvalidArgument {
                what: "open_chain: no snapshot files",
            });
        }
        let mut files: Vec<SnapFile> = Vec::with_capacity(paths.len());
        for (link, p) in paths.iter().enumerate() {
            let f = SnapFile::open(p.as_ref())?;
            let bad = |source| Error::Snapshot {
                path: p.as_ref().to_path_buf(),
                source,
            };
            match (link, f.kind) {
                (0, SnapshotKind::Full) => {}
                (0, SnapshotKind::Diff) => {
                    return Err(bad(SnapshotError::NoBase { parent: f.parent }))
                }
                (_, SnapshotKind::Full) => return Err(bad(SnapshotError::NotADiff { link })),
                (_, SnapshotKind::Diff) => {
                    let expected = files[link - 1].id;
                    if f.parent != expected {
                        return Err(bad(SnapshotError::WrongParent {
                            link,
                            parent: f.parent,
                            expected,
                        }));
                    }
                }
            }
            files.push(f);
        }
        if files.len() == 1 {
            // The fast path: one file, one segment per VMA.
            let f = &files[0];
            let vmas = f.vmas.clone();
            let present = f.saved.clone();
            let sources = (0..vmas.len())
                .map(|k| Sources {
                    segments: vec![(0, k)],
                    owner: None,
                })
                .collect();
            return Ok(Snapshot {
                files,
                vmas,
                present,
                sources,
            });
        }
        let (vmas, present, sources) = merge(&files)?;
        Ok(Snapshot {
            files,
            vmas,
            present,
            sources,
        })
    }

    /// The recorded VMAs, ascending (of a chain: the newest file's layout,
    /// with the merged view's present pages).
    pub fn vmas(&self) -> &[SnapshotVma] {
        &self.vmas
    }

    fn newest(&self) -> &SnapFile {
        &self.files[self.files.len() - 1]
    }

    /// The file (the newest of a chain).
    pub fn path(&self) -> &Path {
        &self.newest().path
    }

    /// Every file of the chain, oldest first.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Files in the chain (1 for a full snapshot alone).
    pub fn chain_len(&self) -> usize {
        self.files.len()
    }

    /// The snapshot id of the newest file (0 for a version-1 file).
    pub fn id(&self) -> u128 {
        self.newest().id
    }

    /// The file's length as recorded (and checked) at open (the newest
    /// file of a chain).
    pub fn file_len(&self) -> u64 {
        self.newest().file_len
    }

    /// The source of VMA `k` (`None` past the last), for
    /// [`MapOptions::restore_from`].
    pub fn source(&self, k: usize) -> Option<SnapshotSource> {
        let v = self.vmas.get(k)?;
        let src = self.sources.get(k)?;
        let segments = src
            .segments
            .iter()
            .map(|&(f, j)| {
                let file = &self.files[f];
                let fv = &file.vmas[j];
                // Page `i` of this VMA is at guest address
                // `v.start + i * PAGE`, which is page
                // `(v.start - fv.start) / PAGE + i` of the file's VMA.
                let base = fv.data_off.wrapping_add(v.start).wrapping_sub(fv.start);
                Some(Segment {
                    path: file.path.clone(),
                    map: file.map.clone(),
                    base: usize::try_from(base).ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        SnapshotSource::new(
            segments,
            src.owner.clone(),
            usize::try_from(v.len / PAGE).ok()?,
            self.present[k].clone(),
        )
    }

    /// How to map VMA `k` restored lazily at its recorded address: a tracked
    /// region (private, or shared memfd as it was) with its protection,
    /// fault-around and pinning.
    pub fn map_options(&self, k: usize) -> Option<MapOptions> {
        let v = self.vmas.get(k)?;
        let opts = match v.kind {
            MapKind::AnonPrivate => MapOptions::anon(v.len),
            // A tracked shared region (`tracked/` step 10): each page is
            // copied into the memfd on first touch.
            MapKind::SharedMemfd => MapOptions::shared(v.len),
        };
        Some(
            opts.at(v.start)
                .prot(v.prot)
                .pinned(v.pinned)
                .fault_around(v.fault_around)
                .restore_from(self.source(k)?),
        )
    }
}

/// The merged view of a validated chain of more than one file: the newest
/// layout, and for each of its pages the newest file that saved it, or
/// absent when a file on the way marks it absent or does not map it, or
/// the full base does not hold it.
type Merged = (Vec<SnapshotVma>, Vec<Box<[u64]>>, Vec<Sources>);

fn merge(files: &[SnapFile]) -> Result<Merged> {
    let last = files.len() - 1;
    let mut cursors = vec![0usize; files.len()];
    let mut vmas = files[last].vmas.clone();
    let mut present = Vec::with_capacity(vmas.len());
    let mut sources = Vec::with_capacity(vmas.len());
    for (k, v) in vmas.iter_mut().enumerate() {
        let pages = (v.len / PAGE) as usize;
        let mut bits = vec![0u64; pages.div_ceil(64)];
        let mut owner = vec![0u16; pages];
        // Segment 0 is the newest file's own VMA, whether or not it holds
        // a page (a source needs one).
        let mut segments = vec![(last, k)];
        let mut seg_of: HashMap<(usize, usize), u16> = HashMap::from([((last, k), 0)]);
        for (p, own) in owner.iter_mut().enumerate() {
            let addr = v.start + p as u64 * PAGE;
            for f in (0..=last).rev() {
                let file = &files[f];
                let Some(j) = file.vma_at(addr, &mut cursors[f]) else {
                    break; // not mapped then: absent from here on
                };
                let q = ((addr - file.vmas[j].start) / PAGE) as usize;
                if bit(&file.saved[j], q) {
                    let n = segments.len();
                    let s = *seg_of.entry((f, j)).or_insert_with(|| {
                        segments.push((f, j));
                        n as u16
                    });
                    if segments.len() > usize::from(u16::MAX) {
                        return Err(Error::InvalidArgument {
                            what: "open_chain: more than 65535 file VMAs feed one VMA",
                        });
                    }
                    *own = s;
                    bits[p / 64] |= 1 << (p % 64);
                    break;
                }
                if file.kind == SnapshotKind::Full || bit(&file.absent[j], q) {
                    break;
                }
            }
        }
        v.present_pages = popcount(&bits);
        present.push(bits.into_boxed_slice());
        sources.push(Sources {
            segments,
            owner: Some(owner.into_boxed_slice()),
        });
    }
    Ok((vmas, present, sources))
}

fn prot_from_bits(b: u8) -> Prot {
    let mut p = Prot::NONE;
    for (bit, q) in [(1, Prot::READ), (2, Prot::WRITE), (4, Prot::EXEC)] {
        if b & bit != 0 {
            p = p | q;
        }
    }
    p
}

fn prot_bits(p: Prot) -> u8 {
    let (r, w, x) = p.bits();
    u8::from(r) | u8::from(w) << 1 | u8::from(x) << 2
}

/// One VMA as the writer found it.
struct Found {
    rec: SnapshotVma,
    host: sys::HostRange,
    /// A shared VMA: its pages are read from the memfd, not the mapping.
    shared: Option<crate::vma::Vma>,
    /// Pages written to the file.
    saved: Vec<u64>,
    /// Pages marked absent (a diff).
    absent: Vec<u64>,
    /// Pages present now (the next diff's base).
    present: Vec<u64>,
}

/// The present (or swapped) pages of `r` by `/proc/self/pagemap`.
fn present_bitmap(r: sys::HostRange) -> std::io::Result<Vec<u64>> {
    const PRESENT_OR_SWAPPED: u64 = sys::pagemap::PRESENT | (1 << 62);
    const CHUNK: usize = 64 * 1024; // pages per pagemap read (512 KiB)
    let pages = r.len() / PAGE_SIZE;
    let mut bitmap = vec![0u64; pages.div_ceil(64)];
    let mut entries = vec![0u64; CHUNK.min(pages)];
    let mut at = 0;
    while at < pages {
        let n = CHUNK.min(pages - at);
        // SAFETY: a sub-range of `r` (page aligned, in bounds), inside the
        // same live mapping `r` is in.
        let sub = unsafe {
            sys::HostRange::new(
                std::ptr::NonNull::new_unchecked(r.ptr().add(at * PAGE_SIZE)),
                n * PAGE_SIZE,
            )
        };
        sys::pagemap(sub, &mut entries[..n])?;
        for (i, e) in entries[..n].iter().enumerate() {
            if e & PRESENT_OR_SWAPPED != 0 {
                let p = at + i;
                bitmap[p / 64] |= 1 << (p % 64);
            }
        }
        at += n;
    }
    Ok(bitmap)
}

/// A file no diff can follow: the guest has a VMA without a dirty log.
const UNLOGGED: &str =
    "the last full snapshot file had a VMA without a dirty log (untracked or its tracker died)";

impl MmUser {
    /// Writes the memory of this (paused) guest to a new snapshot file at
    /// `path` (see the module docs for the format): every VMA's layout and
    /// the pages the kernel has present or swapped (with a dirty log: the
    /// pages the mm's page table has present).
    ///
    /// Holds the mmap **write** lock throughout, so no zap, access or
    /// reaper changes the memory under it; the embedder must have stopped
    /// every thread that touches the guest's memory directly (vCPUs, JIT
    /// code): those take no lock, and a page they write during the call
    /// may be saved before or after the write. The data is written with
    /// one `pwrite` per run of present pages straight from guest memory,
    /// then the index; the file is not fsynced.
    ///
    /// On a guest with [`MmConfig::dirty_log`](crate::MmConfig) it also
    /// harvests the dirty log under the same lock, before reading any
    /// page, so that the next [`snapshot_diff_to_file`](Self::snapshot_diff_to_file)
    /// holds exactly the pages written after this call. It is then the
    /// log's consumer: a [`GuestSnapshot`](crate::GuestSnapshot) taken
    /// before it can no longer be [`reset`](Self::reset) to
    /// ([`Error::SnapshotLayout`]), and a harvest by anyone else
    /// ([`take_dirty`](Self::take_dirty)) refuses the next diff.
    pub async fn snapshot_to_file(&self, path: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.write_snapshot(path.as_ref(), false).await
    }

    /// Writes a **diff** snapshot file at `path`: the pages of this
    /// (paused) guest written or populated since its previous snapshot
    /// file (full or diff), and absent marks for the pages that file had
    /// present and the guest no longer has (module docs). Restore it with
    /// its chain ([`Snapshot::open_chain`]).
    ///
    /// Needs [`MmConfig::dirty_log`](crate::MmConfig)
    /// ([`Error::NotAllowed`]), every VMA tracked on a live tracker
    /// ([`Error::NotTracked`], [`Error::TrackerDead`]), and a previous
    /// snapshot file of this guest with no other harvest of the log since
    /// ([`Error::NoDiffBase`]); none of these errors changes anything. The
    /// guest must be paused, as for [`snapshot_to_file`](Self::snapshot_to_file).
    pub async fn snapshot_diff_to_file(&self, path: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.write_snapshot(path.as_ref(), true).await
    }

    async fn write_snapshot(&self, path: &Path, diff: bool) -> Result<SnapshotStats> {
        let dirty_log = self.config().dirty_log;
        if diff && !dirty_log {
            return Err(Error::NotAllowed {
                addr: 0,
                reason: "a diff snapshot file needs MmConfig::dirty_log",
            });
        }
        let state = self.lock().write().await;
        if diff {
            self.check_not_killed()?;
        }
        // Which VMAs keep a dirty log (a diff needs all of them to).
        let mut logged = Vec::with_capacity(state.vmas().len());
        for v in state.vmas().iter() {
            let ok = dirty_log && self.check_dirty_logged(v).is_ok();
            if diff {
                self.check_dirty_logged(v)?;
            }
            logged.push(ok);
        }
        if !dirty_log {
            return self
                .write_file(path, state, &logged, None)
                .await
                .map(|(s, _)| s);
        }
        // From here the log is harvested: a failure leaves no diff base
        // (`diff_base_take`), so no later diff can miss what it took.
        let (gen, base) = self.diff_base_take(diff)?;
        let res = self.write_file(path, state, &logged, base.as_ref()).await;
        if let Ok((stats, present)) = &res {
            if logged.iter().all(|&l| l) {
                self.diff_base_install(
                    gen,
                    DiffBase {
                        id: stats.id,
                        present: present.clone(),
                    },
                );
            } else {
                self.diff_base_none(gen, UNLOGGED);
            }
        }
        res.map(|(s, _)| s)
    }

    /// The writer proper, under the mmap write lock `state` (dropped once
    /// the data is written). `logged[k]`: VMA `k` keeps a dirty log (it is
    /// harvested, and its presence read from the page table); `base`: the
    /// parent of a diff. Returns the stats and, per VMA, the pages present
    /// now (the next diff's base).
    #[allow(clippy::type_complexity)] // one caller
    async fn write_file(
        &self,
        path: &Path,
        state: crate::mmap_lock::MmapWriteGuard<'_, crate::mm::MmState>,
        logged: &[bool],
        base: Option<&DiffBase>,
    ) -> Result<(SnapshotStats, Vec<(u64, u64, Vec<u64>)>)> {
        let id = new_id()?;
        let mut found = Vec::new();
        for (v, &logged) in state.vmas().iter().zip(logged) {
            let host = v.host_range(v.start, v.end);
            let pages = ((v.end - v.start) / PAGE) as usize;
            let (saved, absent, present) = if logged {
                // Harvest first: a write after this is logged for the next
                // diff, even one racing this call (the guest should be
                // paused, but a write is then never lost from the chain).
                let mut dirty = Vec::new();
                written_runs(v, v.start, v.end, true, &mut dirty)?;
                let present = runs_to_bitmap(&present_runs(self, v), v.start, pages);
                match base {
                    Some(b) => {
                        // Saved: present now, and written since the parent
                        // or not present in it. Absent: present in the
                        // parent, not now.
                        let dirty = runs_to_bitmap(&dirty, v.start, pages);
                        let parent = b.presence(v.start, v.end);
                        let saved: Vec<u64> = (0..present.len())
                            .map(|w| present[w] & (dirty[w] | !parent[w]))
                            .collect();
                        let absent = (0..present.len())
                            .map(|w| !present[w] & parent[w])
                            .collect();
                        (saved, absent, present)
                    }
                    None => (present.clone(), Vec::new(), present),
                }
            } else if let Some((fd, off)) = v.memfd() {
                // A shared VMA: every page its memfd holds, mapped here or
                // not (a DONTNEED of this mapping keeps the page in the
                // memfd, and a device backend may have written pages this
                // mapping never touched). pagemap sees only the mapped ones.
                let p = sys::data_pages(fd, off, v.end - v.start)
                    .map_err(Error::host("lseek(SEEK_DATA) of the memfd"))?;
                (p.clone(), Vec::new(), p)
            } else {
                let p = present_bitmap(host).map_err(Error::host("pread(pagemap)"))?;
                (p.clone(), Vec::new(), p)
            };
            let saved_pages = popcount(&saved);
            if saved_pages > 0 && !v.prot.contains(Prot::READ) {
                return Err(Error::NotAllowed {
                    addr: v.start,
                    reason: "snapshot of present pages in a VMA that is not readable",
                });
            }
            let fault_around = v
                .region
                .tracker()
                .and_then(|t| t.lookup(host.ptr() as usize))
                .map_or(DEFAULT_FAULT_AROUND, |(_, r)| r.fault_around);
            let flags = v.flags;
            found.push(Found {
                rec: SnapshotVma {
                    start: v.start,
                    len: v.end - v.start,
                    prot: v.prot,
                    kind: if v.is_shared() {
                        MapKind::SharedMemfd
                    } else {
                        MapKind::AnonPrivate
                    },
                    tracked: flags.contains(VmFlags::TRACKED),
                    hugepage: flags.contains(VmFlags::HUGEPAGE),
                    pinned: flags.contains(VmFlags::PINNED),
                    fault_around,
                    present_pages: saved_pages,
                    data_off: 0,
                },
                host,
                shared: v.is_shared().then(|| v.clone()),
                saved,
                absent,
                present,
            });
        }
        let overflow = || Error::Overflow { addr: 0, len: 0 };
        let nr = found.len() as u64;
        let words: u64 = found.iter().map(|f| f.saved.len() as u64).sum();
        let bitmap_bytes = words * 8 * if base.is_some() { 2 } else { 1 };
        let index_len = nr * RECORD_LEN + bitmap_bytes;
        let data_start = align_up(HEADER_LEN + index_len, DATA_ALIGN).ok_or_else(overflow)?;
        let mut off = data_start;
        for f in &mut found {
            f.rec.data_off = off;
            off = align_up(off + f.rec.len, DATA_ALIGN).ok_or_else(overflow)?;
        }
        let file_len = found
            .last()
            .map_or(data_start, |f| f.rec.data_off + f.rec.len);

        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(Error::host("open(snapshot)"))?;
        file.set_len(file_len)
            .map_err(Error::host("ftruncate(snapshot)"))?;
        let fd = OwnedFd::from(file);
        let mut stats = SnapshotStats {
            kind: if base.is_some() {
                SnapshotKind::Diff
            } else {
                SnapshotKind::Full
            },
            id,
            vmas: found.len(),
            pages: 0,
            absent_pages: found.iter().map(|f| popcount(&f.absent)).sum(),
            file_len,
            writes: 0,
        };
        for f in &found {
            let pages = (f.rec.len / PAGE) as usize;
            let bit = |i: usize| f.saved[i / 64] & (1 << (i % 64)) != 0;
            let mut i = 0;
            while i < pages {
                if !bit(i) {
                    // Skip whole empty words at once.
                    i = if f.saved[i / 64] == 0 {
                        (i / 64 + 1) * 64
                    } else {
                        i + 1
                    };
                    continue;
                }
                let j = (i..pages).find(|&j| !bit(j)).unwrap_or(pages);
                let at = f.rec.data_off + (i * PAGE_SIZE) as u64;
                if let Some((mfd, moff)) = f.shared.as_ref().and_then(|v| v.memfd()) {
                    // From the memfd: its pages need not be mapped here
                    // (and a kernel-mode fault on this mapping would not
                    // reach a user-mode-only userfaultfd).
                    let len = ((j - i) * PAGE_SIZE) as u64;
                    sys::copy_file(mfd, moff + (i * PAGE_SIZE) as u64, &fd, at, len)
                        .map_err(Error::host("pread(memfd)/pwrite(snapshot)"))?;
                    stats.pages += (j - i) as u64;
                    stats.writes += 1;
                    i = j;
                    continue;
                }
                // SAFETY: pages [i, j) of the VMA's host range: page
                // aligned and inside the same live mapping (we hold the
                // write lock, so it is not unmapped).
                let run = unsafe {
                    sys::HostRange::new(
                        std::ptr::NonNull::new_unchecked(f.host.ptr().add(i * PAGE_SIZE)),
                        (j - i) * PAGE_SIZE,
                    )
                };
                sys::write_pages_to(&fd, run, f.rec.data_off + (i * PAGE_SIZE) as u64)
                    .map_err(Error::host("pwrite(snapshot)"))?;
                stats.pages += (j - i) as u64;
                stats.writes += 1;
                i = j;
            }
        }
        drop(state);

        // The index, then the header with its checksum.
        let mut index = Vec::with_capacity(index_len as usize);
        let mut bitmap_off = HEADER_LEN + nr * RECORD_LEN;
        let mut absent_off = bitmap_off + words * 8;
        for f in &found {
            let r = &f.rec;
            index.extend_from_slice(&r.start.to_le_bytes());
            index.extend_from_slice(&r.len.to_le_bytes());
            index.extend_from_slice(&r.data_off.to_le_bytes());
            index.extend_from_slice(&r.present_pages.to_le_bytes());
            index.extend_from_slice(&bitmap_off.to_le_bytes());
            index.extend_from_slice(&r.fault_around.to_le_bytes());
            let kind = u8::from(r.kind == MapKind::SharedMemfd);
            let flags = if r.tracked { FLAG_TRACKED } else { 0 }
                | if r.hugepage { FLAG_HUGEPAGE } else { 0 }
                | if r.pinned { FLAG_PINNED } else { 0 };
            index.extend_from_slice(&[prot_bits(r.prot), kind, flags, 0, 0, 0, 0, 0]);
            let absent_at = if base.is_some() { absent_off } else { 0 };
            index.extend_from_slice(&absent_at.to_le_bytes());
            bitmap_off += f.saved.len() as u64 * 8;
            absent_off += f.saved.len() as u64 * 8;
        }
        for f in &found {
            for w in &f.saved {
                index.extend_from_slice(&w.to_le_bytes());
            }
        }
        if base.is_some() {
            for f in &found {
                for w in &f.absent {
                    index.extend_from_slice(&w.to_le_bytes());
                }
            }
        }
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        let nr32 = u32::try_from(nr).map_err(|_| overflow())?;
        header[16..20].copy_from_slice(&nr32.to_le_bytes());
        let kind = if base.is_some() { KIND_DIFF } else { KIND_FULL };
        header[20..24].copy_from_slice(&kind.to_le_bytes());
        header[24..32].copy_from_slice(&index_len.to_le_bytes());
        header[32..40].copy_from_slice(&data_start.to_le_bytes());
        header[40..48].copy_from_slice(&file_len.to_le_bytes());
        header[64..80].copy_from_slice(&id.to_le_bytes());
        let parent = base.map_or(0, |b| b.id);
        header[80..96].copy_from_slice(&parent.to_le_bytes());
        let sum = checksum(&header, &index);
        header[48..56].copy_from_slice(&sum.to_le_bytes());
        let file = File::from(fd);
        file.write_all_at(&index, HEADER_LEN)
            .map_err(Error::host("pwrite(snapshot)"))?;
        file.write_all_at(&header, 0)
            .map_err(Error::host("pwrite(snapshot)"))?;
        let present = found
            .into_iter()
            .map(|f| (f.rec.start, f.rec.start + f.rec.len, f.present))
            .collect();
        Ok((stats, present))
    }

    /// Maps every VMA of `snap` into this guest at its recorded address,
    /// lazily restored (nothing is read now); returns their addresses.
    /// All or nothing: a VMA that does not fit (outside the address space,
    /// overlapping a mapping) fails with [`SnapshotError::BadLayout`] before
    /// any is mapped, and any later failure unmaps those already mapped.
    pub async fn restore(&self, snap: &Snapshot) -> Result<Vec<u64>> {
        self.check_not_killed()?;
        let bad = |k: usize, v: &SnapshotVma, reason| Error::Snapshot {
            path: snap.path().to_path_buf(),
            source: SnapshotError::BadLayout {
                vma: k,
                addr: v.start,
                len: v.len,
                reason,
            },
        };
        {
            let state = self.lock().read().await;
            for (k, v) in snap.vmas().iter().enumerate() {
                if check_range(v.start, v.len, self.config().va_limit).is_err() {
                    return Err(bad(k, v, "outside the guest's address space"));
                }
                if state
                    .vmas()
                    .overlapping(v.start, v.start + v.len)
                    .next()
                    .is_some()
                {
                    return Err(bad(k, v, "overlaps a mapping of the guest"));
                }
            }
        }
        let mut mapped = Vec::with_capacity(snap.vmas().len());
        for (k, v) in snap.vmas().iter().enumerate() {
            let res = match snap.map_options(k) {
                Some(opts) => self.mmap(opts).await,
                None => Err(bad(
                    k,
                    v,
                    "data range does not fit this host's address space",
                )),
            };
            match res {
                Ok(addr) => mapped.push((addr, v.len)),
                Err(e) => {
                    for (a, l) in mapped {
                        let _ = self.munmap(a, l).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(mapped.into_iter().map(|(a, _)| a).collect())
    }

    /// Populates now, through the access path (charged as first touches),
    /// the pages of `[addr, addr + len)` that a lazy restore has data for
    /// and never served; other pages stay missing. Returns the pages it
    /// asked for. Run it from the embedder's own threads (one per part of
    /// the range) for a background prefetch: mm-core spawns none. A page
    /// served meanwhile is never copied again; one discarded meanwhile may
    /// come back as a (charged) zero page.
    pub async fn prefetch_restored(&self, addr: u64, len: u64) -> Result<u64> {
        let end = check_range(addr, len, self.config().va_limit)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        {
            let state = self.lock().read().await;
            for v in state.vmas().overlapping(addr, end) {
                let Some(t) = v.region.tracker() else {
                    continue;
                };
                let (s, e) = (v.start.max(addr), v.end.min(end));
                let host = v.host_range(s, e).ptr() as usize;
                let Some((hs, r)) = t.lookup(host) else {
                    continue;
                };
                let Some(rs) = &r.restore else { continue };
                let first = r.src_index(hs, host);
                let pages = ((e - s) / PAGE) as usize;
                let mut i = 0;
                while i < pages {
                    if rs.data(first + i).is_none() {
                        i += 1;
                        continue;
                    }
                    let j = (i..pages)
                        .find(|&j| rs.data(first + j).is_none())
                        .unwrap_or(pages);
                    runs.push((s + i as u64 * PAGE, (j - i) as u64 * PAGE));
                    i = j;
                }
            }
        }
        let mut pages = 0;
        for (a, l) in runs {
            self.access(a, l, Access::Read, &mut |_, _, _| {}).await?;
            pages += l / PAGE;
        }
        Ok(pages)
    }

    /// Blocking [`snapshot_to_file`](Self::snapshot_to_file).
    pub fn snapshot_to_file_blocking(&self, path: impl AsRef<Path>) -> Result<SnapshotStats> {
        block_on(self.snapshot_to_file(path))
    }

    /// Blocking [`snapshot_diff_to_file`](Self::snapshot_diff_to_file).
    pub fn snapshot_diff_to_file_blocking(&self, path: impl AsRef<Path>) -> Result<SnapshotStats> {
        block_on(self.snapshot_diff_to_file(path))
    }

    /// Blocking [`restore`](Self::restore).
    pub fn restore_blocking(&self, snap: &Snapshot) -> Result<Vec<u64>> {
        block_on(self.restore(snap))
    }

    /// Blocking [`prefetch_restored`](Self::prefetch_restored).
    pub fn prefetch_restored_blocking(&self, addr: u64, len: u64) -> Result<u64> {
        block_on(self.prefetch_restored(addr, len))
    }
}
