//! One write-protect window for all the merges of a scanner chunk
//! ([`KsmMm::merge_batch`], issue 12: CPU per saved page).
//!
//! On scattered data most merged runs are one page long, and each run
//! merged alone costs six syscalls besides its `mmap`: a pagemap read,
//! the write-protect ioctl, the registration of the new mapping, the
//! wake, plus the populate. In an untracked mergeable region (registered
//! on the quiet descriptor, where only KSM write-protects, see
//! `tracked/pool.rs`) the runs of one chunk share them:
//!
//! 1. the page locks of every run, in ascending address order (the runs
//!    are sorted and disjoint; PTE locks are always taken ascending);
//! 2. **one** pagemap read of the span (first run to last), then which
//!    pages are private and charged, per run (`run_charged`);
//! 3. **one** `UFFDIO_WRITEPROTECT` of the span: direct writers of any
//!    page in it block from here (pages between the runs too, briefly);
//! 4. per run, in order: fill new stable pages (`pwrite`), or compare with
//!    existing ones (in place), or test for zeros: the contents are frozen;
//! 5. per run that matched: its `mmap` of the stable pages (or its
//!    `DONTNEED`);
//! 6. **one** registration of the span (the new mappings, so that a
//!    private copy made later can be write-protected again; the rest of
//!    the span is registered already);
//! 7. **one** unprotect of the span, which wakes every writer blocked in
//!    it (those of a remapped run refault on the new mapping: copy on
//!    write);
//! 8. the PTEs are published and unlocked, run by run.
//!
//! If step 6 or 7 fails (a registration refused at the map limit leaves
//! the new mapping unregistered, and an unprotect stops at the first
//! unregistered VMA), the span is unprotected piece by piece around the
//! remapped runs and those are woken one by one: no writer is left
//! asleep. Anything else (a tracked region, runs across VMAs or leaves, a
//! span the write-protect refuses) takes the one-run-at-a-time path of
//! `merge.rs`, with the same outcomes.
//!
//! A run that merges onto stable pages another run of the batch fills (a
//! twin of a pair) is only compared and mapped after that run filled and
//! mapped them; if that run did not, the twin is `Changed` (comparing
//! with a page never filled would read a hole, and mapping one the scanner
//! is about to release would lose the twin's contents).

use super::merge::{frozen_run_matches, map_failed};
use super::*;
use crate::sys::HostRange;

/// What one run of a [`KsmMm::merge_batch`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    /// Merge onto existing stable pages `first..` (the run must equal
    /// them).
    Onto(u64),
    /// Fill new stable pages `first..` with the run and map them.
    Fill(u64),
    /// Discard the run if every byte is zero (`use_zero_pages`).
    Zero,
}

/// One run of a batch: `n` pages from `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRun {
    /// First guest address (page aligned).
    pub addr: u64,
    /// Pages in the run.
    pub n: u64,
    /// What to do with it.
    pub op: BatchOp,
}

/// What a run of a batch did: as [`KsmMm::merge`] / [`KsmMm::zero`], with
/// the charged pages of a merged run (see [`KsmMm::merge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// The result.
    pub merge: KsmMerge,
    /// For `Merged` (not `Zero`): which pages were charged to this mm.
    pub charged: Vec<bool>,
}

impl BatchOutcome {
    fn only(merge: KsmMerge) -> BatchOutcome {
        BatchOutcome {
            merge,
            charged: Vec::new(),
        }
    }
}

/// The fill runs of a batch and how far each got: 0 nothing, [`FILLED`]
/// (its stable pages hold its bytes), [`MAPPED`] (and it maps them). See
/// the module docs' last paragraph.
struct Fills(Vec<(u64, u64, u8)>);

const FILLED: u8 = 1;
const MAPPED: u8 = 2;

impl Fills {
    fn of(runs: &[BatchRun]) -> Fills {
        Fills(
            runs.iter()
                .filter_map(|r| match r.op {
                    BatchOp::Fill(first) => Some((first, r.n, 0)),
                    _ => None,
                })
                .collect(),
        )
    }

