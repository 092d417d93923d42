//! `teardown_vs_ksm`: guests exiting while ksmd scans and an admin unmerges
//! (PROTOCOL.md §9, seed 3 and its second-order bugs, §10.1).
//!
//! Every guest maps one tracked, mergeable region: `dup` pages with the
//! same content in every guest, then `unique` pages of its own, and maybe a
//! second mergeable region it never touches (a slot with no rmap items:
//! `ksm_exit`'s fast path). A few passes may run before the race, so some
//! pages are already merged and the exits meet rmap items (the barrier
//! path). The actors:
//!
//! * `ksmd`: a few batches of `pages_to_scan` ([`Ksm::scan_step`]);
//! * `unmerge`: the admin writing `run = 2` ([`Ksm::set_run`]); with a tight
//!   budget its copies do not fit, so it OOM-kills a guest and waits for its
//!   memory while it holds the scanner mutex (seed 3's allocation);
//! * `vcpu`: reads and writes of guest 0 through the API, `DONTNEED`,
//!   `UNMERGEABLE`, `munmap`, then the exit of its own user;
//! * `gN-exit`: each guest's exit (the last `mmput` runs `ksm_exit` then
//!   `exit_mmap`); guest 1 may stay alive to be checked for leaks.
//!
//! Some inputs also (bits of the setup bytes that decoded nothing before,
//! see `Extras`): map every region across the first 2 MiB page-table leaf
//! boundary (the untouched region then sits right above it), make the
//! first pages of every region read-only after its madvise, put the
//! last guest into another KSM domain (`Ksm::enter_domain`), or fail the
//! Nth host call of the KSM unshare (Nth-failure injection: run = 2, the
//! vCPU's UNMERGEABLE or ksmd then meet a failed copy-back).
//!
//! A swarm header ([`crate::swarm`]) may turn ksmd, the unmerge, the
//! vCPU's ops (or some kinds of them) and setup features off for one run.
//!
//! No reaper runs in `teardown_vs_ksm`: it would free the victim's memory
//! without its exit and hide the seed-3 cycle (2009 had no reaper).
//! `ksm_vs_reaper` (PROTOCOL.md §9.9) is the same setup with the reaper
//! installed and two more actors: `oom` (one `out_of_memory`, so there is
//! always a victim) and `reaper` (the reaper's loop). ksmd then scans,
//! merges and unshares beside a reaper zapping the victim, both as readers
//! of its mmap lock; the victim gets OOM_SKIP (I-RP-6) and the oracles
//! above must all still hold (stale stable pages pruned, every charge
//! returned).
//!
//! Oracles, in setup: each batch scans at most `pages_to_scan` (§9.4),
//! the passes walk every mergeable page once (I-KSM-8), two passes merge
//! every duplicate within its domain and make one stable page per domain
//! (no merge across domains), and an mm re-entering its own domain is
//! accepted while entering another one is refused (`OtherDomain`). During
//! the race: the run ends (a deadlock prints each actor's last step); the
//! `sched::check`s of I-KSM-1 (the victim's exit makes no progress while an
//! allocation waits for it), I-KSM-2 (a KSM operation after exit_mmap
//! began) and I-KSM-5 (exit frees a slot ksmd still uses); no second OOM
//! victim while the first lacks OOM_SKIP (I-RP-7); guest 0's reads
//! (its `Read`s, then a read-back of every page before its vCPU's user
//! exits) match the model; guest 1 reads its own contents (no cross-guest leak);
//! run = 2 and `madvise(UNMERGEABLE)` never fail on a host syscall (a
//! read-only VMA is unshared like any other: §9.7 `break_ksm`) but for
//! the harness's own injected ENOMEM, a run = 2 that failed leaves `run`
//! at stop, right after every run = 2 and at the end of the race every
//! page a live guest still has merged keeps its rmap item and mapper
//! (I-KSM-7), and a run = 2
//! that returned `Ok` left no merged page mapped in a live guest (I-KSM-10)
//! and no live guest that keeps a mergeable VMA without its slot (I-KSM-4);
//! guest 1, if it stayed, has no writable host page under a read-only VMA;
//! then, once every guest exited and ksmd ran: every slot freed exactly once
//! (I-KSM-4, I-KSM-9), no stable page left (I-KSM-7), nothing charged
//! (I-RC-3) and every mm struct freed (I-RC-2).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use futures_lite::future::block_on;
use mm_core::{Advice, Host, HostConfig, MapOptions, MmFlag, MmUser, MmWatch, Prot, PAGE_SIZE};
use mm_ksm::{Ksm, KsmConfig, Run};
use mm_reaper::{Reaper, ReaperConfig};

use crate::exec::Report;
use crate::mode::{Mode, Runner};
use crate::scenario::Finding;
use crate::swarm::Swarm;

const P: u64 = PAGE_SIZE as u64;

/// One operation of guest 0's vCPU.
#[derive(Debug, Clone, Arbitrary)]
pub enum KsmOp {
    /// Read one byte of a page of the mergeable region.
    Read {
        /// Which page (modulo the region).
        page: u8,
    },
    /// Write one byte (a merged page is copied: copy-on-write).
    Write {
        /// Which page.
        page: u8,
        /// The byte (0x80 is or-ed in, so it differs from every fill).
        byte: u8,
    },
    /// `madvise(DONTNEED)` of the region.
    DontNeed,
    /// `madvise(UNMERGEABLE)` of the region (unshares its merged pages).
    Unmergeable,
    /// `munmap` of the region.
    Munmap,
}

/// The decoded setup of `teardown_vs_ksm`.
#[derive(Debug, Clone, Arbitrary)]
pub struct KsmSetup {
    guests: u8,
    dup_pages: u8,
    unique_pages: u8,
    empty_pages: u8,
    pre_scans: u8,
    pages_to_scan: u8,
    scan_steps: u8,
    unmerge: bool,
    tight_budget: bool,
    use_zero_pages: bool,
    zero_dups: bool,
    g1_stays: bool,
    ops: Vec<KsmOp>,
    /// The actors and features this run leaves out (swarm testing): read
    /// from the input's swarm header, not decoded by `arbitrary`; 0 (none
    /// off) for a plain input.
    #[arbitrary(default)]
    swarm: Swarm,
}

