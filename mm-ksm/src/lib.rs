//! # mm-ksm: KSM-style deduplication of guest memory
//!
//! Identical pages of guests (the same kernel image, the same module data,
//! zeroed memory) are merged onto one **stable page**, and the host really
//! frees the copies: the stable pages live in a memfd, and a merge maps the
//! stable page over the guest page with `MAP_FIXED | MAP_PRIVATE` inside a
//! userfaultfd write-protect window (mm-core's `ksm` module has the mechanism
//! and its race diagram). A later write by anyone (vCPU, JIT code, the copy
//! API) is copy-on-write in the kernel. Savings show in PSS, not RSS.
//!
//! Tracked and untracked private anonymous 4 KiB VMAs merge. An untracked
//! one is registered with the mm's userfaultfd for write-protect only when
//! it becomes a candidate ([`Ksm::madvise`] `Mergeable`,
//! [`Ksm::set_merge_any`]); pages the embedder touched through the host
//! pointer are found with pagemap and, never having been charged, are not
//! uncharged by their merge. Without userfaultfd write-protect such a VMA is
//! registered but never merged (`mm_core::ksm::wp_failures`, a `warn` event).
//! Shared and pinned VMAs never merge (mlocked ones do, and stay locked;
//! huge-page ones do, their huge page split), but a mergeable one keeps its
//! mm registered (and its merged pages) until it can again.
//! Guests can be kept apart in tenant domains ([`Ksm::enter_domain`]);
//! merges are bounded by a host map-count budget (`scan/maps.rs`).
//!
//! # Layers
//!
//! ```text
//! lib.rs        Ksm: the knobs, madvise / set_merge_any, the thread, stats();
//!               owns Inner (the state the layers below share)
//! scan/         ksmd under the scanner mutex: mod (the batch, steps 2-3, 5-7),
//!               walk (step 4), classify (a chunk: snapshot, checksums,
//!               trees), merge (runs of hits, the pairs' other side),
//!               maps (the host map-count budget), stable (trees + rmap
//!               items), unmerge (run = 2)
//! slots.rs      Slot, the scan list and cursor, ksm_enter / ksm_exit
//! stats.rs types.rs error.rs
//! ------------------------------------------------------------------------
//! mm-core       the mm side of a merge, reached only through the mmap
//!               guard: mm_core::ksm::KsmMm::new(&mm, &state) (snapshot,
//!               merge, zero, unshare), StableStore; mm-core never names
//!               this crate (its madvise(UNMERGEABLE) hook is mm-core's own)
//! ```
//!
//! `scan/` and `slots.rs` reach `Inner` (lib.rs) and each other's types
//! (`Slot`; `SlotItems` for `ksm_exit`'s fast-path test); nothing in mm-ksm
//! depends on mm-reaper, and the lock order is mm-core's (top of
//! `mm-core/src/lib.rs`).
//!
//! # Overview (mm/ksm.c `DOC: Overview`, adapted)
//!
//! * **Slots** ([`Ksm::enter`], `__ksm_enter`): one per registered mm, in a
//!   dashmap keyed by mm id and in the ordered scan list, each holding one
//!   grab (`mm_count`, never a user) on its mm. `VM_MERGEABLE` is set on the
//!   mm and an [`ExitHook`](mm_core::ExitHook) (`ksm_exit`) is registered.
//! * **Rmap items**: one per scanned page, with the page's last checksum
//!   and, once merged, its stable page. Owned by the scanner (under the
//!   scanner mutex, `ksm_thread_mutex`); a slot publishes only its count.
//! * **Unstable tree**: checksum → the first page seen with it **in this
//!   pass**, for pages whose checksum did not change since the last pass
//!   (volatile pages are skipped). Reset at the start of every full pass
//!   and never trusted: a hit is compared byte for byte inside the merge's
//!   write-protect window.
//! * **Stable tree**: checksum → stable pages with that content, each with
//!   its number of mappers (at most `max_page_sharing`). It holds no page
//!   reference: a mapper that was copied (pagemap shows an anonymous page),
//!   zapped or unmapped is found by the next pass and dropped; a stable page
//!   with no mapper left is freed (hole punched).
//!
//! # The scan (`ksm_do_scan`, PROTOCOL §9.4)
//!
//! 1. Take the scanner mutex for one batch of `pages_to_scan` pages.
//! 2. Under the slot-list lock: empty list → done; cursor at the head → a
//!    new pass: reset the unstable tree, move the cursor to the first slot.
//! 3. Take the slot's mmap read lock, then check `users == 0`
//!    (`ksm_test_exit`, I-KSM-2) **before** looking at any VMA: `ksm_exit`
//!    publishes `users == 0` before its write-lock barrier, so a scanner
//!    that gets the lock after the barrier sees it and backs out.
//! 4. Walk the mergeable VMAs from the cursor address, one leaf (2 MiB) at a
//!    time: copy each page out under its page lock, checksum it (xxh3),
//!    skip it if the checksum changed since the last pass, else look it up
//!    in the stable tree, else in the unstable tree, else insert it there.
//!    Runs of consecutive hits are merged with one `mmap` each (onto
//!    consecutive stable pages), within the host map-count budget; a pair
//!    whose other page is in this mm is merged at once, and identical
//!    pages later in the chunk join its stable page (twins); all-zero runs
//!    are discarded (`use_zero_pages`, on by default). `users == 0` is checked again before every leaf.
//! 5. At the end of the mm: drop the rmap items past the last VMA.
//! 6. Under the slot-list lock, advance the cursor. If the mm is exiting
//!    (or has no mergeable VMA left), remove the slot, clear `VM_MERGEABLE`
//!    and drop its grab. Otherwise release the **mmap lock first, then the
//!    slot-list lock** (I-KSM-5): once the list lock is dropped, with the
//!    cursor past the slot, `ksm_exit` may take its fast path and free the
//!    mm struct under us.
//! 7. Unstable hits in another mm are merged after this mm's lock is
//!    dropped (never two mmap locks at once), under that mm's read lock
//!    and its own `users == 0` check.
//! 8. Release the scanner mutex; sleep `sleep` through the clock.
//!
//! # Exit (`__ksm_exit`, PROTOCOL §9.5, seed 3)
//!
//! Called from the last `mmput` with `users` already 0, before `exit_mmap`;
//! **never takes the scanner mutex** (seed 3: a scanner holding it while it
//! allocates can wait for the memory only this exit frees). Under the
//! slot-list lock: no slot → nothing (the scanner freed it); the slot at the
//! cursor → slow; no rmap items → **fast**: remove it, then clear the flags
//! and drop the grab (required: with the scanner stopped the pin would leak
//! for ever); else move it right after the cursor → slow. Slow: the
//! write-lock barrier `drop(mm.lock().write().await)`, which waits for a
//! scanner still inside under the read lock; the scanner (or unmerge-all)
//! frees the slot when it next sees `users == 0`.
//!
//! # Example
//!
//! ```
//! use mm_core::{Advice, Host, MapOptions};
//! use mm_ksm::{Ksm, KsmConfig, Run};
//!
//! let host = Host::with_budget(64 << 20);
//! let ksm = Ksm::new(KsmConfig::default())?;
//! let (a, b) = (host.create_guest("a"), host.create_guest("b"));
//! let (ma, mb) = (a.mm()?, b.mm()?);
//! for mm in [&ma, &mb] {
//!     let addr = mm.mmap_blocking(MapOptions::anon(1 << 20).tracked(true))?;
//!     mm.fill_blocking(addr, 1 << 20, 0x5a)?; // identical pages
//!     ksm.madvise_blocking(mm, addr, 1 << 20, Advice::Mergeable)?;
//! }
//! ksm.set_run_blocking(Run::Merge)?;
//! ksm.set_pages_to_scan(1000)?;
//! while ksm.stats().full_scans < 3 {
//!     ksm.scan_step_blocking();
//! }
//! assert!(ksm.stats().pages_sharing > 0);
//! # drop((ma, mb)); a.exit_blocking(); b.exit_blocking();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod scan;
mod slots;
mod stats;
#[cfg(test)]
mod test_util;
mod types;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use event_listener::Event;
use futures_lite::future;
use mm_core::{
    sched, Advice, Clock, KsmMm, LoopThread, MmFlag, MmUser, StableStore, StopLoop, SystemClock,
    VmFlags,
};

