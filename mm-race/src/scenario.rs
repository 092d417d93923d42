//! Scenarios: a setup decoded from the input, the actors of one race, and
//! the oracles checked after the run.
//!
//! Input layout (what the fuzz targets feed): an `arbitrary`-decoded
//! [`Setup`] first, then (`kill_anywhere` only) one byte choosing the
//! Nth-failure injection, then the remaining bytes are the schedule. An
//! input may start with a swarm header ([`crate::swarm`]) that turns some
//! actors and features off; without one, nothing is off.
//!
//! The actors share only `Send` state (`Arc`, `Mutex`, atomics), so the
//! same run can go on the executor or on OS threads ([`crate::mode`]).

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use mm_core::{
    lock, Advice, Error, Guest, Host, HostConfig, MapOptions, Mm, MmFlag, MmNotifier, MmUser,
    MmWatch, WouldBlock, PAGE_SIZE,
};
use mm_reaper::{Reaper, ReaperConfig, ZapSplit};

use crate::exec::{Ending, Report};
use crate::mode::{Mode, Runner};
use crate::swarm::Swarm;

const P: u64 = PAGE_SIZE as u64;

/// Which actors race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Teardown vs the OOM killer and reaper.
    TeardownVsReaper,
    /// process_mrelease vs the guest's exit.
    MreleaseVsExit,
    /// A vCPU's faults (the access API) vs the reaper.
    FaultVsReap,
    /// Everything, with SIGKILL-like cancellation of cancellable actors.
    KillAnywhere,
    /// Several guests, every actor.
    FullSystem,
    /// Guest exits vs ksmd and unmerge-all (seed 3; [`crate::ksm_scenario`]).
    TeardownVsKsm,
    /// `teardown_vs_ksm` with the OOM killer and reaper (PROTOCOL.md
    /// §9.9): ksmd and the reaper on the same victim.
    KsmVsReaper,
    /// `oom_killer_disable` (the suspend freezer) vs the OOM killer, the
    /// victim's exit and a victim that holds its mmap lock for a long
    /// (virtual) time, so the reaper gives up (seed 4's story, I-RP-8).
    OomDisableVsExit,
    /// `teardown_vs_reaper` with two guests whose OOM standing differs
    /// (`oom_score_adj`, unkillable, an extra page-table leaf): the
    /// victim choice (§7 `select_bad_process`).
    OomChoice,
    /// Direct touches of tracked memory (the uffd handler's fault path)
    /// vs the kill and reap, the embedder's discards and the access API
    /// ([`crate::touch_scenario`]).
    TouchVsReap,
}

impl Target {
    /// All targets, in order.
    pub const ALL: [Target; 10] = [
        Target::TeardownVsReaper,
        Target::MreleaseVsExit,
        Target::FaultVsReap,
        Target::KillAnywhere,
        Target::FullSystem,
        Target::TeardownVsKsm,
        Target::OomDisableVsExit,
        Target::KsmVsReaper,
        Target::OomChoice,
        Target::TouchVsReap,
    ];

    /// Name used by the fuzz targets and the corpus directories.
    pub fn name(self) -> &'static str {
        match self {
            Target::TeardownVsReaper => "teardown_vs_reaper",
            Target::MreleaseVsExit => "mrelease_vs_exit",
            Target::FaultVsReap => "fault_vs_reap",
            Target::KillAnywhere => "kill_anywhere",
            Target::FullSystem => "full_system",
            Target::TeardownVsKsm => "teardown_vs_ksm",
            Target::OomDisableVsExit => "oom_disable_vs_exit",
            Target::KsmVsReaper => "ksm_vs_reaper",
            Target::OomChoice => "oom_choice",
            Target::TouchVsReap => "touch_vs_reap",
        }
    }
}

/// One mapping of a guest.
#[derive(Debug, Clone, Arbitrary)]
pub struct VmaSpec {
    pages: u8,
    shared: bool,
    locked: bool,
    fill: u8,
}

/// One operation of a vCPU actor.
#[derive(Debug, Clone, Arbitrary)]
pub enum GuestOp {
    /// Read one byte.
    Read {
        /// Which VMA.
        vma: u8,
        /// Which page of it.
        page: u8,
    },
    /// Write one byte.
    Write {
        /// Which VMA.
        vma: u8,
        /// Which page of it.
        page: u8,
        /// The byte (0 is written as 1, so data differs from a zero page).
        byte: u8,
    },
    /// madvise(DONTNEED) the VMA.
    DontNeed {
        /// Which VMA.
        vma: u8,
    },
    /// mlock the VMA.
    Mlock {
        /// Which VMA.
        vma: u8,
    },
    /// munlock the VMA.
    Munlock {
        /// Which VMA.
        vma: u8,
    },
    /// munmap the VMA.
    Munmap {
        /// Which VMA.
        vma: u8,
    },
}

/// The decoded setup.
#[derive(Debug, Clone, Arbitrary)]
pub struct Setup {
    vmas: Vec<VmaSpec>,
    ops: Vec<GuestOp>,
    /// Bits 0-1: the reaper's delay (0-300 virtual ms); bits 2-3: its zap
    /// threads (1-3, split at every page); bits 4-7 reading 3: the
    /// reaper's own loop (`Reaper::run`) instead of the harness's steps.
    reaper_delay_ms: u8,
    notifier_refuses: bool,
    second_guest: bool,
    /// Nth-failure injection: the Nth fallible site reached (host mmap,
    /// populate, budget charge, memfd, zap) fails; 0 = none. Decoded after
    /// the setup for `kill_anywhere` only, so the other targets' inputs
    /// keep their meaning.
    #[arbitrary(default)]
    fail_nth: u8,
    /// `oom_disable_vs_exit` only (decoded after the setup, like
    /// `fail_nth`): how long the stuck holder keeps the victim's mmap lock
    /// in write mode, in units of 150 virtual ms (0 = no holder); the
    /// reaper gives up after 3 tries 100 ms apart.
    #[arbitrary(default)]
    hold: u8,
    /// `oom_choice` only (decoded after the setup, like `hold`): each
    /// guest's OOM standing, 4 bits each (guest 0 low, guest 1 high): an
    /// `oom_score_adj` from [`ADJ`] (0..=14) or unkillable (15); bit 8:
    /// guest 1 maps and fills one more page far from the others (its own
    /// page-table leaf, so the two guests' page-table pages differ); bit 9:
    /// the OOM actor's first call is made by guest 0 itself (its
    /// requester path, `task_will_free_mem(current)`).
    #[arbitrary(default)]
    choice: u16,
    /// The actors and features this run leaves out (swarm testing): read
    /// from the input's swarm header, not decoded by `arbitrary`; 0 (none
    /// off) for a plain input.
    #[arbitrary(default)]
    swarm: Swarm,
}