impl KsmSetup {
    /// Forces what `self.swarm` turns off to `false` (or 0), and drops the
    /// ops of a disabled kind. With mask 0 nothing changes.
    fn apply_swarm(&mut self) {
        let s = self.swarm;
        if s.off(Swarm::NO_EXTRA_GUEST) {
            self.guests = 0; // 2 + 0 % 2 guests
        }
        if s.off(Swarm::NO_EMPTY_REGION) {
            self.empty_pages = 0;
        }
        if s.off(Swarm::NO_PRE_SCANS) {
            self.pre_scans = 0;
        }
        self.unmerge &= !s.off(Swarm::NO_UNMERGE);
        self.tight_budget &= !s.off(Swarm::NO_TIGHT_BUDGET);
        self.use_zero_pages &= !s.off(Swarm::NO_ZERO_PAGES);
        self.zero_dups &= !s.off(Swarm::NO_ZERO_DUPS);
        self.g1_stays &= !s.off(Swarm::NO_G1_STAYS);
    }
}

impl KsmOp {
    /// Whether the swarm mask `s` lets this kind of op run.
    fn allowed(&self, s: Swarm) -> bool {
        let bit = match self {
            KsmOp::Read { .. } => Swarm::NO_READ,
            KsmOp::Write { .. } => Swarm::NO_WRITE,
            KsmOp::DontNeed => Swarm::NO_DONTNEED,
            KsmOp::Unmergeable => Swarm::NO_UNMERGEABLE,
            KsmOp::Munmap => Swarm::NO_MUNMAP,
        };
        !s.off(bit | Swarm::NO_OPS)
    }
}

/// The bytes of a 2 MiB page-table leaf (`mm_core::pgtable`: one leaf
/// maps 512 pages).
const LEAF: u64 = 2 << 20;

/// Setup features read from bits of the setup bytes that decoded nothing
/// before (`guests` uses only bit 0, `dup_pages` bits 0-2, `unique_pages`
/// bits 0-1). Each feature needs two of those bits set together, a pair
/// chosen so that no committed input (`fuzz/corpus/{teardown_vs_ksm,
/// ksm_vs_reaper}`, `fuzz/regressions/teardown_vs_ksm`) turns it on: the
/// committed inputs keep their meaning. A random input gets each feature
/// one time in four.
#[derive(Debug, Clone, Copy, Default)]
struct Extras {
    /// `guests` bits 1 and 4: every guest's region is mapped at this fixed
    /// address, across the first 2 MiB leaf boundary (`dup_pages` bits 3-5
    /// pick how many of its pages lie below it, at least one on each side;
    /// a one-page region starts at the boundary). Without it every region
    /// lies inside the first leaf (the mmap floor is 1 MiB), and the leaf
    /// arithmetic (walk.rs `leaf_end`, unshare.rs `stop` and its start
    /// `s / PAGE`) had surviving mutants.
    straddle_at: Option<u64>,
    /// `unique_pages` bits 2 and 6: the first `read_only` pages of every
    /// guest's region are made read-only (`mprotect`) after `madvise
    /// (Mergeable)` (`unique_pages` bits 3-4 give 1-4 pages; the VMA splits
    /// when that is less than the region). 0: none. KSM merges read-only
    /// pages too, and unshare must copy them all the same (unshare.rs's
    /// `!writable` mutants survived: no read-only mergeable VMA existed).
    read_only: u64,
    /// `guests` bits 3 and 7: the last guest joins this KSM domain
    /// (`Ksm::enter_domain`, 1-4 from `dup_pages` bits 6-7) before its
    /// madvise; 0: everyone in the default domain.
    domain: u64,
    /// The guest in `domain`.
    domain_guest: Option<u64>,
    /// With `straddle_at`, `pages_to_scan` bits 6 and 7: the untouched
    /// mergeable region lies right below the region instead of above it.
    /// A vCPU's UNMERGEABLE or munmap of the region between two ksmd
    /// batches then leaves this live guest's only mergeable VMA below the
    /// address where the last batch stopped, and ksmd freed its slot
    /// (walk.rs judged from the VMAs above that address alone; I-KSM-4's
    /// "live mms keep their slots" after run = 2 caught it; fixed, test
    /// `ksmd_keeps_the_slot_of_a_mergeable_vma_below_the_resume_address`).
    empty_below: bool,
    /// `pre_scans` bits 4 and 5 with `pages_to_scan` bit 5 (the only
    /// triple of free bits no committed input sets; no free pair was left):
    /// Nth-failure injection on the KSM unshare path, N = 1-4 from
    /// `pre_scans` bits 2-3 (a run makes a few unshare calls: one per
    /// run of merged pages a page-table leaf holds, per guest); 0: none. Only the
    /// unshare's host calls count (`fail:mprotect(unshare)`,
    /// `fail:madvise(POPULATE_WRITE) unshare`, mm-core `ksm/unshare.rs`):
    /// run = 2, UNMERGEABLE and ksmd's unshare of an item's page then meet
    /// a host failure. Added for unmerge.rs's error paths, which no input
    /// reached (the targets injected no failures).
    fail_nth: u32,
}

impl Extras {
    fn of(setup: &KsmSetup, pages: u64, nguests: u64) -> Extras {
        let (g, d, u) = (setup.guests, setup.dup_pages, setup.unique_pages);
        let below = if pages > 1 {
            1 + u64::from(d >> 3 & 7) % (pages - 1)
        } else {
            0
        };
        let straddle_at = (g & 0x12 == 0x12).then_some(LEAF - below * P);
        let read_only = if u & 0x44 == 0x44 {
            1 + u64::from(u >> 3 & 3)
        } else {
            0
        };
        let domain = if g & 0x88 == 0x88 {
            1 + u64::from(d >> 6)
        } else {
            0
        };
        Extras {
            straddle_at,
            read_only,
            domain,
            domain_guest: (domain != 0).then_some(nguests - 1),
            empty_below: straddle_at.is_some() && setup.pages_to_scan & 0xc0 == 0xc0,
            fail_nth: if setup.pre_scans & 0x30 == 0x30 && setup.pages_to_scan & 0x20 != 0 {
                1 + u32::from(setup.pre_scans >> 2 & 3)
            } else {
                0
            },
        }
    }
}

