//! Steps 1-5 of a merge (see the module docs of [`crate::ksm`]), the
//! scanner's snapshot, and the zero-page discard. Each is reached through
//! [`KsmMm`], which checked the lock proof.

use std::sync::atomic::Ordering;

use super::*;
use crate::pgtable::{Pte, PAGES_PER_LEAF};
use crate::sys::{self, pagemap, HostRange, PAGE_SIZE};
use crate::tracked::Tracker;
use crate::vma::VmFlags;

const PAGE: u64 = PAGE_SIZE as u64;

impl Mm {
    /// The scanner's look at `want.len()` pages from `addr` (one VMA, one
    /// leaf; the mmap lock held, `state` is the proof). For each page, under
    /// its PTE lock: a private page asked for in `want` is copied to its
    /// slot of `buf`; a merged page whose sharing a direct write broke
    /// (pagemap: anonymous again) is turned into a private page first
    /// (charged in a tracked region, as the handler would have; uncharged
    /// in an untracked one, like any page touched through the host
    /// pointer). In an untracked region a page the embedder touched
    /// directly (pagemap: present, anonymous, exclusive; the PTE says
    /// nothing) is a private, uncharged page. `out[i]` says what page `i`
    /// is now.
    pub(super) fn ksm_snapshot(
        &self,
        state: &MmState,
        addr: u64,
        want: &[bool],
        buf: &mut [u8],
        out: &mut [KsmPage],
    ) -> Result<()> {
        self.check_ksm_before_exit();
        let n = want.len();
        let Some(end) = snapshot_range(addr, n, buf.len(), out.len())? else {
            return Ok(());
        };
        let vma = state
            .vmas()
            .find(addr)
            .filter(|v| end <= v.end)
            .ok_or(Error::Unmapped { addr })?;
        let guard = crossbeam_epoch::pin();
        let first = addr / PAGE;
        let untracked = !vma.flags.contains(VmFlags::TRACKED);
        let Some((leaf, pm)) = self.snapshot_leaf(vma, addr, end, &guard)? else {
            out[..n].fill(KsmPage::Absent);
            return Ok(());
        };
        for i in 0..n {
            let pte = leaf.pte(first + i as u64);
            let o = Pte(pte_lock(pte));
            let e = pm.get(i).copied().unwrap_or(0);
            let (new, page) = self.snapshot_page(o, e, untracked);
            if page == KsmPage::Private && want[i] {
                let at = addr + i as u64 * PAGE;
                let host = vma.host_range(at, at + PAGE).ptr();
                // SAFETY: the page is inside a VMA of this mm and we hold
                // the mmap lock (no munmap can unmap it) and its page lock
                // (no zap of ours, no API populate); `host` is page aligned
                // and the slot is one page inside `buf` (asserted above).
                // A vCPU or the embedder may write (or discard) the page
                // during the copy: `copy_from_host_racy` reads it word by
                // word with volatile loads, and the bytes are only a hint
                // for the checksum; the merge compares again inside its
                // write-protect window (step 3).
                unsafe {
                    sys::copy_from_host_racy(host, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                };
            }
            pte_unlock(pte, new);
            out[i] = page;
        }
        Ok(())
    }

    /// The leaf of a snapshot's run `[addr, end)` and the pagemap entries
    /// of its pages (empty when not needed); `None` when the run has no
    /// leaf and needs none (every page absent).
    fn snapshot_leaf<'g>(
        &'g self,
        vma: &Vma,
        addr: u64,
        end: u64,
        guard: &'g crossbeam_epoch::Guard,
    ) -> Result<Option<(&'g Leaf, Vec<u64>)>> {
        let n = ((end - addr) / PAGE) as usize;
        let first = addr / PAGE;
        // An untracked region's pages may be populated with no PTE (touched
        // through the host pointer): allocate the leaf, so that the merge
        // holds real page locks against the access path and our zaps.
        let untracked = !vma.flags.contains(VmFlags::TRACKED);
        // Pagemap always for an untracked region (direct touches leave no
        // trace in the PTEs), else only when some page maps a stable page
        // (a lock-free peek; re-checked under the lock below).
        let mut pm = Vec::new();
        let read_pagemap = |pm: &mut Vec<u64>| {
            pm.resize(n, 0);
            sys::pagemap(vma.host_range(addr, end), pm).map_err(Error::host("pagemap"))
        };
        if untracked {
            read_pagemap(&mut pm)?;
        }
        let leaf = match self.pgtable.leaf(first, guard) {
            Some(l) => l,
            // A page of an untracked region touched through the host
            // pointer has no PTE: allocate the leaf so that the merge holds
            // real page locks against the access path and our zaps. Only
            // then: a leaf per 2 MiB of memory nobody touched would cost
            // uncharged page-table memory until teardown.
            None if untracked && pm.iter().any(|e| direct_private(*e)) => {
                self.pgtable.leaf_alloc(first, guard)
            }
            None => return Ok(None),
        };
        let any_ksm = (0..n as u64).any(|i| Pte(leaf.pte(first + i).load(Ordering::Relaxed)).ksm());
        if any_ksm && !untracked {
            read_pagemap(&mut pm)?;
        }
        Ok(Some((leaf, pm)))
    }

