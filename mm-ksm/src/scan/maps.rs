//! The host map-count budget (issue 12). Every merged run is a private
//! mapping of the stable memfd over the guest range: a run in the middle
//! of an anonymous region costs up to two extra host VMAs (its own and
//! the split of the region), and the process has `vm.max_map_count`
//! (65,530 by default) of them in all. Past it, `mmap` fails with
//! `ENOMEM` for everyone: the embedder, the allocator, thread stacks.
//!
//! So the scanner keeps a budget:
//!
//! 1. At the start of a pass (and of every batch once the estimate is
//!    low), headroom = `vm.max_map_count` minus the maps in use (lines
//!    of `/proc/self/maps`, re-read at most every 250 ms at a new pass and
//!    every 20 ms when low, or at once after spending half the reserve)
//!    minus a reserve
//!    ([`KsmConfig::map_reserve`](crate::KsmConfig), default 1,024) that
//!    is never spent, so an unrelated `mmap` never fails because of KSM.
//! 2. Each merge first estimates its cost from its neighbours: a side of
//!    the run whose neighbour is an anonymous page of the same VMA costs
//!    one map (a split), a side next to a merged page or a VMA edge costs
//!    none (the run replaces a piece that was already its own VMA). Zero
//!    pages cost nothing (`use_zero_pages` discards them with
//!    `MADV_DONTNEED`, no mapping).
//! 3. Spend where it saves most: a run that costs two maps per page (an
//!    isolated page) is only merged while more than a quarter of the
//!    pass's headroom is left; cheaper runs (longer runs, pages next to
//!    merged ones) may use it all. A new pair pays for its other side up
//!    front (two more maps per page at most), so a stable page is never
//!    left with one mapper for want of maps.
//! 4. A refused run stays unmerged and is counted: `KsmStats::
//!    pages_unmerged_map_budget` is the count of the last full pass.
//!
//! The estimate is an upper bound for the common cases; the real count
//! is re-read at a later pass (or batch, when low), and `ENOMEM` from the merge itself is
//! still handled (`map_limit_hits`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::MmCtx;
use crate::types::{GuestAddr, PageCount, PAGE};

/// Below this estimated headroom the real count is re-read every batch
/// (at most every [`LOW_REREAD`]).
const LOW_WATER: u64 = 4096;

/// The count is re-read at a new pass only when the last read is this old,
/// or when we spent half the reserve since (then at once): a pass over a
/// few small guests takes tens of milliseconds, and reading the maps of a
/// process with 40,000 of them costs ~5 ms (4 % of the scanner's CPU on
/// scattered data, issue 12). Maps others create meanwhile come out of the
/// reserve, as between two passes before.
const PASS_REREAD: Duration = Duration::from_millis(250);

/// Below [`LOW_WATER`], the least time between two reads: at the ceiling,
/// where nothing more can merge, every batch re-read 65,000 lines (the
/// scanner's CPU per saved page was 2.6x ksmd's at 4 x 192 MiB).
const LOW_REREAD: Duration = Duration::from_millis(20);

/// The budget's state, in the [`Scanner`](super::Scanner).
#[derive(Debug, Default)]
pub(crate) struct MapBudget {
    /// Maps we may still create this batch.
    headroom: u64,
    /// Isolated pages merge only while `headroom` stays above this.
    floor: u64,
    /// Pages left unmerged for want of maps, this pass.
    pub(super) starved: u64,
    /// When the count was last read (`None`: never), and with which
    /// reserve (a new reserve is applied at once).
    read_at: Option<(Instant, u64)>,
    /// Maps spent since.
    spent: u64,
}

/// `/proc/sys/vm/max_map_count`.
pub(crate) fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Maps of this process (lines of `/proc/self/maps`), counted through a
/// 64 KiB buffer: the text of a process with 40,000 maps is 3 MiB, and a
/// buffer that size, once freed, stays resident in the malloc heap (glibc
/// raises its mmap threshold after the first such free), 750 pages off
/// what KSM saves.
pub(crate) fn maps_in_use() -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open("/proc/self/maps").ok()?;
    let mut buf = vec![0u8; 64 << 10];
    let mut lines = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Some(lines),
            Ok(n) => lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

