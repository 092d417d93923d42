//! The mm side of `ksm_add_vma`: an untracked VMA that KSM may merge gets
//! its host mapping registered for userfaultfd write-protect (the merge's
//! step 2 needs it). Reached from `mmap` ([`on_new_vma`]) and
//! `madvise(MERGEABLE)` ([`on_madvise_mergeable`]), both under the mmap
//! write lock, and from mm-ksm's `set_merge_any` ([`prepare_all`]).

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::flags::MmFlag;
use crate::mm::{MmState, MmUser};
use crate::sched;
use crate::sys::PAGE_SIZE;
use crate::vma::{Prot, VmFlags, Vma};

const PAGE: u64 = PAGE_SIZE as u64;

/// `ksm_add_vma`: called by `mmap` under the write lock for every new VMA,
/// before it is published. With `prctl(PR_SET_MEMORY_MERGE)` on
/// (`VM_MERGE_ANY`) the VMA is a KSM candidate from the start. Tested under
/// the write lock, which [`prepare_all`] takes after setting the flag, so
/// no mmap slips between the two.
pub(crate) fn on_new_vma(mm: &MmUser, vma: &Vma) {
    if mm.flags().test(MmFlag::VM_MERGE_ANY) {
        register_wp(mm, vma);
    }
}

/// `madvise(MERGEABLE)` on `[addr, end)`, under the write lock, after
/// `VM_MERGEABLE` was set: an untracked VMA needs its write-protect
/// registration before KSM can merge it ([`register_wp`]). Kept on
/// UNMERGEABLE: harmless, and undone by munmap/exit.
pub(crate) fn on_madvise_mergeable(mm: &MmUser, state: &MmState, addr: u64, end: u64) {
    for v in state.vmas().overlapping(addr, end) {
        if v.ksm_wp_candidate() {
            register_wp(mm, v);
        }
    }
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
/// it like a tracked one. Returns whether the VMA can now be merged;
/// failures (no userfaultfd, no WP) are counted in
/// [`wp_failures`](super::wp_failures) and logged: the VMA is then never merged.
/// Called under the mmap write lock.
pub(crate) fn register_wp(mm: &MmUser, vma: &Vma) -> bool {
    if !vma.ksm_wp_candidate() {
        return vma.region.wp_tracker().is_some();
    }
    if vma.region.ksm_wp().is_some() {
        return true;
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
            t.add_range(vma.region.base() as usize, len, guest, PAGE);
            vma.region.set_ksm_wp(t);
            true
        }
        Err(e) => {
            mm.ksm.wp_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "mm_core::ksm", mm_id = mm.id(), start = vma.start, end = vma.end, error = %e, "mergeable VMA cannot be write-protected with userfaultfd: KSM will not merge it");
            false
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
        if v.ksm_wp_candidate() && !register_wp(mm, v) {
            failed += 1;
        }
    }
    Ok(failed)
}

impl Vma {
    /// Can the mechanism merge this VMA's pages? Private, 4 KiB, readable,
    /// not locked or pinned, and registered with userfaultfd write-protect
    /// (step 2 needs it): a tracked region, or an untracked one registered
    /// for write-protect only when it became mergeable
    /// ([`MmUser::madvise`](crate::MmUser::madvise) `Mergeable`,
    /// [`prepare_all`], an mmap under `VM_MERGE_ANY`). Whether KSM
    /// *should* (`VM_MERGEABLE`) is the scanner's business.
    pub fn ksm_capable(&self) -> bool {
        let no = [
            VmFlags::SHARED,
            VmFlags::HUGEPAGE,
            VmFlags::LOCKED,
            VmFlags::PINNED,
        ];
        !no.iter().any(|f| self.flags.contains(*f))
            && self.prot.contains(Prot::READ)
            && self
                .region
                .wp_tracker()
                .is_some_and(|t| !t.is_dead() && t.wp())
    }

    /// Could this VMA be merged if its host range were registered for
    /// write-protect (private anonymous 4 KiB, not tracked)?
    pub(crate) fn ksm_wp_candidate(&self) -> bool {
        !self.flags.contains(VmFlags::SHARED)
            && !self.flags.contains(VmFlags::HUGEPAGE)
            && !self.flags.contains(VmFlags::TRACKED)
            && self.region.is_anon()
            && self.region.tracker().is_none()
    }
}
