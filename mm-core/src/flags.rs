//! Per-mm atomic flags, the `MMF_*` bits of `mm->flags`.
//!
//! Flags are only ever set (never cleared), except `VM_MERGEABLE`, which the
//! KSM exit paths clear. Every set is `SeqCst` and every test `SeqCst`: these
//! are handshake bits published *before* a lock step (exit_mmap sets
//! `OOM_SKIP` before asking for the write lock) and read *after* another lock
//! step (the reaper tests it under the read lock), so the lock already orders
//! them; `SeqCst` costs nothing on these slow paths and keeps the argument
//! local.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// One `MMF_*` bit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MmFlag(u64);

impl MmFlag {
    /// `MMF_OOM_SKIP`: of no further interest to the OOM killer; do not reap.
    /// Set by exit_mmap before its write lock and by the reaper when it is done.
    pub const OOM_SKIP: MmFlag = MmFlag(1 << 0);
    /// `MMF_UNSTABLE`: contents may have been zapped by the reaper; every
    /// access fails instead of seeing zeros. Never cleared.
    pub const UNSTABLE: MmFlag = MmFlag(1 << 1);
    /// `MMF_OOM_REAP_QUEUED`: queued for the reaper (at most once per mm).
    pub const OOM_REAP_QUEUED: MmFlag = MmFlag(1 << 2);
    /// `MMF_VM_MERGEABLE`: registered with KSM (holds a KSM slot and a grab).
    pub const VM_MERGEABLE: MmFlag = MmFlag(1 << 3);
    /// `MMF_VM_MERGE_ANY`: KSM should consider every compatible VMA.
    pub const VM_MERGE_ANY: MmFlag = MmFlag(1 << 4);
    /// The owning guest was killed (`SIGNAL_GROUP_EXIT`): the API refuses
    /// what a killed task could no longer do (map, protect, lock, advise,
    /// write) with `Error::Killed`; reads, `munmap`, `munlock` and
    /// `DONTNEED` (which only free) still work. Never cleared.
    pub const KILLED: MmFlag = MmFlag(1 << 5);

    fn name(self) -> &'static str {
        match self.0 {
            1 => "OOM_SKIP",
            2 => "UNSTABLE",
            4 => "OOM_REAP_QUEUED",
            8 => "VM_MERGEABLE",
            16 => "VM_MERGE_ANY",
            32 => "KILLED",
            _ => "?",
        }
    }
}

impl fmt::Debug for MmFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The flag word of one [`Mm`](crate::Mm).
#[derive(Default)]
pub struct MmFlags(AtomicU64);

impl MmFlags {
    /// Tests one flag.
    pub fn test(&self, flag: MmFlag) -> bool {
        self.0.load(Ordering::SeqCst) & flag.0 != 0
    }

    /// Sets one flag.
    pub fn set(&self, flag: MmFlag) {
        self.0.fetch_or(flag.0, Ordering::SeqCst);
    }

    /// Sets one flag and says whether it was already set (`test_and_set_bit`).
    pub fn test_and_set(&self, flag: MmFlag) -> bool {
        self.0.fetch_or(flag.0, Ordering::SeqCst) & flag.0 != 0
    }

    /// Clears one flag. Only `VM_MERGEABLE` / `VM_MERGE_ANY` are ever cleared.
    pub fn clear(&self, flag: MmFlag) {
        debug_assert!(
            flag == MmFlag::VM_MERGEABLE || flag == MmFlag::VM_MERGE_ANY,
            "{flag:?} is never cleared"
        );
        self.0.fetch_and(!flag.0, Ordering::SeqCst);
    }
}

impl fmt::Debug for MmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = [
            MmFlag::OOM_SKIP,
            MmFlag::UNSTABLE,
            MmFlag::OOM_REAP_QUEUED,
            MmFlag::VM_MERGEABLE,
            MmFlag::VM_MERGE_ANY,
        ];
        f.debug_set()
            .entries(all.into_iter().filter(|fl| self.test(*fl)))
            .finish()
    }
}
