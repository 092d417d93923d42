//! Fault resolution under the PTE locks (steps 3-6 of `tracked/`): the
//! fault-around window, fail-open, poison after `UNSTABLE`, busy pages,
//! foreign removes. The mm's side of a tracked fault: the handler thread
//! reaches it through [`FaultTarget`], which [`Mm`] implements at the end
//! of this file, so that the tracker never names the mm.

use std::sync::atomic::Ordering;

use super::Mm;
use crate::flags::MmFlag;
use crate::pgtable::{Leaf, Pte, PAGES_PER_LEAF};
use crate::sys::{self, PAGE_SIZE};
use crate::tracked::{zero_source, FaultTarget, Outcome, Restore, Tracker};
use crate::types::BoxFuture;
use crate::uffd::Fill;

const PAGE: u64 = PAGE_SIZE as u64;

/// The PTE locks the handler holds on one fault-around window. Unlocks on
/// drop: a panic between locking and unlocking (caught by `handler_main`,
/// step 9) must not leave `LOCK` bits set, or every later `pte_lock` of
/// those pages (zaps, the reaper, the access path) would spin forever.
/// Until [`WindowLocks::commit`] the drop restores the words as locked and
/// gives back the charge taken for the window.
struct WindowLocks<'a> {
    mm: &'a Mm,
    leaf: &'a Leaf,
    lo_gpn: u64,
    n: usize,
    /// Old word | LOCK, 0 = not held.
    held: [u64; PAGES_PER_LEAF as usize],
    /// Pages to unlock as `PRESENT` (after `commit`).
    present: [bool; PAGES_PER_LEAF as usize],
    /// Bytes charged for the window and not yet accounted as present.
    charged: u64,
    committed: bool,
}

impl<'a> WindowLocks<'a> {
    /// The `n` pages from `lo_gpn` of `leaf`, none locked yet.
    fn new(mm: &'a Mm, leaf: &'a Leaf, lo_gpn: u64, n: usize) -> Self {
        WindowLocks {
            mm,
            leaf,
            lo_gpn,
            n,
            held: [0; PAGES_PER_LEAF as usize],
            present: [false; PAGES_PER_LEAF as usize],
            charged: 0,
            committed: false,
        }
    }

    /// The rest of the window after the faulting page `gpn_f`, ascending,
    /// try-locks only (skip busy pages).
    fn lock_rest(&mut self, gpn_f: u64) {
        for (i, gpn) in (self.lo_gpn..self.lo_gpn + self.n as u64).enumerate() {
            if gpn != gpn_f {
                if let Some(o) = try_lock(self.leaf.pte(gpn)) {
                    self.held[i] = o;
                }
            }
        }
    }

    /// Slot `i` is locked by us and needs a page (not present, not KSM).
    fn wants(&self, i: usize) -> bool {
        self.held[i] != 0 && !Pte(self.held[i]).present() && !Pte(self.held[i]).ksm()
    }

    /// The pages are accounted: unlock with `PRESENT` where populated.
    fn commit(mut self, present: &[bool]) {
        self.present[..present.len()].copy_from_slice(present);
        self.charged = 0;
        self.committed = true;
    }
}

impl Drop for WindowLocks<'_> {
    fn drop(&mut self) {
        for i in 0..self.n {
            if self.held[i] != 0 {
                let set = if self.committed && self.present[i] {
                    Pte::PRESENT
                } else {
                    0
                };
                crate::pgtable::pte_unlock(
                    self.leaf.pte(self.lo_gpn + i as u64),
                    self.held[i] | set,
                );
            }
        }
        if self.charged > 0 {
            self.mm.budget.uncharge(self.charged);
        }
    }
}

/// The fault-around window `[lo, hi)` of a fault at guest address
/// `guest`: the aligned `fa` bytes around it, clipped to the registered
/// range `[range_lo, range_hi)` (one leaf).
fn fault_around_window(guest: u64, range_lo: u64, range_hi: u64, fa: u64) -> (u64, u64) {
    let lo = (guest & !(fa - 1)).max(range_lo);
    let hi = ((guest & !(fa - 1)) + fa).min(range_hi);
    debug_assert_eq!(lo / PAGE / PAGES_PER_LEAF, (hi - 1) / PAGE / PAGES_PER_LEAF);
    (lo, hi)
}