impl Setup {
    /// Forces the setup features that `self.swarm` turns off to `false`
    /// (or 0). With mask 0 nothing changes.
    fn apply_swarm(&mut self) {
        let s = self.swarm;
        for v in &mut self.vmas {
            v.shared &= !s.off(Swarm::NO_SHARED);
            v.locked &= !s.off(Swarm::NO_LOCKED);
        }
        self.notifier_refuses &= !s.off(Swarm::NO_NOTIFIER);
        self.second_guest &= !s.off(Swarm::NO_EXTRA_GUEST);
        if s.off(Swarm::NO_REAPER_DELAY) {
            self.reaper_delay_ms = 0;
        }
        if s.off(Swarm::NO_FAIL) {
            self.fail_nth = 0;
        }
        if s.off(Swarm::NO_HOLDER) {
            self.hold = 0;
        }
    }
}

impl GuestOp {
    /// Whether the swarm mask `s` lets this kind of op run.
    fn allowed(&self, s: Swarm) -> bool {
        let bit = match self {
            GuestOp::Read { .. } => Swarm::NO_READ,
            GuestOp::Write { .. } => Swarm::NO_WRITE,
            GuestOp::DontNeed { .. } => Swarm::NO_DONTNEED,
            GuestOp::Mlock { .. } | GuestOp::Munlock { .. } => Swarm::NO_MLOCK_OPS,
            GuestOp::Munmap { .. } => Swarm::NO_MUNMAP,
        };
        !s.off(bit | Swarm::NO_OPS)
    }
}

/// A finding: which invariant broke, and the trace that broke it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The invariant (PROTOCOL.md §12 name first).
    pub invariant: String,
    /// The schedule as an N-column trace.
    pub trace: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invariant broken: {}", self.invariant)?;
        write!(f, "{}", self.trace)
    }
}

struct Refuse;
impl MmNotifier for Refuse {
    fn release(&self, _mm: &Mm) {}
    fn invalidate_range_start(
        &self,
        _r: std::ops::Range<u64>,
        blockable: bool,
    ) -> Result<(), WouldBlock> {
        if blockable {
            Ok(())
        } else {
            Err(WouldBlock)
        }
    }
}

/// `oom_choice`'s `oom_score_adj` values. With its 2 MiB budget one unit
/// is about half a page of badness, so small values compete with the
/// guests' few pages and the large ones decide alone.
const ADJ: [i32; 15] = [
    0, 1, -1, 4, -4, 10, -10, 25, -25, 60, -60, 300, -300, 1000, -1000,
];

/// One read of the vCPU: (vma, page, expected byte if known, result).
type Read = (usize, u64, Option<u8>, Result<u8, String>);

/// What the vCPU saw, checked against the model afterwards.
#[derive(Debug, Default)]
struct Observed {
    reads: Vec<Read>,
}

struct GuestSetup {
    guest: Guest,
    watch: MmWatch,
    vmas: Vec<(u64, u64)>, // (addr, pages)
}

/// Refuses nothing; checks that a nonblocking
/// invalidation (a reap: the OOM reaper's or `process_mrelease`'s, the only
/// callers with `blockable == false`) never covers one of the guest's
/// shared VMAs. I-RP-3: shared memory is not the victim's alone and is
/// never reaped. Catches the mm-reaper mutant `is_shared() || PINNED` ->
/// `&&` in `reap_locked` (fuzz/mutants.sh): a reaped shared VMA reads its
/// memfd's bytes back on the next fault, so no content oracle sees it.
struct SharedNotReaped(Vec<std::ops::Range<u64>>);
impl MmNotifier for SharedNotReaped {
    fn release(&self, _mm: &Mm) {}
    fn invalidate_range_start(
        &self,
        r: std::ops::Range<u64>,
        blockable: bool,
    ) -> Result<(), WouldBlock> {
        mm_core::sched::check(
            blockable || !self.0.iter().any(|s| s.start < r.end && r.start < s.end),
            "I-RP-3: a reap invalidated (zapped) a shared VMA",
        );
        Ok(())
    }
}

fn build_guest(host: &Host, name: &str, setup: &Setup) -> Option<GuestSetup> {
    let guest = host.create_guest(name);
    let mm = guest.mm().ok()?;
    let watch = mm.watch();
    let mut vmas = Vec::new();
    let mut shared = Vec::new();
    let default = [VmaSpec {
        pages: 2,
        shared: false,
        locked: false,
        fill: 0x5a,
    }];
    let specs = if setup.vmas.is_empty() {
        &default[..]
    } else {
        &setup.vmas[..]
    };
    for v in specs.iter().take(4) {
        let pages = u64::from(v.pages % 8) + 1;
        let opts = if v.shared {
            MapOptions::shared(pages * P)
        } else {
            MapOptions::anon(pages * P)
        };
        // A failed mmap (only by injection) leaves this VMA out.
        let Ok(a) = futures_lite::future::block_on(mm.mmap(opts)) else {
            continue;
        };
        let _ = futures_lite::future::block_on(mm.fill(a, pages * P, v.fill | 1));
        if v.locked {
            let _ = futures_lite::future::block_on(mm.mlock(a, pages * P));
        }
        vmas.push((a, pages));
        if v.shared {
            shared.push(a..a + pages * P);
        }
    }
    // First, so a refusing notifier after it cannot hide a reap from it.
    mm.register_notifier(Arc::new(SharedNotReaped(shared)));
    if setup.notifier_refuses {
        mm.register_notifier(Arc::new(Refuse));
    }
    // Drop the setup user clone while the guest still holds one: not last.
    drop(mm);
    Some(GuestSetup { guest, watch, vmas })
}