    /// Does an `Onto` run need stable pages that a fill of this batch has
    /// not brought to stage `need` (yet, or ever)?
    fn blocks(&self, op: BatchOp, n: u64, need: u8) -> bool {
        let BatchOp::Onto(first) = op else {
            return false;
        };
        self.0
            .iter()
            .any(|&(f, m, stage)| stage < need && first < f + m && f < first + n)
    }

    fn reached(&mut self, op: BatchOp, stage: u8) {
        if let BatchOp::Fill(first) = op {
            for e in self.0.iter_mut().filter(|e| e.0 == first) {
                e.2 = stage;
            }
        }
    }
}

/// A run inside the window.
enum St<'g> {
    /// Finished with this outcome (PTEs unlocked or never locked).
    Done(Result<BatchOutcome>),
    /// Locked, charged pages known; `true` once its contents matched.
    Open(Locked<'g>, Vec<bool>, bool),
    /// Remapped (or discarded): publish at step 8.
    Mapped(Locked<'g>, Vec<bool>),
}

impl Mm {
    /// [`KsmMm::merge_batch`]: the runs of one chunk, in one window when
    /// the module docs allow, else one at a time. One outcome per run.
    pub(super) fn ksm_merge_batch(
        &self,
        state: &MmState,
        store: &StableStore,
        runs: &[BatchRun],
    ) -> Vec<Result<BatchOutcome>> {
        self.check_ksm_before_exit();
        match self.batch_window(state, runs) {
            Some((vma, t)) => self.batch_in_window(state, vma, t, store, runs),
            None => self.batch_one_by_one(state, store, runs),
        }
    }

    /// The VMA and quiet tracker of a batch that can share one window:
    /// sorted, disjoint, non-empty runs in one leaf of one untracked VMA
    /// registered on the quiet descriptor.
    fn batch_window<'s>(
        &self,
        state: &'s MmState,
        runs: &[BatchRun],
    ) -> Option<(&'s Vma, &'s Arc<Tracker>)> {
        let (first, last) = (runs.first()?, runs.last()?);
        let sorted = runs.windows(2).all(|w| {
            w[0].n > 0
                && w[0]
                    .addr
                    .checked_add(w[0].n * PAGE)
                    .is_some_and(|e| e <= w[1].addr)
        });
        let end = last.addr.checked_add(last.n.checked_mul(PAGE)?)?;
        if !sorted || last.n == 0 || runs.len() < 2 {
            return None;
        }
        let (vma, t) = self.ksm_wp_vma(state, first.addr, (end - first.addr) / PAGE)?;
        let quiet = !vma.flags.contains(VmFlags::TRACKED)
            && t.is_quiet(vma.host_range(first.addr, first.addr + PAGE).ptr() as usize);
        quiet.then_some((vma, t))
    }

    /// One run at a time (`ksm_merge` / `ksm_zero`), twins after their
    /// fills.
    fn batch_one_by_one(
        &self,
        state: &MmState,
        store: &StableStore,
        runs: &[BatchRun],
    ) -> Vec<Result<BatchOutcome>> {
        let mut fills = Fills::of(runs);
        runs.iter()
            .map(|r| {
                if fills.blocks(r.op, r.n, MAPPED) {
                    return Ok(BatchOutcome::only(KsmMerge::Changed));
                }
                let out = match r.op {
                    BatchOp::Zero => self.ksm_zero(state, r.addr, r.n).map(BatchOutcome::only),
                    BatchOp::Onto(first) | BatchOp::Fill(first) => {
                        let mut charged = vec![false; r.n as usize];
                        let run = MergeRun {
                            addr: r.addr,
                            n: r.n,
                            store,
                            first,
                            fill: matches!(r.op, BatchOp::Fill(_)),
                        };
                        self.ksm_merge(state, run, &mut charged)
                            .map(|merge| BatchOutcome { merge, charged })
                    }
                };
                if matches!(
                    out,
                    Ok(BatchOutcome {
                        merge: KsmMerge::Merged,
                        ..
                    })
                ) {
                    fills.reached(r.op, MAPPED);
                }
                out
            })
            .collect()
    }

    /// Steps 1-8 of the module docs.
    fn batch_in_window(
        &self,
        state: &MmState,
        vma: &Vma,
        t: &Tracker,
        store: &StableStore,
        runs: &[BatchRun],
    ) -> Vec<Result<BatchOutcome>> {
        let lo = runs[0].addr;
        let last = runs[runs.len() - 1];
        let hi = last.addr + last.n * PAGE;
        let span = vma.host_range(lo, hi);
        let host = |r: &BatchRun| vma.host_range(r.addr, r.addr + r.n * PAGE);
        let guard = crossbeam_epoch::pin();
        // 1. Page locks, ascending.
        let mut sts: Vec<St<'_>> = runs
            .iter()
            .map(|r| match self.lock_run(r.addr, r.n, &guard) {
                Some(l) => St::Open(l, Vec::new(), false),
                None => St::Done(Ok(BatchOutcome::only(KsmMerge::Changed))),
            })
            .collect();
        // 2. One pagemap read of the span; which pages are mergeable.
        let mut pm = vec![0u64; ((hi - lo) / PAGE) as usize];
        if let Err(e) = sys::pagemap(span, &mut pm) {
            unlock_all(&mut sts);
            tracing::debug!(target: "mm_core::ksm", mm_id = self.id(), error = %e, "batch pagemap failed; one run at a time");
            return self.batch_one_by_one(state, store, runs);
        }
        for (r, st) in runs.iter().zip(sts.iter_mut()) {
            let St::Open(locked, charged, _) = st else {
                continue;
            };
            let at = ((r.addr - lo) / PAGE) as usize;
            let pms = &pm[at..at + r.n as usize];
            let filemap = locked.olds.iter().any(|o| o & Pte::FILEMAP != 0);
            match Self::run_charged_with(vma, &locked.olds, Some(pms)) {
                Some(_) if filemap && !t.wp_shmem() => {
                    close(st, Ok(BatchOutcome::only(KsmMerge::NotEligible)))
                }
                Some(c) => *charged = c,
                None => close(st, Ok(BatchOutcome::only(KsmMerge::Changed))),
            }
        }
        if sts.iter().all(|s| matches!(s, St::Done(_))) {
            return done_all(sts);
        }
        // 3. One write-protect window over the span.
        if t.writeprotect(span, true).is_err() {
            unlock_all(&mut sts);
            return self.batch_one_by_one(state, store, runs);
        }
        // 4. Fill, compare or test, in order (twins after their fills).
        let mut fills = Fills::of(runs);
        for (r, st) in runs.iter().zip(sts.iter_mut()) {
            let St::Open(_, _, matched) = st else {
                continue;
            };
            if fills.blocks(r.op, r.n, FILLED) {
                close(st, Ok(BatchOutcome::only(KsmMerge::Changed)));
                continue;
            }
            let res = match r.op {
                // SAFETY: page locks held and the span write-protected.
                BatchOp::Zero => Ok(unsafe { sys::host_is_zero(host(r)) }),
                BatchOp::Onto(first) => frozen_run_matches(store, host(r), first, false),
                BatchOp::Fill(first) => frozen_run_matches(store, host(r), first, true),
            };
            match res {
                Ok(true) => {
                    *matched = true;
                    fills.reached(r.op, FILLED);
                }
                Ok(false) => close(st, Ok(BatchOutcome::only(KsmMerge::Changed))),
                Err(e) => close(st, Err(e)),
            }
        }
        // 5. Remap (or discard) each run that matched, in order.
        let mut limited = false;
        for (r, st) in runs.iter().zip(sts.iter_mut()) {
            let St::Open(_, _, true) = st else {
                continue;
            };
            let limited_here = limited && r.op != BatchOp::Zero;
            if limited_here || fills.blocks(r.op, r.n, MAPPED) {
                let m = if limited_here {
                    KsmMerge::MapLimit
                } else {
                    KsmMerge::Changed
                };
                close(st, Ok(BatchOutcome::only(m)));
                continue;
            }
            let hr = host(r);
            // `Err(None)`: the map limit (`ENOMEM`).
            let res: std::result::Result<(), Option<Error>> = match r.op {
                BatchOp::Zero => vma.discard_zero(r.addr, r.addr + r.n * PAGE).map_err(Some),
                BatchOp::Onto(first) | BatchOp::Fill(first) => vma
                    .map_stable(t, hr, store, first)
                    .map_err(|e| map_failed(e).err()),
            };
            match res {
                Ok(()) => {
                    if r.op != BatchOp::Zero {
                        let _ = sys::populate_read(hr);
                    }
                    fills.reached(r.op, MAPPED);
                    let St::Open(l, c, _) =
                        std::mem::replace(st, St::Done(Ok(BatchOutcome::only(KsmMerge::Merged))))
                    else {
                        unreachable!("matched above")
                    };
                    *st = St::Mapped(l, c);
                }
                Err(None) => {
                    limited = true;
                    close(st, Ok(BatchOutcome::only(KsmMerge::MapLimit)));
                }
                Err(Some(e)) => close(st, Err(e)),
            }
        }
        // 6-7. Register the new mappings and unprotect (wake) the span;
        //      piece by piece if either fails.
        let remapped: Vec<HostRange> = runs
            .iter()
            .zip(&sts)
            .filter(|(r, s)| matches!(s, St::Mapped(..)) && r.op != BatchOp::Zero)
            .map(|(r, _)| host(r))
            .collect();
        let registered = remapped.is_empty() || t.register_wp_only(span).is_ok();
        if !registered || t.writeprotect(span, false).is_err() {
            self.unprotect_around(t, vma, runs, &sts, lo, hi);
        }
        // 8. Publish and unlock.
        for (r, st) in runs.iter().zip(sts.iter_mut()) {
            let St::Mapped(..) = st else {
                continue;
            };
            let St::Mapped(locked, was_charged) =
                std::mem::replace(st, St::Done(Ok(BatchOutcome::only(KsmMerge::Merged))))
            else {
                unreachable!("matched above")
            };
            let out = match r.op {
                BatchOp::Zero => {
                    let charged = was_charged.iter().filter(|c| **c).count() as u64;
                    locked.unlock_with(|_, o| {
                        (Pte(o).flags() & !(Pte::PRESENT | Pte::DIRTY)) | Pte::KSM_ZERO
                    });
                    self.uncharge_pages(charged, 0);
                    BatchOutcome::only(KsmMerge::Merged)
                }
                BatchOp::Onto(first) | BatchOp::Fill(first) => {
                    locked.unlock_with(|i, o| merged_pte(o, first + i as u64));
                    let mut charged = vec![false; r.n as usize];
                    self.settle_merged_charges(&was_charged, &mut charged);
                    BatchOutcome {
                        merge: KsmMerge::Merged,
                        charged,
                    }
                }
            };
            *st = St::Done(Ok(out));
        }
        unlock_all(&mut sts);
        done_all(sts)
    }

    /// The slow end of steps 6-7: unprotect every piece of `[lo, hi)`
    /// outside the remapped runs and wake each remapped run.
    fn unprotect_around(
        &self,
        t: &Tracker,
        vma: &Vma,
        runs: &[BatchRun],
        sts: &[St<'_>],
        lo: u64,
        hi: u64,
    ) {
        let mut at = lo;
        for (r, st) in runs.iter().zip(sts) {
            if !matches!(st, St::Mapped(..)) || r.op == BatchOp::Zero {
                continue;
            }
            if at < r.addr {
                let _ = t.writeprotect(vma.host_range(at, r.addr), false);
            }
            let _ = t.wake_range(vma.host_range(r.addr, r.addr + r.n * PAGE));
            at = r.addr + r.n * PAGE;
        }
        if at < hi {
            let _ = t.writeprotect(vma.host_range(at, hi), false);
        }
    }
}

/// The PTE word of a page now mapping stable page `id` (as
/// `publish_merged`).
fn merged_pte(old: u64, id: u64) -> u64 {
    (Pte(old).flags() & !(Pte::PRESENT | Pte::DIRTY | Pte::KSM_ZERO))
        | Pte::KSM
        | Pte::FILEMAP
        | (id << Pte::STABLE_SHIFT)
}

/// Ends an open run with `out`, unlocking its PTEs unchanged.
fn close(st: &mut St<'_>, out: Result<BatchOutcome>) {
    if let St::Open(locked, ..) | St::Mapped(locked, ..) = std::mem::replace(st, St::Done(out)) {
        locked.unlock_with(|_, o| o);
    }
}

/// Unlocks every run still open, unchanged (`Changed`).
fn unlock_all(sts: &mut [St<'_>]) {
    for st in sts.iter_mut() {
        if !matches!(st, St::Done(_)) {
            close(st, Ok(BatchOutcome::only(KsmMerge::Changed)));
        }
    }
}

fn done_all(sts: Vec<St<'_>>) -> Vec<Result<BatchOutcome>> {
    sts.into_iter()
        .map(|s| match s {
            St::Done(out) => out,
            _ => unreachable!("every run was closed"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Advice, Host, MapOptions};

    /// Writes `byte` over page `k` of the mapping at `host` (the embedder
    /// touching an untracked region directly).
    fn fill(host: *mut u8, k: u64, byte: u8) {
        // SAFETY: test-only direct touch of a live mapping of ours.
        unsafe { host.add((k * PAGE) as usize).write_bytes(byte, PAGE_SIZE) };
    }

    fn page(host: *mut u8, k: u64) -> Vec<u8> {
        let mut v = vec![0u8; PAGE_SIZE];
        // SAFETY: reads one page of a live mapping nobody writes now.
        unsafe { sys::copy_from_host(host.add((k * PAGE) as usize), &mut v) };
        v
    }

    /// One window for a chunk's runs: a pair's fill, its twin, a zero run
    /// and a run that changed, with the outcomes and the bytes the one-run
    /// path gives; a twin of a fill that could not happen is `Changed`
    /// (never compared with the hole, never mapped).
    #[test]
    fn test_batch_in_one_window() {
        let host = Host::with_budget(64 << 20);
        let mm = host.new_mm("batch");
        let a = mm.mmap_blocking(MapOptions::anon(16 * PAGE)).unwrap();
        mm.madvise_blocking(a, 16 * PAGE, Advice::Mergeable)
            .unwrap();
        let h = mm.find_vma_blocking(a).unwrap().host_ptr();
        // Page 6 is zeros, like the hole of a stable page never filled:
        // compared with it, it would match.
        for (k, b) in [(0, 7), (1, 1), (2, 7), (3, 0), (4, 9), (6, 0)] {
            fill(h, k, b);
        }
        let store = StableStore::new("batch-test").unwrap();
        let s = store.alloc(2).unwrap();
        let state = futures_lite::future::block_on(mm.lock().read());
        let ksm = KsmMm::new(&mm, &state).unwrap();
        // The scanner's look first (it allocates the page-table leaf whose
        // page locks the merges take).
        let mut buf = vec![0u8; 16 * PAGE_SIZE];
        let mut out = [KsmPage::Absent; 16];
        ksm.snapshot(a, &[true; 16], &mut buf, &mut out).unwrap();
        let run = |k: u64, op| BatchRun {
            addr: a + k * PAGE,
            n: 1,
            op,
        };
        // Page 5 was never touched: its fill is `Changed`, and so is the
        // twin at 6 that would join it.
        let runs = [
            run(0, BatchOp::Fill(s)),
            run(2, BatchOp::Onto(s)),
            run(3, BatchOp::Zero),
            run(4, BatchOp::Onto(s)),
            run(5, BatchOp::Fill(s + 1)),
            run(6, BatchOp::Onto(s + 1)),
        ];
        assert!(mm.batch_window(&state, &runs).is_some(), "not batched");
        let got: Vec<KsmMerge> = ksm
            .merge_batch(&store, &runs)
            .into_iter()
            .map(|o| o.unwrap().merge)
            .collect();
        use KsmMerge::{Changed, Merged};
        assert_eq!(got, [Merged, Merged, Merged, Changed, Changed, Changed]);
        drop(state);
        for (k, b) in [(0, 7), (1, 1), (2, 7), (3, 0), (4, 9), (6, 0)] {
            assert!(page(h, k).iter().all(|x| *x == b), "page {k}");
        }
        // The merged pages are copy-on-write: a write to one is private.
        fill(h, 2, 3);
        assert!(page(h, 0).iter().all(|x| *x == 7));
        let mut b = [0u8; 1];
        mm.read_blocking(a + 3 * PAGE, &mut b).unwrap();
        assert_eq!(b[0], 0);
    }
}