impl Mm {
    /// Step 3: resolves a missing-page fault at host address `addr`.
    fn tracked_fault(&self, t: &Tracker, addr: usize, fail_open: bool, force: bool) -> Outcome {
        let Some((hs, r)) = t.lookup(addr) else {
            // No longer ours (munmap in flight, unregistered): let it refault.
            let _ = t.with_uffd(|u| u.wake(addr, PAGE_SIZE));
            return Outcome::Served;
        };
        let guest = r.guest_start + (addr - hs) as u64;
        let range_hi = r.guest_start + (r.host_end - hs) as u64;
        let (lo, hi) = fault_around_window(guest, r.guest_start, range_hi, r.fault_around);
        let host_of = |g: u64| hs + (g - r.guest_start) as usize;
        let guard = crossbeam_epoch::pin();
        let leaf = self.pgtable.leaf_alloc(lo / PAGE, &guard);
        let gpn_f = guest / PAGE;
        t.counters.faults.fetch_add(1, Ordering::Relaxed);
        // Acquire: pairs with the Release of `pte_unlock` that published
        // PRESENT (a peek: the PRESENT bit of a shared page is only cleared
        // by a zap, which unregisters the range first).
        if r.shared && Pte(leaf.pte(gpn_f).load(Ordering::Acquire)).present() {
            return self.continue_present(t, addr, leaf, gpn_f, hi / PAGE, force);
        }

        // Try-lock the faulting page first: the handler never waits for a
        // PTE lock (step 6). A zapper holding it is blocked in madvise until
        // we read its REMOVE message, which needs no lock.
        let Some(old_f) = try_lock(leaf.pte(gpn_f)) else {
            if force {
                return self.resolve_busy(t, addr);
            }
            return Outcome::Busy;
        };
        let n = ((hi - lo) / PAGE) as usize;
        let fi = (gpn_f - lo / PAGE) as usize;
        let mut w = WindowLocks::new(self, leaf, lo / PAGE, n);
        w.held[fi] = old_f;
        if Pte(old_f).present() {
            drop(w);
            if r.shared {
                return self.continue_present(t, addr, leaf, gpn_f, hi / PAGE, force);
            }
            return refill_present(t, addr);
        }
        #[cfg(test)]
        if t.unstable_after_first_lock.swap(false, Ordering::SeqCst) {
            self.flags.set(MmFlag::UNSTABLE);
        }
        w.lock_rest(gpn_f);
        // check_stable_address_space under the page locks (step 5), the
        // counterpart of the reaper's "set UNSTABLE, then zap under the page
        // locks":
        //
        //   reaper                       | handler
        //   set UNSTABLE                 |
        //   lock pte, clear, DONTNEED    |
        //                                | try-lock pte: empty
        //                                | UNSTABLE? yes -> POISON (SIGBUS)
        //
        // Checked only once *every* lock of the window is held: the reaper
        // zaps per VMA, so it may set UNSTABLE and zap pages of the window
        // between our locking of the faulting page and of the others; a check
        // before that would let us COPY zeros over pages it just reaped.
        if self.flags.test(MmFlag::UNSTABLE) {
            drop(w);
            return self.poison_fault(t, addr);
        }
        let charge = match self.charge_window(&mut w, fail_open) {
            Ok(c) => c,
            Err(Outcome::NeedMemory(_)) if fail_open && self.config.hard_budget => {
                drop(w);
                return self.hard_limit(t, addr);
            }
            Err(outcome) => return outcome,
        };
        #[cfg(test)]
        if t.panic_after_lock.swap(false, Ordering::SeqCst) {
            panic!("injected handler panic with the window locked");
        }
        let host_lo = host_of(lo);
        let restore = r
            .restore
            .as_deref()
            .map(|rs| (rs, r.src_index(hs, host_lo)));
        let src = match (r.shared, restore) {
            (true, Some((rs, first))) => WindowSrc::ShmemRestore(rs, first),
            (true, None) => WindowSrc::Shmem,
            (false, restore) => WindowSrc::Anon(restore),
        };
        self.fill_window(t, w, fi, charge, host_lo, addr, src)
    }

