//! Breaking the sharing (`break_ksm` / unmerge) and giving back charges.

use std::sync::atomic::Ordering;

use super::*;
use crate::pgtable::{pte_lock, Leaf, Pte, PAGES_PER_LEAF};
use crate::sys::{self, PAGE_SIZE};
use crate::vma::Prot;

const PAGE: u64 = PAGE_SIZE as u64;

/// The errno of a host call failed by the race harness's injection
/// (`sched::fail`): the ENOMEM a real `mprotect` or
/// `MADV_POPULATE_WRITE` returns when the host is out of memory.
fn injected_errno() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENOMEM)
}

impl Mm {
    /// Gives back the charge of `pages` merged pages of this mm, as
    /// reported by [`KsmMm::merge`] (which already repaid the mm's
    /// fail-open debt with the merged pages).
    pub(super) fn ksm_uncharge(&self, pages: u64) {
        if pages > 0 {
            // Debt was repaid by ksm_merge already: these were charged.
            self.budget.uncharge(pages * PAGE);
        }
    }

    /// Breaks the sharing of every merged page in `[addr, addr + len)`
    /// (`break_ksm` / unmerge): each becomes a charged private copy with the
    /// same contents (`MADV_POPULATE_WRITE` makes the kernel copy it). The
    /// mmap lock is held (`state`). Returns the pages unshared.
    pub(super) fn ksm_unshare(&self, state: &MmState, addr: u64, len: u64) -> Result<u64> {
        self.check_ksm_before_exit();
        let end = addr.saturating_add(len);
        let guard = crossbeam_epoch::pin();
        let mut done = 0;
        for vma in state.vmas().overlapping(addr, end) {
            let (s, e) = (vma.start.max(addr), vma.end.min(end));
            let mut gpn = s / PAGE;
            while gpn < e / PAGE {
                let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(e / PAGE);
                let Some(leaf) = self.pgtable.leaf(gpn, &guard) else {
                    gpn = stop;
                    continue;
                };
                // A leaf with a merged page, or with only the mark of a
                // discarded KSM zero page (which the unshare drops, as the
                // kernel's unmerge decrements `ksm_zero_pages`): asking for
                // merged pages alone left the marks of a leaf of zero pages
                // and `ksm_stat`'s `zero_pages` counting them after the
                // unmerge (found by the race harness's UNMERGEABLE oracle).
                let peek = (gpn..stop).any(|g| {
                    let o = Pte(leaf.pte(g).load(Ordering::Relaxed));
                    o.ksm() || o.ksm_zero()
                });
                if peek {
                    done += self.unshare_leaf(vma, leaf, gpn, stop)?;
                }
                gpn = stop;
            }
        }
        Ok(done)
    }

    fn unshare_leaf(&self, vma: &Vma, leaf: &Leaf, gpn: u64, stop: u64) -> Result<u64> {
        let olds: Vec<u64> = (gpn..stop).map(|g| pte_lock(leaf.pte(g))).collect();
        let locked = Locked {
            leaf,
            first: gpn,
            olds,
        };
        let writable = vma.prot.contains(Prot::WRITE);
        let mut res = Ok(());
        let mut copied = vec![false; locked.olds.len()];
        let n = locked.olds.len();
        let mut i = 0;
        while i < n && res.is_ok() {
            if !Pte(locked.olds[i]).ksm() {
                i += 1;
                continue;
            }
            let j = (i..n).find(|&j| !Pte(locked.olds[j]).ksm()).unwrap_or(n);
            let r = vma.host_range((gpn + i as u64) * PAGE, (gpn + j as u64) * PAGE);
            // A read-only VMA is made writable on the host for the copy only
            // (the guest cannot write it: its VMA says read-only).
            let rw = (true, true, vma.prot.contains(Prot::EXEC));
            res = (|| {
                if !writable {
                    // Nth-failure injection (the race harness): the host
                    // refusing the temporary mprotect (ENOMEM: a VMA split
                    // past `vm.max_map_count`), before anything was copied.
                    if sched::fail("fail:mprotect(unshare)") {
                        return Err(injected_errno());
                    }
                    sys::protect(r, rw)?;
                }
                // Nth-failure injection: the copy-back failing (ENOMEM, no
                // page copied); the range gets its protection back and the
                // run keeps its KSM PTEs, as after a real failure.
                let p = if sched::fail("fail:madvise(POPULATE_WRITE) unshare") {
                    Err(injected_errno())
                } else {
                    sys::populate_write(r)
                };
                if !writable {
                    sys::protect(r, vma.prot.bits())?;
                }
                p
            })()
            .map_err(Error::host("madvise(POPULATE_WRITE) unshare"));
            if res.is_ok() {
                copied[i..j].iter_mut().for_each(|c| *c = true);
                for _ in i..j {
                    self.charge_existing();
                }
            }
            i = j;
        }
        let count = copied.iter().filter(|c| **c).count() as u64;
        locked.unlock_with(|i, o| {
            if copied[i] {
                (Pte(o).flags() & !Pte::KSM) | Pte::PRESENT
            } else if Pte(o).ksm_zero() {
                // A discarded zero page leaves KSM with the range: nothing
                // to copy (it reads zeros and is populated on touch), but
                // it no longer counts as a KSM zero page (the kernel's
                // unmerge decrements `ksm_zero_pages` here too).
                o & !Pte::KSM_ZERO
            } else {
                o
            }
        });
        res.map(|()| count)
    }
}