    /// What one locked page is for the scanner, and its new PTE word: `o`
    /// is the locked PTE, `e` its pagemap entry (0 if not read).
    fn snapshot_page(&self, o: Pte, e: u64, untracked: bool) -> (u64, KsmPage) {
        if o.ksm() {
            // Copied by a direct write since the merge? The copy is a
            // private page again; in a tracked region charge it (the
            // fault path does the same for writes through the API).
            if e & pagemap::PRESENT != 0 && e & pagemap::FILE == 0 {
                if untracked {
                    (o.flags() & !Pte::KSM, KsmPage::Private)
                } else {
                    self.charge_existing();
                    ((o.flags() & !Pte::KSM) | Pte::PRESENT, KsmPage::Private)
                }
            } else {
                (o.0, KsmPage::Stable(o.stable_id()))
            }
        } else if o.present() || (untracked && direct_private(e)) {
            // Populated through the API (charged), or by the embedder
            // through the host pointer of an untracked region (not).
            (o.0 & !Pte::KSM_ZERO, KsmPage::Private)
        } else if o.0 & Pte::KSM_ZERO != 0 {
            (o.0, KsmPage::Zero)
        } else {
            (o.0, KsmPage::Absent)
        }
    }

    /// Merges the `n` pages from `addr` (one VMA, one leaf, all private)
    /// onto stable pages `first..first + n` of `store`; with `fill` the
    /// stable pages are new and get this run's contents, else the run must
    /// equal them. Steps 1-5 of the module docs. The mmap lock is held
    /// (`state`) and the caller checked `users > 0`.
    ///
    /// The budget is left to the caller: on `Merged`, `charged[i]` (at
    /// least `n` long) says whether page `i` was charged to this mm (PTE
    /// `PRESENT`; pages an embedder touched directly in an untracked region
    /// never were). The caller moves that charge to the stable page or
    /// gives it back with [`KsmMm::uncharge`]; a page that was never
    /// charged must not be uncharged. This mm's rss is already lowered.
    pub(super) fn ksm_merge(
        &self,
        state: &MmState,
        run: MergeRun<'_>,
        charged: &mut [bool],
    ) -> Result<KsmMerge> {
        let MergeRun {
            addr,
            n,
            store,
            first,
            fill,
        } = run;
        self.check_ksm_before_exit();
        let Some((vma, t)) = self.ksm_wp_vma(state, addr, n) else {
            return Ok(KsmMerge::NotEligible);
        };
        if (charged.len() as u64) < n {
            return Err(Error::InvalidArgument {
                what: "ksm_merge: charged shorter than the run",
            });
        }
        let end = addr + n * PAGE;
        let r = vma.host_range(addr, end);
        let guard = crossbeam_epoch::pin();
        // 1. Page locks: no accessor, zap or handler fill in the window.
        let Some((locked, was_charged)) = self.lock_charged_run(vma, r, addr, n, &guard)? else {
            return Ok(KsmMerge::Changed);
        };
        if !t.wp_shmem() && locked.olds.iter().any(|o| o & Pte::FILEMAP != 0) {
            // A private copy inside a merged range, which this kernel cannot
            // write-protect: not mergeable until a zap restores it.
            locked.unlock_with(|_, o| o);
            return Ok(KsmMerge::NotEligible);
        }
        // 2. Write-protect: direct writers block from here.
        if let Err(e) = t.writeprotect(r, true) {
            locked.unlock_with(|_, o| o);
            return Err(e);
        }
        // 3. Compare (or fill): the contents are frozen.
        match frozen_run_matches(store, r, first, fill) {
            Ok(true) => {}
            Ok(false) => {
                abort_window(t, r, locked)?;
                return Ok(KsmMerge::Changed);
            }
            Err(e) => {
                abort_window(t, r, locked)?;
                return Err(e);
            }
        }
        // 4. Map the stable pages over the run; the handler ignores the
        //    UNMAP message of our own replacement.
        if let Err(e) = vma.map_stable(t, r, store, first) {
            abort_window(t, r, locked)?;
            return map_failed(e);
        }
        // 5. Publish: see `publish_merged`.
        self.publish_merged(t, r, locked, first);
        self.settle_merged_charges(&was_charged, &mut charged[..n as usize]);
        tracing::trace!(target: "mm_core::ksm", mm_id = self.id(), addr, pages = n, stable = first, fill, "ksm_merge_one_page");
        Ok(KsmMerge::Merged)
    }

