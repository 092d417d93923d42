//! Where a tracked region's missing pages come from: the zero source (the
//! default), or a snapshot file (lazy restore, issue 15).
//!
//! A restored region's registry entry ([`super::Range`]) holds a
//! [`Restore`]: the snapshot's read-only file mapping, the file offset of
//! the region's first page, the snapshot's present-page bitmap, and a
//! **served** bit per page, fresh for each mapping. Under the page's PTE
//! lock, whoever fills a missing page (the handler's fault-around, the
//! access path, a prefetch) asks [`Restore::data`]: a page present in the
//! snapshot and not yet served is copied from the file (`UFFDIO_COPY`
//! straight from the file mapping); any other page is filled from the zero
//! source. Every page that ends up filled, and every page a zap discards
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
/// [`MapOptions`]: crate::MapOptions
#[derive(Clone)]
pub struct SnapshotSource {
    inner: Arc<SourceInner>,
}

struct SourceInner {
    path: Arc<PathBuf>,
    map: Arc<FileMapping>,
    /// File offset of the region's first page.
    data_off: usize,
    pages: usize,
    /// Bit `i`: page `i` has data in the file.
    present: Box<[u64]>,
}

impl std::fmt::Debug for SnapshotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSource")
            .field("path", &self.inner.path)
            .field("data_off", &self.inner.data_off)
            .field("pages", &self.inner.pages)
            .finish()
    }
}

impl SnapshotSource {
    /// A region of `pages` pages whose page `i` is at file offset
    /// `data_off + i * PAGE_SIZE` when bit `i` of `present` is set.
    /// `None` unless the data range lies inside `map` and `present` has a
    /// bit per page (the opener validated both; checked again here because
    /// a COPY source outside the mapping would read our own memory).
    pub(crate) fn new(
        path: Arc<PathBuf>,
        map: Arc<FileMapping>,
        data_off: usize,
        pages: usize,
        present: Box<[u64]>,
    ) -> Option<SnapshotSource> {
        let end = pages.checked_mul(PAGE_SIZE)?.checked_add(data_off)?;
        if end > map.len() || data_off % PAGE_SIZE != 0 || present.len() != pages.div_ceil(64) {
            return None;
        }
        Some(SnapshotSource {
            inner: Arc::new(SourceInner {
                path,
                map,
                data_off,
                pages,
                present,
            }),
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

    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.inner.path
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
            .field("path", &self.src.path)
            .field("pages", &self.src.pages)
            .finish()
    }
}

impl Restore {
    /// The snapshot file (for errors).
    pub(crate) fn path(&self) -> &Path {
        &self.src.path
    }

    fn bit(words: &[u64], i: usize) -> bool {
        words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
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
        if i >= self.src.pages || !Self::bit(&self.src.present, i) || self.served(i) {
            return None;
        }
        Some(self.src.map.at(self.src.data_off + i * PAGE_SIZE))
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
        let map = &self.src.map;
        let _ = map.unmap_pages(self.src.data_off + i * PAGE_SIZE, (j - i) * PAGE_SIZE);
        // Sequential filling (this run starts where the last one ended):
        // start reading the next READ_AHEAD pages now, so that on a cold
        // cache the disk works while the next windows are copied (the
        // COPY's own fault reads synchronously). Relaxed: a heuristic.
        if self.next.swap(j, Ordering::Relaxed) == i && j < self.src.pages {
            let end = (j + READ_AHEAD).min(self.src.pages);
            let _ = map.will_need(self.src.data_off + j * PAGE_SIZE, (end - j) * PAGE_SIZE);
        }
    }
}

/// Pages a sequential restore asks the kernel to read ahead (8 MiB).
const READ_AHEAD: usize = 2048;