thread_local! {
    static STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static INJECTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static KILLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// OOM kills made by the runs on this thread so far (the corpus replay
/// checks that the targets with an OOM killer really kill: with
/// `Host::badness` -> `None`, no guest is ever chosen, and every reaper
/// oracle held vacuously; fuzz/mutants.sh).
pub fn kills_made() -> u64 {
    KILLS.with(|s| s.get())
}

/// One more run with an injected failure (see [`failures_injected`]).
pub(crate) fn count_injected() {
    INJECTED.with(|s| s.set(s.get() + 1));
}

pub(crate) fn count_kills(n: u64) {
    KILLS.with(|s| s.set(s.get() + n));
}

/// Runs on this thread so far in which a failure was injected (the tests
/// check that the fallible sites are really reached).
pub fn failures_injected() -> u64 {
    INJECTED.with(|s| s.get())
}

/// Protocol steps executed on this thread so far (coverage of the schedule
/// space; the tests check that inputs really run).
pub fn steps_executed() -> u64 {
    STEPS.with(|s| s.get())
}

pub(crate) fn count_steps(n: u64) {
    STEPS.with(|s| s.set(s.get() + n));
}

/// Runs one input against a target on the deterministic executor; `None`
/// = no finding.
pub fn run(target: Target, data: &[u8]) -> Option<Finding> {
    run_mode(target, data, &Mode::Sim)
}

/// Runs one input against a target in `mode`.
pub fn run_mode(target: Target, data: &[u8], mode: &Mode) -> Option<Finding> {
    if target == Target::TeardownVsKsm {
        return crate::ksm_scenario::run_mode(data, mode);
    }
    if target == Target::KsmVsReaper {
        return crate::ksm_scenario::run_mode_reaper(data, mode, true);
    }
    if target == Target::TouchVsReap {
        return crate::touch_scenario::run_mode(data, mode);
    }
    let (swarm, data) = crate::swarm::split(target, data);
    let mut u = Unstructured::new(data);
    let Ok(mut setup) = Setup::arbitrary(&mut u) else {
        return None;
    };
    if target == Target::KillAnywhere {
        setup.fail_nth = u.int_in_range(0..=15).unwrap_or(0);
    }
    if target == Target::OomDisableVsExit {
        setup.hold = u.int_in_range(0..=7).unwrap_or(0);
    }
    if target == Target::OomChoice {
        setup.choice = u.arbitrary().unwrap_or(0);
    }
    setup.swarm = swarm;
    setup.apply_swarm();
    let schedule = u.take_rest().to_vec();
    run_setup_mode(target, &setup, &schedule, mode)
}

/// Runs a decoded setup with an explicit schedule on the executor.
pub fn run_setup(target: Target, setup: &Setup, schedule: &[u8]) -> Option<Finding> {
    run_setup_mode(target, setup, schedule, &Mode::Sim)
}

/// Runs a decoded setup in `mode` (the schedule drives the executor, or
/// the kill delays on threads).
pub fn run_setup_mode(
    target: Target,
    setup: &Setup,
    schedule: &[u8],
    mode: &Mode,
) -> Option<Finding> {
    let mut sim = Runner::new(mode, schedule);
    sim.fail_nth(u32::from(setup.fail_nth));
    let clock = sim.clock();
    let host = Host::new(HostConfig {
        clock: clock.clone(),
        oom_wait: sim.time(Duration::from_millis(300)),
        // oom_choice: small enough that oom_score_adj competes with the
        // guests' pages (one unit ~ half a page), large enough for both.
        ..HostConfig::with_budget(if target == Target::OomChoice {
            2 << 20
        } else {
            1 << 30
        })
    });
    let reaper_delay = sim.time(Duration::from_millis(
        u64::from(setup.reaper_delay_ms % 4) * 100,
    ));
    // Bits 2-3 of the same byte: the reap's zap over 1-3 real threads,
    // split at every page (`min_len` 0, `align_pages` 1), so the split's
    // part arithmetic runs on these VMAs of a few pages (production splits
    // only VMAs of 128 MiB or more on 2 MiB boundaries). Added for the
    // mm-reaper `zap_vma` mutants the harness could not reach
    // (fuzz/mutants.sh): a part left out leaves pages present after a
    // complete reap (I-RP-10), a part outside the VMA fails and makes the
    // reap partial. The zap threads have no hook: the reaping thread
    // zaps the first part, so injected failures and checks still reach it.
    let zap = ZapSplit {
        threads: 1 + usize::from(setup.reaper_delay_ms >> 2 & 3).min(2),
        min_len: 0,
        align_pages: NonZeroU64::MIN,
    };
    let reaper = Reaper::new(ReaperConfig {
        delay: reaper_delay,
        max_retries: 3,
        retry_interval: sim.time(Duration::from_millis(100)),
        zap,
        clock: clock.clone(),
    });
    reaper.install(&host);

    // The setup runs under the run's hook (failure injection counts there
    // too), outside any actor: nothing yields.
    let hook = sim.install_for_setup();
    let g0 = build_guest(&host, "g0", setup)?;
    let g1 = if target == Target::OomChoice
        || matches!(target, Target::FullSystem | Target::OomDisableVsExit) && setup.second_guest
    {
        build_guest(&host, "g1", setup)
    } else {
        None
    };
    let mut unkillable = Vec::new();
    if target == Target::OomChoice {
        for (i, g) in [Some(&g0), g1.as_ref()].into_iter().flatten().enumerate() {
            match ADJ.get(usize::from(setup.choice >> (4 * i) & 15)) {
                Some(&adj) => g.guest.set_oom_score_adj(adj),
                None => {
                    g.guest.set_unkillable(true);
                    unkillable.push(g.guest.id());
                }
            }
        }
        if let (Some(g), true) = (&g1, setup.choice & 0x100 != 0) {
            // A failed mmap (only by injection) just leaves it out.
            if let Ok(mm) = g.guest.mm() {
                let far = MapOptions {
                    addr: Some(64 << 20),
                    ..MapOptions::anon(P)
                };
                if let Ok(a) = futures_lite::future::block_on(mm.mmap(far)) {
                    let _ = futures_lite::future::block_on(mm.fill(a, P, 0x77));
                }
            }
        }
    }
    let watches: Vec<MmWatch> = [Some(&g0), g1.as_ref()]
        .into_iter()
        .flatten()
        .map(|g| g.watch.clone())
        .collect();
    drop(hook);
    let observed = Arc::new(Mutex::new(Observed::default()));
    let oom_done = Arc::new(AtomicBool::new(false));
    let cancellable = target == Target::KillAnywhere || target == Target::FullSystem;
    // When the first mm was queued for reaping (virtual time; I-RP-2).
    let queued_at: Arc<Mutex<Option<std::time::Instant>>> = Arc::new(Mutex::new(None));
    // Guest 0 was killed (SIGKILL with its mm still there to mark): set by
    // the killing actor in the same poll as the kill.
    let g0_killed = Arc::new(AtomicBool::new(false));
    // The stuck holder saw the reaper set OOM_SKIP while it held the lock:
    // the reaper gave up (oom_disable_vs_exit).
    let expect_gave_up = Arc::new(AtomicBool::new(false));
    // The last instant an actor saw the victim count at 0 right after a
    // step that can count a victim out (a guest's exit, a registry read
    // in the OOM actor).
    let zero_at: Arc<Mutex<Option<std::time::Instant>>> = Arc::new(Mutex::new(None));

    // The vCPU: its own user reference in a slot the harness can take back
    // if the actor is cancelled (the killed task's exit still runs).
    let vcpu_slot: Arc<Mutex<Option<MmUser>>> = Arc::new(Mutex::new(g0.guest.mm().ok()));
    {
        // The ops run in a cancellable actor holding a clone (never the
        // last user); the slot's own user exits in a separate actor once the
        // ops finish or are cancelled (the dropped future releases the
        // semaphore), as a killed task still runs its exit.
        let done = Arc::new(async_lock::Semaphore::new(0));
        struct Release(Arc<async_lock::Semaphore>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.add_permits(1);
            }
        }
        let release = Release(done.clone());
        let slot = vcpu_slot.clone();
        // Ops of a kind the swarm mask turns off are dropped (all of
        // them with NO_OPS); mask 0 keeps the first six as decoded.
        let allowed = |op: &&GuestOp| op.allowed(setup.swarm);
        let mut ops: Vec<GuestOp> = setup.ops.iter().filter(allowed).take(6).cloned().collect();
        if setup.ops.is_empty() {
            ops = [
                GuestOp::Write {
                    vma: 0,
                    page: 0,
                    byte: 0x42,
                },
                GuestOp::Read { vma: 0, page: 0 },
                GuestOp::Read { vma: 0, page: 1 },
            ]
            .iter()
            .filter(allowed)
            .cloned()
            .collect();
        }
        let vmas = g0.vmas.clone();
        let obs = observed.clone();
        let killed = g0_killed.clone();
        let fut = async move {
            let _release = release;
            let user = lock(&slot).clone();
            let Some(user) = user else {
                return;
            };
            vcpu(&user, &vmas, &ops, &obs, &killed).await;
        };
        if cancellable {
            sim.spawn_cancellable("vcpu", fut);
        } else {
            sim.spawn("vcpu", fut);
        }
        let slot = vcpu_slot.clone();
        sim.spawn("vcpu-exit", async move {
            let _permit = done.acquire().await;
            let own = lock(&slot).take();
            if let Some(u) = own {
                u.exit().await;
            }
        });
    }

    match target {
        Target::MreleaseVsExit => {
            let g = g0.guest.clone();
            let killed = g0_killed.clone();
            sim.spawn("kill", async move {
                // Every kill counts: `Guest::mm_grab` finds the mm while
                // anybody (the vCPU) still uses it, also inside the
                // guest's own exit. It did not between the exit's take of
                // its user and the lingering publish, and a vCPU wrote on
                // after the kill (fixed in `Guest::exit`).
                g.kill();
                killed.store(true, Ordering::SeqCst);
                // SIGKILL delivered: from now on the guest is dying (what
                // process_mrelease requires, §7.1). Catches the oom.rs
                // mutant `Guest::kill` -> `()` (fuzz/mutants.sh): a kill
                // that did nothing passed every other oracle here.
                mm_core::sched::check(g.is_dying(), "§7.1: a killed guest is not dying");
            });
            let (h, id) = (host.clone(), g0.guest.id());
            sim.spawn("mrelease", async move {
                // PROTOCOL §7.1 step 5: -EINVAL ("not dying") only for a
                // target that is not dying. Read here, with no yield point
                // before mrelease's own test: a guest killed by now is
                // dying there too. Catches the mm-reaper mutant
                // `!guest.is_dying()` -> `guest.is_dying()` (every dying
                // guest refused, a live one reaped; fuzz/mutants.sh), which
                // no other oracle saw: the victim's exit frees its memory
                // anyway.
                let dying = h.guest(id).is_ok_and(|g| g.is_dying());
                let before = MreleaseWatch::new(&h, id);
                let r = mm_reaper::mrelease(&h, id).await;
                before.check(&r);
                mm_core::sched::check(
                    !(dying && matches!(r, Err(mm_reaper::MreleaseError::NotDying { .. }))),
                    "§7.1: process_mrelease of a killed guest returned EINVAL (not dying)",
                );
                // ... and it never reaps a guest that is not dying (its
                // memory is still in use).
                mm_core::sched::check(
                    dying || !matches!(r, Ok(mm_reaper::MreleaseOutcome::Reaped { .. })),
                    "§7.1: process_mrelease reaped a guest that was not dying",
                );
            });
        }
        Target::FaultVsReap => {
            let grab = g0.guest.mm_grab()?;
            let g = g0.guest.clone();
            let killed = g0_killed.clone();
            sim.spawn("reaper", async move {
                g.kill();
                killed.store(true, Ordering::SeqCst);
                let _ = mm_reaper::oom_reap_task_mm(&grab, zap).await;
            });
        }
        _ => {
            let (h, done, id) = (host.clone(), oom_done.clone(), g0.guest.mm_id());
            let again = !setup.swarm.off(Swarm::NO_OOM_AGAIN);
            // oom_choice, bit 9: guest 0 itself runs short first (its own
            // allocation calls the OOM killer), dying or not by then.
            let first_requester = (setup.choice & 0x200 != 0).then_some(id);
            let w = OomWatch {
                reaper: reaper.clone(),
                clock: clock.clone(),
                queued_at: queued_at.clone(),
                zero_at: zero_at.clone(),
                g0_killed: g0_killed.clone(),
                g0: g0.guest.id(),
                unkillable: unkillable.clone(),
            };
            sim.spawn("oom", async move {
                // mark_oom_victim (I-RP-9): a guest reported killed has its
                // oom_mm, which the reaper and the selection go by. Catches
                // the oom.rs mutant `mark_oom_victim` -> `()`
                // (fuzz/mutants.sh): with no victim marked nothing was
                // reaped, and every reaper oracle held vacuously.
                let first = h.out_of_memory(first_requester).await;
                after_oom(&h, first, first_requester, &w);
                if let mm_core::OomOutcome::Killed { guest } = first {
                    let g = h.guests().into_iter().find(|g| g.id() == guest);
                    mm_core::sched::check(
                        g.is_none_or(|g| g.is_oom_victim()),
                        "I-RP-9: the OOM killer reported a kill but the victim has no oom_mm",
                    );
                }
                // The victim itself then runs short while dying
                // (task_will_free_mem(current)): it must not be queued twice.
                if again {
                    let again = h.out_of_memory(Some(id)).await;
                    after_oom(&h, again, Some(id), &w);
                }
                done.store(true, Ordering::SeqCst);
            });
            let poll = sim.time(Duration::from_millis(50));
            if setup.reaper_delay_ms >> 4 == 3 {
                // Bits 4-7 of the same byte read 3 (a value no earlier
                // committed input has; a random one, 1 in 16): the
                // reaper's own loop, `Reaper::run` (the `oom_reaper`
                // kthread's body, which `Reaper::spawn` runs on a thread),
                // and an actor that stops it once the OOM actor is done
                // and nothing is pending. Catches mm-reaper `Reaper::run` -> `()`, its
                // `!` deleted and `Reaper::stop` -> `()` (fuzz/mutants.sh;
                // the harness drove only `Reaper::step`): the queue is
                // never served, or the loop never ends (the step limit).
                // The loop's own wait decides when it steps, so I-RP-2's
                // timing check stays with `reaper_loop`.
                let r = reaper.clone();
                sim.spawn("reaper", async move { r.run().await });
                let (r, done, c) = (reaper.clone(), oom_done.clone(), clock.clone());
                sim.spawn("reaper-stop", async move {
                    while !(done.load(Ordering::SeqCst) && r.pending() == 0) {
                        mm_core::Clock::sleep(&*c, poll).await;
                    }
                    r.stop();
                });
            } else {
                let not_before = Some((queued_at.clone(), reaper_delay));
                sim.spawn(
                    "reaper",
                    reaper_loop(
                        reaper.clone(),
                        oom_done.clone(),
                        clock.clone(),
                        poll,
                        not_before,
                    ),
                );
            }
            if cancellable && !setup.swarm.off(Swarm::NO_MRELEASE) {
                let (h, id) = (host.clone(), g0.guest.id());
                sim.spawn_cancellable("mrelease", async move {
                    let before = MreleaseWatch::new(&h, id);
                    let r = mm_reaper::mrelease(&h, id).await;
                    before.check(&r);
                });
            }
        }
    }
    // Kills counted when oom_killer_disable returned true (u64::MAX: it
    // did not, or no freezer ran).
    let frozen_at = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    // Each guest's exit() has returned (set by its exit actor in the same
    // poll: nothing yields between exit_oom_victim and the return).
    let exited: Vec<(Guest, Arc<AtomicBool>)> = [Some(&g0), g1.as_ref()]
        .into_iter()
        .flatten()
        .map(|g| (g.guest.clone(), Arc::new(AtomicBool::new(false))))
        .collect();
    if target == Target::OomDisableVsExit {
        let (h, at, guests) = (host.clone(), frozen_at.clone(), exited.clone());
        let wait = sim.time(Duration::from_millis(1000));
        // The "exit returned" flags are exact only on the executor (the
        // exit actor sets its flag in the same poll as exit_oom_victim);
        // on OS threads the freezer may run between the two.
        let exact = !sim.is_threads();
        let (c, zero) = (clock.clone(), zero_at.clone());
        sim.spawn("freezer", async move {
            let t0 = c.now();
            let frozen = h.oom_killer_disable(wait).await;
            let now = c.now();
            if !frozen {
                // I-RP-8's other half: `false` only for a timeout, with a
                // victim still counted when it expired (read in the same
                // poll). Catches the oom.rs mutant `oom_killer_disable` ->
                // `false` (fuzz/mutants.sh): a disable that gave up at once
                // was a legal outcome for every other oracle.
                mm_core::sched::check(
                    !exact || (now >= t0 + wait && h.oom_stats().victims_running != 0),
                    "I-RP-8: oom_killer_disable returned false before its timeout or with no victim left",
                );
                // A disable that timed out leaves the OOM killer enabled
                // (the kernel's oom_killer_disable calls
                // oom_killer_enable): a later OOM must still kill. Catches
                // oom.rs `oom_killer_enable` -> `()` (fuzz/mutants.sh).
                mm_core::sched::check(
                    !h.oom_stats().disabled,
                    "I-RP-8: oom_killer_disable timed out and left the OOM killer disabled",
                );
                return;
            }
            // ... and `true` as soon as the last victim is counted out:
            // virtual time does not move while the woken freezer can run,
            // so a `true` at or after the deadline is only right if the
            // last count-out happened at this very instant. Catches the
            // lost wakeups of `exit_oom_victim` (`left - 1` -> `+` / `/`,
            // `left == 0` -> `!=`; fuzz/mutants.sh): the freezer then slept
            // to its timeout and still returned true.
            mm_core::sched::check(
                !exact || now < t0 + wait || *lock(&zero) == Some(now),
                "I-RP-8: oom_killer_disable slept past the last victim's exit (lost wakeup)",
            );
            // I-RP-8: true only when no marked victim is still running: each
            // has finished its own exit (mmput, then exit_oom_victim).
            for (g, done) in &guests {
                mm_core::sched::check(
                    !exact || g.oom_mm().is_none() || done.load(Ordering::SeqCst),
                    "I-RP-8: oom_killer_disable returned while a victim was still exiting",
                );
            }
            at.store(h.oom_stats().kills, Ordering::SeqCst);
        });
        if setup.hold != 0 {
            // A victim thread stuck with its mmap lock held for write (in
            // mmap, say): the reaper's tries all fail and it gives up.
            let grab = g0.guest.mm_grab()?;
            let (c, r) = (clock.clone(), reaper.clone());
            let hold = sim.time(Duration::from_millis(150 * u64::from(setup.hold)));
            let expect = expect_gave_up.clone();
            sim.spawn("stuck-holder", async move {
                let guard = grab.lock().write().await;
                // With users left, exit_mmap has not begun, and it needs
                // the read lock before it can set OOM_SKIP: during this
                // hold only the reaper can set it, and a reaper that cannot
                // get the lock sets it only when it gives up.
                let reaper_only = grab.users() > 0 && !grab.flags().test(MmFlag::OOM_SKIP);
                mm_core::Clock::sleep(&*c, hold).await;
                if reaper_only && grab.flags().test(MmFlag::OOM_SKIP) {
                    expect.store(true, Ordering::SeqCst);
                }
                // I-RP-6: a reaper that gave up set OOM_SKIP first, so the
                // OOM killer can move on while this holder is still stuck
                // (only the reaper can have set it: exit waits for us).
                mm_core::sched::check(
                    r.stats().gave_up == 0 || grab.flags().test(MmFlag::OOM_SKIP),
                    "I-RP-6: the reaper gave up without setting OOM_SKIP",
                );
                drop(guard);
            });
        }
    }
    for (i, (g, done)) in exited.iter().cloned().enumerate() {
        let name = if i == 0 { "exit" } else { "g1-exit" };
        let (h, c, zero) = (host.clone(), clock.clone(), zero_at.clone());
        sim.spawn(name, async move {
            g.exit().await;
            done.store(true, Ordering::SeqCst);
            // exit_oom_victim ran in this poll if it ran in the exit.
            if h.oom_stats().victims_running == 0 {
                *lock(&zero) = Some(c.now());
            }
        });
    }

    let mut report = sim.run(20_000);
    STEPS.with(|s| s.set(s.get() + report.trace.len() as u64));
    count_kills(host.oom_stats().kills);
    if report.injected.is_some() {
        INJECTED.with(|s| s.set(s.get() + 1));
    }
    let threads = sim.is_threads();
    let finding = |report: &Report, what: String| {
        let what = match report.injected {
            Some(site) => format!("{what} (after an injected failure at {site})"),
            None => what,
        };
        Some(Finding {
            invariant: what,
            trace: if threads {
                "(thread mode: no step trace)\n".to_owned()
            } else {
                report.trace_table(60)
            },
        })
    };
    if threads {
        if let Ending::Deadlock(last) = &report.ending {
            // Threads still hold the state (and maybe the mmap lock): no
            // oracle can run; they are leaked.
            return finding(&report, format!("deadlock/hang: {last:?}"));
        }
    }
    // A cancelled vCPU still exits (its user is in the slot): run that exit
    // as the harness, outside the schedule.
    let own = lock(&vcpu_slot).take();
    if let Some(u) = own {
        futures_lite::future::block_on(u.exit());
    }
    if let Some(what) = ending_verdict(&report) {
        return finding(&report, what);
    }
    // Content model: a successful read returns what the vCPU wrote (or
    // the fill); never zeros where data was (I-RP-5).
    for (vma, page, want, got) in &lock(&observed).reads {
        if let (Some(w), Ok(b)) = (want, got) {
            if w != b {
                return finding(
                    &report,
                    format!("I-RP-5: read of vma {vma} page {page} returned {b:#x}, expected {w:#x} (zero page after UNSTABLE?)"),
                );
            }
        }
    }
    // I-RP-8: no victim marked once oom_killer_disable returned true.
    let at = frozen_at.load(Ordering::SeqCst);
    if at != u64::MAX && host.oom_stats().kills != at {
        return finding(
            &report,
            "I-RP-8: a victim was killed after oom_killer_disable returned true".into(),
        );
    }
    // I-RP-7: never a second victim while one lacks OOM_SKIP.
    if let Some(what) = second_victim(&host) {
        return finding(&report, what);
    }
    // I-RP-6: a victim ends with OOM_SKIP (reaper or exit_mmap).
    if let Some(m) = g0.guest.oom_mm() {
        if !m.flags().test(MmFlag::OOM_SKIP) {
            return finding(&report, "I-RP-6: victim never got OOM_SKIP".into());
        }
    }
    // I-RP-1: each mm queued at most once.
    let victims = [Some(&g0), g1.as_ref()]
        .into_iter()
        .flatten()
        .filter(|g| g.guest.oom_mm().is_some())
        .count();
    if reaper.stats().queued > victims as u64 {
        return finding(
            &report,
            "I-RP-1: an mm was queued for reaping more than once".into(),
        );
    }
    if let Some(what) = reaper_accounting(reaper.stats(), 3) {
        return finding(&report, what);
    }
    // I-RP-6 / oom_reap_task: the reaper set OOM_SKIP while the stuck
    // holder kept it out, so it gave up, and says so. Catches the mm-reaper
    // mutant deleting the second `!` of `gave_up` (fuzz/mutants.sh).
    if expect_gave_up.load(Ordering::SeqCst) && reaper.stats().gave_up == 0 {
        return finding(
            &report,
            "I-RP-6: the reaper gave up on a stuck victim (set OOM_SKIP under its holder) without counting it".into(),
        );
    }
    // A reap that no notifier refused and no injected failure broke is
    // complete (§7 step 4: only a refusing secondary MMU, or a failed
    // zap, makes it partial). Catches the mm-reaper mutants `reap_locked`
    // -> `(false, _)` (fuzz/mutants.sh): every reap partial, retried, and
    // given up with OOM_SKIP; the victim's exit freed the memory anyway.
    if !setup.notifier_refuses && report.injected.is_none() && reaper.stats().partial != 0 {
        return finding(
            &report,
            "§7: a reap with no refusing notifier was partial".into(),
        );
    }
    // Everything returned: budget 0, no guest left, every struct freed at
    // count 0 once the last holders (guest records, reaper) are gone.
    let charged = host.stats().charged_bytes;
    drop((g0, g1, reaper, exited));
    report.trace.shrink_to_fit();
    if let Some(what) = victims_balanced(&host) {
        return finding(&report, what);
    }
    end_of_run_oracles(charged, host, &watches).and_then(|what| finding(&report, what))
}