impl MapBudget {
    /// Step 1: at a new pass, or when the running estimate gets low,
    /// re-reads the headroom if the last read is old enough
    /// ([`PASS_REREAD`], [`LOW_REREAD`]), half the reserve was spent since,
    /// or the reserve changed (`/proc/self/maps` of a process with tens of
    /// thousands of maps costs milliseconds); at a new pass also the floor
    /// for isolated pages. Between reads the estimate only goes down by
    /// what we spend, so maps the embedder creates meanwhile come out of
    /// the reserve until the next read.
    pub(super) fn refresh(&mut self, reserve: u64, new_pass: bool) {
        let low = self.headroom <= LOW_WATER;
        if !new_pass && !low {
            return;
        }
        let due = match self.read_at {
            None => true,
            Some((at, r)) => {
                let wait = if low { LOW_REREAD } else { PASS_REREAD };
                r != reserve || at.elapsed() >= wait || self.spent >= reserve / 2
            }
        };
        if due {
            let (Some(max), Some(used)) = (max_map_count(), maps_in_use()) else {
                // No procfs: no budget; ENOMEM handling still applies.
                self.headroom = u64::MAX / 4;
                self.floor = 0;
                return;
            };
            self.headroom = max.saturating_sub(used).saturating_sub(reserve);
            self.read_at = Some((Instant::now(), reserve));
            self.spent = 0;
        }
        if new_pass {
            self.floor = self.headroom / 4;
        }
    }

    /// Steps 2-3: may a merge costing `cost` maps for `pages` pages go
    /// ahead? Spends the maps if so.
    fn spend(&mut self, cost: u64, pages: u64) -> bool {
        if cost == 0 {
            return true;
        }
        let floor = if cost >= 2 * pages { self.floor } else { 0 };
        if self.headroom < cost + floor {
            return false;
        }
        self.headroom -= cost;
        self.spent += cost;
        true
    }
}

/// Step 2: the host maps a merge of `n` pages at `addr` of `cx`'s mm adds
/// (0, 1 or 2).
pub(super) fn run_cost(
    cx: &MmCtx<'_>,
    addr: GuestAddr,
    n: PageCount,
    planned: &dyn Fn(GuestAddr) -> bool,
) -> u64 {
    let Some(vma) = cx.state.vmas().find(addr.0) else {
        return 0;
    };
    let end = addr.add_pages(n.0);
    let merged =
        |a: GuestAddr| planned(a) || cx.items.map.get(&a).is_some_and(|it| it.stable().is_some());
    let left = addr.0 > vma.start() && !merged(GuestAddr(addr.0 - PAGE));
    let right = end.0 < vma.end() && !merged(end);
    u64::from(left) + u64::from(right)
}

/// Steps 2-4 for a merge of `n` pages at `addr` (`extra`: maps paid up
/// front for a pair's other side): `true` if it may go ahead; else the
/// pages are counted as starved.
pub(super) fn allow(cx: &mut MmCtx<'_>, addr: GuestAddr, n: PageCount, extra: u64) -> bool {
    allow_planned(cx, addr, n, extra, &|_| false)
}

/// [`allow`] for a run planned in a chunk's batch: `planned` says which
/// neighbours the batch will have merged by then.
pub(super) fn allow_planned(
    cx: &mut MmCtx<'_>,
    addr: GuestAddr,
    n: PageCount,
    extra: u64,
    planned: &dyn Fn(GuestAddr) -> bool,
) -> bool {
    let cost = run_cost(cx, addr, n, planned) + extra;
    if cx.sc.maps.spend(cost, n.0) {
        return true;
    }
    cx.sc.maps.starved += n.0;
    cx.inner
        .counters
        .map_budget_refusals
        .fetch_add(1, Ordering::Relaxed);
    false
}
