//! The zap (`unmap_page_range`): clear PTEs, free host pages, uncharge.

use super::*;
use crate::error::{Error, Result};
use crate::pgtable::{pte_lock, pte_unlock, Pte, PAGES_PER_LEAF};
use crate::sched;
use crate::sys::{self, PAGE_SIZE};
use crate::vma::{VmFlags, Vma};

const PAGE: u64 = PAGE_SIZE as u64;

impl Mm {
    /// Zaps `[start, end)` of `vma` (`unmap_page_range`): clears the PTEs,
    /// frees the host pages and uncharges them. Returns the pages uncharged.
    ///
    /// Needs the mmap lock in either mode (`state` is the proof). Pages are
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
        // I-EX-4: no zap after free_pgtables (the reaper vs teardown race
        // the write lock in exit_mmap step 8 closes).
        sched::check(
            !self.pgtable.is_freed(),
            "I-EX-4: page table zapped after free_pgtables",
        );
        let _ = state;
        debug_assert!(vma.start <= start && end <= vma.end && start < end);
        if vma.flags.contains(VmFlags::LOCKED) {
            // madvise(DONTNEED) refuses mlocked host memory; the guest flag
            // stays (it only changes under the write lock), only the host's
            // pin on these pages goes. Since 5.18 the reaper reaps VM_LOCKED.
            sys::lock(vma.host_range(start, end), false).map_err(Error::host("munlock"))?;
        }
        let shared = vma.is_shared();
        let guard = crossbeam_epoch::pin();
        let (first, last) = (start / PAGE, end / PAGE);
        let mut freed = 0u64;
        let mut pending: Option<u64> = None; // start gpn of a leafless run
        let mut gpn = first;
        let mut olds = Vec::with_capacity(PAGES_PER_LEAF as usize);
        let mut wp_cleared = false;
        // Found by Nth-failure injection (kill_anywhere): a failed host free
        // used to abort the zap, and exit_mmap / munmap, whose VMA is
        // already out of every guest's reach, then dropped the VMA with its
        // pages still charged (I-RC-3: budget never back to 0). For those
        // two the pages count as freed anyway: the host mapping under them
        // is unmapped when its region goes (exit_mmap step 10; munmap once
        // the last VMA slicing the region is gone), which frees them.
        let free_host = |s: u64, e: u64| match (vma.free_host(s, e), reason) {
            (Err(err), ZapReason::Exit | ZapReason::Munmap) => {
                tracing::warn!(target: "mm_core::zap", mm_id = self.id, ?reason, error = %err,
                    "host free failed; pages freed with the mapping");
                Ok(())
            }
            (res, _) => res,
        };
        // One leaf's pages, under all of its PTE locks.
        let mut zap_leaf = |leaf: &crate::pgtable::Leaf, gpn: u64, stop: u64| -> Result<()> {
            olds.clear();
            for p in gpn..stop {
                olds.push(pte_lock(leaf.pte(p)));
            }
            let mut res = free_host(gpn * PAGE, stop * PAGE);
            if res.is_ok() && matches!(reason, ZapReason::DontNeed | ZapReason::Reap) {
                // Merged pages (KSM): the host range is a private
                // mapping of the KSM memfd, where DONTNEED only drops
                // a private copy and a later touch would read the
                // stable page, not zeros. Put anonymous memory back
                // (munmap and exit_mmap leave the range dead anyway).
                res = self.restore_anon_runs(vma, gpn, &olds);
            }
            for (i, p) in (gpn..stop).enumerate() {
                let old = olds[i];
                if res.is_ok() {
                    if Pte(old).present() {
                        freed += 1;
                    }
                    wp_cleared |= old & Pte::WP != 0;
                    // Present, KSM, FILEMAP, KSM_ZERO, WP: all gone.
                    pte_unlock(leaf.pte(p), 0);
                } else {
                    pte_unlock(leaf.pte(p), old);
                }
            }
            res
        };
        // A leafless run is discarded without page locks. A leaf may appear
        // under it meanwhile (the access path, or the KSM scanner's
        // snapshot of an untracked region, both under the read lock too):
        // look again after the discard and zap any such leaf under its
        // locks, so nothing populated or merged there survives the zap.
        //
        //   zap (DONTNEED)               | ksmd (untracked region)
        //   leaf? none                   |
        //                                | leaf_alloc, lock, merge: the
        //                                |   range maps the stable page
        //   DONTNEED: drops nothing      |
        //   leaf? yes: lock, restore anon|
        //
        // Without the second look the guest would read the merged contents
        // back after its DONTNEED instead of zeros.
        let flush = |p: u64,
                     q: u64,
                     zap_leaf: &mut dyn FnMut(&crate::pgtable::Leaf, u64, u64) -> Result<()>|
         -> Result<()> {
            free_host(p * PAGE, q * PAGE)?;
            let mut g = p;
            while g < q {
                let stop = ((g / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(q);
                if let Some(leaf) = self.pgtable.leaf(g, &guard) {
                    zap_leaf(leaf, g, stop)?;
                }
                g = stop;
            }
            Ok(())
        };
        // Whatever fails, what was zapped so far is uncharged below (a
        // multi-leaf zap used to return before uncharging earlier leaves).
        let res = (|| -> Result<()> {
            while gpn < last {
                let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(last);
                match self.pgtable.leaf(gpn, &guard) {
                    None => {
                        pending.get_or_insert(gpn);
                    }
                    Some(leaf) => {
                        if let Some(p) = pending.take() {
                            flush(p, gpn, &mut zap_leaf)?;
                        }
                        zap_leaf(leaf, gpn, stop)?;
                    }
                }
                gpn = stop;
            }
            if let Some(p) = pending.take() {
                flush(p, last, &mut zap_leaf)?;
            }
            Ok(())
        })();
        if wp_cleared {
            // API writers waiting for these pages' unprotect (step 7 of
            // tracked.rs): the pages are gone, so is the protection.
            if let Some(t) = vma.region.tracker() {
                t.wp_changed();
            }
        }
        if shared {
            self.uncharge_pages(0, freed);
        } else {
            self.uncharge_pages(freed, 0);
        }
        res?;
        tracing::trace!(target: "mm_core::zap", mm_id = self.id, ?reason, start, end, pages = freed);
        Ok(freed)
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
            crate::merge::restore_anon(vma, s, e)?;
            i = j;
        }
        Ok(())
    }
}

impl Vma {
    /// Frees the host pages under guest `[start, end)` of this VMA.
    pub(crate) fn free_host(&self, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let off = self.region_off + (start - self.start) as usize;
        self.region.free_pages(off, (end - start) as usize)
    }
}
