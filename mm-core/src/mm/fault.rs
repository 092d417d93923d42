//! The fault path: populate under the PTE locks, charge, copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::error::{Access, Error, Result};
use crate::flags::MmFlag;
use crate::pgtable::{pte_lock, pte_unlock, Leaf, Pte, PAGES_PER_LEAF};
use crate::sched;
use crate::sys::{self, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::tracked::Tracker;
use crate::vma::{Prot, VmFlags, Vma};

const PAGE: u64 = PAGE_SIZE as u64;

impl Mm {
    /// The fault path for `[start, end)` inside one leaf and one VMA: lock the
    /// PTEs ([`Window::lock`]), back off from write-protected pages
    /// ([`Mm::wp_backoff`]), populate the missing pages charging the budget
    /// ([`Mm::populate_window`]), run `f` on the host memory, publish the
    /// PTEs ([`Window::publish`]). `f` gets (host pointer, byte offset from
    /// `start`).
    ///
    /// Returns `Err(NeedMemory)` through `Fault::Budget` when the budget is
    /// exhausted, so the caller can drop every lock before asking the host
    /// for room.
    fn fault_chunk(
        &self,
        vma: &Vma,
        start: u64,
        end: u64,
        write: bool,
        f: &mut dyn FnMut(*mut u8, u64, u64),
    ) -> std::result::Result<(), Fault> {
        sched::check(
            !self.pgtable.is_freed(),
            "I-EX-4: page table populated after free_pgtables",
        );
        // Huge VMAs populate the whole 2 MiB block (inside the VMA) at once,
        // so the charge matches the THP the host maps.
        let (lo, hi) = if vma.flags.contains(VmFlags::HUGEPAGE) {
            let hp = HUGE_PAGE_SIZE as u64;
            (
                (start & !(hp - 1)).max(vma.start),
                ((start & !(hp - 1)) + hp).min(vma.end),
            )
        } else {
            (start, end)
        };
        let guard = crossbeam_epoch::pin();
        let leaf = self.pgtable.leaf_alloc(lo / PAGE, &guard);
        let mut w = Window::lock(leaf, lo, hi);
        if (lo, hi) != (start, end)
            && w.olds()
                .iter()
                .any(|o| o & (Pte::KSM | Pte::FILEMAP | Pte::KSM_ZERO) != 0)
        {
            // A merge split this block's huge page on the host (the kernel's
            // KSM splits a THP to merge it, issue 12): from here on the
            // block faults 4 KiB pages, as the kernel does under a PMD that
            // became a page table. A 2 MiB window would charge and copy the
            // block's other merged pages on a write to one of them.
            w.unlock_all();
            w = Window::lock(leaf, start, end);
        }
        if write {
            if let Some(fault) = self.wp_backoff(vma, &w) {
                return Err(fault);
            }
        }
        self.populate_window(vma, &w, write)?;
        let base = vma.host_range(start, end).ptr();
        f(base, 0, end - start);
        w.publish(write);
        Ok(())
    }

    /// A write to a write-protected page (tracked/ step 7): the copy
    /// would block in the kernel's WP fault while we hold these PTE locks
    /// and the caller holds the mmap read lock; zaps and the reaper would
    /// then spin on the locks, and a queued munmap (writer) would keep
    /// `write_unprotect` (a reader) from ever running. Back off instead:
    /// unlock the window and let the caller drop every lock and wait for
    /// the generation read here (under the locks that showed the bit) to
    /// move.
    fn wp_backoff(&self, vma: &Vma, w: &Window<'_>) -> Option<Fault> {
        if !w.olds().iter().any(|o| o & Pte::WP != 0) {
            return None;
        }
        let t = vma.region.tracker().filter(|t| !t.is_dead())?;
        let gen = t.wp_gen();
        let t = t.clone();
        w.unlock_all();
        Some(Fault::WriteProtected(t, gen))
    }

    /// Populates and charges the missing pages of the locked window (and,
    /// for a write, the copies of its KSM pages). A KSM page (mm-ksm,
    /// `ksm/merge.rs`) is mapped but not present: a read sees the stable
    /// page as it is; a write copies it (the kernel's copy-on-write of the
    /// private file mapping, done by the caller's `f`) and the copy is
    /// charged here like a populated page. On error the window is unlocked.
    fn populate_window(
        &self,
        vma: &Vma,
        w: &Window<'_>,
        write: bool,
    ) -> std::result::Result<(), Fault> {
        let olds = w.olds();
        let missing = olds.iter().filter(|o| needs_page(**o)).count() as u64;
        let cow = if write {
            olds.iter().filter(|o| Pte(**o).ksm()).count() as u64
        } else {
            0
        };
        if missing + cow == 0 {
            return Ok(());
        }
        // I-RP-5 / check_stable_address_space: re-checked under the page
        // lock after seeing the PTE empty. The reaper sets UNSTABLE
        // before its first zap and zaps under these same page locks:
        //
        //   reaper                       | accessor
        //   set UNSTABLE                 |
        //   lock pte, clear, DONTNEED    |
        //                                | lock pte: empty
        //                                | UNSTABLE? yes -> Err(Unstable)
        //
        // Without this check the accessor would repopulate a zero page
        // and hand the guest zeros where its data was.
        if missing > 0 && self.flags.test(MmFlag::UNSTABLE) {
            w.unlock_all();
            return Err(Fault::Err(Error::Unstable { mm_id: self.id }));
        }
        if let Err(e) = self.budget.try_charge((missing + cow) * PAGE) {
            w.unlock_all();
            return Err(Fault::Budget(e));
        }
        // Populate each run of missing pages with one madvise, or, in a
        // tracked region, with UFFDIO_COPY/ZEROPAGE: MADV_POPULATE there
        // would fault into our own handler, and the handler must see the
        // page as populated by whoever holds its PTE lock first.
        let tracker = vma.region.tracker().filter(|t| !t.is_dead());
        for (i, j) in missing_runs(olds) {
            let r = vma.host_range(w.lo + i as u64 * PAGE, w.lo + j as u64 * PAGE);
            if let Err(e) = populate_run(vma, tracker, r, j - i) {
                // Pages populated so far in this chunk are not marked
                // present; give their charge back and drop them again.
                // Only the runs that were missing: present (and KSM)
                // pages of the window hold data and keep their PTE.
                self.budget.uncharge((missing + cow) * PAGE);
                for (k, m) in missing_runs(olds) {
                    let _ = vma.free_host(w.lo + k as u64 * PAGE, w.lo + m as u64 * PAGE);
                }
                w.unlock_all();
                return Err(Fault::Err(e));
            }
        }
        if vma.is_shared() {
            self.rss_shmem.fetch_add(missing + cow, Ordering::Relaxed);
        } else {
            self.rss_anon.fetch_add(missing + cow, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Runs the fault path over `[addr, addr+len)`, calling `f(host_ptr,
    /// offset, len)` for each piece, with the pages populated and locked.
    pub(crate) async fn access(
        &self,
        addr: u64,
        len: u64,
        access: Access,
        f: &mut (dyn FnMut(*mut u8, u64, u64) + Send),
    ) -> Result<()> {
        if access == Access::Write {
            self.check_not_killed()?;
        }
        if len == 0 {
            // Nothing to copy, but the address must still be the guest's:
            // a zero-length access outside every mapping (its end counts,
            // as an empty slice at the end of a buffer does) is `Unmapped`.
            let state = self.lock.read().await;
            let vmas = &state.vmas;
            let mapped = vmas.find(addr).is_some()
                || addr.checked_sub(1).is_some_and(|a| vmas.find(a).is_some());
            return if mapped {
                Ok(())
            } else {
                Err(Error::Unmapped { addr })
            };
        }
        let end = addr.checked_add(len).ok_or(Error::Overflow { addr, len })?;
        if end > self.config.va_limit {
            return Err(Error::OutOfRange {
                addr,
                len,
                limit: self.config.va_limit,
            });
        }
        let mut pos = addr;
        let mut pressure_rounds = 0;
        'retry: loop {
            let state = self.lock.read().await;
            sched::point("access:locked").await;
            if self.flags.test(MmFlag::UNSTABLE) {
                return Err(Error::Unstable { mm_id: self.id });
            }
            check_access(&state, pos, end, access)?;
            let vmas: Vec<&Vma> = state.vmas.overlapping(pos, end).collect();
            for vma in vmas {
                while pos < end.min(vma.end) {
                    let pstart = pos & !(PAGE - 1);
                    let leaf_end = ((pstart / PAGE / PAGES_PER_LEAF) + 1) * PAGES_PER_LEAF * PAGE;
                    let cend = leaf_end.min(vma.end).min(end.next_multiple_of(PAGE));
                    let (from, to) = (pos, cend.min(end));
                    // A step between the early UNSTABLE check and the page
                    // lock: the reaper may set UNSTABLE and zap right here,
                    // which is what the check under the page lock is for.
                    sched::point("access:fault").await;
                    let mut g = |host: *mut u8, _off: u64, _n: u64| {
                        // `host` maps `pstart`; hand out the byte window.
                        f(
                            host.wrapping_add((from - pstart) as usize),
                            from - addr,
                            to - from,
                        );
                    };
                    match self.fault_chunk(vma, pstart, cend, access == Access::Write, &mut g) {
                        Ok(()) => pos = to,
                        Err(Fault::Err(e)) => return Err(e),
                        Err(Fault::WriteProtected(t, gen)) => {
                            // Every page lock is dropped; drop the mmap lock
                            // too (write_unprotect, munmap and the reaper need
                            // it) and wait for the protection to go.
                            drop(state);
                            t.wait_wp(gen).await;
                            continue 'retry;
                        }
                        Err(Fault::Budget(e)) => {
                            // Every page lock is dropped; drop the mmap lock
                            // too before asking for room, because reclaim
                            // (KSM, the OOM reaper) takes mmap locks.
                            drop(state);
                            pressure_rounds += 1;
                            let freed = pressure_rounds <= 3
                                && self.pressure.relieve(e.requested, Some(self.id)).await;
                            if !freed {
                                return Err(e.into_error());
                            }
                            continue 'retry;
                        }
                    }
                }
            }
            return Ok(());
        }
    }

    /// Populates every readable page of `[start, end)` (mlock).
    pub(crate) async fn populate(&self, start: u64, end: u64) -> Result<()> {
        let ranges: Vec<(u64, u64, bool)> = {
            let state = self.lock.read().await;
            state.vmas.check_mapped(start, end)?;
            state
                .vmas
                .overlapping(start, end)
                .map(|v| {
                    (
                        v.start.max(start),
                        v.end.min(end),
                        v.prot.contains(Prot::READ),
                    )
                })
                .collect()
        };
        for (s, e, readable) in ranges {
            if readable {
                self.access(s, e - s, Access::Read, &mut |_, _, _| {})
                    .await?;
            }
        }
        Ok(())
    }
}

/// How the fault path failed.
pub(crate) enum Fault {
    Budget(crate::budget::OverBudget),
    /// A write hit a `Pte::WP` page: wait for this tracker's WP generation
    /// to move past the one given, with no lock held.
    WriteProtected(Arc<Tracker>, u64),
    Err(Error),
}

/// A page the fault path must populate: neither present nor a KSM page.
fn needs_page(o: u64) -> bool {
    !Pte(o).present() && !Pte(o).ksm()
}

/// The runs `[i, j)` of window slots whose page must be populated.
fn missing_runs(olds: &[u64]) -> Vec<(usize, usize)> {
    let n = olds.len();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < n {
        if !needs_page(olds[i]) {
            i += 1;
            continue;
        }
        let j = (i..n).find(|&j| !needs_page(olds[j])).unwrap_or(n);
        runs.push((i, j));
        i = j;
    }
    runs
}

/// Populates one run of `pages` missing pages at host range `r`: through
/// the tracker (UFFDIO_COPY/ZEROPAGE) in a live tracked region, else with
/// `MADV_POPULATE_{READ,WRITE}` (untracked, or the handler died and the
/// ranges were unregistered).
fn populate_run(
    vma: &Vma,
    tracker: Option<&Arc<Tracker>>,
    r: sys::HostRange,
    pages: usize,
) -> Result<()> {
    let write = vma.prot.contains(Prot::WRITE);
    let mut done = [false; PAGES_PER_LEAF as usize];
    match tracker.map(|t| t.populate_locked(r.ptr() as usize, &mut done[..pages], write)) {
        Some(Ok(true)) => Ok(()),
        Some(Err(e)) => Err(e),
        Some(Ok(false)) | None => {
            if crate::sched::fail("fail:madvise(POPULATE)") {
                Err(crate::vma::injected("madvise(POPULATE)"))
            } else if write {
                sys::populate_write(r).map_err(Error::host("madvise(POPULATE)"))
            } else {
                sys::populate_read(r).map_err(Error::host("madvise(POPULATE)"))
            }
        }
    }
}

/// The PTE locks of one fault window `[lo, hi)` inside one leaf, taken in
/// ascending order.
struct Window<'g> {
    leaf: &'g Leaf,
    lo: u64,
    hi: u64,
    olds: [u64; PAGES_PER_LEAF as usize],
}

impl<'g> Window<'g> {
    fn lock(leaf: &'g Leaf, lo: u64, hi: u64) -> Self {
        let mut olds = [0u64; PAGES_PER_LEAF as usize];
        for (i, gpn) in (lo / PAGE..hi / PAGE).enumerate() {
            olds[i] = pte_lock(leaf.pte(gpn));
        }
        Window { leaf, lo, hi, olds }
    }

    /// The PTE words as found under the locks.
    fn olds(&self) -> &[u64] {
        &self.olds[..((self.hi - self.lo) / PAGE) as usize]
    }

    /// Unlocks every PTE unchanged (a back-off or an error).
    fn unlock_all(&self) {
        for (i, gpn) in (self.lo / PAGE..self.hi / PAGE).enumerate() {
            pte_unlock(self.leaf.pte(gpn), self.olds[i]);
        }
    }

    /// Publishes the populated window and unlocks it.
    fn publish(self, write: bool) {
        let dirty = if write { Pte::DIRTY } else { 0 };
        for (i, gpn) in (self.lo / PAGE..self.hi / PAGE).enumerate() {
            let o = Pte(self.olds[i]);
            let new = match (o.ksm(), write) {
                // Read of a KSM page: still shared, still uncharged.
                (true, false) => o.0,
                // Written: now a private copy (FILEMAP stays: the host range
                // is still the file mapping until a zap).
                (true, true) => (o.flags() & !Pte::KSM) | Pte::PRESENT | dirty,
                (false, _) => o.0 | Pte::PRESENT | dirty,
            };
            pte_unlock(self.leaf.pte(gpn), new);
        }
    }
}

/// `[pos, end)` is mapped and every VMA under it allows `access`.
fn check_access(state: &MmState, pos: u64, end: u64, access: Access) -> Result<()> {
    state.vmas.check_mapped(pos, end)?;
    let need = match access {
        Access::Read => Prot::READ,
        Access::Write => Prot::WRITE,
    };
    match state
        .vmas
        .overlapping(pos, end)
        .find(|v| !v.prot.contains(need))
    {
        Some(vma) => Err(Error::Protection {
            addr: pos.max(vma.start),
            access,
        }),
        None => Ok(()),
    }
}
