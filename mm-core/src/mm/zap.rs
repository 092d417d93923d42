//! The zap (`unmap_page_range`): clear PTEs, free host pages, uncharge.
//!
//! One zap walks its range one leaf (2 MiB) at a time, in named steps:
//! [`Zap::walk`] (leaves and leafless runs in address order),
//! [`Zap::zap_leaf`] (one leaf under all of its PTE locks),
//! [`Zap::flush_leafless`] (a run with no leaf, looked at again after the
//! discard) and [`Zap::finish`] (wake WP waiters, uncharge what was freed).

use std::sync::Arc;

use super::*;
use crate::error::{Error, Result};
use crate::pgtable::{pte_lock, pte_unlock, Leaf, Pte, PAGES_PER_LEAF};
use crate::sched;
use crate::sys::{self, PAGE_SIZE};
use crate::vma::{VmFlags, Vma};

const PAGE: u64 = PAGE_SIZE as u64;

impl Mm {
    /// Zaps `[start, end)` of `vma` (`unmap_page_range`): clears the PTEs,
    /// frees the host pages and uncharges them. Returns the pages uncharged.
    ///
    /// Needs the mmap lock in either mode: `state` is the proof, and must be
    /// this mm's ([`Error::ForeignLock`] otherwise). The range is looked up
    /// in `state`: it must lie inside the VMA of `state` that `vma`
    /// describes ([`Error::InvalidArgument`] otherwise). Pages are
    /// zapped one leaf (2 MiB) at a time with every PTE of that leaf locked
    /// in ascending order, so an accessor is never in the middle of copying a
    /// page whose host memory goes (it holds the page lock), and one that
    /// comes after sees the PTE empty and, after `UNSTABLE`, fails. Host
    /// ranges with no leaf were never populated through the API but may have
    /// been touched directly by the embedder: they are discarded too, in one
    /// call per run.
    pub fn zap_range(
        &self,
        state: &MmState,
        vma: &Vma,
        start: u64,
        end: u64,
        reason: ZapReason,
    ) -> Result<u64> {
        self.check_state(state)?;
        let found = state
            .vmas
            .find(start)
            .filter(|v| {
                start < end
                    && end <= v.end
                    && v.start == vma.start
                    && v.end == vma.end
                    && Arc::ptr_eq(&v.region, &vma.region)
            })
            .ok_or(Error::InvalidArgument {
                what: "zap_range: the range is not inside this VMA of the locked mm",
            })?;
        self.zap_vma(found, start, end, reason)
    }

    /// The zap of [`zap_range`](Self::zap_range) once the VMA is known: the
    /// caller holds the mmap lock and `vma` is either in the tree it guards
    /// or was just taken out of it under the write lock (`munmap`).
    pub(super) fn zap_vma(
        &self,
        vma: &Vma,
        start: u64,
        end: u64,
        reason: ZapReason,
    ) -> Result<u64> {
        // I-EX-4: no zap after free_pgtables (the reaper vs teardown race
        // the write lock in exit_mmap step 8 closes).
        sched::check(
            !self.pgtable.is_freed(),
            "I-EX-4: page table zapped after free_pgtables",
        );
        debug_assert!(vma.start <= start && end <= vma.end && start < end);
        if vma.flags.contains(VmFlags::LOCKED) {
            // madvise(DONTNEED) refuses mlocked host memory; the guest flag
            // stays (it only changes under the write lock), only the host's
            // pin on these pages goes. Since 5.18 the reaper reaps VM_LOCKED.
            sys::lock(vma.host_range(start, end), false).map_err(Error::host("munlock"))?;
        }
        let mut zap = Zap {
            mm: self,
            vma,
            reason,
            olds: Vec::with_capacity(PAGES_PER_LEAF as usize),
            freed: 0,
            wp_cleared: false,
        };
        // Whatever fails, what was zapped so far is uncharged by `finish`
        // (every leaf already cleared, not only the last one).
        let res = zap.walk(start / PAGE, end / PAGE);
        zap.finish(res, start, end)
    }

