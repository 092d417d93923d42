//! Snapshots of a guest's memory and their lazy restore (issue 15).
//!
//! [`MmUser::snapshot_to_file`] writes the present pages of every VMA of a paused
//! guest to a sparse file; [`Snapshot::open`] validates one (every bad
//! input gets its named [`SnapshotError`], before anything is mapped);
//! [`MmUser::restore`] maps its whole layout into another guest as tracked
//! regions (or [`Snapshot::map_options`] one VMA at a time), reading
//! nothing up front: the userfaultfd handler and the access path serve
//! each missing page from the file on first touch (`tracked/source.rs`).
//!
//! # Which pages are saved
//!
//! The kernel's view, not the library's counters: a page is saved when
//! `/proc/self/pagemap` says it is present or swapped in the VMA's host
//! range. A shared memfd VMA's pages that are in the memfd but not mapped
//! are not seen (and such a VMA cannot be restored lazily yet: it needs
//! the memfd MINOR-fault regions of issue 15 §3).
//!
//! # File format, version 1
//!
//! All integers little-endian. The file is sparse: only the present pages
//! of each VMA are written, each at its page offset inside the VMA's data
//! area, so that page `i` of VMA `k` is at `data_off[k] + i * 4096` and a
//! restore copies a run of pages with one `UFFDIO_COPY` straight from a
//! read-only mapping of the file. Absent pages are holes (never read: the
//! bitmap says they are zero).
//!
//! ```text
//! 0        header (64 bytes)
//!            0  magic        [u8; 8] = "GMMSNAP\0"
//!            8  version      u32 = 1
//!           12  page_size    u32 = 4096
//!           16  nr_vmas      u32
//!           20  flags        u32 = 0
//!           24  index_len    u64   bytes of the index, from offset 64
//!           32  data_start   u64   first data byte (2 MiB aligned)
//!           40  file_len     u64   the file's length as written
//!           48  checksum     u64   XXH3-64 of header (this field zeroed)
//!                                  and index
//!           56  reserved     u64 = 0
//! 64       index: nr_vmas records of 64 bytes, ascending guest address
//!            0  guest_start  u64
//!            8  len          u64   bytes, page aligned
//!           16  data_off     u64   file offset of the VMA's page 0
//!           24  present      u64   pages saved (the bitmap's popcount)
//!           32  bitmap_off   u64   file offset of the present bitmap
//!           40  fault_around u64   of a tracked region (else 2 MiB)
//!           48  prot u8 (1 read, 2 write, 4 exec), kind u8 (0 private
//!               anonymous, 1 shared memfd), flags u8 (1 tracked,
//!               2 hugepage, 4 pinned), 5 bytes 0
//!           56  reserved     u64 = 0
//!          then the bitmaps: ceil(len / 4096 / 64) u64 words per VMA,
//!          bit i of word i / 64 = page i saved
//! data_start  VMA 0's data area: len bytes, holes where not saved
//!          (each area starts 2 MiB aligned)
//! file_len
//! ```
//!
//! The data is written first, with one `pwrite` per run of present pages
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

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_lite::future::block_on;

use crate::error::{Access, Error, Result, SnapshotError};
use crate::mm::{check_range, MapKind, MapOptions, MmUser};
use crate::sys::{self, FileMapping, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::tracked::{SnapshotSource, DEFAULT_FAULT_AROUND};
use crate::vma::{Prot, VmFlags};

/// The first eight bytes of a snapshot file.
pub const MAGIC: [u8; 8] = *b"GMMSNAP\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: u64 = 64;
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

const FLAG_TRACKED: u8 = 1;
const FLAG_HUGEPAGE: u8 = 2;
const FLAG_PINNED: u8 = 4;

/// One VMA of a snapshot, as its index records it.
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
    /// Pages saved.
    pub present_pages: u64,
    /// File offset of the VMA's page 0.
    pub data_off: u64,
}

/// What [`MmUser::snapshot_to_file`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// VMAs recorded.
    pub vmas: usize,
    /// Pages saved (present or swapped by the kernel's pagemap).
    pub pages: u64,
    /// The file's (sparse) length.
    pub file_len: u64,
    /// `pwrite` calls of data (one per run of present pages).
    pub writes: u64,
}

