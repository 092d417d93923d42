//! The dirty log of a guest ([`MmConfig::dirty_log`](super::MmConfig)),
//! its in-memory snapshot and its reset.
//!
//! # The dirty log
//!
//! A dirty-logged mm's tracked regions are registered with its shard's
//! `WP_ASYNC` userfaultfd in MISSING + WP mode (`tracked/pool.rs`). Pages
//! come in unprotected (`UFFDIO_COPY` without `MODE_WP`), so a page
//! populated since the last harvest counts as written. A harvest
//! ([`MmUser::take_dirty`]) is one `PAGEMAP_SCAN` walk per VMA with
//! `PM_SCAN_WP_MATCHING`: it reports the pages whose protection is gone
//! and protects them again in the same walk, atomically per page against
//! writers (a write lands before the walk reached its page, and is
//! reported now, or after, and is reported next time). A write to a
//! protected page, from any thread or from the kernel on its behalf (KVM,
//! `O_DIRECT`), only clears the protection, in the kernel: no message, no
//! handler round trip.
//!
//! # Snapshot and reset
//!
//! [`MmUser::snapshot`] (the guest paused):
//!
//! 1. under the mmap read lock, check that every VMA is tracked with a
//!    dirty log, record the layout, and harvest the log (every page is
//!    protected now: a later write is logged);
//! 2. read which pages are present from the mm's page table (see
//!    `present_runs` for why not from `/proc/self/pagemap`);
//! 3. copy each present run through the access path (under its page
//!    locks, so a racing reaper is seen: `Unstable`, never zeros) into the
//!    snapshot's buffer, which is charged to the host budget.
//!
//! [`MmUser::reset`] (the guest paused) puts back exactly what changed:
//!
//! 1. under the read lock, refuse a layout that changed
//!    ([`Error::SnapshotLayout`]), and list the pages written since the
//!    last harvest (`PAGEMAP_SCAN` without re-protecting);
//! 2. a written page that was absent at snapshot time is zapped
//!    (`zap_range`, uncharged), under the same read lock, as
//!    `madvise(DONTNEED)` does, and its hole protected (the kernel reports
//!    an unprotected hole as written);
//! 3. a written page present at snapshot time gets its old bytes back
//!    through the access path (no lock held by us: it takes its own);
//! 4. under the read lock again, the layout is checked once more (the
//!    descriptor is shared with other guests: protecting a range that was
//!    unmapped and reused would hide their writes) and the restored pages
//!    are protected again (`UFFDIO_WRITEPROTECT`);
//! 5. pages present at snapshot time but zapped since (the embedder's own
//!    `DONTNEED`, a balloon) show up as a deficit of the mm's resident
//!    count; only then is the page table walked, and the missing pages are
//!    written back (charged) and protected like step 3-4.
//!
//! The budget and the resident set end where they were at snapshot time.
//!
//! # The base of diff snapshot files
//!
//! A diff snapshot file (`snapshot.rs`) holds the pages written since the
//! previous snapshot file of the guest, and marks the pages that became
//! absent since. For that the mm keeps a [`DiffState`]: the id of the last
//! snapshot file and which pages were present when it was written (one bit
//! per page of its layout, by guest address), valid only while the dirty
//! log was harvested by nobody else since. Every other harvest
//! ([`MmUser::take_dirty`], [`MmUser::snapshot`], [`MmUser::reset`],
//! which re-protects what it puts back) bumps its generation and drops the
//! base, so a diff after one is refused ([`Error::NoDiffBase`]) instead of
//! silently missing the pages that harvest took.

use std::ops::Range;

use super::*;
use crate::error::{Error, Result};
use crate::pgtable::{Pte, PAGES_PER_LEAF};
use crate::sys::{self, PAGE_SIZE};
use crate::vma::{VmFlags, Vma};

const PAGE: u64 = PAGE_SIZE as u64;
/// Runs re-protected one `UFFDIO_WRITEPROTECT` each; above, one
/// `PAGEMAP_SCAN` walk over their span (`write_back`).
const WP_IOCTL_RUNS: usize = 64;
/// Page regions read per `PAGEMAP_SCAN` call.
const SCAN_BATCH: usize = 512;

/// One VMA of a snapshot's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LayoutVma {
    start: u64,
    end: u64,
    prot: Prot,
    flags: VmFlags,
}

