//! Where a tracked region's missing pages come from: the zero source (the
//! default), or a snapshot file (lazy restore, issue 15).
//!
//! A restored region's registry entry ([`super::Range`]) holds a
//! [`Restore`]: the snapshot's read-only file mapping(s) and where the
//! region's pages are in them (one segment for a single file; for a chain
//! of diff snapshots, a segment per file VMA that holds a newest copy of
//! some page, and each page's segment), the merged present-page bitmap
//! (a page a later diff marks absent is not present), and a
//! **served** bit per page, fresh for each mapping. Under the page's PTE
//! lock, whoever fills a missing page (the handler's fault-around, the
//! access path, a prefetch) asks [`Restore::data`]: a page present in the
//! snapshot and not yet served is copied from the file (`UFFDIO_COPY`
//! straight from the file mapping); any other page is filled from the zero
//! source. A COPY run never crosses a segment ([`Restore::run_end`]).
//! Every page that ends up filled, and every page a zap discards
//! (ours: `free_pages`; the embedder's: a foreign REMOVE), is marked served,
//! so a page zapped after its first fill refaults as zeros (the `DONTNEED`
//! semantics of the restored guest) and no page is ever served from the
//! file twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::sys::{FileMapping, PAGE_SIZE};

/// One region's slice of an open snapshot: what [`MapOptions`]'s `source`
/// restores from (built by `Snapshot::map_options`). Cheap to clone; each
/// mapping made with it gets its own served bits, so two mappings restored
/// from one source both read the snapshot's bytes.
///
/// The region's pages come from one or more **segments**: a segment is a
/// file mapping in which page `i` of the region sits at offset
/// `base + i * PAGE_SIZE`. A single snapshot file gives one segment (the
/// VMA's data area); a chain of diff snapshots gives one per (file, VMA of
/// that file) that holds the newest copy of some page, and a per-page
/// segment number.
///
/// [`MapOptions`]: crate::MapOptions
#[derive(Clone)]
pub struct SnapshotSource {
    inner: Arc<SourceInner>,
}

/// Where some of a region's pages are: page `i` at `map` offset
/// `base + i * PAGE_SIZE` (wrapping: a segment of an older file whose VMA
/// starts inside the region has a "negative" base; every page that uses
/// the segment is checked in bounds by [`SnapshotSource::new`]).
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// The file (for errors).
    pub(crate) path: Arc<PathBuf>,
    /// Its read-only mapping.
    pub(crate) map: Arc<FileMapping>,
    /// File offset of the region's page 0, wrapping.
    pub(crate) base: usize,
}

struct SourceInner {
    /// Never empty. Segment 0 alone when `owner` is `None`; of a chain,
    /// segment 0 is the newest file's.
    segments: Box<[Segment]>,
    /// Segment of each page that has data (`None`: segment 0 for all).
    owner: Option<Box<[u16]>>,
    pages: usize,
    /// Bit `i`: page `i` has data in the snapshot.
    present: Box<[u64]>,
}

impl SourceInner {
    fn segment(&self, i: usize) -> &Segment {
        let s = self.owner.as_ref().map_or(0, |o| usize::from(o[i]));
        &self.segments[s]
    }

    fn offset(&self, i: usize) -> usize {
        self.segment(i).base.wrapping_add(i * PAGE_SIZE)
    }
}

impl std::fmt::Debug for SnapshotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSource")
            .field("path", &self.path())
            .field("segments", &self.inner.segments.len())
            .field("pages", &self.inner.pages)
            .finish()
    }
}