/// I-RP-8: `oom_victims` is balanced once every guest exited: every marked
/// victim, once through its own exit, was counted out. Catches the oom.rs
/// mutant `exit_oom_victim` -> `()` (fuzz/mutants.sh): the count never
/// going down only makes oom_killer_disable time out, a legal outcome
/// there. A victim whose mm outlived its exit is counted out when the host
/// next prunes exited guests (this registry read), once its last user is
/// gone and its teardown is through. On the KSM targets it found such a
/// victim whose teardown met an empty tree and never set OOM_SKIP, which
/// the lingering exit waited for: counted for ever, and every later
/// selection aborted on it (`killed_guest_that_stays_lacks_oom_skip`; now
/// `Mm::exit_done`). Shared by every scenario.
pub(crate) fn victims_balanced(host: &Host) -> Option<String> {
    drop(host.guests());
    let victims = host.oom_stats().victims_running;
    (victims != 0)
        .then(|| format!("I-RP-8: {victims} OOM victim(s) still counted after every exit"))
}

/// What a `process_mrelease` caller knows at its call, to judge the
/// outcome's label (§7.1) in the poll where the call returned.
struct MreleaseWatch {
    /// The target's mm (a count, as mrelease's own pin).
    mm: Option<mm_core::MmGrab>,
    /// `UNSTABLE` was set at the call: an earlier reap ran.
    unstable: bool,
}