impl LayoutVma {
    fn of(v: &Vma) -> LayoutVma {
        LayoutVma {
            start: v.start,
            end: v.end,
            prot: v.prot,
            flags: v.flags,
        }
    }
}

/// A guest's memory at one moment, in memory: its layout, which pages were
/// present, and their contents. Taken by [`MmUser::snapshot`], put back by
/// [`MmUser::reset`]. Its buffer holds only the present pages (the rest is
/// never touched, so it costs nothing) and is charged to the host budget
/// until the snapshot is dropped.
pub struct GuestSnapshot {
    mm_id: u64,
    layout: Vec<LayoutVma>,
    /// Offset of each VMA's first page in `data` / `present` (pages).
    first_page: Vec<u64>,
    /// One bit per page of the layout: present at snapshot time.
    present: Vec<u64>,
    present_pages: u64,
    /// The pages' contents, at `page index * PAGE_SIZE`.
    data: Vec<u8>,
    budget: Arc<Budget>,
    charged: u64,
    /// [`DiffState::files`] when taken: a snapshot file written since
    /// harvested the log, so a reset could not see the writes before it.
    files: u64,
}

impl std::fmt::Debug for GuestSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSnapshot")
            .field("mm_id", &self.mm_id)
            .field("vmas", &self.layout.len())
            .field("present_pages", &self.present_pages)
            .finish()
    }
}

impl Drop for GuestSnapshot {
    fn drop(&mut self) {
        self.budget.uncharge(self.charged);
    }
}

impl GuestSnapshot {
    /// Pages present at snapshot time (their bytes are held).
    pub fn present_pages(&self) -> u64 {
        self.present_pages
    }

    /// Bytes of guest memory the snapshot holds (charged to the budget).
    pub fn bytes(&self) -> u64 {
        self.charged
    }

    /// Was the page at guest address `addr` present at snapshot time?
    pub fn was_present(&self, addr: u64) -> bool {
        self.page_index(addr).is_some_and(|i| self.bit(i))
    }

    /// The snapshot's bytes of the page at `addr` (page aligned down);
    /// `None` if it was not mapped or not present.
    pub fn page(&self, addr: u64) -> Option<&[u8]> {
        let i = self.page_index(addr).filter(|&i| self.bit(i))?;
        let off = (i * PAGE) as usize;
        Some(&self.data[off..off + PAGE_SIZE])
    }

    fn page_index(&self, addr: u64) -> Option<u64> {
        let k = self
            .layout
            .iter()
            .position(|v| v.start <= addr && addr < v.end)?;
        Some(self.first_page[k] + (addr - self.layout[k].start) / PAGE)
    }