struct G {
    guest: mm_core::Guest,
    watch: MmWatch,
    addr: u64,
    pages: u64,
    /// Initial byte of each page of the region.
    fill: Vec<u8>,
}

/// One read of the vCPU: (page, expected, got).
type Read = (u64, Option<u8>, Result<u8, String>);

/// Runs one input (setup first, then the schedule) on the executor.
pub fn run(data: &[u8]) -> Option<Finding> {
    run_mode(data, &Mode::Sim)
}

/// Runs one input in `mode` (the executor, or OS threads).
pub fn run_mode(data: &[u8], mode: &Mode) -> Option<Finding> {
    run_mode_reaper(data, mode, false)
}

/// Runs one input in `mode`; `reaper`: the `ksm_vs_reaper` actors too.
pub fn run_mode_reaper(data: &[u8], mode: &Mode, reaper: bool) -> Option<Finding> {
    let target = if reaper {
        crate::Target::KsmVsReaper
    } else {
        crate::Target::TeardownVsKsm
    };
    let (swarm, data) = crate::swarm::split(target, data);
    let mut u = Unstructured::new(data);
    let mut setup = KsmSetup::arbitrary(&mut u).ok()?;
    setup.swarm = swarm;
    setup.apply_swarm();
    let schedule = u.take_rest().to_vec();
    run_setup_reaper(&setup, &schedule, mode, reaper)
}

/// Runs a decoded setup with an explicit schedule in `mode`.
pub fn run_setup(setup: &KsmSetup, schedule: &[u8], mode: &Mode) -> Option<Finding> {
    run_setup_reaper(setup, schedule, mode, false)
}