pub use error::{Error, Result};
pub use stats::{KsmProcessStat, KsmStats};

use crate::scan::Scanner;
use crate::slots::{ScanList, Slot};
use crate::stats::Counters;
use crate::types::MmId;

/// The `run` knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// 0: ksmd does not scan; merged pages stay merged.
    Stop,
    /// 1: ksmd scans and merges.
    Merge,
    /// 2: every merged page is unmerged (`unmerge_and_remove_all_rmap_items`);
    /// slots of live guests stay registered.
    Unmerge,
}

impl Run {
    fn to_u8(self) -> u8 {
        match self {
            Run::Stop => 0,
            Run::Merge => 1,
            Run::Unmerge => 2,
        }
    }
    fn from_u8(v: u8) -> Run {
        match v {
            1 => Run::Merge,
            2 => Run::Unmerge,
            _ => Run::Stop,
        }
    }
}

/// Scanner settings (the sysfs knobs at start).
#[derive(Debug, Clone)]
pub struct KsmConfig {
    /// `pages_to_scan`: pages per batch (kernel default 100).
    pub pages_to_scan: u64,
    /// `sleep_millisecs` between batches (kernel default 20 ms).
    pub sleep: Duration,
    /// `max_page_sharing`: mappers per stable page (kernel default 256).
    pub max_page_sharing: u64,
    /// `use_zero_pages`: discard all-zero pages instead of merging them.
    /// On by default (the kernel's default is off): a discarded page
    /// (`MADV_DONTNEED`) costs no host mapping, a zero page merged onto a
    /// stable page costs up to two, and both save the same page; reads
    /// see zeros and a write allocates a fresh page, as in the kernel.
    pub use_zero_pages: bool,
    /// `smart_scan`: skip pages that did not merge in recent passes.
    pub smart_scan: bool,
    /// Host maps (`vm.max_map_count` headroom) KSM never spends, so an
    /// unrelated `mmap` of the embedder or the allocator never fails
    /// because of merges (`scan/maps.rs`). Default 1,024.
    pub map_reserve: u64,
    /// Opt-in: raise `vm.max_map_count` to at least this when the process
    /// may (root), restored at drop if nobody changed it meanwhile;
    /// `None` (the default) leaves it alone. Each host map costs the
    /// kernel roughly 200-300 bytes of unswappable memory (a
    /// `vm_area_struct` and its share of the maple tree and anon_vma
    /// chains); 1 M extra maps is about 0.25 GiB.
    pub raise_max_map_count: Option<u64>,
    /// Time source for the sleeps.
    pub clock: Arc<dyn Clock>,
}