    fn bit(&self, i: u64) -> bool {
        self.present[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Guest runs of `[start, end)` (inside VMA `k`) split by presence at
    /// snapshot time: `(run, present)`.
    fn split_by_presence(&self, k: usize, start: u64, end: u64) -> Vec<(Range<u64>, bool)> {
        let v = &self.layout[k];
        let mut out: Vec<(Range<u64>, bool)> = Vec::new();
        let mut a = start;
        while a < end {
            let p = self.bit(self.first_page[k] + (a - v.start) / PAGE);
            match out.last_mut() {
                Some((r, q)) if *q == p && r.end == a => r.end = a + PAGE,
                _ => out.push((a..a + PAGE, p)),
            }
            a += PAGE;
        }
        out
    }

    fn data_of(&self, k: usize, r: &Range<u64>) -> &[u8] {
        let off = ((self.first_page[k] + (r.start - self.layout[k].start) / PAGE) * PAGE) as usize;
        &self.data[off..off + (r.end - r.start) as usize]
    }
}

/// The state a diff snapshot file is written against (module docs): the
/// last snapshot file's id and presence, or why there is none.
#[derive(Debug)]
pub(crate) struct DiffState {
    /// Bumped by every harvest of the dirty log (ours included): a writer
    /// installs its base only if nobody harvested after it.
    pub(crate) gen: u64,
    /// Bumped by every snapshot file writer's harvest: an in-memory
    /// [`GuestSnapshot`] taken before one cannot be reset to (the writes
    /// before the file are in no log any more).
    pub(crate) files: u64,
    /// The base, or why a diff cannot be written now.
    pub(crate) base: std::result::Result<DiffBase, &'static str>,
}

/// No full snapshot file was written yet.
const NO_BASE: &str = "no full snapshot file of this guest was written (snapshot_to_file)";
/// Someone else harvested the log.
const HARVESTED: &str =
    "the dirty log was harvested since the last snapshot file (take_dirty, snapshot or reset)";

impl Default for DiffState {
    fn default() -> Self {
        DiffState {
            gen: 0,
            files: 0,
            base: Err(NO_BASE),
        }
    }
}

/// The last snapshot file of a guest, as a diff needs it.
#[derive(Debug, Clone)]
pub(crate) struct DiffBase {
    /// The file's snapshot id (a diff records it as its parent).
    pub(crate) id: u128,
    /// Each VMA of its layout, `[start, end)`, with one bit per page:
    /// present (saved, or inherited from its own parent) in the file's
    /// merged view. Ascending.
    pub(crate) present: Vec<(u64, u64, Vec<u64>)>,
}

impl DiffBase {
    /// The base's presence of the pages of `[start, end)`, one bit per
    /// page (pages outside its layout: absent).
    pub(crate) fn presence(&self, start: u64, end: u64) -> Vec<u64> {
        let pages = ((end - start) / PAGE) as usize;
        let mut out = vec![0u64; pages.div_ceil(64)];
        for (s, e, bits) in &self.present {
            let (lo, hi) = ((*s).max(start), (*e).min(end));
            let mut a = lo;
            while a < hi {
                let q = ((a - s) / PAGE) as usize;
                if bits[q / 64] & (1 << (q % 64)) != 0 {
                    let p = ((a - start) / PAGE) as usize;
                    out[p / 64] |= 1 << (p % 64);
                }
                a += PAGE;
            }
        }
        out
    }
}

impl Mm {
    fn diff_state(&self) -> std::sync::MutexGuard<'_, DiffState> {
        // Only read or replaced whole under it: a panic leaves it valid.
        self.diff.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reset to `snap` would miss the writes a snapshot file's harvest
    /// took from the log since `snap` was taken: refused.
    fn check_no_file_since(&self, snap: &GuestSnapshot) -> Result<()> {
        if self.diff_state().files == snap.files {
            return Ok(());
        }
        Err(Error::SnapshotLayout {
            why: "a snapshot file was written since (its harvest of the dirty log hides \
                  the writes before it): take a new snapshot",
        })
    }

    /// A harvest of the dirty log other than a snapshot file's: the next
    /// diff would miss what it took.
    fn diff_base_harvested(&self) {
        let mut d = self.diff_state();
        d.gen += 1;
        if d.base.is_ok() {
            d.base = Err(HARVESTED);
        }
    }

    /// A snapshot file writer is about to harvest the log (under the mmap
    /// write lock): returns its generation and, for a diff (`need`), the
    /// base it is written against. The base is taken: until
    /// [`diff_base_install`](Self::diff_base_install) there is none, so a
    /// writer that fails after its harvest leaves none. A diff without a
    /// base gets [`Error::NoDiffBase`] and changes nothing.
    pub(crate) fn diff_base_take(&self, need: bool) -> Result<(u64, Option<DiffBase>)> {
        let mut d = self.diff_state();
        if need {
            if let Err(why) = d.base {
                return Err(Error::NoDiffBase { why });
            }
        }
        d.gen += 1;
        d.files += 1;
        let base = std::mem::replace(
            &mut d.base,
            Err("the last snapshot file was not completed: write a full one"),
        );
        Ok((d.gen, base.ok().filter(|_| need)))
    }

    /// The writer of generation `gen` finished: `base` (its file) becomes
    /// the base of the next diff, unless the log was harvested since.
    pub(crate) fn diff_base_install(&self, gen: u64, base: DiffBase) {
        let mut d = self.diff_state();
        if d.gen == gen {
            d.base = Ok(base);
        }
    }

    /// The writer of generation `gen` wrote a file no diff can follow (a
    /// guest with a VMA that keeps no dirty log): say why.
    pub(crate) fn diff_base_none(&self, gen: u64, why: &'static str) {
        let mut d = self.diff_state();
        if d.gen == gen {
            d.base = Err(why);
        }
    }
}

/// What a [`MmUser::reset`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Pages written since the snapshot (or the last reset) whose bytes
    /// were put back.
    pub pages_restored: u64,
    /// Pages populated since the snapshot and zapped (uncharged).
    pub pages_discarded: u64,
    /// Pages present at snapshot time, zapped since, written back.
    pub pages_refilled: u64,
}

impl MmUser {
    /// Guest page ranges of `[addr, addr+len)` written since the last
    /// harvest (or populated since: a page comes in unprotected), sorted;
    /// they are protected again in the same page-table walk, so the next
    /// call reports only later writes. Needs
    /// [`MmConfig::dirty_log`](super::MmConfig) and a tracked range
    /// ([`Error::NotTracked`], [`Error::NotAllowed`] otherwise).
    pub async fn take_dirty(&self, addr: u64, len: u64) -> Result<Vec<Range<u64>>> {
        self.dirty(addr, len, true).await
    }