fn run_setup_reaper(
    setup: &KsmSetup,
    schedule: &[u8],
    mode: &Mode,
    with_reaper: bool,
) -> Option<Finding> {
    let mut sim = Runner::new(mode, schedule);
    let clock = sim.clock();
    let nguests = 2 + u64::from(setup.guests % 2);
    let dup = 1 + u64::from(setup.dup_pages % 8);
    let unique = u64::from(setup.unique_pages % 4);
    let empty = u64::from(setup.empty_pages % 3);
    // Tight: exactly the populated pages fit, so an unmerge (copies while
    // the stable pages are still charged) must go through the OOM killer.
    let budget = if setup.tight_budget {
        nguests * (dup + unique) * P
    } else {
        1 << 30
    };
    let host = Host::new(HostConfig {
        clock: clock.clone(),
        oom_wait: sim.time(Duration::from_millis(300)),
        ..HostConfig::with_budget(budget)
    });
    let reaper = with_reaper.then(|| {
        let r = Reaper::new(ReaperConfig {
            delay: Duration::ZERO,
            max_retries: 3,
            retry_interval: sim.time(Duration::from_millis(100)),
            zap: mm_reaper::ZapSplit::default(),
            clock: clock.clone(),
        });
        r.install(&host);
        r
    });
    let scan_budget = 1 + u64::from(setup.pages_to_scan % 32);
    let ksm = Ksm::new(KsmConfig {
        pages_to_scan: scan_budget,
        sleep: Duration::ZERO,
        use_zero_pages: setup.use_zero_pages,
        clock: clock.clone(),
        ..KsmConfig::default()
    })
    .ok()?;

    let x = Extras::of(setup, dup + unique, nguests);
    // Only the unshare's host calls count: the setup runs with no hook
    // (nothing there counts), and N then names the Nth copy-back (or its
    // mprotect) of the race, whoever does it.
    sim.fail_sites(unshare_site);
    sim.fail_nth(x.fail_nth);
    let mut gs = Vec::new();
    for g in 0..nguests {
        let guest = host.create_guest(&format!("g{g}"));
        let mm = guest.mm().ok()?;
        let watch = mm.watch();
        let pages = dup + unique;
        let mut opts = MapOptions::anon(pages * P).tracked(true);
        if let Some(at) = x.straddle_at {
            opts = opts.at(at);
        }
        let addr = block_on(mm.mmap(opts)).ok()?;
        if x.domain_guest == Some(g) {
            ksm.enter_domain(&mm, x.domain).ok()?;
        }
        let dup_byte = if setup.zero_dups { 0 } else { 0x5a };
        let fill: Vec<u8> = (0..pages)
            .map(|i| {
                if i < dup {
                    dup_byte
                } else {
                    0x10 + (g * 4 + (i - dup)) as u8
                }
            })
            .collect();
        for (i, b) in fill.iter().enumerate() {
            block_on(mm.fill(addr + i as u64 * P, P, *b)).ok()?;
        }
        block_on(ksm.madvise(&mm, addr, pages * P, Advice::Mergeable)).ok()?;
        if x.read_only > 0 {
            let ro = x.read_only.min(pages);
            block_on(mm.mprotect(addr, ro * P, Prot::READ)).ok()?;
        }
        // mm-ksm's tenant domains (`Ksm::enter_domain`): an mm joins one
        // domain once; entering again into the same domain is a no-op,
        // into another one is refused with `OtherDomain` (and madvise's
        // enter, with no domain, keeps whichever it joined). Added for the
        // three `enter` domain-check mutants of slots.rs (`d != s.domain`
        // -> `==`, the guard -> `true` / `false`), which no input reached:
        // the harness only used the default domain.
        if x.domain != 0 {
            let mine = if x.domain_guest == Some(g) {
                x.domain
            } else {
                0
            };
            let again = ksm.enter_domain(&mm, mine);
            let other = ksm.enter_domain(&mm, mine ^ x.domain);
            if again.is_err()
                || !matches!(other, Err(mm_ksm::Error::OtherDomain { domain, .. }) if domain == mine)
            {
                return Some(Finding {
                    invariant: format!(
                        "domains: guest {g} in ksm domain {mine}: entering it again gave {again:?}, entering domain {} gave {other:?} (want Ok, then OtherDomain)",
                        mine ^ x.domain
                    ),
                    trace: "(setup, before the race)".into(),
                });
            }
        }
        if empty > 0 {
            // Above the region, as the mmap floor puts it without
            // `straddle_at` (the lowest gap), or right below it
            // (`empty_below`).
            let mut e_opts = MapOptions::anon(empty * P).tracked(true);
            if x.straddle_at.is_some() {
                let at = if x.empty_below {
                    addr - empty * P
                } else {
                    addr + pages * P
                };
                e_opts = e_opts.at(at);
            }
            let e = block_on(mm.mmap(e_opts)).ok()?;
            block_on(ksm.madvise(&mm, e, empty * P, Advice::Mergeable)).ok()?;
        }
        drop(mm);
        gs.push(G {
            guest,
            watch,
            addr,
            pages,
            fill,
        });
    }
    block_on(ksm.set_run(Run::Merge)).ok()?;
    let pre = u64::from(setup.pre_scans % 4);
    let setup_finding = |what: String| {
        Some(Finding {
            invariant: what,
            trace: "(setup, before the race)".into(),
        })
    };
    for _ in 0..64 {
        if ksm.stats().full_scans >= pre {
            break;
        }
        // §9.4 ksm_do_scan(n): a batch scans at most pages_to_scan pages.
        let n = block_on(ksm.scan_step());
        if n > scan_budget {
            return setup_finding(format!(
                "pacing: a batch scanned {n} pages, pages_to_scan is {scan_budget}"
            ));
        }
    }

    // KSM's purpose (PROTOCOL §9.4, cmp_and_merge_page): before the race,
    // with nothing writing, two full passes merge duplicate pages (the
    // first records each checksum, the second finds it unchanged and merges:
    // into one stable page, or the KSM zero page). A ksmd that merges
    // nothing passed every other oracle: mutation testing (fuzz/mutants.sh)
    // showed the walk.rs mutants that skip every VMA (`v.end() > addr` ->
    // `==` / `<`, `||` -> `&&` on merge-any, `!capable` -> `capable`) or
    // never scan one (`a < ve` -> `==` / `>`) surviving the corpus.
    // Every duplicate: nothing writes, so two passes merge them all. (This
    // asked only for "something" while about 2 % of runs of one input left
    // three of guest 0's pages "absent" and unmerged: the uffd shard routed
    // an UNMAP of the previous run's guest, read before its teardown, to
    // the new guest at the same host addresses; fixed by the route barrier,
    // `tracked/pool.rs` point 9.)
    let st = ksm.stats();
    // I-KSM-8 (full_scans counts completed passes) and §9.4: once the
    // pre-race batches reached `pre` passes they stopped at a pass boundary,
    // and every pass walks every page of every mergeable region once
    // (populated or not). Catches walk.rs's `scanned += n` -> `*=` (a batch
    // that never counts, so never stops).
    let pages = nguests * (dup + unique + empty);
    if st.full_scans >= pre && st.pages_scanned != st.full_scans * pages {
        return setup_finding(format!(
            "I-KSM-8: {} pages scanned in {} full passes over {pages} mergeable pages",
            st.pages_scanned, st.full_scans
        ));
    }
    if st.full_scans >= 2 {
        let zero_merge = setup.zero_dups && setup.use_zero_pages;
        // The duplicates of each KSM domain: a domain's pages merge among
        // themselves only (mm-ksm's tenant domains; the KSM zero page is
        // the exception, shared by every domain), so a domain holding one
        // duplicate page leaves it unmerged, and each domain with two or
        // more gets its own stable page.
        let per_domain = if x.domain != 0 && !zero_merge {
            vec![(nguests - 1) * dup, dup]
        } else {
            vec![nguests * dup]
        };
        let dups: u64 = per_domain.iter().filter(|n| **n >= 2).sum();
        let stable = per_domain.iter().filter(|n| **n >= 2).count() as u64;
        let merged = if zero_merge {
            st.ksm_zero_pages
        } else {
            st.pages_shared + st.pages_sharing
        };
        if merged != dups {
            return setup_finding(format!(
                "merging: after {} full passes before the race, {merged} of the {dups} duplicate pages merged (shared {}, sharing {}, zero {}; domains {per_domain:?})",
                st.full_scans, st.pages_shared, st.pages_sharing, st.ksm_zero_pages
            ));
        }
        // Pages never merge across KSM domains (mm-ksm, `Ksm::enter_domain`:
        // the trees' keys fold in the domain, `Slot::salt`): one stable
        // page per domain for the one duplicated content. Added for
        // slots.rs `Slot::salt` -> 0 / 1 (every domain keyed alike: the
        // last guest's duplicates joined the other domain's stable page),
        // which no input reached with the default domain alone.
        if !zero_merge && st.pages_shared != stable {
            return setup_finding(format!(
                "domains: after {} full passes, {} stable page(s) for one duplicated content in {} domain(s) with duplicates (pages merged across domains?)",
                st.full_scans, st.pages_shared, stable
            ));
        }
    }

    let reads: Arc<Mutex<Vec<Read>>> = Arc::default();
    // ksmd.
    if !setup.swarm.off(Swarm::NO_KSMD) {
        let k = ksm.clone();
        let steps = 1 + setup.scan_steps % 6;
        sim.spawn("ksmd", async move {
            for _ in 0..steps {
                let n = k.scan_step().await;
                // §9.4 ksm_do_scan(n), during the race too.
                mm_core::sched::check(
                    n <= scan_budget,
                    "pacing: a ksmd batch scanned more than pages_to_scan",
                );
            }
        });
    }
    // Every actor that may OOM-kill (the OOM actor, unmerge's pressure
    // path, the vCPU's faults) counts down here; the reaper's loop stops
    // only once all are done and its queue is empty. (Stopping after the
    // OOM actor alone let a later kill by unmerge go unreaped: a false
    // I-RP-6 on ksm_vs_reaper.)
    let oom_done = Arc::new(AtomicBool::new(false));
    let killers = Arc::new(AtomicUsize::new(0));
    let killer = |killers: &Arc<AtomicUsize>, done: &Arc<AtomicBool>| {
        killers.fetch_add(1, Ordering::SeqCst);
        let (k, d) = (killers.clone(), done.clone());
        move || {
            if k.fetch_sub(1, Ordering::SeqCst) == 1 {
                d.store(true, Ordering::SeqCst);
            }
        }
    };
    // The admin writing run = 2.
    let unmerged = Arc::new(AtomicBool::new(false));
    if setup.unmerge {
        let (k, done) = (ksm.clone(), unmerged.clone());
        let finished = killer(&killers, &oom_done);
        let guests: Vec<(mm_core::Guest, u64, u64)> = gs
            .iter()
            .map(|g| (g.guest.clone(), g.addr, g.pages))
            .collect();
        // The guests that keep a VM_MERGEABLE VMA for as long as they
        // live: all but guest 0, whose vCPU may munmap its region or make
        // it unmergeable (then ksmd may rightly free its slot), unless it
        // also has the empty region, which nothing touches.
        let unmaps = setup
            .ops
            .iter()
            .any(|op| matches!(op, KsmOp::Munmap | KsmOp::Unmergeable));
        let keeps: Vec<bool> = (0..gs.len())
            .map(|i| i > 0 || empty > 0 || !unmaps)
            .collect();
        sim.spawn("unmerge", async move {
            // ENOMEM is a legal outcome (run falls back to stop).
            let before = crate::exec::injections();
            let res = k.set_run(Run::Unmerge).await;
            let injected = crate::exec::injections() != before;
            // §9.7: unmerge-all copies every merged page of a live mm,
            // read-only VMAs included (the host range is made writable for
            // the copy only); a host syscall failing there is a bug, not
            // an outcome. Added for unshare.rs's first `!writable` ->
            // `writable` (no mprotect before MADV_POPULATE_WRITE on a
            // read-only range: EFAULT), reached with `Extras::read_only`.
            // Unless the harness failed that syscall itself (`fail_nth`):
            // then the error is the injected ENOMEM.
            mm_core::sched::check(
                !res.as_ref().is_err_and(|e| host_failure(e) && !(injected && enomem(e))),
                "§9.7: run = 2 failed on a host syscall (unshare of a read-only VMA?)",
            );
            if res.is_err() {
                // A failed run = 2 stops the scanner (`set_run`: run falls
                // back to stop, as the sysfs write leaves ksm_run at its
                // old value but ksmd idle): a ksmd that merged again would
                // undo what the admin asked for.
                mm_core::sched::check(
                    k.run_mode() == Run::Stop,
                    "§9.7: run = 2 failed but the scanner did not fall back to stop",
                );
            }
            // I-KSM-7, after run = 2 whatever it returned (at once: the
            // scanner mutex was just released, no batch is half done and
            // every count is published): a page of a live guest that
            // still maps a stable page (its unshare failed, or its slot
            // was never reached) keeps its rmap item and its mapper, or a
            // later pass frees the stable page under it (its reads turn to
            // zeros) or never frees it (a leak). Catches an unmerge-all
            // that drops the items of a slot whose unshare failed (the
            // unmerge.rs `!all_gone` and `retain` paths).
            if let Some(what) = unaccounted_merged(&k, &guests) {
                mm_core::sched::check(false, what);
            }
            if res.is_ok() {
                done.store(true, Ordering::SeqCst);
                // I-KSM-10 at once (no yield in between): a guest still
                // alive now was alive when its slot was unmerged.
                mm_core::sched::check(
                    ksm_pages_left(&guests) == 0,
                    "I-KSM-10: run = 2 returned Ok while a live guest still maps a merged page",
                );
                // I-KSM-4 (b) and PROTOCOL §9.7, "live mms keep their
                // slots": unmerge-all frees only the slot of an mm it saw
                // exiting (users == 0). Also at once: a guest alive now was
                // alive all along, and one that keeps a mergeable VMA was
                // not rightly dropped by ksmd either. Catches the unmerge.rs
                // mutant `users() > 0` -> `< 0` (every mm treated as
                // exiting: a live guest silently falls out of KSM), which
                // no other oracle saw (fuzz/mutants.sh).
                mm_core::sched::check(
                    live_unregistered(&k, &guests, &keeps).is_none(),
                    "I-KSM-4: run = 2 returned Ok but freed the KSM slot of a live guest (live mms keep their slots, PROTOCOL §9.7)",
                );
            }
            finished();
        });
    }
    // Guest 0's vCPU, on its own user reference.
    let vcpu_user: Option<MmUser> = gs[0].guest.mm().ok();
    if let Some(user) = vcpu_user {
        // Ops of a kind the swarm mask turns off are dropped (all of
        // them with NO_OPS; the read-back audit still runs); mask 0 keeps
        // the first six as decoded.
        let allowed = |op: &&KsmOp| op.allowed(setup.swarm);
        let mut ops: Vec<KsmOp> = setup.ops.iter().filter(allowed).take(6).cloned().collect();
        if setup.ops.is_empty() {
            ops = [
                KsmOp::Write { page: 0, byte: 1 },
                KsmOp::Read { page: 0 },
                KsmOp::Read { page: 1 },
            ]
            .iter()
            .filter(allowed)
            .cloned()
            .collect();
        }
        let (k, reads) = (ksm.clone(), reads.clone());
        let (addr, pages, fill) = (gs[0].addr, gs[0].pages, gs[0].fill.clone());
        // With a read-only head (`Extras::read_only`), the vCPU's
        // UNMERGEABLE covers only the writable VMA above it: an unshare
        // whose range starts above another VMA's merged pages in the same
        // leaf. Added for unshare.rs's start `s / PAGE` -> `s % PAGE` (the
        // walk then starts at page 0 and unshares the read-only VMA's pages
        // with the writable VMA's protection: the host copy fails).
        let ro = x.read_only.min(pages);
        let unmerge_from = if ro < pages { ro } else { 0 };
        let finished = killer(&killers, &oom_done);
        sim.spawn("vcpu", async move {
            vcpu(&k, &user, addr, unmerge_from, &fill, &ops, &reads).await;
            finished();
            user.exit().await;
        });
    }
    // The OOM killer (one kill) and the reaper's loop (ksm_vs_reaper).
    if let Some(r) = &reaper {
        let h = host.clone();
        let finished = killer(&killers, &oom_done);
        sim.spawn("oom", async move {
            let _ = h.out_of_memory(None).await;
            finished();
        });
        let poll = sim.time(Duration::from_millis(50));
        sim.spawn(
            "reaper",
            crate::scenario::reaper_loop(r.clone(), oom_done.clone(), clock.clone(), poll, None),
        );
    }
    for (i, g) in gs.iter().enumerate() {
        if i == 1 && setup.g1_stays {
            continue;
        }
        let guest = g.guest.clone();
        let name: &'static str = ["g0-exit", "g1-exit", "g2-exit"][i];
        sim.spawn(name, async move { guest.exit().await });
    }

    let report = sim.run(20_000);
    crate::scenario::count_steps(report.trace.len() as u64);
    crate::scenario::count_kills(host.oom_stats().kills);
    if report.injected.is_some() {
        crate::scenario::count_injected();
    }
    let finding = |report: &Report, what: String| {
        let what = match report.injected {
            Some(site) => format!("{what} (after an injected failure at {site})"),
            None => what,
        };
        Some(Finding {
            invariant: what,
            trace: report.trace_table(60),
        })
    };
    if let Some(what) = crate::scenario::ending_verdict(&report) {
        return finding(&report, what);
    }
    for (page, want, got) in reads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if let (Some(w), Ok(b)) = (want, got) {
            if w != b {
                return finding(
                    &report,
                    format!("content: guest 0 page {page} read {b:#x}, expected {w:#x} (a merge or unmerge lost data)"),
                );
            }
        }
    }
    // I-RP-7: unmerge's pressure loop calls the OOM killer again and again
    // with 2-3 guests; it must never pick a second victim while the first
    // still lacks OOM_SKIP.
    if let Some(what) = crate::scenario::second_victim(&host) {
        return finding(&report, what);
    }
    // I-RP-6 (ksm_vs_reaper): the reaper's loop ran until its queue was
    // empty, and it always ends with OOM_SKIP. Without a reaper a killed
    // guest that has not exited (guest 1 may stay) rightly lacks it.
    for g in gs.iter().filter(|_| with_reaper) {
        if let Some(m) = g.guest.oom_mm() {
            if !m.flags().test(MmFlag::OOM_SKIP) {
                return finding(&report, "I-RP-6: victim never got OOM_SKIP".into());
            }
        }
    }
    // I-KSM-7 at the end of the race (every actor done, so no batch is
    // half done): a live guest's page that still maps a stable page has
    // its rmap item (see `unaccounted_merged`). Guest 1, if it stayed,
    // is the one still alive; with an injected failure its unshare may
    // have failed in run = 2 or under ksmd.
    {
        let live: Vec<(mm_core::Guest, u64, u64)> = gs
            .iter()
            .map(|g| (g.guest.clone(), g.addr, g.pages))
            .collect();
        if let Some(what) = unaccounted_merged(&ksm, &live) {
            return finding(&report, what.into());
        }
    }
    // I-KSM-10: a run = 2 that succeeded left nothing merged (ksmd merges
    // nothing after it: run is no longer "merge"), and every mapper of a
    // merged page was either unshared or gone with its guest. Mutation
    // testing (fuzz/mutants.sh) showed an unmerge that did nothing, or
    // skipped slots, was caught by no other oracle: merged pages still read
    // the right bytes.
    if unmerged.load(Ordering::SeqCst) {
        let st = ksm.stats();
        if st.pages_shared != 0 || st.pages_sharing != 0 {
            return finding(
                &report,
                format!(
                    "I-KSM-10: run = 2 returned Ok but {} stable page(s), {} sharing left",
                    st.pages_shared, st.pages_sharing
                ),
            );
        }
    }
    // I-KSM-4 (b), PROTOCOL §9.4 step 6 and §9.7: a slot is freed only for
    // an mm that is exiting or has no mergeable VMA left. Guest 1, if it
    // stayed, is alive and keeps its mergeable region, so it is still
    // registered, whatever ksmd and run = 2 did meanwhile. Catches the
    // walk.rs mutants that free a live mm's slot at the end of its visit
    // (fuzz/mutants.sh).
    if setup.g1_stays {
        let g1 = [(gs[1].guest.clone(), gs[1].addr, gs[1].pages)];
        if live_unregistered(&ksm, &g1, &[true]).is_some() {
            return finding(
                &report,
                "I-KSM-4: guest 1 is alive with a mergeable region but lost its KSM slot".into(),
            );
        }
    }
    // Guest 1 (alive if it stayed): its own contents, whatever guest 0
    // wrote (unless it was the victim and reaped: then nothing to check).
    if setup.g1_stays && gs[1].guest.oom_mm().is_none() {
        if let Ok(mm) = gs[1].guest.mm() {
            for (i, want) in gs[1].fill.iter().enumerate() {
                let mut b = [0u8; 2];
                let at = gs[1].addr + i as u64 * P;
                if block_on(mm.read(at, &mut b[..1])).is_ok()
                    && block_on(mm.read(at + P - 1, &mut b[1..])).is_ok()
                    && b != [*want; 2]
                {
                    return finding(
                        &report,
                        format!("isolation: guest 1 page {i} reads {b:#x?}, its own content is {want:#x} (cross-guest leak)"),
                    );
                }
            }
        }
    }
    // A read-only VMA stays read-only on the host: unshare makes the range
    // writable for its copy only (unshare.rs `unshare_leaf`), so guest 1,
    // if it stayed, has no writable host page under a read-only VMA after
    // whatever run = 2 unshared, and no read-only host page under a
    // writable one (the host protection is the VMA's, `mprotect`). Added
    // for unshare.rs's second `!writable` -> `writable` (the protection
    // never restored), reached with `Extras::read_only`.
    if setup.g1_stays && x.read_only > 0 {
        if let Ok(mm) = gs[1].guest.mm() {
            if let Some((at, perms)) = host_protection_mismatch(&mm) {
                return finding(
                    &report,
                    format!("protection: guest 1's page {at:#x} is mapped {perms} on the host, its VMA says otherwise"),
                );
            }
        }
    }
    // I-KSM-9 (§9.5's fast path is required, not just faster): after an
    // Ok run = 2, with run still "unmerge" (the scanner stopped), guest 1,
    // if it stayed, has no rmap item and its slot is not at the cursor, so
    // its exit must free the slot itself; a slot left to a scanner that
    // never runs pins the mm for ever. Catches the slots.rs mutants that
    // send such an exit down the slow path (`list.cursor == Some(id)` ->
    // `true` / `!=`, `rmap_items == 0` -> `false`; fuzz/mutants.sh).
    if setup.g1_stays && unmerged.load(Ordering::SeqCst) {
        if let Some(id) = gs[1].guest.mm_grab().map(|m| m.id()) {
            block_on(gs[1].guest.exit());
            if ksm.is_registered(id) {
                return finding(
                    &report,
                    "I-KSM-9: guest 1 exited after run = 2 with no rmap item, but its slot was left to the stopped scanner".into(),
                );
            }
        }
    }
    // Everyone exits; ksmd then frees what exits left to it (run = merge).
    for g in &gs {
        block_on(g.guest.exit());
    }
    if block_on(ksm.set_run(Run::Merge)).is_err() {
        return finding(&report, "run = merge refused after every exit".into());
    }
    for _ in 0..64 {
        if ksm.stats().mm_slots == 0 {
            break;
        }
        block_on(ksm.scan_step());
    }
    let st = ksm.stats();
    if st.mm_slots != 0 {
        return finding(
            &report,
            format!("I-KSM-9: {} slot(s) left (mms pinned for ever) after every exit and 64 batches of ksmd", st.mm_slots),
        );
    }
    let freed = st.slots_freed_by_exit + st.slots_freed_by_scanner;
    if freed != nguests {
        return finding(
            &report,
            format!(
                "I-KSM-4: {freed} slot frees for {nguests} slots (by exit {}, by ksmd {})",
                st.slots_freed_by_exit, st.slots_freed_by_scanner
            ),
        );
    }
    if st.pages_shared != 0 || st.rmap_items != 0 {
        return finding(
            &report,
            format!(
                "I-KSM-7: {} stable page(s), {} rmap item(s) left with no mm",
                st.pages_shared, st.rmap_items
            ),
        );
    }
    let watches: Vec<MmWatch> = gs.iter().map(|g| g.watch.clone()).collect();
    drop((gs, ksm, reaper));
    let charged = host.stats().charged_bytes;
    if let Some(what) = crate::scenario::victims_balanced(&host) {
        return finding(&report, what);
    }
    crate::scenario::end_of_run_oracles(charged, host, &watches)
        .and_then(|what| finding(&report, what))
}