/// An open, validated snapshot file: the restore source of one or more
/// guests. The file stays mapped read-only while this value or any region
/// restored from it lives.
#[derive(Debug)]
pub struct Snapshot {
    path: Arc<PathBuf>,
    vmas: Vec<SnapshotVma>,
    bitmaps: Vec<Box<[u64]>>,
    map: Arc<FileMapping>,
    file_len: u64,
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

fn checksum(header: &[u8], index: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&header[..48]);
    h.update(&[0u8; 8]);
    h.update(&header[56..64]);
    h.update(index);
    h.digest()
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

impl Snapshot {
    /// Opens and validates the snapshot at `path`: header, checksum, every
    /// index entry against the file's length. Reads only the header and
    /// index; maps the file read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Snapshot> {
        let path = path.as_ref().to_path_buf();
        let bad = |source| Error::Snapshot {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(Error::host("open(snapshot)"))?;
        let len = file
            .metadata()
            .map_err(Error::host("fstat(snapshot)"))?
            .len();
        if len < HEADER_LEN {
            return Err(bad(SnapshotError::Truncated {
                len,
                need: HEADER_LEN,
            }));
        }
        // One read for the header and, usually, the whole index (32 KiB of
        // bitmaps per GiB of guest): on a cold cache each read is a disk
        // round trip before the restore is usable.
        let mut head = vec![0u8; len.min(FIRST_READ) as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(Error::host("pread(snapshot)"))?;
        let mut header = [0u8; HEADER_LEN as usize];
        header.copy_from_slice(&head[..HEADER_LEN as usize]);
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&header[..8]);
        if magic != MAGIC {
            return Err(bad(SnapshotError::BadMagic { found: magic }));
        }
        let version = le32(&header, 8);
        if version != VERSION {
            return Err(bad(SnapshotError::BadVersion {
                found: version,
                supported: VERSION,
            }));
        }
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
                end: HEADER_LEN.saturating_add(index_len),
                limit: HEADER_LEN + MAX_INDEX,
            }));
        }
        let index_end = HEADER_LEN + index_len;
        if len < index_end || len < file_len {
            return Err(bad(SnapshotError::Truncated {
                len,
                need: index_end.max(file_len),
            }));
        }
        let mut index = vec![0u8; index_len as usize];
        let have = (head.len() - HEADER_LEN as usize).min(index.len());
        index[..have].copy_from_slice(&head[HEADER_LEN as usize..HEADER_LEN as usize + have]);
        if have < index.len() {
            file.read_exact_at(&mut index[have..], HEADER_LEN + have as u64)
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
        if nr * RECORD_LEN > index_len {
            return Err(bad(SnapshotError::IndexPastEnd {
                vma: 0,
                what: "records",
                end: HEADER_LEN + nr * RECORD_LEN,
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
        let mut bitmaps = Vec::with_capacity(nr as usize);
        let mut prev_end = 0u64;
        for k in 0..nr as usize {
            let r = &index[k * RECORD_LEN as usize..(k + 1) * RECORD_LEN as usize];
            let (start, vlen, data_off) = (le64(r, 0), le64(r, 8), le64(r, 16));
            let (present, bitmap_off, fault_around) = (le64(r, 24), le64(r, 32), le64(r, 40));
            let (prot, kind, flags) = (r[48], r[49], r[50]);
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
            if prot > 7 || kind > 1 || flags > 7 {
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
            let bm_end = bitmap_off.saturating_add(words * 8);
            if bitmap_off < HEADER_LEN + nr * RECORD_LEN || bm_end > index_end {
                return Err(bad(SnapshotError::IndexPastEnd {
                    vma: k,
                    what: "bitmap",
                    end: bm_end,
                    limit: index_end,
                }));
            }
            let at = (bitmap_off - HEADER_LEN) as usize;
            let mut bitmap: Box<[u64]> = (0..words as usize)
                .map(|w| le64(&index, at + w * 8))
                .collect();
            // Bits past the last page mean nothing: clear them.
            if pages % 64 != 0 {
                if let Some(last) = bitmap.last_mut() {
                    *last &= (1u64 << (pages % 64)) - 1;
                }
            }
            let counted: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
            if counted != present {
                return Err(layout("present-page count does not match its bitmap"));
            }
            vmas.push(SnapshotVma {
                start,
                len: vlen,
                prot: prot_from_bits(prot),
                kind: if kind == 1 {
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
            bitmaps.push(bitmap);
        }
        let map_len = usize::try_from(file_len.max(PAGE).next_multiple_of(PAGE)).map_err(|_| {
            Error::Overflow {
                addr: 0,
                len: file_len,
            }
        })?;
        let map = FileMapping::new(&file, map_len).map_err(Error::host("mmap(snapshot)"))?;
        Ok(Snapshot {
            path: Arc::new(path),
            vmas,
            bitmaps,
            map: Arc::new(map),
            file_len,
        })
    }

    /// The recorded VMAs, ascending.
    pub fn vmas(&self) -> &[SnapshotVma] {
        &self.vmas
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length as recorded (and checked) at open.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The source of VMA `k` (`None` past the last), for
    /// [`MapOptions::restore_from`].
    pub fn source(&self, k: usize) -> Option<SnapshotSource> {
        let v = self.vmas.get(k)?;
        SnapshotSource::new(
            self.path.clone(),
            self.map.clone(),
            usize::try_from(v.data_off).ok()?,
            usize::try_from(v.len / PAGE).ok()?,
            self.bitmaps[k].clone(),
        )
    }

    /// How to map VMA `k` restored lazily at its recorded address: a tracked
    /// private region with its protection, fault-around and pinning.
    pub fn map_options(&self, k: usize) -> Option<MapOptions> {
        let v = self.vmas.get(k)?;
        Some(
            MapOptions::anon(v.len)
                .at(v.start)
                .prot(v.prot)
                .pinned(v.pinned)
                .fault_around(v.fault_around)
                .restore_from(self.source(k)?),
        )
    }
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
    bitmap: Vec<u64>,
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

impl MmUser {
    /// Writes the memory of this (paused) guest to a new snapshot file at
    /// `path` (see the module docs for the format): every VMA's layout and
    /// the pages the kernel has present or swapped.
    ///
    /// Holds the mmap **write** lock throughout, so no zap, access or
    /// reaper changes the memory under it; the embedder must have stopped
    /// every thread that touches the guest's memory directly (vCPUs, JIT
    /// code): those take no lock, and a page they write during the call
    /// may be saved before or after the write. The data is written with
    /// one `pwrite` per run of present pages straight from guest memory,
    /// then the index; the file is not fsynced.
    pub async fn snapshot_to_file(&self, path: impl AsRef<Path>) -> Result<SnapshotStats> {
        let path = path.as_ref();
        let state = self.lock().write().await;
        let mut found = Vec::new();
        for v in state.vmas().iter() {
            let host = v.host_range(v.start, v.end);
            let bitmap = present_bitmap(host).map_err(Error::host("pread(pagemap)"))?;
            let present: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
            if present > 0 && !v.prot.contains(Prot::READ) {
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
                    present_pages: present,
                    data_off: 0,
                },
                host,
                bitmap,
            });
        }
        let overflow = || Error::Overflow { addr: 0, len: 0 };
        let nr = found.len() as u64;
        let bitmap_bytes: u64 = found.iter().map(|f| f.bitmap.len() as u64 * 8).sum();
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
            vmas: found.len(),
            pages: 0,
            file_len,
            writes: 0,
        };
        for f in &found {
            let pages = (f.rec.len / PAGE) as usize;
            let bit = |i: usize| f.bitmap[i / 64] & (1 << (i % 64)) != 0;
            let mut i = 0;
            while i < pages {
                if !bit(i) {
                    // Skip whole empty words at once.
                    i = if f.bitmap[i / 64] == 0 {
                        (i / 64 + 1) * 64
                    } else {
                        i + 1
                    };
                    continue;
                }
                let j = (i..pages).find(|&j| !bit(j)).unwrap_or(pages);
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
            index.extend_from_slice(&0u64.to_le_bytes());
            bitmap_off += f.bitmap.len() as u64 * 8;
        }
        for f in &found {
            for w in &f.bitmap {
                index.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        let nr32 = u32::try_from(nr).map_err(|_| overflow())?;
        header[16..20].copy_from_slice(&nr32.to_le_bytes());
        header[24..32].copy_from_slice(&index_len.to_le_bytes());
        header[32..40].copy_from_slice(&data_start.to_le_bytes());
        header[40..48].copy_from_slice(&file_len.to_le_bytes());
        let sum = checksum(&header, &index);
        header[48..56].copy_from_slice(&sum.to_le_bytes());
        let file = File::from(fd);
        file.write_all_at(&index, HEADER_LEN)
            .map_err(Error::host("pwrite(snapshot)"))?;
        file.write_all_at(&header, 0)
            .map_err(Error::host("pwrite(snapshot)"))?;
        Ok(stats)
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
                if v.kind == MapKind::SharedMemfd {
                    return Err(Error::Unsupported {
                        what:
                            "lazy restore of a shared memfd VMA (needs memfd MINOR-fault regions)",
                    });
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

    /// Blocking [`restore`](Self::restore).
    pub fn restore_blocking(&self, snap: &Snapshot) -> Result<Vec<u64>> {
        block_on(self.restore(snap))
    }

    /// Blocking [`prefetch_restored`](Self::prefetch_restored).
    pub fn prefetch_restored_blocking(&self, addr: u64, len: u64) -> Result<u64> {
        block_on(self.prefetch_restored(addr, len))
    }
}