    /// `madvise(DONTNEED)` of guest `[start, end)` of a shared VMA: this
    /// mapping's host PTEs go, the pages stay in the memfd, `PRESENT` and
    /// charged (the next touch of a tracked one is a `MINOR` fault,
    /// `tracked/` step 10). In a tracked region the discard is announced
    /// as our own zap and runs under the PTE locks of each leaf, as a zap
    /// does (step 6): an accessor between its fill of a page and its copy
    /// holds that page's lock, so its pages are never unmapped under it
    /// (its copy would fault on a page it holds locked but not yet
    /// `PRESENT`, which the handler only serves after `BUSY_TIMEOUT`).
    /// A leafless run gets its leaf (as a fault would): a discard without
    /// the locks could race an accessor that allocates the leaf, fills
    /// and copies meanwhile.
    pub(super) fn discard_shared(&self, vma: &Vma, start: u64, end: u64) -> Result<()> {
        let tracker = vma.region.tracker();
        let discard = |s: u64, e: u64| -> Result<()> {
            let r = vma.host_range(s, e);
            let f = || sys::discard(r).map_err(Error::host("madvise(DONTNEED)"));
            match tracker {
                Some(t) => {
                    let a = r.ptr() as usize;
                    t.self_zap(a, a + r.len(), f)
                }
                None => f(),
            }
        };
        if tracker.is_none() {
            return discard(start, end);
        }
        let guard = crossbeam_epoch::pin();
        let (mut gpn, last) = (start / PAGE, end / PAGE);
        while gpn < last {
            let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(last);
            let leaf = self.pgtable.leaf_alloc(gpn, &guard);
            let olds: Vec<u64> = (gpn..stop).map(|p| pte_lock(leaf.pte(p))).collect();
            let res = discard(gpn * PAGE, stop * PAGE);
            for (i, p) in (gpn..stop).enumerate() {
                pte_unlock(leaf.pte(p), olds[i]);
            }
            res?;
            gpn = stop;
        }
        Ok(())
    }

    /// Maps anonymous memory back over every run of `FILEMAP` pages among
    /// `olds` (the locked PTE words of the pages from `first_gpn`), and
    /// registers the runs with the tracker again in a tracked region.
    fn restore_anon_runs(&self, vma: &Vma, first_gpn: u64, olds: &[u64]) -> Result<()> {
        let is_file = |o: u64| o & Pte::FILEMAP != 0;
        let mut i = 0;
        while i < olds.len() {
            if !is_file(olds[i]) {
                i += 1;
                continue;
            }
            let j = (i..olds.len())
                .find(|&j| !is_file(olds[j]))
                .unwrap_or(olds.len());
            let (s, e) = ((first_gpn + i as u64) * PAGE, (first_gpn + j as u64) * PAGE);
            vma.restore_anon(s, e)?;
            i = j;
        }
        Ok(())
    }
}

/// One zap in progress: the VMA, why, and what was freed so far.
struct Zap<'a> {
    mm: &'a Mm,
    vma: &'a Vma,
    reason: ZapReason,
    /// The locked PTE words of the leaf being zapped.
    olds: Vec<u64>,
    /// Present pages cleared (to uncharge).
    freed: u64,
    /// Some cleared page was write-protected (`Pte::WP`).
    wp_cleared: bool,
}