/// The `sched::fail` sites of the KSM unshare (mm-core `ksm/unshare.rs`):
/// the only ones the KSM targets' `fail_nth` counts.
fn unshare_site(name: &str) -> bool {
    name == "fail:mprotect(unshare)" || name == "fail:madvise(POPULATE_WRITE) unshare"
}

/// A host syscall's ENOMEM: what an injected failure returns.
fn enomem(e: &mm_ksm::Error) -> bool {
    matches!(
        e,
        mm_ksm::Error::Mm {
            source: mm_core::Error::Host { source, .. },
            ..
        } if source.kind() == std::io::ErrorKind::OutOfMemory
    )
}

/// I-KSM-7 (an rmap item is dropped only after its page was unshared,
/// mm-ksm `scan/stable.rs`), read while no ksmd batch is half done: the
/// pages of the guests alive now (`users > 0`) whose PTE maps a stable
/// page (`mm_core::ksm::page_counts`, what `ksm_stat`'s
/// `ksm_merging_pages` says) each still have their rmap item and their
/// stable page's mapper: the guest is registered, its slot's items and
/// the scanner's (`rmap_items`, `pages_shared + pages_sharing`) are at
/// least its merged pages. Without them a later pass frees the stable
/// page under the guest (its reads turn to zeros) or never frees it (a
/// leak). Merged pages of exited guests and items of unmerged pages
/// only add to the scanner's side. `(guest, addr, pages)`.
fn unaccounted_merged(ksm: &Ksm, guests: &[(mm_core::Guest, u64, u64)]) -> Option<&'static str> {
    let st = ksm.stats();
    let mut merged = 0;
    for (guest, _, _) in guests {
        let Some(mm) = guest.mm_grab() else { continue };
        if mm.users() == 0 {
            continue;
        }
        let (m, _) = mm_core::ksm::page_counts(&mm);
        if m == 0 {
            continue;
        }
        merged += m;
        match ksm.process_stat(mm.id()) {
            None => {
                return Some("I-KSM-7: a live guest maps merged pages but has no KSM slot (its rmap items were dropped before its pages were unshared)")
            }
            Some(ps) if ps.rmap_items < m => {
                return Some("I-KSM-7: a live guest maps more merged pages than its slot has rmap items (items dropped before their pages were unshared)")
            }
            Some(_) => {}
        }
    }
    if st.rmap_items < merged {
        return Some("I-KSM-7: live guests map more merged pages than the scanner has rmap items (items dropped before their pages were unshared)");
    }
    if st.pages_shared + st.pages_sharing < merged {
        return Some("I-KSM-7: live guests map more merged pages than the stable pages have mappers (a stable page freed or due to be freed under a mapper)");
    }
    None
}