    /// Step 5 of a merge: map the pages for reads, wake the writers blocked
    /// at step 2 (they refault on the new mapping: copy-on-write), and
    /// publish the PTEs as `KSM | FILEMAP | stable id`.
    fn publish_merged(&self, t: &Tracker, r: HostRange, locked: Locked<'_>, first: u64) {
        let _ = sys::populate_read(r);
        // Register the merged range for write-protect (memfd mappings need
        // UFFD_FEATURE_WP_HUGETLBFS_SHMEM), so a private copy made later can
        // be merged again; MISSING stays off (the file always has the page).
        if let Err(e) = t.register_wp_only(r) {
            tracing::debug!(target: "mm_core::ksm", mm_id = self.id(), addr = locked.first * PAGE, error = %e, "merged range not write-protectable");
        }
        let _ = t.wake_range(r);
        locked.unlock_with(|i, o| {
            (Pte(o).flags() & !(Pte::PRESENT | Pte::DIRTY | Pte::KSM_ZERO))
                | Pte::KSM
                | Pte::FILEMAP
                | ((first + i as u64) << Pte::STABLE_SHIFT)
        });
    }

    /// After a merge: says in `charged` which pages' charges the caller may
    /// move or give back, and lowers this mm's rss by the present pages.
    /// Fail-open debt first (charged = present - debt): only the pages
    /// beyond the mm's debt were really charged, and only their charge may
    /// move to a stable page or be given back (a debt moved as a charge
    /// would be uncharged later without ever being charged).
    pub(super) fn settle_merged_charges(&self, was_charged: &[bool], charged: &mut [bool]) {
        // Only the pages that were PRESENT were counted (and charged).
        let present = was_charged.iter().filter(|c| **c).count() as u64;
        let mut real = self.repay_debt(present * PAGE) / PAGE;
        for (c, w) in charged.iter_mut().zip(was_charged) {
            *c = *w && real > 0;
            if *c {
                real -= 1;
            }
        }
        // Relaxed: a counter (as everywhere for rss).
        let prev = self.rss_anon.fetch_sub(present, Ordering::Relaxed);
        debug_assert!(prev >= present, "rss underflow");
    }