impl Zap<'_> {
    /// Walks `[first, last)` (guest page numbers) in address order: a leaf
    /// is zapped under its locks, a run of leafless pages is discarded when
    /// the next leaf (or the end) is reached.
    fn walk(&mut self, first: u64, last: u64) -> Result<()> {
        let guard = crossbeam_epoch::pin();
        let mut pending: Option<u64> = None; // start gpn of a leafless run
        let mut gpn = first;
        while gpn < last {
            let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(last);
            match self.mm.pgtable.leaf(gpn, &guard) {
                None => {
                    pending.get_or_insert(gpn);
                }
                Some(leaf) => {
                    if let Some(p) = pending.take() {
                        self.flush_leafless(p, gpn, &guard)?;
                    }
                    self.zap_leaf(leaf, gpn, stop)?;
                }
            }
            gpn = stop;
        }
        if let Some(p) = pending.take() {
            self.flush_leafless(p, last, &guard)?;
        }
        Ok(())
    }

    /// Frees the host pages of guest `[s, e)`. A failed free does not fail
    /// the zap of `exit_mmap` or `munmap` (fault injection's
    /// `kill_anywhere` exercises it): their VMA is already out of every
    /// guest's reach, and failing would drop it with its pages still
    /// charged (I-RC-3: the budget never back to 0). For those two the
    /// pages count as freed anyway: the host mapping under them is
    /// unmapped when its region goes (exit_mmap step 10; munmap once the
    /// last VMA slicing the region is gone), which frees them.
    ///
    /// At exit, an untracked mergeable region is not discarded page range
    /// by page range but mapped over with fresh anonymous memory, one
    /// `mmap(MAP_FIXED)` per leaf: it frees the same pages, and the
    /// thousands of host VMAs KSM's merges split it into (one per merged
    /// run on scattered data) collapse into one in the same kernel walk,
    /// instead of one walk for the discard and another for the unmap at
    /// step 10 (teardown of merged guests, issue 12). Its write-protect
    /// registration goes with the old VMAs (quiet descriptor: no message).
    fn free_host(&self, s: u64, e: u64) -> Result<()> {
        let res = if self.reason == ZapReason::Exit && self.vma.replace_at_exit() {
            self.vma.replace_host(s, e)
        } else {
            self.vma.free_host(s, e)
        };
        match (res, self.reason) {
            (Err(err), ZapReason::Exit | ZapReason::Munmap) => {
                tracing::warn!(target: "mm_core::zap", mm_id = self.mm.id, reason = ?self.reason, error = %err,
                    "host free failed; pages freed with the mapping");
                Ok(())
            }
            (res, _) => res,
        }
    }

    /// One leaf's pages `[gpn, stop)`, under all of its PTE locks (taken in
    /// ascending order, released before returning).
    fn zap_leaf(&mut self, leaf: &Leaf, gpn: u64, stop: u64) -> Result<()> {
        self.olds.clear();
        for p in gpn..stop {
            self.olds.push(pte_lock(leaf.pte(p)));
        }
        let mut res = self.free_host(gpn * PAGE, stop * PAGE);
        if res.is_ok() && matches!(self.reason, ZapReason::DontNeed | ZapReason::Reap) {
            // Merged pages (KSM): the host range is a private
            // mapping of the KSM memfd, where DONTNEED only drops
            // a private copy and a later touch would read the
            // stable page, not zeros. Put anonymous memory back
            // (munmap and exit_mmap leave the range dead anyway).
            res = self.mm.restore_anon_runs(self.vma, gpn, &self.olds);
        }
        for (i, p) in (gpn..stop).enumerate() {
            let old = self.olds[i];
            if res.is_ok() {
                if Pte(old).present() {
                    self.freed += 1;
                }
                self.wp_cleared |= old & Pte::WP != 0;
                // Present, KSM, FILEMAP, KSM_ZERO, WP: all gone.
                pte_unlock(leaf.pte(p), 0);
            } else {
                pte_unlock(leaf.pte(p), old);
            }
        }
        res
    }

    /// A leafless run `[p, q)` is discarded without page locks. A leaf may
    /// appear under it meanwhile (the access path, or the KSM scanner's
    /// snapshot of an untracked region, both under the read lock too):
    /// look again after the discard and zap any such leaf under its locks,
    /// so nothing populated or merged there survives the zap.
    ///
    /// ```text
    ///   zap (DONTNEED)               | ksmd (untracked region)
    ///   leaf? none                   |
    ///                                | leaf_alloc, lock, merge: the
    ///                                |   range maps the stable page
    ///   DONTNEED: drops nothing      |
    ///   leaf? yes: lock, restore anon|
    /// ```
    ///
    /// Without the second look the guest would read the merged contents
    /// back after its DONTNEED instead of zeros.
    fn flush_leafless(&mut self, p: u64, q: u64, guard: &crossbeam_epoch::Guard) -> Result<()> {
        self.free_host(p * PAGE, q * PAGE)?;
        let mut g = p;
        while g < q {
            let stop = ((g / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(q);
            if let Some(leaf) = self.mm.pgtable.leaf(g, guard) {
                self.zap_leaf(leaf, g, stop)?;
            }
            g = stop;
        }
        Ok(())
    }

    /// After the walk, whatever it returned: wake API writers waiting for
    /// an unprotect of cleared pages, and uncharge every page freed.
    fn finish(self, res: Result<()>, start: u64, end: u64) -> Result<u64> {
        if self.wp_cleared {
            // API writers waiting for these pages' unprotect (step 7 of
            // tracked/): the pages are gone, so is the protection.
            if let Some(t) = self.vma.region.tracker() {
                t.wp_changed();
            }
        }
        if self.vma.is_shared() {
            self.mm.uncharge_pages(0, self.freed);
        } else {
            self.mm.uncharge_pages(self.freed, 0);
        }
        res?;
        let (mm_id, reason, pages) = (self.mm.id, self.reason, self.freed);
        tracing::trace!(target: "mm_core::zap", mm_id, ?reason, start, end, pages);
        Ok(pages)
    }
}

impl Vma {
    /// Frees the host pages under guest `[start, end)` of this VMA.
    /// Is this VMA's host memory mapped over at exit rather than
    /// discarded (`Zap::free_host`)? An untracked anonymous region
    /// registered for KSM's write-protect: its registration sends no
    /// message on the way out (the quiet descriptor; or the shared one,
    /// whose ranges exit_mmap unregistered before the zap).
    fn replace_at_exit(&self) -> bool {
        self.region.is_anon() && self.region.tracker().is_none() && self.region.ksm_wp().is_some()
    }

    /// Maps fresh anonymous memory over guest `[start, end)` (exit only:
    /// the pages are freed and the range reads zeros until the region is
    /// unmapped).
    fn replace_host(&self, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        if crate::sched::fail("fail:madvise(DONTNEED)") {
            return Err(Error::Host {
                op: "mmap(MAP_FIXED anon) at exit",
                source: std::io::Error::other("injected failure"),
            });
        }
        sys::map_anon_fixed(self.host_range(start, end), self.prot.bits())
            .map_err(Error::host("mmap(MAP_FIXED anon) at exit"))
    }

    pub(crate) fn free_host(&self, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let off = self.region_off + (start - self.start) as usize;
        self.region.free_pages(off, (end - start) as usize)
    }
}