impl MreleaseWatch {
    fn new(h: &Host, id: u64) -> MreleaseWatch {
        let mm = h.guest(id).ok().and_then(|g| g.mm_grab());
        let unstable = mm
            .as_ref()
            .is_some_and(|m| m.flags().test(MmFlag::UNSTABLE));
        MreleaseWatch { mm, unstable }
    }

    /// §7.1 outcome labels: `Reaped { pages: 0 }` never follows an earlier
    /// reap (a second process_mrelease that frees nothing says
    /// `AlreadyDone`); `AlreadyDone` means the work is done: `OOM_SKIP`
    /// set, or no present page left in a reapable VMA (not shared, not
    /// pinned; checked in the same poll as the return, when the read lock
    /// can be had). Catches the mm-reaper mutants of `complete && pages ==
    /// 0 && reaped_before` (fuzz/mutants.sh): `&&` -> `||` (a partial
    /// reap, refused by a notifier, reported `AlreadyDone`) and `==` ->
    /// `!=`.
    fn check(&self, r: &Result<mm_reaper::MreleaseOutcome, mm_reaper::MreleaseError>) {
        let Some(mm) = &self.mm else { return };
        match r {
            Ok(mm_reaper::MreleaseOutcome::Reaped { pages: 0 }) => mm_core::sched::check(
                !self.unstable,
                "§7.1: process_mrelease after an earlier reap freed nothing but said Reaped, not AlreadyDone",
            ),
            Ok(mm_reaper::MreleaseOutcome::AlreadyDone) => {
                if mm.flags().test(MmFlag::OOM_SKIP) {
                    return;
                }
                let Some(st) = mm.lock().try_read() else {
                    return;
                };
                let left: u64 = st
                    .vmas()
                    .iter()
                    .filter(|v| !v.is_shared() && !v.flags().contains(mm_core::VmFlags::PINNED))
                    .map(|v| mm.page_table().count_present(v.start() / P, v.end() / P))
                    .sum();
                mm_core::sched::check(
                    left == 0,
                    "§7.1: process_mrelease said AlreadyDone with pages left to reap and no OOM_SKIP",
                );
            }
            _ => {}
        }
    }
}

