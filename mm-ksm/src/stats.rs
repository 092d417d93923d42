//! The counters: the kernel's sysfs names (`/sys/kernel/mm/ksm/*`) and
//! `/proc/<pid>/ksm_stat`, and the atomics the scanner publishes the
//! global ones through (the per-guest ones are read from the guest's page
//! table, `Ksm::process_stat`).

/// Counters with the kernel's sysfs names (`/sys/kernel/mm/ksm/*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KsmStats {
    /// Stable pages in use.
    pub pages_shared: u64,
    /// Further mappings of them: the pages saved.
    pub pages_sharing: u64,
    /// Pages in the unstable tree (waiting for a twin).
    pub pages_unshared: u64,
    /// `rmap_items - shared - sharing - unshared`, clamped at 0.
    pub pages_volatile: u64,
    /// Pages looked at by the scanner.
    pub pages_scanned: u64,
    /// Pages skipped by smart scan.
    pub pages_skipped: u64,
    /// Completed full passes (`ksm_scan.seqnr`).
    pub full_scans: u64,
    /// Pages discarded as zero pages (`use_zero_pages`) and not touched since.
    pub ksm_zero_pages: u64,
    /// `(pages_sharing + ksm_zero_pages) * 4096 - rmap_items * sizeof(rmap_item)`.
    pub general_profit: i64,
    /// Rmap items (pages tracked by the scanner).
    pub rmap_items: u64,
    /// Registered mms.
    pub mm_slots: u64,
    /// Merges refused with `ENOMEM` by `vm.max_map_count`.
    pub map_limit_hits: u64,
    /// Pages left unmerged in the last full pass for want of host maps:
    /// the map-count budget (headroom under `vm.max_map_count` minus the
    /// reserve) refused their merge.
    pub pages_unmerged_map_budget: u64,
    /// Merges (runs) the map-count budget refused, since the start.
    pub map_budget_refusals: u64,
    /// Stable pages freed (no mapper left).
    pub stable_pages_freed: u64,
    /// Slots freed by `ksm_exit`'s fast path.
    pub slots_freed_by_exit: u64,
    /// Slots freed by the scanner or unmerge-all.
    pub slots_freed_by_scanner: u64,
}

/// Per-guest counters (`/proc/<pid>/ksm_stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KsmProcessStat {
    /// `ksm_rmap_items`.
    pub rmap_items: u64,
    /// `ksm_merging_pages`: pages of this mm that map a stable page.
    pub merging_pages: u64,
    /// `ksm_zero_pages`.
    pub zero_pages: u64,
}

mm_core::counters! {
    pub(crate) struct Counters -> KsmStats {
        pages_shared, pages_sharing, pages_unshared, rmap_items,
        pages_scanned, pages_skipped, full_scans, ksm_zero_pages,
        map_limit_hits, pages_unmerged_map_budget, map_budget_refusals,
        stable_pages_freed, slots_freed_by_exit,
        slots_freed_by_scanner,
    }
}