/// An error of a KSM operation that comes from a failed host syscall
/// (not from the budget, a kill or the guest's own range).
fn host_failure(e: &mm_ksm::Error) -> bool {
    matches!(
        e,
        mm_ksm::Error::Mm {
            source: mm_core::Error::Host { .. },
            ..
        }
    )
}

/// The first page of a readable VMA of `mm` whose host mapping is
/// writable while the VMA is not, or the other way round (read from
/// `/proc/self/maps`), as `(guest address, host perms)`.
fn host_protection_mismatch(mm: &MmUser) -> Option<(u64, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let ranges: Vec<(u64, u64, String)> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let a = u64::from_str_radix(a, 16).ok()?;
            let b = u64::from_str_radix(b, 16).ok()?;
            Some((a, b, f.next()?.to_string()))
        })
        .collect();
    mm.vmas_blocking()
        .iter()
        .filter(|v| v.prot().contains(Prot::READ))
        .find_map(|v| {
            let w = v.prot().contains(Prot::WRITE);
            (0..v.len() / P).find_map(|i| {
                let h = v.host_ptr() as u64 + i * P;
                ranges
                    .iter()
                    .find(|(a, b, _)| *a <= h && h < *b)
                    .filter(|(_, _, perms)| (perms.as_bytes().get(1) == Some(&b'w')) != w)
                    .map(|(_, _, perms)| (v.start() + i * P, perms.clone()))
            })
        })
}