    /// `use_zero_pages`: discards the `n` pages from `addr` if they are all
    /// zeros, inside the same write-protect window as a merge; they read
    /// back as zeros (a later touch populates a fresh page).
    pub(super) fn ksm_zero(&self, state: &MmState, addr: u64, n: u64) -> Result<KsmMerge> {
        self.check_ksm_before_exit();
        let Some((vma, t)) = self.ksm_wp_vma(state, addr, n) else {
            return Ok(KsmMerge::NotEligible);
        };
        let end = addr + n * PAGE;
        let r = vma.host_range(addr, end);
        let guard = crossbeam_epoch::pin();
        let Some((locked, charged)) = self.lock_charged_run(vma, r, addr, n, &guard)? else {
            return Ok(KsmMerge::Changed);
        };
        let charged = charged.iter().filter(|c| **c).count() as u64;
        if let Err(e) = t.writeprotect(r, true) {
            locked.unlock_with(|_, o| o);
            return Err(e);
        }
        // SAFETY: page locks held and the range write-protected.
        if !unsafe { sys::host_is_zero(r) } {
            let res = t.writeprotect(r, false);
            locked.unlock_with(|_, o| o);
            res?;
            return Ok(KsmMerge::Changed);
        }
        // Announced as our own zap (free_pages), so the handler ignores the
        // REMOVE message. Writers blocked on WP refault on an empty PTE and
        // the handler populates them once we unlock.
        let res = vma.discard_zero(addr, end);
        let _ = t.wake_range(r);
        if let Err(e) = res {
            let _ = t.writeprotect(r, false);
            locked.unlock_with(|_, o| o);
            return Err(e);
        }
        locked.unlock_with(|_, o| (Pte(o).flags() & !(Pte::PRESENT | Pte::DIRTY)) | Pte::KSM_ZERO);
        // Only what was charged: a page touched through the host pointer of
        // an untracked region never was.
        self.uncharge_pages(charged, 0);
        Ok(KsmMerge::Merged)
    }
}

/// Step 3 of a merge, with the run locked and write-protected: fills new
/// stable pages with the run (`fill`), or compares the run with them.
pub(super) fn frozen_run_matches(
    store: &StableStore,
    r: HostRange,
    first: u64,
    fill: bool,
) -> Result<bool> {
    let host_err = |source| Error::Host {
        op: "ksm fill/compare",
        source,
    };
    if fill {
        return sys::write_pages_to(&store.fd, r, first * PAGE)
            .map(|()| true)
            .map_err(host_err);
    }
    // Page locks held and the range write-protected (steps 1-2): nobody
    // writes it during the compare.
    store.equals(r, first)
}

/// Step 4 failed (the window already aborted): `MapLimit` at
/// `vm.max_map_count` (`ENOMEM`), else the host error.
pub(super) fn map_failed(e: std::io::Error) -> Result<KsmMerge> {
    if e.raw_os_error() == Some(libc::ENOMEM) {
        return Ok(KsmMerge::MapLimit);
    }
    Err(Error::Host {
        op: "mmap(MAP_FIXED|MAP_PRIVATE memfd)",
        source: e,
    })
}

/// Gives up a merge after step 2: unprotecting wakes the writers (their
/// writes land in the page they wrote to, which stays), then the PTEs are
/// unlocked unchanged.
fn abort_window(t: &Tracker, r: HostRange, locked: Locked<'_>) -> Result<()> {
    let res = t.writeprotect(r, false);
    locked.unlock_with(|_, o| o);
    res
}

/// Checks the arguments of a snapshot of `n` pages from `addr` (buffers
/// long enough, page aligned, inside one page-table leaf); returns the end
/// address, or `None` for an empty snapshot.
fn snapshot_range(addr: u64, n: usize, buf_len: usize, out_len: usize) -> Result<Option<u64>> {
    if buf_len < n * PAGE_SIZE || out_len < n {
        return Err(Error::InvalidArgument {
            what: "ksm_snapshot: buf or out shorter than want",
        });
    }
    if n == 0 {
        return Ok(None);
    }
    if addr % PAGE != 0 {
        return Err(Error::Unaligned {
            addr,
            len: n as u64 * PAGE,
        });
    }
    let end = addr + n as u64 * PAGE;
    if addr / PAGE / PAGES_PER_LEAF != (end - PAGE) / PAGE / PAGES_PER_LEAF {
        return Err(Error::InvalidArgument {
            what: "ksm_snapshot: the pages cross a page-table leaf (2 MiB)",
        });
    }
    Ok(Some(end))
}
