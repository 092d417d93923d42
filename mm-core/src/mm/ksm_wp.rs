//! The mm side of `ksm_add_vma`: an untracked VMA that KSM may merge gets
//! its host mapping registered for userfaultfd write-protect (the merge's
//! step 2 in `ksm/`, which needs it). Reached from `mmap` ([`on_new_vma`])
//! and `madvise(MERGEABLE)` ([`on_madvise_mergeable`]), both under the mmap
//! write lock, and from mm-ksm's `set_merge_any` ([`prepare_all`], exported
//! as `mm_core::ksm::prepare_all`). The registration is the mm's (its
//! tracker, its write lock), so it lives here and `mm` never calls into
//! `ksm`; the KSM mechanism above reads the result through
//! `Vma::ksm_capable` and [`KsmMmState`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::{MmState, MmUser};
use crate::error::{Error, Result};
use crate::flags::MmFlag;
use crate::sched;
use crate::vma::{VmFlags, Vma};

/// `ksm_add_vma`: called by `mmap` under the write lock for every new VMA,
/// before it is published. With `prctl(PR_SET_MEMORY_MERGE)` on
/// (`VM_MERGE_ANY`) the VMA is a KSM candidate from the start. Tested under
/// the write lock, which [`prepare_all`] takes after setting the flag, so
/// no mmap slips between the two.
pub(crate) fn on_new_vma(mm: &MmUser, vma: &Vma) {
    if mm.flags().test(MmFlag::VM_MERGE_ANY) {
        // Counted and logged (`wp_failures`); the mmap itself stands.
        let _ = register_wp(mm, vma);
    }
}

/// `madvise(MERGEABLE)` on `[addr, end)`, under the write lock, before
/// `VM_MERGEABLE` is set: an untracked VMA needs its write-protect
/// registration before KSM can merge it ([`register_wp`]). A VMA that
/// could merge but cannot be registered makes the advice fail
/// ([`Error::MergeUnavailable`]) instead of a silent `Ok` for a range that
/// would never merge; the caller then leaves the flag alone. Kept on
/// UNMERGEABLE: harmless, and undone by munmap/exit.
pub(crate) fn on_madvise_mergeable(
    mm: &MmUser,
    state: &MmState,
    addr: u64,
    end: u64,
) -> Result<()> {
    for v in state.vmas().overlapping(addr, end) {
        if v.ksm_wp_candidate() {
            register_wp(mm, v).map_err(|source| Error::MergeUnavailable {
                addr: v.start.max(addr),
                source: Box::new(source),
            })?;
        }
    }
    Ok(())
}

/// Registers the host mapping under `vma` (an untracked private
/// anonymous 4 KiB VMA becoming a KSM candidate) with the mm's
/// userfaultfd for **write-protect only**, starting the tracker and its
/// handler if this mm had no tracked region. No MISSING mode: first
/// touches stay the kernel's, so the region keeps its untracked
/// charging (pages touched through the host pointer are not charged).
/// The merge (`ksm/merge.rs`) then has its write-protect window; the
/// handler leaves write faults blocked until the window closes. The
/// whole host mapping is registered at once (slices of it can become
/// VMAs of their own); munmap, a region's drop and exit_mmap unregister
/// it like a tracked one. A failure (no userfaultfd, no WP) is counted in
/// `mm_core::ksm::wp_failures`, logged, and returned: the VMA is then never
/// merged. Called under the mmap write lock.
pub(crate) fn register_wp(mm: &MmUser, vma: &Vma) -> Result<()> {
    if !vma.ksm_wp_candidate() || vma.region.ksm_wp().is_some() {
        return Ok(());
    }
    let len = vma.region.len();
    let res = mm.tracker_or_start_wp().and_then(|t| {
        t.register_wp_anon(vma.region.range(0, len))?;
        Ok(t)
    });
    match res {
        Ok(t) => {
            // Guest address of the mapping's first byte: VMAs slice
            // their region at contiguous offsets.
            let guest = vma.start - vma.region_off as u64;
            t.add_wp_range(vma.region.base() as usize, len, guest);
            vma.region.set_ksm_wp(t);
            Ok(())
        }
        Err(e) => {
            mm.ksm.wp_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "mm_core::ksm", mm_id = mm.id(), start = vma.start, end = vma.end, error = %e, "mergeable VMA cannot be write-protected with userfaultfd: KSM will not merge it");
            Err(e)
        }
    }
}

/// `VM_MERGE_ANY` was just set (mm-ksm's `set_merge_any`): registers
/// every untracked VMA that KSM may now merge, as `madvise(MERGEABLE)`
/// does for its range (see `register_wp`). Takes the write lock.
/// Returns how many VMAs cannot be merged for lack of write-protect.
pub async fn prepare_all(mm: &MmUser) -> Result<u64> {
    let state = mm.lock().write().await;
    sched::point("ksm_prepare:locked").await;
    if mm.flags().test(MmFlag::UNSTABLE) {
        return Err(Error::Unstable { mm_id: mm.id() });
    }
    let mut failed = 0;
    for v in state.vmas().iter() {
        if v.ksm_wp_candidate() && register_wp(mm, v).is_err() {
            failed += 1;
        }
    }
    Ok(failed)
}

impl Vma {
    /// Could this VMA be merged if its host range were registered for
    /// write-protect (private anonymous, huge-page or not, not tracked)?
    pub(crate) fn ksm_wp_candidate(&self) -> bool {
        !self.flags.contains(VmFlags::SHARED)
            && !self.flags.contains(VmFlags::TRACKED)
            && self.region.is_anon()
            && self.region.tracker().is_none()
    }
}

/// The per-mm state of the write-protect registration, kept in the
/// [`Mm`](super::Mm) and read by the KSM seam (`mm_core::ksm::wp_failures`).
#[derive(Debug, Default)]
pub(crate) struct KsmMmState {
    /// Mergeable untracked VMAs whose host range could not be registered
    /// for userfaultfd write-protect (no userfaultfd, no WP): KSM skips
    /// them.
    pub(crate) wp_failures: AtomicU64,
}