    /// Step 10: a fault on a shared page that is `PRESENT` (charged: it is
    /// in the memfd) but not mapped here: a `MINOR` fault after a DONTNEED
    /// of this mapping, or an API access whose copy faults while it holds
    /// the page's lock. `UFFDIO_CONTINUE` maps it from the page cache,
    /// with the run of `PRESENT` pages after it up to the window's end
    /// (`hi_gpn`) as fault-around, charging nothing. No PTE lock is taken:
    /// nothing changes in the page table, the page is charged already, and
    /// the faulter may be an accessor holding the lock (waiting for it
    /// would stall that accessor for `BUSY_TIMEOUT`). The range cannot go
    /// under the ioctl unnoticed: munmap and exit unregister a range
    /// before they zap it (CONTINUE then fails with `ENOENT`), and the
    /// range was looked up just before. A page the memfd lost (`EFAULT`:
    /// the embedder punched it with `MADV_REMOVE`) is refilled under its
    /// lock, still charged (`force`: without it, see `refill_shared`).
    fn continue_present(
        &self,
        t: &Tracker,
        addr: usize,
        leaf: &Leaf,
        gpn_f: u64,
        hi_gpn: u64,
        force: bool,
    ) -> Outcome {
        // Relaxed: only how far the fault-around run goes; nothing is read
        // through it, and CONTINUE checks each page itself (EFAULT outside
        // the page cache, EEXIST where mapped).
        let present = |g: u64| Pte(leaf.pte(g).load(Ordering::Relaxed)).present();
        let n = (gpn_f + 1..hi_gpn).find(|&g| !present(g)).unwrap_or(hi_gpn) - gpn_f;
        let len = n as usize * PAGE_SIZE;
        // DONTWAKE and one wake below: a CONTINUE that stops short (a page
        // of the run mapped already) wakes nobody past that page.
        let mut res = t.with_uffd(|u| u.continue_(addr, len, false));
        if n > 1 && matches!(res, Err(_) | Ok(Fill::Exists { done: 0 })) {
            // ENOENT: the run crosses a VMA boundary (`fill_run`); EFAULT:
            // a page of it left the memfd; EEXIST: a page is mapped. The
            // faulting page alone says which.
            res = t.with_uffd(|u| u.continue_(addr, PAGE_SIZE, false));
        }
        let mapped = match res {
            Ok(Fill::Done) => n,
            Ok(Fill::Again { done }) | Ok(Fill::Exists { done }) => (done / PAGE_SIZE) as u64,
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                return self.refill_shared(t, addr, leaf, gpn_f, force);
            }
            Err(_) => 0,
        };
        t.counters
            .pages_continued
            .fetch_add(mapped, Ordering::Relaxed);
        let _ = t.with_uffd(|u| u.wake(addr, len.max(PAGE_SIZE)));
        Outcome::Served
    }

    /// A `PRESENT` shared page the memfd no longer holds (the embedder's
    /// `MADV_REMOVE`): a zeroed page back, under its lock, not charged
    /// again (it stayed charged: DESIGN-NOTES). Busy while locked; after
    /// `BUSY_TIMEOUT` (`force`) without the lock, as `resolve_busy` does:
    /// the holder may be an accessor whose copy took this very fault (the
    /// page is charged either way, so nothing is left to settle).
    fn refill_shared(
        &self,
        t: &Tracker,
        addr: usize,
        leaf: &Leaf,
        gpn_f: u64,
        force: bool,
    ) -> Outcome {
        match try_lock(leaf.pte(gpn_f)) {
            Some(old) => {
                if Pte(old).present() {
                    let _ = t.with_uffd(|u| u.fill_shmem(addr, PAGE_SIZE, false, &mut 0));
                }
                crate::pgtable::pte_unlock(leaf.pte(gpn_f), old);
            }
            None if force => {
                t.counters.busy_breaks.fetch_add(1, Ordering::Relaxed);
                let _ = t.with_uffd(|u| u.fill_shmem(addr, PAGE_SIZE, false, &mut 0));
            }
            None => return Outcome::Busy,
        }
        let _ = t.with_uffd(|u| u.wake(addr, PAGE_SIZE));
        Outcome::Served
    }

    /// Charges the missing pages of the locked window (step 3). Over
    /// budget, the window shrinks to the faulting page; still over budget,
    /// it is served over budget when failing open (step 4), else the
    /// handler must run the pressure path first (`NeedMemory`).
    fn charge_window(
        &self,
        w: &mut WindowLocks<'_>,
        fail_open: bool,
    ) -> std::result::Result<WindowCharge, Outcome> {
        let n = w.n;
        let mut c = WindowCharge {
            missing: (0..n).filter(|&i| w.wants(i)).count() as u64,
            only_faulting: false,
            overcommit: false,
        };
        if self.budget.try_charge(c.missing * PAGE).is_err() {
            // Shrink the window to the faulting page before asking for room.
            if self.budget.try_charge(PAGE).is_ok() {
                c.only_faulting = true;
                c.missing = 1;
            } else if fail_open && !self.config.hard_budget {
                c.only_faulting = true;
                c.missing = 1;
                c.overcommit = true;
            } else {
                return Err(Outcome::NeedMemory(PAGE));
            }
        }
        if !c.overcommit {
            w.charged = c.missing * PAGE;
        }
        Ok(c)
    }

    /// Fills the charged pages of the window run by run (`UFFDIO_COPY`, or
    /// in a shared region `UFFDIO_ZEROPAGE`; DONTWAKE), settles the charge
    /// with what was really populated,
    /// publishes the PTEs and wakes every thread blocked in the window.
    /// `host_lo` is the host address of the window's first page; `src`
    /// where the pages come from (for a lazy restore, the restore and its
    /// page index of that page).
    #[allow(clippy::too_many_arguments)] // one call site, all of it state
    fn fill_window(
        &self,
        t: &Tracker,
        w: WindowLocks<'_>,
        fi: usize,
        c: WindowCharge,
        host_lo: usize,
        addr: usize,
        src: WindowSrc<'_>,
    ) -> Outcome {
        let n = w.n;
        let selected = |i: usize| w.wants(i) && (!c.only_faulting || i == fi);
        let mut present = [false; PAGES_PER_LEAF as usize];
        let zero = zero_source().ok();
        // One run `[a, b)` of window slots: zeros, or the restore's file
        // pages (and zeros where the snapshot holds none), or zeroed memfd
        // pages.
        let fill = |a: usize, b: usize, present: &mut [bool; PAGES_PER_LEAF as usize]| match src {
            WindowSrc::Anon(None) => {
                self.fill_run(t, host_lo + a * PAGE_SIZE, zero, &mut present[a..b])
            }
            WindowSrc::Anon(Some((rs, first))) | WindowSrc::ShmemRestore(rs, first) => {
                self.fill_restored(t, rs, first, host_lo, zero, a, b, present)
            }
            WindowSrc::Shmem => fill_run_shmem(t, host_lo + a * PAGE_SIZE, &mut present[a..b]),
        };
        let mut crossed = false;
        let mut i = 0;
        while i < n {
            if !selected(i) {
                i += 1;
                continue;
            }
            let j = (i..n).find(|&j| !selected(j)).unwrap_or(n);
            let end = fill(i, j, &mut present);
            // More than one page failing with ENOENT: the run crosses a VMA
            // boundary (see `fill_run`); retried below.
            crossed |= end == RunEnd::Failed(libc::ENOENT) && j - i > 1;
            if end == RunEnd::Stop {
                break;
            }
            i = j;
        }
        if crossed && selected(fi) && !present[fi] {
            // A run crossed a VMA boundary (see `fill_run`): the window is
            // clipped to the registered range, not to the VMA, because the
            // handler never takes the mmap lock to look the VMA up. Serve
            // the faulting page and what follows it in its run, halving
            // until the copy stays inside the faulting page's VMA (one page
            // always does). Without this the faulter refaulted forever on
            // the same ENOENT (a wasm linear memory, read-write below its
            // size and PROT_NONE above, in one tracked range).
            let end = (fi..n).find(|&j| !selected(j)).unwrap_or(n);
            let mut len = end - fi;
            while fill(fi, fi + len, &mut present) == RunEnd::Failed(libc::ENOENT) && len > 1 {
                t.counters.vma_clips.fetch_add(1, Ordering::Relaxed);
                len /= 2;
            }
        }
        let populated = (0..n).filter(|&i| present[i]).count() as u64;
        // Charged `missing`, populated `populated` (≤ missing): return the rest.
        if c.overcommit {
            if populated > 0 {
                // Relaxed: a counter, read back by `uncharge_pages`.
                self.debt.fetch_add(PAGE, Ordering::Relaxed);
                t.counters.fail_open_pages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "mm_core::tracked", mm_id = self.id(), addr, "budget exhausted after pressure; fail-open");
            }
        } else if c.missing > populated {
            self.budget.uncharge((c.missing - populated) * PAGE);
        }
        if matches!(src, WindowSrc::Shmem | WindowSrc::ShmemRestore(..)) {
            self.rss_shmem.fetch_add(populated, Ordering::Relaxed);
        } else {
            self.rss_anon.fetch_add(populated, Ordering::Relaxed);
        }
        t.counters
            .pages_faulted
            .fetch_add(populated, Ordering::Relaxed);
        w.commit(&present[..n]);
        // Wake every thread blocked in the window (COPY ran with DONTWAKE).
        // If COPY failed for the faulting page (EAGAIN: a REMOVE is queued;
        // or the range went away) it refaults and is queued again, behind
        // the message we must read first.
        let _ = t.with_uffd(|u| u.wake(host_lo, n * PAGE_SIZE));
        if c.overcommit || c.missing == 0 {
            Outcome::Served
        } else {
            Outcome::Charged
        }
    }

    /// Fills window slots `[i, j)` of a lazy restore (`tracked/source.rs`):
    /// each sub-run whose pages the snapshot holds (and never served) is
    /// copied from the file mapping, the rest from the zero source; the
    /// filled pages are marked served. A file page the COPY cannot read
    /// (`EFAULT`: the file was truncated under us) is poisoned: its toucher
    /// gets SIGBUS, never zeros (the page stays unserved, unpresent and
    /// uncharged).
    #[allow(clippy::too_many_arguments)] // the window's state, one caller
    fn fill_restored(
        &self,
        t: &Tracker,
        rs: &Restore,
        first: usize,
        host_lo: usize,
        zero: Option<*const u8>,
        i: usize,
        j: usize,
        present: &mut [bool],
    ) -> RunEnd {
        let mut a = i;
        while a < j {
            let data = rs.data(first + a);
            let b = rs.run_end(first + a, first + j) - first;
            let host = host_lo + a * PAGE_SIZE;
            if data.is_none() {
                if self.fill_run(t, host, zero, &mut present[a..b]) == RunEnd::Stop {
                    return RunEnd::Stop;
                }
                a = b;
                continue;
            }
            // The COPY faults the file pages in itself (measured no slower
            // than a MADV_POPULATE_READ first, or a pread into a buffer:
            // DESIGN-NOTES); `release` unmaps them again.
            let end = self.fill_run(t, host, data, &mut present[a..b]);
            for k in (a..b).filter(|&k| present[k]) {
                rs.mark_served(first + k, first + k + 1);
            }
            rs.release(first + a, first + b);
            match end {
                RunEnd::Done => a = b,
                RunEnd::Stop => return RunEnd::Stop,
                RunEnd::Failed(libc::EFAULT) => {
                    // The first page not filled is the unreadable one.
                    let bad = (a..b).find(|&k| !present[k]).unwrap_or(a);
                    self.poison_lost(t, host_lo + bad * PAGE_SIZE);
                    a = bad + 1;
                }
                // ENOENT: the run crosses a VMA boundary; the caller
                // retries shorter (as for a run of zeros).
                RunEnd::Failed(libc::ENOENT) => return RunEnd::Failed(libc::ENOENT),
                RunEnd::Failed(_) => return RunEnd::Stop,
            }
        }
        RunEnd::Done
    }

    /// A snapshot page the file no longer holds: SIGBUS for its touchers
    /// (`UFFDIO_POISON`, contained like a reaped page when `contain` is
    /// installed). Without POISON support the faulter stays blocked.
    fn poison_lost(&self, t: &Tracker, host: usize) {
        tracing::error!(target: "mm_core::tracked", mm_id = self.id(), host, "snapshot page unreadable (file truncated under a running restore): poisoned");
        if !t.poison {
            return;
        }
        if let Some((start, r)) = t.lookup(host) {
            crate::contain::register(start, r.host_end);
        }
        if let Ok(Fill::Done) = t.with_uffd(|u| u.poison(host, PAGE_SIZE)) {
            t.counters.pages_poisoned.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `UFFDIO_COPY` of one run for the handler, marking `present` pages
    /// (`src` covers the run: the zero source, or contiguous file pages).
    /// `RunEnd::Failed(ENOENT)` for a run of more than one page:
    /// `mfill_atomic` wants the whole destination inside one VMA, and the
    /// run crosses a VMA boundary (guestmm's `mprotect` split the registered
    /// range; the kernel's own fault-around stops at the VMA's end). The
    /// caller retries shorter.
    fn fill_run(
        &self,
        t: &Tracker,
        host: usize,
        src: Option<*const u8>,
        present: &mut [bool],
    ) -> RunEnd {
        let Some(src) = src else {
            return RunEnd::Done;
        };
        let zero = zero_source().ok() == Some(src);
        let n = present.len();
        let mut i = 0;
        while i < n {
            let at = host + i * PAGE_SIZE;
            let from = if zero {
                src
            } else {
                src.wrapping_add(i * PAGE_SIZE)
            };
            // DONTWAKE: the faulters are woken after the PTEs say PRESENT
            // and the counters are updated, so a woken thread never sees
            // its page populated but not yet accounted.
            match t.with_uffd(|u| u.copy(at, from, (n - i) * PAGE_SIZE, false)) {
                Ok(Fill::Done) => {
                    present[i..].iter_mut().for_each(|p| *p = true);
                    return RunEnd::Done;
                }
                Ok(Fill::Exists { done }) => {
                    // EEXIST under our lock on an empty PTE: a page the
                    // kernel still holds (a foreign REMOVE whose zap is not
                    // done). Count it as ours: it is charged, and the next
                    // zap clears both. The caller wakes the whole window.
                    let k = done / PAGE_SIZE;
                    present[i..=i + k].iter_mut().for_each(|p| *p = true);
                    i += k + 1;
                }
                Ok(Fill::Again { done }) => {
                    let k = done / PAGE_SIZE;
                    present[i..i + k].iter_mut().for_each(|p| *p = true);
                    t.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
                    // A REMOVE is queued and unread, and we are its reader:
                    // retrying here cannot succeed. Give up on the rest of the
                    // run; the caller wakes the faulter, which refaults and is
                    // served after the next drain of the queue. (A COPY that
                    // stops short at an unreadable source page also says
                    // EAGAIN; its retry says EFAULT.)
                    return RunEnd::Stop;
                }
                Err(e) => {
                    tracing::debug!(target: "mm_core::tracked", mm_id = self.id(), error = %e, "UFFDIO_COPY failed");
                    return RunEnd::Failed(e.raw_os_error().unwrap_or(0));
                }
            }
        }
        RunEnd::Done
    }

    /// Hard budget, pressure exhausted: the guest is killed instead of
    /// overcommitting, and this fault gets SIGBUS (poisoned like a reaped
    /// page; `contain` confines it to the thread).
    fn hard_limit(&self, t: &Tracker, addr: usize) -> Outcome {
        t.counters.hard_limit_kills.fetch_add(1, Ordering::Relaxed);
        // Once: the guest's later faults (its threads may still run until
        // the kill hook stops them) find it killed and are only poisoned.
        if !self.flags.test(MmFlag::KILLED) {
            self.pressure.kill_requester(self.id);
        }
        self.poison_fault(t, addr)
    }

    /// UNSTABLE: SIGBUS for the faulter (step 5). Without POISON support
    /// (pre-6.6) the fault is left unanswered: the thread stays blocked
    /// rather than read zeros, until teardown unregisters the range.
    fn poison_fault(&self, t: &Tracker, addr: usize) -> Outcome {
        if t.poison {
            // Before the SIGBUS exists: a containment handler that sees it
            // finds the range (`contain`), so the faulter, not the
            // process, pays for touching a reaped guest.
            if let Some((start, r)) = t.lookup(addr) {
                crate::contain::register(start, r.host_end);
            }
            match t.with_uffd(|u| u.poison(addr, PAGE_SIZE)) {
                Ok(Fill::Done) => {
                    t.counters.pages_poisoned.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) | Err(_) => {
                    let _ = t.with_uffd(|u| u.wake(addr, PAGE_SIZE));
                }
            }
        }
        Outcome::Served
    }

    /// The faulting page stayed locked for `BUSY_TIMEOUT` (`tracked/`):
    /// most likely an accessor faulted on it while holding its lock (its
    /// page was discarded behind our back by the embedder). Populate that one page without the
    /// lock, so it can finish, and return [`Outcome::Unlocked`]: the handler
    /// then settles the charge with [`Mm::settle_busy`] once the lock is
    /// free (the holder may have been a slow zapper that leaves the PTE
    /// empty over the page we just mapped).
    fn resolve_busy(&self, t: &Tracker, addr: usize) -> Outcome {
        t.counters.busy_breaks.fetch_add(1, Ordering::Relaxed);
        if self.flags.test(MmFlag::UNSTABLE) {
            return self.poison_fault(t, addr);
        }
        // The descriptor is shared by the shard's mms (`tracked/pool.rs`):
        // without the page lock, re-check that the page is still ours just
        // before the COPY, so it cannot land in a range another mm mapped
        // at the same address after an unmap of ours.
        let Some((hs, r)) = t.lookup(addr) else {
            let _ = t.with_uffd(|u| u.wake(addr, PAGE_SIZE));
            return Outcome::Served;
        };
        // A lazy restore's unserved page comes from the file; without the
        // lock another filler may copy it too: one COPY wins, the other
        // gets EEXIST, so it is still served once.
        if r.shared {
            // The memfd's page, allocated or found (step 10); settled like
            // an anonymous page (`settle_busy`).
            let _ = t.with_uffd(|u| match u.fill_shmem(addr, PAGE_SIZE, true, &mut 0)? {
                Fill::Done => Ok(()),
                _ => u.wake(addr, PAGE_SIZE),
            });
            return Outcome::Unlocked;
        }
        let idx = r.src_index(hs, addr);
        let data = r.restore.as_ref().and_then(|rs| rs.data(idx));
        if let Some(src) = data.or_else(|| zero_source().ok()) {
            let done = t.with_uffd(|u| match u.copy(addr, src, PAGE_SIZE, true)? {
                Fill::Done => Ok(true),
                _ => u.wake(addr, PAGE_SIZE).map(|()| false),
            });
            if let (Ok(true), Some(rs)) = (done, &r.restore) {
                rs.mark_served(idx, idx + 1);
            }
        }
        Outcome::Unlocked
    }

    /// After `resolve_busy` mapped the page at `addr` without its lock:
    /// try-lock it; if the PTE is still empty while the host page is
    /// resident, account it now (charge, or fail-open debt when the budget
    /// is full: the page exists either way) and mark it `PRESENT`, so that
    /// `charged = present − debt` holds again and the next zap uncharges it.
    /// Returns `false` while the page is still locked (retry next round).
    fn settle_busy(&self, t: &Tracker, addr: usize) -> bool {
        let Some((hs, r)) = t.lookup(addr) else {
            return true; // unmapped meanwhile: nothing to account
        };
        let gpn = (r.guest_start + (addr - hs) as u64) / PAGE;
        let guard = crossbeam_epoch::pin();
        let Some(leaf) = self.pgtable.leaf(gpn, &guard) else {
            return true;
        };
        let Some(old) = try_lock(leaf.pte(gpn)) else {
            return false;
        };
        let mut new = old;
        if !Pte(old).present() && sys::page_resident(addr).unwrap_or(false) {
            if self.budget.try_charge(PAGE).is_err() {
                // Relaxed: a counter, read back by `uncharge_pages`.
                self.debt.fetch_add(PAGE, Ordering::Relaxed);
                t.counters.fail_open_pages.fetch_add(1, Ordering::Relaxed);
            }
            if r.shared {
                self.rss_shmem.fetch_add(1, Ordering::Relaxed);
            } else {
                self.rss_anon.fetch_add(1, Ordering::Relaxed);
            }
            t.counters.pages_faulted.fetch_add(1, Ordering::Relaxed);
            new |= Pte::PRESENT;
        }
        crate::pgtable::pte_unlock(leaf.pte(gpn), new);
        true
    }

    /// The embedder discarded `[start, end)` itself (REMOVE / UNMAP): clear
    /// and uncharge the present PTEs we can lock; push what stays locked.
    fn tracked_forget_pages(
        &self,
        t: &Tracker,
        start: usize,
        end: usize,
        left: &mut Vec<(usize, usize)>,
    ) {
        let mut host = start;
        while host < end {
            let Some((hs, r)) = t.lookup(host) else {
                host += PAGE_SIZE;
                continue;
            };
            let stop = r.host_end.min(end);
            let guard = crossbeam_epoch::pin();
            let mut freed = 0u64;
            let mut wp_cleared = false;
            let mut a = host;
            while a < stop {
                let gpn = (r.guest_start + (a - hs) as u64) / PAGE;
                if let Some(leaf) = self.pgtable.leaf(gpn, &guard) {
                    match try_lock(leaf.pte(gpn)) {
                        Some(old) => {
                            let new = if Pte(old).present() {
                                freed += 1;
                                wp_cleared |= old & Pte::WP != 0;
                                0
                            } else {
                                old
                            };
                            crate::pgtable::pte_unlock(leaf.pte(gpn), new);
                        }
                        None => left.push((a, a + PAGE_SIZE)),
                    }
                }
                a += PAGE_SIZE;
            }
            self.uncharge_pages(freed, 0);
            if wp_cleared {
                t.wp_changed();
            }
            host = stop;
        }
    }
}

fn try_lock(pte: &std::sync::atomic::AtomicU64) -> Option<u64> {
    // Acquire: pairs with the Release in `pte_unlock`, as `pte_lock`.
    let old = pte.fetch_or(Pte::LOCK, Ordering::Acquire);
    if old & Pte::LOCK == 0 {
        Some(old | Pte::LOCK)
    } else {
        None
    }
}

/// Where [`Mm::fill_window`] takes a window's pages from.
#[derive(Clone, Copy)]
enum WindowSrc<'a> {
    /// A private anonymous region: zeros, or a lazy restore and the
    /// restore's page index of the window's first page.
    Anon(Option<(&'a Restore, usize)>),
    /// A shared memfd region (step 10): `UFFDIO_ZEROPAGE`, which allocates
    /// zeroed pages in the memfd (`Uffd::fill_shmem`).
    Shmem,
    /// A shared memfd region restored lazily: as `Anon(Some(..))`, whose
    /// `UFFDIO_COPY` allocates each page in the memfd with the snapshot's
    /// bytes (or zeros). A page the memfd holds already (`EEXIST`: a device
    /// backend wrote it) is not overwritten: the faulter refaults, takes a
    /// `MINOR` fault on the now `PRESENT` page and gets it mapped as it is.
    ShmemRestore(&'a Restore, usize),
}

/// `fill_run` for a shared region's run (step 10): zeroed memfd pages
/// (`UFFDIO_ZEROPAGE`, DONTWAKE), `UFFDIO_CONTINUE` for a page the memfd
/// already holds. Every page of the run is then in the memfd and mapped.
fn fill_run_shmem(t: &Tracker, host: usize, present: &mut [bool]) -> RunEnd {
    let mut filled = 0;
    let res = t.with_uffd(|u| u.fill_shmem(host, present.len() * PAGE_SIZE, false, &mut filled));
    // Filled pages are in the memfd and mapped, whatever ended the fill.
    present[..filled / PAGE_SIZE]
        .iter_mut()
        .for_each(|p| *p = true);
    match res {
        Ok(Fill::Done) | Ok(Fill::Exists { .. }) => RunEnd::Done,
        Ok(Fill::Again { .. }) => {
            t.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
            // A REMOVE is queued and we are its reader (see `fill_run`).
            RunEnd::Stop
        }
        Err(e) => RunEnd::Failed(e.raw_os_error().unwrap_or(0)),
    }
}

/// How a run of `UFFDIO_COPY` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    /// Every page of the run is filled (or was found present).
    Done,
    /// `EAGAIN`: a REMOVE is queued; stop filling this window.
    Stop,
    /// The ioctl failed with this errno.
    Failed(i32),
}

/// What [`Mm::charge_window`] charged for a window.
struct WindowCharge {
    /// Pages charged (or, failing open, served over budget).
    missing: u64,
    /// The window shrank to the faulting page.
    only_faulting: bool,
    /// Served over budget (fail-open, step 4): recorded as debt.
    overcommit: bool,
}

/// The faulting page is `PRESENT` (charged) but its host page is gone (the
/// embedder's own DONTNEED): bring it back without charging again.
fn refill_present(t: &Tracker, addr: usize) -> Outcome {
    let src = match zero_source() {
        Ok(s) => s,
        Err(_) => return Outcome::Served,
    };
    let _ = t.with_uffd(|u| match u.copy(addr, src, PAGE_SIZE, true)? {
        Fill::Done => Ok(()),
        _ => u.wake(addr, PAGE_SIZE),
    });
    Outcome::Served
}

impl FaultTarget for Mm {
    fn resolve(&self, t: &Tracker, addr: usize, fail_open: bool, force: bool) -> Outcome {
        self.tracked_fault(t, addr, fail_open, force)
    }

    fn settle(&self, t: &Tracker, addr: usize) -> bool {
        self.settle_busy(t, addr)
    }

    fn forget(&self, t: &Tracker, start: usize, end: usize, left: &mut Vec<(usize, usize)>) {
        self.tracked_forget_pages(t, start, end, left)
    }

    /// The mm's injected pressure hook, asked on behalf of this mm's task.
    fn pressure(&self, bytes: u64) -> BoxFuture<'static, bool> {
        let (relief, id) = (self.pressure.clone(), self.id());
        Box::pin(async move { relief.relieve(bytes, Some(id)).await })
    }
}