impl Default for KsmConfig {
    fn default() -> Self {
        KsmConfig {
            pages_to_scan: 100,
            sleep: Duration::from_millis(20),
            max_page_sharing: 256,
            use_zero_pages: true,
            smart_scan: true,
            map_reserve: 1024,
            raise_max_map_count: None,
            clock: Arc::new(SystemClock),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) pages_to_scan: AtomicU64,
    pub(crate) sleep_ms: AtomicU64,
    pub(crate) max_page_sharing: AtomicU64,
    pub(crate) use_zero_pages: AtomicBool,
    pub(crate) smart_scan: AtomicBool,
    /// [`KsmConfig::map_reserve`].
    pub(crate) map_reserve: AtomicU64,
    /// `vm.max_map_count` as it was before [`KsmConfig::raise_max_map_count`]
    /// raised it, and the value written: restored at drop.
    pub(crate) raised_map_count: Option<(u64, u64)>,
    pub(crate) run: AtomicU8,
    pub(crate) clock: Arc<dyn Clock>,
    /// `ksm_thread_mutex`: the trees and rmap items; held by the scanner for
    /// a batch and by unmerge-all. Never taken by `ksm_exit` (seed 3).
    pub(crate) scanner: mm_core::sched::Mutex<Scanner>,
    /// The slot hash (`mm_slots_hash`).
    pub(crate) slots: DashMap<MmId, Arc<Slot>>,
    /// The slot-list lock.
    pub(crate) list: Mutex<ScanList>,
    pub(crate) store: StableStore,
    pub(crate) counters: Counters,
    /// Mm ids whose `ksm_exit` hook is registered: one hook per mm, however
    /// often it leaves KSM (its slot freed by the scanner) and enters again.
    /// Inserted under the slot-list lock by `enter`, removed by the hook.
    pub(crate) hooked: DashMap<MmId, ()>,
    /// Wakes the scan loop (knob changes, first slot, stop).
    pub(crate) wake: Event,
    pub(crate) stop: AtomicBool,
    /// The budget of the host whose mms this instance serves, bound by the
    /// first `enter`: stable pages are charged to one host's budget, so
    /// merging across hosts would leave one host charged for pages only
    /// the other maps.
    pub(crate) host_budget: std::sync::OnceLock<Arc<mm_core::Budget>>,
}

/// The KSM scanner (ksmd) and its registry. Cheap to clone; run it with
/// [`Ksm::spawn`] (a std thread) or poll [`Ksm::run`] on any executor; a
/// race harness can drive [`Ksm::scan_step`] itself.
#[derive(Clone)]
pub struct Ksm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ksm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ksm")
            .field("run", &self.run_mode())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Ksm {
    /// A scanner with this configuration: `run` is [`Run::Stop`], nothing
    /// registered, no thread started.
    pub fn new(config: KsmConfig) -> Result<Ksm> {
        check_pages_to_scan(config.pages_to_scan)?;
        check_max_page_sharing(config.max_page_sharing)?;
        let store = StableStore::new("guestmm-ksm").map_err(|source| Error::Store { source })?;
        let raised_map_count = config.raise_max_map_count.and_then(raise_max_map_count);
        Ok(Ksm {
            inner: Arc::new(Inner {
                pages_to_scan: AtomicU64::new(config.pages_to_scan),
                sleep_ms: AtomicU64::new(config.sleep.as_millis() as u64),
                max_page_sharing: AtomicU64::new(config.max_page_sharing),
                use_zero_pages: AtomicBool::new(config.use_zero_pages),
                smart_scan: AtomicBool::new(config.smart_scan),
                map_reserve: AtomicU64::new(config.map_reserve),
                raised_map_count,
                run: AtomicU8::new(Run::Stop.to_u8()),
                clock: config.clock,
                scanner: mm_core::sched::Mutex::new(Scanner::default()),
                slots: DashMap::new(),
                list: Mutex::new(ScanList::default()),
                store,
                counters: Counters::default(),
                hooked: DashMap::new(),
                wake: Event::new(),
                stop: AtomicBool::new(false),
                host_budget: std::sync::OnceLock::new(),
            }),
        })
    }

    /// `__ksm_enter`: registers `mm` (idempotent: entering twice is one
    /// slot, one hook). The slot pins the mm struct with a grab (never a
    /// user); `VM_MERGEABLE` is set and the `ksm_exit` hook registered, once
    /// per mm: an mm whose slot the scanner freed and that enters again
    /// keeps its one hook. One `Ksm` serves the mms of one [`Host`](mm_core::Host)
    /// (mm_core::Host; the first `enter` binds it): an mm of another host
    /// is [`Error::OtherHost`], and an mm another `Ksm` already holds is
    /// [`Error::OtherKsm`].
    pub fn enter(&self, mm: &MmUser) -> Result<()> {
        slots::enter(&self.inner, mm, self.run_mode(), None)
    }

    /// [`enter`](Self::enter) into KSM domain `domain` (a tenant): pages
    /// of mms in different domains never merge, so copy-on-write timing
    /// cannot reveal one tenant's page contents to another (the side
    /// channel of cross-tenant deduplication). [`enter`](Self::enter) and
    /// `madvise(Mergeable)` use domain 0, the default: one domain per
    /// `Host`. An mm joins once; entering it again into another domain is
    /// [`Error::OtherDomain`] (leave first: it exits, or everything is
    /// unmerged and the scanner frees its slot).
    pub fn enter_domain(&self, mm: &MmUser, domain: u64) -> Result<()> {
        slots::enter(&self.inner, mm, self.run_mode(), Some(domain))
    }

    /// `madvise` with KSM's part: `Mergeable` sets `VM_MERGEABLE` (mm-core
    /// registers untracked VMAs for userfaultfd write-protect) and enters
    /// the mm; `Unmergeable` unmerges the range's pages
    /// (`unmerge_ksm_pages`) and clears it, under one write lock. Other advice is passed to mm-core.
    pub async fn madvise(&self, mm: &MmUser, addr: u64, len: u64, advice: Advice) -> Result<()> {
        let id = mm.id();
        mm.madvise(addr, len, advice).await.map_err(Error::mm(id))?;
        match advice {
            Advice::Mergeable => self.enter(mm),
            // Unmergeable: mm-core unshared the range under the write lock
            // that cleared the flag (`unmerge_ksm_pages`).
            _ => Ok(()),
        }
    }

    /// Blocking [`madvise`](Self::madvise).
    pub fn madvise_blocking(&self, mm: &MmUser, addr: u64, len: u64, advice: Advice) -> Result<()> {
        future::block_on(self.madvise(mm, addr, len, advice))
    }

    /// The whole-guest switch (`prctl(PR_SET_MEMORY_MERGE)`): on, every
    /// compatible VMA is considered (`VM_MERGE_ANY`) and the mm entered;
    /// off, the flag goes and the pages of VMAs without `VM_MERGEABLE` are
    /// unmerged.
    pub async fn set_merge_any(&self, mm: &MmUser, on: bool) -> Result<()> {
        if on {
            mm.flags().set(MmFlag::VM_MERGE_ANY);
            // Untracked VMAs need their write-protect registration before
            // they can merge (mm-core `ksm::prepare_all`; later mmaps get it
            // at creation while the flag is set).
            let failed = match mm_core::ksm::prepare_all(mm).await {
                Ok(f) => f,
                Err(e) => {
                    // Not entered: leave no flag that says otherwise.
                    mm.flags().clear(MmFlag::VM_MERGE_ANY);
                    return Err(Error::mm(mm.id())(e));
                }
            };
            if failed > 0 {
                tracing::warn!(target: "mm_ksm", mm_id = mm.id(), vmas = failed, "merge-any: VMAs without userfaultfd write-protect will not merge");
            }
            return self.enter(mm);
        }
        mm.flags().clear(MmFlag::VM_MERGE_ANY);
        let state = mm.lock().read().await;
        sched::point("ksm_merge_any:read_locked").await;
        for v in state.vmas().iter() {
            if !v.flags().contains(VmFlags::MERGEABLE) {
                KsmMm::new(mm, &state)
                    .and_then(|ksm| ksm.unshare(v.start(), v.len()))
                    .map_err(Error::mm(mm.id()))?;
            }
        }
        Ok(())
    }

    /// Blocking [`set_merge_any`](Self::set_merge_any).
    pub fn set_merge_any_blocking(&self, mm: &MmUser, on: bool) -> Result<()> {
        future::block_on(self.set_merge_any(mm, on))
    }

    /// The `run` knob. `Unmerge` unmerges everything before it returns
    /// (under the scanner mutex, as the sysfs write does); on error `run`
    /// falls back to `Stop`.
    pub async fn set_run(&self, run: Run) -> Result<()> {
        let inner = &self.inner;
        match run {
            Run::Unmerge => {
                let mut sc = inner.scanner.lock().await;
                inner.run.store(run.to_u8(), Ordering::SeqCst);
                if let Err(e) = scan::unmerge_all(inner, &mut sc).await {
                    inner.run.store(Run::Stop.to_u8(), Ordering::SeqCst);
                    return Err(e);
                }
            }
            Run::Stop | Run::Merge => inner.run.store(run.to_u8(), Ordering::SeqCst),
        }
        inner.wake.notify(usize::MAX);
        Ok(())
    }

    /// Blocking [`set_run`](Self::set_run).
    pub fn set_run_blocking(&self, run: Run) -> Result<()> {
        future::block_on(self.set_run(run))
    }

    /// The `run` knob's value.
    pub fn run_mode(&self) -> Run {
        Run::from_u8(self.inner.run.load(Ordering::SeqCst))
    }

    /// `pages_to_scan` (> 0).
    pub fn set_pages_to_scan(&self, n: u64) -> Result<()> {
        check_pages_to_scan(n)?;
        self.inner.pages_to_scan.store(n, Ordering::Relaxed);
        self.inner.wake.notify(usize::MAX);
        Ok(())
    }

    /// `sleep_millisecs`.
    pub fn set_sleep(&self, d: Duration) {
        self.inner
            .sleep_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
        self.inner.wake.notify(usize::MAX);
    }

    /// `max_page_sharing` (≥ 2). Applies to later merges.
    pub fn set_max_page_sharing(&self, n: u64) -> Result<()> {
        check_max_page_sharing(n)?;
        self.inner.max_page_sharing.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// `use_zero_pages`.
    pub fn set_use_zero_pages(&self, on: bool) {
        self.inner.use_zero_pages.store(on, Ordering::Relaxed);
    }

    /// `smart_scan`.
    pub fn set_smart_scan(&self, on: bool) {
        self.inner.smart_scan.store(on, Ordering::Relaxed);
    }

    /// [`KsmConfig::map_reserve`]: host maps merges never spend.
    pub fn set_map_reserve(&self, maps: u64) {
        self.inner.map_reserve.store(maps, Ordering::Relaxed);
    }

    /// One batch (`ksm_do_scan(pages_to_scan)`) if `run` is `Merge`, under
    /// the scanner mutex. Returns the pages scanned.
    pub async fn scan_step(&self) -> u64 {
        if self.run_mode() != Run::Merge {
            return 0;
        }
        let mut sc = self.inner.scanner.lock().await;
        sched::point("ksm:batch_locked").await;
        let n = self.inner.pages_to_scan.load(Ordering::Relaxed);
        scan::do_scan(&self.inner, &mut sc, n).await
    }

    /// Blocking [`scan_step`](Self::scan_step).
    pub fn scan_step_blocking(&self) -> u64 {
        future::block_on(self.scan_step())
    }

    /// The scan loop (`ksm_scan_thread`): batches while `run` is `Merge`,
    /// `sleep` apart (through the clock); waits for a knob change otherwise.
    /// Returns after [`Ksm::stop`].
    pub async fn run(&self) {
        let inner = &self.inner;
        loop {
            if inner.stop.load(Ordering::SeqCst) {
                return;
            }
            self.scan_step().await;
            // Listen before testing, so a wake between the test and the
            // wait is not lost.
            let listener = inner.wake.listen();
            if inner.stop.load(Ordering::SeqCst) {
                return;
            }
            let should_run = self.run_mode() == Run::Merge && !inner.slots.is_empty();
            if should_run {
                let d = Duration::from_millis(inner.sleep_ms.load(Ordering::Relaxed));
                if !d.is_zero() {
                    future::or(inner.clock.sleep(d), listener).await;
                }
            } else {
                listener.await;
            }
        }
    }

    /// Starts [`run`](Self::run) on a std thread named `ksmd`.
    pub fn spawn(&self) -> std::io::Result<KsmThread> {
        self.inner.stop.store(false, Ordering::SeqCst);
        let k = self.clone();
        let handle = std::thread::Builder::new()
            .name("ksmd".into())
            .spawn(move || future::block_on(k.run()))?;
        Ok(KsmThread(LoopThread::new(self.clone(), handle)))
    }

    /// Asks [`run`](Self::run) to return.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify(usize::MAX);
    }

    /// Counters (lock-free; each is exact, together they may be one batch apart).
    pub fn stats(&self) -> KsmStats {
        let mut s = self.inner.counters.snapshot(KsmStats::default());
        let (shared, sharing, items, zero) = (
            s.pages_shared,
            s.pages_sharing,
            s.rmap_items,
            s.ksm_zero_pages,
        );
        s.pages_volatile = items.saturating_sub(shared + sharing + s.pages_unshared);
        s.general_profit = ((sharing + zero) * mm_core::PAGE_SIZE as u64) as i64
            - (items * scan::RMAP_ITEM_BYTES) as i64;
        s.mm_slots = self.inner.slots.len() as u64;
        s
    }

    /// Per-guest counters of a registered mm. `merging_pages` and
    /// `zero_pages` are read from its page table
    /// ([`mm_core::ksm::page_counts`], a walk of its existing leaves): an
    /// unmerge or a zap shows at once. `rmap_items` is the scanner's, as of
    /// its last visit.
    pub fn process_stat(&self, mm_id: u64) -> Option<KsmProcessStat> {
        self.inner.slots.get(&MmId(mm_id)).map(|s| {
            let (merging_pages, zero_pages) = mm_core::ksm::page_counts(&s.mm);
            KsmProcessStat {
                rmap_items: s.rmap_items.load(Ordering::Relaxed),
                merging_pages,
                zero_pages,
            }
        })
    }

    /// Is `mm_id` registered (has a slot)?
    pub fn is_registered(&self, mm_id: u64) -> bool {
        self.inner.slots.contains_key(&MmId(mm_id))
    }
}

const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

/// [`KsmConfig::raise_max_map_count`]: raises the sysctl to `want` if it
/// is lower and writable; returns `(old, want)` when it wrote.
fn raise_max_map_count(want: u64) -> Option<(u64, u64)> {
    let old = scan::max_map_count()?;
    if old >= want {
        return None;
    }
    match std::fs::write(MAX_MAP_COUNT, want.to_string()) {
        Ok(()) => {
            tracing::info!(target: "mm_ksm", old, new = want, "vm.max_map_count raised");
            Some((old, want))
        }
        Err(e) => {
            tracing::warn!(target: "mm_ksm", old, want, error = %e, "vm.max_map_count not raised (needs root)");
            None
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Restore only what we changed, and only if nobody changed it
        // since.
        if let Some((old, ours)) = self.raised_map_count {
            if scan::max_map_count() == Some(ours) {
                if let Err(e) = std::fs::write(MAX_MAP_COUNT, old.to_string()) {
                    tracing::warn!(target: "mm_ksm", old, error = %e, "vm.max_map_count not restored");
                }
            }
        }
    }
}

fn check_pages_to_scan(n: u64) -> Result<()> {
    if n == 0 {
        return Err(Error::BadKnob {
            knob: "pages_to_scan",
            value: n,
            reason: "must be at least 1",
        });
    }
    Ok(())
}

fn check_max_page_sharing(n: u64) -> Result<()> {
    if n < 2 {
        return Err(Error::BadKnob {
            knob: "max_page_sharing",
            value: n,
            reason: "must be at least 2",
        });
    }
    Ok(())
}

/// A running [`Ksm::spawn`] thread; stopped and joined on drop.
#[derive(Debug)]
pub struct KsmThread(LoopThread<Ksm>);

impl KsmThread {
    /// Stops the loop and joins the thread.
    pub fn stop(self) {
        self.0.stop();
    }
}

impl StopLoop for Ksm {
    fn stop_loop(&self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use mm_core::PAGE_SIZE;

    use super::*;

    const PAGE: u64 = PAGE_SIZE as u64;

    /// `r` is `BadKnob` for `knob`, with `value` when given.
    fn assert_bad_knob<T: std::fmt::Debug>(r: Result<T>, knob: &str, value: Option<u64>) {
        match r {
            Err(Error::BadKnob {
                knob: k, value: v, ..
            }) if k == knob && value.is_none_or(|x| x == v) => {}
            other => panic!("want BadKnob {knob} {value:?}, got {other:?}"),
        }
    }

    #[test]
    fn test_knob_validation_errors() {
        let config = |pages_to_scan, max_page_sharing| KsmConfig {
            pages_to_scan,
            max_page_sharing,
            ..KsmConfig::default()
        };
        assert_bad_knob(Ksm::new(config(0, 256)), "pages_to_scan", Some(0));
        assert_bad_knob(Ksm::new(config(100, 1)), "max_page_sharing", Some(1));
        let k = Ksm::new(KsmConfig::default()).unwrap();
        k.set_pages_to_scan(5).unwrap();
        assert_bad_knob(k.set_pages_to_scan(0), "pages_to_scan", None);
        assert_eq!(k.inner.pages_to_scan.load(Ordering::Relaxed), 5, "kept");
        k.set_max_page_sharing(2).unwrap();
        assert_bad_knob(k.set_max_page_sharing(0), "max_page_sharing", None);
        assert_eq!(k.inner.max_page_sharing.load(Ordering::Relaxed), 2, "kept");
    }

    #[test]
    fn test_run_round_trip() {
        for r in [Run::Stop, Run::Merge, Run::Unmerge] {
            assert_eq!(Run::from_u8(r.to_u8()), r);
        }
        assert_eq!(Run::from_u8(3), Run::Stop);
        assert_eq!(Run::from_u8(u8::MAX), Run::Stop);
        let k = Ksm::new(KsmConfig::default()).unwrap();
        assert_eq!(k.run_mode(), Run::Stop);
        for r in [Run::Merge, Run::Unmerge, Run::Stop] {
            k.set_run_blocking(r).unwrap();
            assert_eq!(k.run_mode(), r);
        }
    }

    #[test]
    fn test_stats_formulas() {
        let k = Ksm::new(KsmConfig::default()).unwrap();
        let c = &k.inner.counters;
        let set = |items, shared, sharing, unshared, zero| {
            c.rmap_items.store(items, Ordering::Relaxed);
            c.pages_shared.store(shared, Ordering::Relaxed);
            c.pages_sharing.store(sharing, Ordering::Relaxed);
            c.pages_unshared.store(unshared, Ordering::Relaxed);
            c.ksm_zero_pages.store(zero, Ordering::Relaxed);
        };
        let item = scan::RMAP_ITEM_BYTES as i64;
        // Volatile = items - shared - sharing - unshared ...
        set(10, 1, 2, 3, 0);
        let s = k.stats();
        assert_eq!(s.pages_volatile, 4);
        assert_eq!(s.general_profit, 2 * PAGE as i64 - 10 * item);
        // ... clamped at 0 (the counters are published one batch apart).
        set(3, 2, 4, 1, 0);
        assert_eq!(k.stats().pages_volatile, 0);
        // Profit is negative when the items cost more than the sharing saves.
        set(1000, 0, 0, 0, 0);
        let s = k.stats();
        assert_eq!(s.general_profit, -1000 * item);
        assert!(s.general_profit < 0);
        // Zero pages count as saved.
        set(0, 0, 0, 0, 5);
        assert_eq!(k.stats().general_profit, 5 * PAGE as i64);
    }
}