/// The first guest alive now (`users > 0`), among those that `keep` a
/// mergeable VMA while they live, that has no KSM slot.
fn live_unregistered(
    ksm: &Ksm,
    guests: &[(mm_core::Guest, u64, u64)],
    keep: &[bool],
) -> Option<usize> {
    guests.iter().zip(keep).position(|((guest, _, _), keep)| {
        *keep
            && guest
                .mm_grab()
                .is_some_and(|mm| mm.users() > 0 && !ksm.is_registered(mm.id()))
    })
}

/// Pages of `[addr, addr + pages * P)` of `mm` whose PTE says merged (KSM)
/// or still carries the mark of a discarded KSM zero page (not present).
fn ksm_pages_in(mm: &MmUser, addr: u64, pages: u64) -> u64 {
    use mm_core::pgtable::Pte;
    let guard = crossbeam_epoch::pin();
    (0..pages)
        .filter(|p| {
            mm.page_table()
                .pte(addr / P + p, &guard)
                .is_some_and(|pte| {
                    let pte = Pte(pte.load(Ordering::SeqCst));
                    pte.ksm() || pte.ksm_zero()
                })
        })
        .count() as u64
}

/// Pages of the guests alive now (`users > 0`) whose PTE says merged
/// (KSM), read from their page tables. `(guest, addr, pages)`.
fn ksm_pages_left(guests: &[(mm_core::Guest, u64, u64)]) -> u64 {
    let guard = crossbeam_epoch::pin();
    let mut n = 0;
    for (guest, addr, pages) in guests {
        let Some(mm) = guest.mm_grab() else { continue };
        if mm.users() == 0 {
            continue;
        }
        for p in 0..*pages {
            let gpn = addr / P + p;
            if let Some(pte) = mm.page_table().pte(gpn, &guard) {
                if mm_core::pgtable::Pte(pte.load(Ordering::SeqCst)).ksm() {
                    n += 1;
                }
            }
        }
    }
    n
}