fn bit(words: &[u64], i: usize) -> bool {
    words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

impl SnapshotSource {
    /// A region of `pages` pages whose page `i`, when bit `i` of `present`
    /// is set, is in segment `owner[i]` (segment 0 for all when `owner` is
    /// `None`). `None` unless every such page lies inside its segment's
    /// mapping, page aligned, and `present` (and `owner`) have an entry per
    /// page (the opener validated all that; checked again here because a
    /// COPY source outside the mapping would read our own memory).
    pub(crate) fn new(
        segments: Vec<Segment>,
        owner: Option<Box<[u16]>>,
        pages: usize,
        present: Box<[u64]>,
    ) -> Option<SnapshotSource> {
        if segments.is_empty()
            || present.len() != pages.div_ceil(64)
            || owner.as_ref().is_some_and(|o| o.len() != pages)
            || segments.iter().any(|s| s.base % PAGE_SIZE != 0)
        {
            return None;
        }
        pages.checked_mul(PAGE_SIZE)?;
        let inner = SourceInner {
            segments: segments.into_boxed_slice(),
            owner,
            pages,
            present,
        };
        if inner.owner.is_none() {
            // One segment: its whole range must fit (the fast path).
            let s = &inner.segments[0];
            let end = s.base.checked_add(pages * PAGE_SIZE)?;
            if end > s.map.len() {
                return None;
            }
        } else {
            for i in (0..pages).filter(|&i| bit(&inner.present, i)) {
                let s = inner.owner.as_ref()?[i];
                let seg = inner.segments.get(usize::from(s))?;
                let off = inner.offset(i);
                if off.checked_add(PAGE_SIZE)? > seg.map.len() {
                    return None;
                }
            }
        }
        Some(SnapshotSource {
            inner: Arc::new(inner),
        })
    }

    /// Length in bytes of the region this source restores.
    pub fn len(&self) -> u64 {
        (self.inner.pages * PAGE_SIZE) as u64
    }

    /// Never true: a source covers at least one page.
    pub fn is_empty(&self) -> bool {
        self.inner.pages == 0
    }

    /// Pages the snapshot holds data for.
    pub fn present_pages(&self) -> u64 {
        self.inner
            .present
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The snapshot file (the newest of a chain: its segment is first).
    pub fn path(&self) -> &Path {
        &self.inner.segments[0].path
    }

    /// A restore of this source for one new mapping (fresh served bits).
    pub(crate) fn restore(&self) -> Arc<Restore> {
        let words = self.inner.pages.div_ceil(64);
        Arc::new(Restore {
            src: self.inner.clone(),
            served: (0..words).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(usize::MAX),
        })
    }
}

/// One mapping's lazy restore: the source and its served bits.
pub(crate) struct Restore {
    src: Arc<SourceInner>,
    /// Bit `i`: page `i` was filled (or discarded) once; from now on it is
    /// an ordinary anonymous page (zeros after a zap). Set under the page's
    /// PTE lock (or, without it, by `resolve_busy` after its COPY won: a
    /// second COPY of the page fails with `EEXIST`, so it is copied once).
    served: Box<[AtomicU64]>,
    /// Where the last run copied from the file ended (read-ahead
    /// heuristic of `release`).
    next: AtomicUsize,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("segments", &self.src.segments.len())
            .field("pages", &self.src.pages)
            .finish()
    }
}

impl Restore {
    /// The snapshot file that holds page `i` (for errors).
    pub(crate) fn path(&self, i: usize) -> &Path {
        if i < self.src.pages {
            &self.src.segment(i).path
        } else {
            &self.src.segments[0].path
        }
    }

    fn served(&self, i: usize) -> bool {
        // Relaxed: written and read under the page's PTE lock, whose
        // Acquire/Release orders them (`resolve_busy`'s lock-free fill is
        // guarded by the COPY's EEXIST instead).
        self.served
            .get(i / 64)
            .is_none_or(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }

    /// Where page `i` must be copied from: `Some(file address)` when the
    /// snapshot has data for it and it was never served; `None` for the
    /// zero source. Out-of-range pages get `None`.
    pub(crate) fn data(&self, i: usize) -> Option<*const u8> {
        if i >= self.src.pages || !bit(&self.src.present, i) || self.served(i) {
            return None;
        }
        Some(self.src.segment(i).map.at(self.src.offset(i)))
    }

    /// The end (at most `j`) of the run of pages from `i` that one COPY
    /// can fill: all from the zero source, or all file pages contiguous in
    /// one segment. Page `i`'s source is [`data`](Self::data)`(i)`.
    pub(crate) fn run_end(&self, i: usize, j: usize) -> usize {
        let first = self.data(i);
        let seg = |k: usize| {
            self.src
                .owner
                .as_ref()
                .map_or(0, |o| o.get(k).copied().unwrap_or(0))
        };
        (i + 1..j)
            .find(|&k| {
                let d = self.data(k);
                d.is_some() != first.is_some() || (first.is_some() && seg(k) != seg(i))
            })
            .unwrap_or(j)
    }

    /// Marks pages `[i, j)` served (filled, or discarded by a zap).
    pub(crate) fn mark_served(&self, i: usize, j: usize) {
        let j = j.min(self.src.pages);
        let mut k = i;
        while k < j {
            let w = k / 64;
            let hi = ((w + 1) * 64).min(j);
            let mask = if hi - k == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - k)) - 1) << (k % 64)
            };
            // Relaxed: see `served`.
            self.served[w].fetch_or(mask, Ordering::Relaxed);
            k = hi;
        }
    }

    /// Drops the file pages of `[i, j)` from our process's page tables after
    /// a COPY from them (which faulted them in: they stay in the page
    /// cache), so the process does not map the snapshot twice over (its
    /// file RSS would grow by every page served). Best effort.
    pub(crate) fn release(&self, i: usize, j: usize) {
        let j = j.min(self.src.pages);
        if i >= j {
            return;
        }
        let src = &self.src;
        let in_file = |k: usize| bit(&src.present, k);
        let seg = |k: usize| src.owner.as_ref().map_or(0, |o| o[k]);
        // Only pages the snapshot holds have a place in a file; in a chain
        // they may sit in several segments: one madvise per piece.
        let mut a = i;
        while a < j {
            if !in_file(a) {
                a += 1;
                continue;
            }
            let b = (a + 1..j)
                .find(|&k| !in_file(k) || seg(k) != seg(a))
                .unwrap_or(j);
            let map = &src.segment(a).map;
            let _ = map.unmap_pages(src.offset(a), (b - a) * PAGE_SIZE);
            a = b;
        }
        // Sequential filling (this run starts where the last one ended):
        // start reading the next READ_AHEAD pages now, so that on a cold
        // cache the disk works while the next windows are copied (the
        // COPY's own fault reads synchronously). Relaxed: a heuristic.
        // Single-segment sources only (a chain's next pages are scattered
        // over its files).
        if src.owner.is_none() && self.next.swap(j, Ordering::Relaxed) == i && j < src.pages {
            let end = (j + READ_AHEAD).min(src.pages);
            let s = &src.segments[0];
            let _ = s
                .map
                .will_need(s.base + j * PAGE_SIZE, (end - j) * PAGE_SIZE);
        }
    }
}

/// Pages a sequential restore asks the kernel to read ahead (8 MiB).
const READ_AHEAD: usize = 2048;