    /// [`take_dirty`](Self::take_dirty) without protecting anything: the
    /// log is left as it is (the next `take_dirty` reports the same pages
    /// and any later writes).
    pub async fn peek_dirty(&self, addr: u64, len: u64) -> Result<Vec<Range<u64>>> {
        self.dirty(addr, len, false).await
    }

    async fn dirty(&self, addr: u64, len: u64, reprotect: bool) -> Result<Vec<Range<u64>>> {
        let end = check_range(addr, len, self.config.va_limit)?;
        let state = self.lock.read().await;
        state.vmas.check_mapped(addr, end)?;
        if reprotect {
            self.diff_base_harvested();
        }
        let mut out = Vec::new();
        for v in state.vmas.overlapping(addr, end) {
            self.check_dirty_logged(v)?;
            let (s, e) = (v.start.max(addr), v.end.min(end));
            written_runs(v, s, e, reprotect, &mut out)?;
        }
        Ok(out)
    }

    /// The VMA keeps a dirty log (tracked, on a live `WP_ASYNC` tracker).
    pub(crate) fn check_dirty_logged(&self, v: &Vma) -> Result<()> {
        if !v.flags.contains(VmFlags::TRACKED) {
            return Err(Error::NotTracked { addr: v.start });
        }
        match v.region.tracker() {
            Some(t) if t.is_dead() => Err(Error::TrackerDead { mm_id: self.id }),
            Some(t) if t.wp_async() => Ok(()),
            _ => Err(Error::NotAllowed {
                addr: v.start,
                reason: "a dirty log (take_dirty, snapshot, reset) needs MmConfig::dirty_log",
            }),
        }
    }

    /// Takes a snapshot of the guest's memory (see the module docs). The
    /// guest must be paused: a write racing the copy lands in the snapshot
    /// or in the log, never silently in neither, but the snapshot is then
    /// not one moment of the guest. Every VMA must be tracked with a dirty
    /// log; the copy is charged to the budget ([`Error::OutOfMemory`]
    /// when it does not fit).
    pub async fn snapshot(&self) -> Result<GuestSnapshot> {
        self.check_not_killed()?;
        let files;
        let (layout, present) = {
            let state = self.lock.read().await;
            let mut layout = Vec::new();
            let mut present = Vec::new();
            for v in state.vmas.iter() {
                self.check_dirty_logged(v)?;
            }
            self.diff_base_harvested();
            files = self.diff_state().files;
            for v in state.vmas.iter() {
                layout.push(LayoutVma::of(v));
                // Protect everything first: a write after this is logged.
                written_runs(v, v.start, v.end, true, &mut Vec::new())?;
                present.push(present_runs(self, v));
            }
            (layout, present)
        };
        let mut first_page = Vec::with_capacity(layout.len());
        let mut pages = 0u64;
        for v in &layout {
            first_page.push(pages);
            pages += (v.end - v.start) / PAGE;
        }
        let present_pages: u64 = present
            .iter()
            .flatten()
            .map(|r| (r.end - r.start) / PAGE)
            .sum();
        let charged = present_pages * PAGE;
        self.budget
            .try_charge(charged)
            .map_err(|e| e.into_error())?;
        let mut snap = GuestSnapshot {
            mm_id: self.id,
            layout,
            first_page,
            present: vec![0u64; pages.div_ceil(64) as usize],
            present_pages,
            // Zeroed by mmap for a large size: untouched pages cost nothing.
            data: vec![0u8; (pages * PAGE) as usize],
            budget: self.budget.clone(),
            charged,
            files,
        };
        for (k, runs) in present.iter().enumerate() {
            for r in runs {
                let first = snap.first_page[k] + (r.start - snap.layout[k].start) / PAGE;
                for i in first..first + (r.end - r.start) / PAGE {
                    snap.present[(i / 64) as usize] |= 1 << (i % 64);
                }
                let off = (first * PAGE) as usize;
                let dst = &mut snap.data[off..off + (r.end - r.start) as usize];
                self.read(r.start, dst).await?;
            }
        }
        Ok(snap)
    }