/// An instant of the virtual clock, recorded by one actor for another.
pub(crate) type QueuedAt = Arc<Mutex<Option<std::time::Instant>>>;

/// What the OOM actor records for the other oracles, and what it needs
/// to judge a choice.
struct OomWatch {
    reaper: Reaper,
    clock: Arc<dyn mm_core::Clock>,
    /// When the first mm was queued for reaping.
    queued_at: QueuedAt,
    /// The last instant the victim count was seen at 0.
    zero_at: QueuedAt,
    /// Guest 0 was killed (by the OOM killer, with its mm).
    g0_killed: Arc<AtomicBool>,
    g0: u64,
    /// Guests the harness made unkillable (`oom_choice`).
    unkillable: Vec<u64>,
}

/// Right after an `out_of_memory` call returned, in the same poll: nothing
/// else ran since its selection and kill. Checks the choice, and records
/// when the first mm was queued for reaping, whether the victim count is
/// 0 now (a registry read may have counted an exited victim out) and
/// whether guest 0 was killed.
fn after_oom(h: &Host, r: mm_core::OomOutcome, requester: Option<u64>, w: &OomWatch) {
    mm_core::sched::check(
        victim_choice_ok(h, r, &w.unkillable),
        "§7 select_bad_process: the victim is not the eligible guest with the highest badness (the first by id on a tie), or an eligible guest was left",
    );
    mm_core::sched::check(
        requester_ok(h, r, requester, w.g0, w.g0_killed.load(Ordering::SeqCst)),
        "§7 task_will_free_mem(current): a dying requester without OOM_SKIP was not made the pending victim itself, or a guest that is not dying was reported pending",
    );
    if r == (mm_core::OomOutcome::Killed { guest: w.g0 }) {
        w.g0_killed.store(true, Ordering::SeqCst);
    }
    if w.reaper.stats().queued > 0 {
        lock(&w.queued_at).get_or_insert(w.clock.now());
    }
    if h.oom_stats().victims_running == 0 {
        *lock(&w.zero_at) = Some(w.clock.now());
    }
}