async fn vcpu(
    ksm: &Ksm,
    user: &MmUser,
    addr: u64,
    unmerge_from: u64,
    fill: &[u8],
    ops: &[KsmOp],
    reads: &Mutex<Vec<Read>>,
) {
    // The region's pages: one initial byte each.
    let pages = fill.len() as u64;
    let mut model: Vec<Option<u8>> = fill.iter().map(|b| Some(*b)).collect();
    let len = pages * P;
    for op in ops {
        match *op {
            KsmOp::Read { page } => {
                let p = u64::from(page) % pages;
                read_page(user, addr, p, &model, reads).await;
            }
            KsmOp::Write { page, byte } => {
                let p = u64::from(page) % pages;
                let byte = byte | 0x80;
                model[p as usize] = match user.write(addr + p * P, &[byte]).await {
                    Ok(()) => Some(byte),
                    Err(_) => None,
                };
            }
            KsmOp::DontNeed => {
                let _ = user.madvise(addr, len, Advice::DontNeed).await;
                model.iter_mut().for_each(|m| *m = None);
            }
            KsmOp::Unmergeable => {
                // Contents stay; an error (e.g. out of memory) changes
                // nothing. A host syscall failing is a bug (as for run = 2
                // above: the unshare of a read-only VMA).
                let from = addr + unmerge_from * P;
                let before = crate::exec::injections();
                let res = ksm
                    .madvise(user, from, len - unmerge_from * P, Advice::Unmergeable)
                    .await;
                let injected = crate::exec::injections() != before;
                // Unless the harness failed the unshare's syscall itself
                // (`Extras::fail_nth`, the injected ENOMEM): then the
                // madvise fails before `VM_MERGEABLE` goes (the kernel's
                // order), the range's merged pages stay merged and keep
                // their rmap items, and the read-back audit below checks
                // their contents.
                mm_core::sched::check(
                    !res.as_ref().is_err_and(|e| host_failure(e) && !(injected && enomem(e))),
                    "§9.7 break_ksm: madvise(UNMERGEABLE) failed on a host syscall (unshare of a read-only VMA?)",
                );
                // §9.7 break_ksm (`unmerge_ksm_pages`): an UNMERGEABLE that
                // returned Ok left no page of its range mapping a KSM page
                // (read from the page table at once, before any yield).
                // The scanner drops the range's rmap items later, unsharing
                // each page on its own, which hid a wrong leaf walk in the
                // range unshare. Added for unshare.rs's leaf `stop` with
                // `gpn / PAGES_PER_LEAF` -> `gpn * PAGES_PER_LEAF` (one
                // unshare_leaf over both leaves: the pages past the
                // boundary are read in the wrong leaf), reached by a region
                // across the 2 MiB leaf boundary (`Extras::straddle_at`).
                // Nor a discarded KSM zero page's mark (the kernel's
                // unmerge decrements `ksm_zero_pages`): added for
                // unshare.rs's zero-mark branch (`!= 0` -> `== 0`, its `!`
                // deleted; fuzz/mutants.sh), which only a per-guest
                // counter test saw.
                if res.is_ok() {
                    let n = ksm_pages_in(user, from, pages - unmerge_from);
                    mm_core::sched::check(
                        n == 0,
                        "§9.7 break_ksm: madvise(UNMERGEABLE) returned Ok while a page of its range still maps a KSM page (or keeps a KSM zero mark)",
                    );
                }
            }
            KsmOp::Munmap => {
                let _ = user.munmap(addr, len).await;
                model.iter_mut().for_each(|m| *m = None);
            }
        }
    }
    // The audit: every page read back once more before this user exits.
    // A loss (an rmap item dropped before its page was unshared, a stable
    // page freed under a mapper) shows on whichever page it hit, not only
    // when a random `Read` names that page at the right moment: the
    // issue-16 data-loss bug needed both and ten-minute campaigns missed it.
    for p in 0..pages {
        read_page(user, addr, p, &model, reads).await;
    }
}

/// Reads the first byte of page `p` and records it with what the model
/// expects there.
async fn read_page(
    user: &MmUser,
    addr: u64,
    p: u64,
    model: &[Option<u8>],
    reads: &Mutex<Vec<Read>>,
) {
    let mut b = [0u8];
    let got = match user.read(addr + p * P, &mut b).await {
        Ok(()) => Ok(b[0]),
        Err(e) => Err(e.to_string()),
    };
    reads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((p, model[p as usize], got));
}