    /// Puts the guest's memory back to `snap` (see the module docs), the
    /// guest paused: only the pages written since the snapshot (or the
    /// last reset) are copied back; pages populated since are zapped and
    /// uncharged. A guest whose layout changed since gets
    /// [`Error::SnapshotLayout`] (nothing is changed); a snapshot of
    /// another guest [`Error::InvalidArgument`]; a killed or unstable guest
    /// its error, never zeroed memory.
    pub async fn reset(&self, snap: &GuestSnapshot) -> Result<ResetStats> {
        if snap.mm_id != self.id {
            return Err(Error::InvalidArgument {
                what: "reset: the snapshot is of another guest",
            });
        }
        self.check_not_killed()?;
        let mut stats = ResetStats::default();
        // Steps 1-2.
        let mut restore: Vec<(usize, Range<u64>)> = Vec::new();
        {
            let state = self.lock.read().await;
            check_layout(&state, snap)?;
            self.check_no_file_since(snap)?;
            // The reset re-protects what it puts back: those changes are
            // in no log a diff snapshot file could read.
            self.diff_base_harvested();
            let vmas: Vec<&Vma> = state.vmas.iter().collect();
            for (k, v) in vmas.into_iter().enumerate() {
                let mut written = Vec::new();
                written_runs(v, v.start, v.end, false, &mut written)?;
                for w in written {
                    for (r, was) in snap.split_by_presence(k, w.start, w.end) {
                        if was {
                            stats.pages_restored += (r.end - r.start) / PAGE;
                            restore.push((k, r));
                        } else {
                            stats.pages_discarded += (r.end - r.start) / PAGE;
                            self.zap_range(&state, v, r.start, r.end, ZapReason::DontNeed)?;
                            // The zap leaves holes the kernel reports as
                            // written until protected: protect them (a
                            // marker per hole), or every later reset would
                            // zap them again.
                            written_runs(v, r.start, r.end, true, &mut Vec::new())?;
                        }
                    }
                }
            }
        }
        // Steps 3-4.
        self.write_back(snap, &restore).await?;
        // Step 5: pages lost since the snapshot.
        if self.rss_pages() < snap.present_pages {
            let mut lost: Vec<(usize, Range<u64>)> = Vec::new();
            {
                let state = self.lock.read().await;
                check_layout(&state, snap)?;
                self.check_no_file_since(snap)?;
                for (k, v) in state.vmas.iter().enumerate() {
                    let now = present_runs(self, v);
                    let mut i = 0;
                    for (r, was) in snap.split_by_presence(k, v.start, v.end) {
                        if !was {
                            continue;
                        }
                        // The parts of `r` not covered by `now`.
                        let mut a = r.start;
                        while i < now.len() && now[i].end <= a {
                            i += 1;
                        }
                        let mut j = i;
                        while a < r.end {
                            match now.get(j) {
                                Some(n) if n.start < r.end => {
                                    if n.start > a {
                                        lost.push((k, a..n.start));
                                    }
                                    a = a.max(n.end);
                                    j += 1;
                                }
                                _ => {
                                    lost.push((k, a..r.end));
                                    a = r.end;
                                }
                            }
                        }
                    }
                }
            }
            stats.pages_refilled = lost.iter().map(|(_, r)| (r.end - r.start) / PAGE).sum();
            self.write_back(snap, &lost).await?;
        }
        Ok(stats)
    }