/// §7 step 2's exception (`task_will_free_mem(current)`): an `out_of_memory`
/// call whose requester (by mm id) is dying and whose mm lacks `OOM_SKIP`
/// kills nobody: it marks the requester and reports it pending. And a
/// pending victim is always dying (killed or exiting): only a kill or that
/// exception marks one. Read in the same poll as the call's return; dying
/// never goes back, but a kill of the requester by this very call made it
/// dying: then only what made it dying before counts (its exit had begun:
/// it no longer holds its mm; or the harness saw an earlier kill of guest
/// 0, `g0_killed`). Catches the oom.rs mutants of the requester test
/// (`mm_id() == id` -> `!=`, `is_dying() && !OOM_SKIP` -> `||`, its `!`
/// deleted; fuzz/mutants.sh), with `oom_choice`'s first call made by
/// guest 0.
fn requester_ok(
    h: &Host,
    r: mm_core::OomOutcome,
    requester: Option<u64>,
    g0: u64,
    g0_killed: bool,
) -> bool {
    let guests = h.guests();
    if let mm_core::OomOutcome::VictimPending { guest } = r {
        if !guests.iter().any(|g| g.id() == guest && g.is_dying()) {
            return false;
        }
    }
    let Some(req) = requester.and_then(|id| guests.iter().find(|g| g.mm_id() == id)) else {
        return true;
    };
    let dying = if r == (mm_core::OomOutcome::Killed { guest: req.id() }) {
        !req.is_alive() || (req.id() == g0 && g0_killed)
    } else {
        req.is_dying()
    };
    let takes_itself = dying
        && req
            .mm_grab()
            .is_some_and(|m| !m.flags().test(MmFlag::OOM_SKIP));
    r == mm_core::OomOutcome::Disabled
        || !takes_itself
        || (r == mm_core::OomOutcome::VictimPending { guest: req.id() } && req.is_oom_victim())
}

/// `oom_badness` as the harness computes it, from the guest's state (read
/// in the same poll as the selection): `None` if not eligible. `victim` is
/// the guest just killed (its `oom_mm` was set by this kill; any other
/// guest with one was a victim before and is skipped, or made the
/// selection abort).
fn harness_badness(h: &Host, g: &Guest, victim: Option<u64>, unkillable: &[u64]) -> Option<i64> {
    if unkillable.contains(&g.id())
        || g.oom_score_adj() == -1000
        || (Some(g.id()) != victim && g.oom_mm().is_some())
    {
        return None;
    }
    let mm = g.mm_grab()?;
    if mm.users() == 0 || mm.flags().test(MmFlag::OOM_SKIP) {
        return None;
    }
    let sampled = mm
        .lock()
        .try_read()
        .and_then(|st| Mm::resident_bytes(&mm, &st).ok())
        .unwrap_or(0)
        / P;
    let pages = mm.rss_pages().max(sampled) + mm.pgtables_bytes() / P;
    let total = (h.budget().limit() / P).max(1) as i64;
    Some(pages as i64 + i64::from(g.oom_score_adj()) * total / 1000)
}

/// §7 victim choice (`select_bad_process`): a kill took the eligible guest
/// with the highest badness, the first in id order on a tie (the registry
/// is id-ordered and only a strictly higher score replaces the choice);
/// `NoVictim` only when no guest is eligible. A policy rather than a
/// protocol step, but mutation testing showed any victim passed:
/// catches the oom.rs mutants of `badness` (`Some(0)` / `Some(1)` /
/// `Some(-1)`, its arithmetic and eligibility tests) and of the `points >
/// p` comparison (fuzz/mutants.sh).
fn victim_choice_ok(h: &Host, r: mm_core::OomOutcome, unkillable: &[u64]) -> bool {
    let victim = match r {
        mm_core::OomOutcome::Killed { guest } => Some(guest),
        mm_core::OomOutcome::NoVictim => None,
        _ => return true,
    };
    let mut best: Option<(i64, u64)> = None;
    for g in h.guests() {
        if let Some(b) = harness_badness(h, &g, victim, unkillable) {
            if best.is_none_or(|(p, _)| b > p) {
                best = Some((b, g.id()));
            }
        }
    }
    best.map(|(_, id)| id) == victim
}

/// The reaper's thread: reap what is queued; when nothing is, sleep `poll`
/// (virtual time on the executor), until the OOM actor is `done` and the
/// queue is empty. Shared by every scenario with a reaper.
///
/// With `not_before` (when the first mm was queued, the reaper's delay):
/// I-RP-2, no reap begins earlier than the delay after the kill that
/// queued it (`wake_oom_reaper`'s timer: the victim's own exit gets that
/// long first). A step that pops an entry starts its first attempt at
/// the instant it began. Catches the mm-reaper mutant `now + delay` ->
/// `now - delay` (fuzz/mutants.sh), which reaped at once.
pub(crate) async fn reaper_loop(
    r: Reaper,
    done: Arc<AtomicBool>,
    clock: Arc<dyn mm_core::Clock>,
    poll: Duration,
    not_before: Option<(QueuedAt, Duration)>,
) {
    loop {
        let began = clock.now();
        if r.step().await {
            if let Some((at, delay)) = &not_before {
                let queued = *lock(at);
                mm_core::sched::check(
                    queued.is_some_and(|q| began >= q + *delay),
                    "I-RP-2: a reap began earlier than the reaper's delay after the kill",
                );
            }
            continue;
        }
        if done.load(Ordering::SeqCst) && r.pending() == 0 {
            break;
        }
        mm_core::Clock::sleep(&*clock, poll).await;
    }
}