    /// Copies the snapshot's bytes of `runs` back through the access path,
    /// then protects them again under the read lock (steps 3-4).
    async fn write_back(&self, snap: &GuestSnapshot, runs: &[(usize, Range<u64>)]) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        for (k, r) in runs {
            self.write(r.start, snap.data_of(*k, r)).await?;
        }
        let state = self.lock.read().await;
        check_layout(&state, snap)?;
        self.check_no_file_since(snap)?;
        let vmas: Vec<&Vma> = state.vmas.iter().collect();
        if runs.len() > WP_IOCTL_RUNS {
            // One walk per VMA over the span of its runs: each
            // UFFDIO_WRITEPROTECT flushes the TLB on its own (~1.3 µs a
            // page here); a PAGEMAP_SCAN walk protects every written page of
            // the span with one flush.
            for (k, v) in vmas.iter().enumerate() {
                let mine = runs.iter().filter(|(j, _)| *j == k);
                let lo = mine.clone().map(|(_, r)| r.start).min();
                let hi = mine.map(|(_, r)| r.end).max();
                if let (Some(lo), Some(hi)) = (lo, hi) {
                    written_runs(v, lo, hi, true, &mut Vec::new())?;
                }
            }
            return Ok(());
        }
        for (k, r) in runs {
            let v = vmas[*k];
            let t = v
                .region
                .tracker()
                .ok_or(Error::NotTracked { addr: r.start })?;
            let h = v.host_range(r.start, r.end);
            t.with_uffd(|u| u.writeprotect(h.ptr() as usize, h.len(), true))
                .map_err(Error::host("UFFDIO_WRITEPROTECT"))?;
        }
        Ok(())
    }
}

/// The guest's layout still is the snapshot's.
fn check_layout(state: &MmState, snap: &GuestSnapshot) -> Result<()> {
    let now: Vec<LayoutVma> = state.vmas.iter().map(LayoutVma::of).collect();
    if now == snap.layout {
        return Ok(());
    }
    let why = if now.len() != snap.layout.len() {
        "a mapping was added or removed since the snapshot"
    } else if now
        .iter()
        .zip(&snap.layout)
        .any(|(a, b)| (a.start, a.end) != (b.start, b.end))
    {
        "a mapping moved, grew or shrank since the snapshot"
    } else if now.iter().zip(&snap.layout).any(|(a, b)| a.prot != b.prot) {
        "a mapping's protection changed since the snapshot"
    } else {
        "a mapping's flags (mlock, madvise) changed since the snapshot"
    };
    Err(Error::SnapshotLayout { why })
}

/// Appends the guest runs of `[s, e)` of `v` written since last protected
/// (`PAGEMAP_SCAN`), protecting them again when `reprotect`.
pub(crate) fn written_runs(
    v: &Vma,
    s: u64,
    e: u64,
    reprotect: bool,
    out: &mut Vec<Range<u64>>,
) -> Result<()> {
    let h = v.host_range(s, e);
    let (hs, he) = (h.ptr() as usize, h.ptr() as usize + h.len());
    let to_guest = |a: usize| s + (a - hs) as u64;
    let mut buf = vec![
        sys::PageRegion {
            start: 0,
            end: 0,
            categories: 0
        };
        SCAN_BATCH
    ];
    let mut at = hs;
    while at < he {
        let (n, walk_end) = sys::pagemap_scan_written(at, he, reprotect, &mut buf)
            .map_err(Error::host("PAGEMAP_SCAN"))?;
        for r in &buf[..n] {
            let (a, b) = (to_guest(r.start as usize), to_guest(r.end as usize));
            match out.last_mut() {
                Some(l) if l.end == a => l.end = b,
                _ => out.push(a..b),
            }
        }
        if walk_end <= at {
            break;
        }
        at = walk_end;
    }
    Ok(())
}

/// The guest runs of `v` whose page is present in the mm's page table. For
/// a tracked region it records every populated page (the handler and the
/// access path set `PRESENT` under the page lock, zaps and foreign
/// `REMOVE`s clear it), swapped-out pages included. `/proc/self/pagemap`
/// cannot serve here: the dirty log's write-protect markers on never
/// populated pages read as swapped entries, which an unprivileged process
/// cannot tell from real ones (the swap offset is hidden).
pub(crate) fn present_runs(mm: &Mm, v: &Vma) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let guard = crossbeam_epoch::pin();
    let (first, last) = (v.start / PAGE, v.end / PAGE);
    let mut gpn = first;
    while gpn < last {
        let leaf_end = ((gpn / PAGES_PER_LEAF) + 1) * PAGES_PER_LEAF;
        let stop = leaf_end.min(last);
        if let Some(leaf) = mm.pgtable.leaf(gpn, &guard) {
            for g in gpn..stop {
                if Pte(leaf.pte(g).load(Ordering::Acquire)).present() {
                    let a = g * PAGE;
                    match out.last_mut() {
                        Some(l) if l.end == a => l.end = a + PAGE,
                        _ => out.push(a..a + PAGE),
                    }
                }
            }
        }
        gpn = stop;
    }
    out
}