/// The run's own verdict: a deadlock, the step limit, or the first
/// violation an actor reported.
pub(crate) fn ending_verdict(report: &Report) -> Option<String> {
    match &report.ending {
        Ending::Done => {}
        Ending::Deadlock(last) => return Some(format!("deadlock: {last:?}")),
        Ending::StepLimit => return Some("livelock: step limit".into()),
    }
    report.violations.first().map(|(v, _)| v.clone())
}

/// `oom_reap_task`'s retry policy, from the reaper's counters once its
/// queue is empty: every entry that was not dropped at its delay had at
/// most `max_retries` attempts (each attempt counts as exactly one of
/// contended, partial, reaped, skipped) and ended at most one way (reaped,
/// skipped, or given up), and a give-up came after `max_retries` failed
/// attempts. Catches the mm-reaper mutants `attempts += 1` -> `*=`
/// (retries for ever), `attempts >= max_retries` -> `<` (gives up after
/// one try), and the `gave_up` test's `&&` -> `||` and first `!` deleted
/// (a reaped mm counted as given up too; fuzz/mutants.sh).
pub(crate) fn reaper_accounting(s: mm_reaper::ReaperStats, max_retries: u64) -> Option<String> {
    let entries = s.queued.saturating_sub(s.exited_before_reap);
    let failed = s.contended + s.partial;
    let attempts = failed + s.reaped + s.skipped;
    if attempts > max_retries * entries {
        return Some(format!(
            "oom_reap_task: {attempts} reap attempts for {entries} queued mm(s), at most {max_retries} each"
        ));
    }
    if s.reaped + s.skipped + s.gave_up > entries {
        return Some(format!(
            "oom_reap_task: {} reaped + {} skipped + {} given up > {entries} queued mm(s)",
            s.reaped, s.skipped, s.gave_up
        ));
    }
    if failed < max_retries * s.gave_up {
        return Some(format!(
            "oom_reap_task: gave up {} time(s) after only {failed} failed attempt(s) ({max_retries} each)",
            s.gave_up
        ));
    }
    None
}

/// I-RP-7: the OOM killer never picks a second victim while the first
/// still lacks OOM_SKIP.
pub(crate) fn second_victim(host: &Host) -> Option<String> {
    (host.oom_stats().second_kills != 0)
        .then(|| "I-RP-7: second victim chosen while the first lacked OOM_SKIP".into())
}

/// I-RC-3 and I-RC-2 once every actor and guest record is gone: `charged`
/// (read before the last drops) is 0, and every mm struct is freed once
/// the host goes too. Shared by every scenario.
pub(crate) fn end_of_run_oracles(charged: u64, host: Host, watches: &[MmWatch]) -> Option<String> {
    if charged != 0 {
        return Some(format!(
            "I-RC-3: {charged} bytes still charged after every exit"
        ));
    }
    drop(host);
    // The uffd shard thread (a real thread, outside the executor) holds an
    // mm for the length of one round: serving its queued work, or a
    // pressure future not yet dropped after the teardown stopped the
    // tracker (the slot goes at the shard's next round). A leak stays; a
    // round ends within microseconds. So: freed within a bounded wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let left = watches.iter().position(|w| !w.is_freed());
        match left {
            Some(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            _ => {
                return left.map(|i| {
                    format!("I-RC-2: mm struct {i} not freed after every reference was dropped")
                })
            }
        }
    }
}

/// `killed`: the guest was killed (its mm marked `KILLED`) by now. §7.1:
/// a killed guest's own writes and mlocks fail (`Killed`, or `Unstable`
/// once reaped), never succeed; they test the flag before their first
/// yield point, so one that starts after the kill sees it. Catches the
/// oom.rs mutant that deletes the `!` in `Guest::kill` (fuzz/mutants.sh):
/// the first kill then marked the guest dying but left its mm unmarked,
/// and its vCPU wrote on into memory being reaped.
async fn vcpu(
    user: &MmUser,
    vmas: &[(u64, u64)],
    ops: &[GuestOp],
    obs: &Mutex<Observed>,
    killed: &AtomicBool,
) {
    let after_kill = |ok: bool, was_killed: bool| {
        mm_core::sched::check(
            !(ok && was_killed),
            "§7.1: a write or mlock of a killed guest succeeded",
        );
    };
    if vmas.is_empty() {
        return;
    }
    // The model: last known byte of each (vma, page); None once unknown.
    let mut model: std::collections::HashMap<(usize, u64), Option<u8>> =
        std::collections::HashMap::new();
    let pick = |v: u8| usize::from(v) % vmas.len();
    for op in ops {
        match *op {
            GuestOp::Read { vma, page } => {
                let i = pick(vma);
                let (a, pages) = vmas[i];
                let p = u64::from(page) % pages;
                let mut b = [0u8];
                let r = user.read(a + p * P, &mut b).await;
                let want = model.get(&(i, p)).copied().flatten();
                let got = match r {
                    Ok(()) => Ok(b[0]),
                    Err(e) => Err(e.to_string()),
                };
                lock(obs).reads.push((i, p, want, got));
            }
            GuestOp::Write { vma, page, byte } => {
                let i = pick(vma);
                let (a, pages) = vmas[i];
                let p = u64::from(page) % pages;
                let byte = byte | 1;
                let was_killed = killed.load(Ordering::SeqCst);
                let r = user.write(a + p * P, &[byte]).await;
                after_kill(r.is_ok(), was_killed);
                match r {
                    Ok(()) => {
                        model.insert((i, p), Some(byte));
                    }
                    Err(Error::Unstable { .. }) | Err(_) => {
                        model.insert((i, p), None);
                    }
                }
            }
            GuestOp::DontNeed { vma } => {
                let i = pick(vma);
                let (a, pages) = vmas[i];
                let _ = user.madvise(a, pages * P, Advice::DontNeed).await;
                for p in 0..pages {
                    model.insert((i, p), None);
                }
            }
            GuestOp::Mlock { vma } | GuestOp::Munlock { vma } => {
                let i = pick(vma);
                let (a, pages) = vmas[i];
                if matches!(op, GuestOp::Mlock { .. }) {
                    let was_killed = killed.load(Ordering::SeqCst);
                    let r = user.mlock(a, pages * P).await;
                    after_kill(r.is_ok(), was_killed);
                } else {
                    let _ = user.munlock(a, pages * P).await;
                }
            }
            GuestOp::Munmap { vma } => {
                let i = pick(vma);
                let (a, pages) = vmas[i];
                let _ = user.munmap(a, pages * P).await;
                for p in 0..pages {
                    model.insert((i, p), None);
                }
            }
        }
    }
}
