//! `touch_vs_reap`: *direct* touches of tracked guest memory (a vCPU's or
//! JIT code's loads and stores, which the userfaultfd handler serves) vs
//! the OOM kill and reap (or `process_mrelease`), the embedder's own
//! discards and the access API. The other targets touch guest memory
//! only through the access API, so the handler's fault path
//! (`mm/tracked_fault.rs`: the fault-around window, the `UNSTABLE` check
//! under the window's locks, poison, busy pages, foreign removes) ran in
//! none of them (issue 16: 0 of its 38 mutants caught).
//!
//! # How a direct touch stays deterministic
//!
//! A touch is one step of the vCPU actor: a helper thread reads or writes
//! one byte of the guest's host mapping with `process_vm_readv` /
//! `process_vm_writev` on this very process ([`direct`]). The kernel takes
//! the fault on the process's behalf (GUP), exactly as it does for a KVM
//! vCPU: a missing page sends the handler a fault message, and a page the
//! handler poisons makes the call fail with `EFAULT`, where a CPU load
//! would take `SIGBUS` and the thread would be parked for good
//! (`mm_core::contain`). The executor waits for the touch to finish (at
//! most [`TOUCH_WAIT`]: longer is a finding, a fault nobody served), and
//! nothing else runs on it meanwhile. So the uffd shard thread serves the
//! fault while every actor is stopped at a yield point: the interleaving
//! is still the schedule's alone, and a replay has the same outcome. What
//! a touch meets is what the other actors left between two yield points:
//! `UNSTABLE` set and pages reaped (poison), pages the embedder discarded
//! behind the mm's back (its foreign-remove path), PTEs of a fault-around
//! window present or missing.
//!
//! A touch needs a full userfaultfd descriptor (root, or
//! `vm.unprivileged_userfaultfd = 1`): a `UFFD_USER_MODE_ONLY` one refuses
//! the faults the kernel takes for the process (`EFAULT`), so there the
//! touches are skipped and the rest of the race still runs.
//!
//! # Input layout
//!
//! An `arbitrary`-decoded [`TouchSetup`], then the schedule. An input may
//! start with a swarm header ([`crate::swarm`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use mm_core::lock;
use mm_core::pgtable::Pte;
use mm_core::{Advice, Host, HostConfig, MapOptions, MmUser, PAGE_SIZE};
use mm_reaper::ZapSplit;

use crate::mode::{Mode, Runner};
use crate::scenario::{end_of_run_oracles, ending_verdict, Finding, Target};
use crate::swarm::Swarm;

const P: u64 = PAGE_SIZE as u64;
/// Guest bytes mapped by one page-table leaf.
const LEAF_BYTES: u64 = mm_core::pgtable::PAGES_PER_LEAF * P;

/// The longest the executor waits for one direct touch: the handler serves
/// a fault within microseconds, or within its busy timeout (100 ms) when
/// the page is locked. A run stops touching after the first touch that
/// waited this long (a finding), so a hang costs one wait.
pub const TOUCH_WAIT: Duration = Duration::from_secs(2);

/// The VMA of an input that decodes none.
const DEFAULT_VMA: [TouchVma; 1] = [TouchVma {
    pages: 3,
    shared: false,
    fault_around: 2,
    filled: 0b001,
    fill: 0x5a,
}];

/// One tracked mapping of the guest.
#[derive(Debug, Clone, Arbitrary)]
pub struct TouchVma {
    /// 1-16 pages.
    pages: u8,
    /// A shared memfd region (`tracked/` step 10) instead of private
    /// anonymous memory.
    shared: bool,
    /// Fault-around window: 1, 2, 4 or 8 pages (bits 0-1).
    fault_around: u8,
    /// Which pages the setup fills through the API (bit i: page i; the
    /// others are missing until touched).
    filled: u16,
    /// The fill byte (made odd: never zero).
    fill: u8,
}

/// One operation of the vCPU.
#[derive(Debug, Clone, Arbitrary)]
pub enum TouchOp {
    /// A direct load of one byte (the handler serves the fault).
    Load {
        /// Which VMA.
        vma: u8,
        /// Which page of it.
        page: u8,
    },
    /// A direct store of one byte.
    Store {
        /// Which VMA.
        vma: u8,
        /// Which page of it.
        page: u8,
        /// The byte (made odd).
        byte: u8,
    },
    /// A read through the access API.
    Read {
        /// Which VMA.
        vma: u8,
        /// Which page of it.
        page: u8,
    },
    /// A write through the access API.
    Write {
        /// Which VMA.
        vma: u8,
        /// Which page of it.
        page: u8,
        /// The byte (made odd).
        byte: u8,
    },
    /// The embedder's own `madvise(DONTNEED)` of the whole host mapping,
    /// behind the mm's back (a foreign REMOVE for the handler).
    Discard {
        /// Which VMA.
        vma: u8,
    },
    /// `madvise(DONTNEED)` through the mm.
    DontNeed {
        /// Which VMA.
        vma: u8,
    },
}

/// The decoded setup.
#[derive(Debug, Clone, Arbitrary)]
pub struct TouchSetup {
    vmas: Vec<TouchVma>,
    ops: Vec<TouchOp>,
    /// Bits 0-1: who kills and reaps: 0 and 3 the OOM reaper's
    /// `oom_reap_task_mm`, 1 `process_mrelease`, 2 nobody. Bits 2-4
    /// reading 7 (1 in 8): the first direct touch of a missing page is
    /// made while the harness holds that page's PTE lock, as an API
    /// accessor on another thread does during its copy: the handler finds
    /// the page busy and, after the busy timeout, serves it without the
    /// lock (`resolve_busy`), then accounts it once the lock is free
    /// (`settle_busy`). Bits 5-6 reading 3: the first VMA straddles the
    /// first page-table leaf's end. Bit 7: a tight budget (see
    /// `run_setup_mode`).
    kill: u8,
    #[arbitrary(default)]
    swarm: Swarm,
}

impl TouchOp {
    fn allowed(&self, s: Swarm) -> bool {
        let bit = match self {
            TouchOp::Load { .. } | TouchOp::Read { .. } => Swarm::NO_READ,
            TouchOp::Store { .. } | TouchOp::Write { .. } => Swarm::NO_WRITE,
            TouchOp::Discard { .. } | TouchOp::DontNeed { .. } => Swarm::NO_DONTNEED,
        };
        !s.off(bit | Swarm::NO_OPS)
    }

    fn vma(&self) -> u8 {
        match *self {
            TouchOp::Load { vma, .. }
            | TouchOp::Store { vma, .. }
            | TouchOp::Read { vma, .. }
            | TouchOp::Write { vma, .. }
            | TouchOp::Discard { vma }
            | TouchOp::DontNeed { vma } => vma,
        }
    }
}

/// A mapped VMA: guest address, pages, shared, fault-around pages, host
/// address of its first byte.
#[derive(Debug, Clone, Copy)]
struct Mapped {
    addr: u64,
    pages: u64,
    shared: bool,
    fa: u64,
    host: usize,
}

/// What one op saw, checked after the run.
#[derive(Debug)]
struct Seen {
    op: &'static str,
    vma: usize,
    page: u64,
    /// The model's byte, if known.
    want: Option<u8>,
    /// The guest was killed before the op started.
    killed: bool,
    got: Result<u8, String>,
}

/// Direct access to this process's own memory through the kernel.
mod direct {
    /// Reads (`store` = None) or writes one byte at host address `at` of
    /// this process with `process_vm_readv` / `process_vm_writev`: the
    /// kernel faults the page in on our behalf (a uffd fault the handler
    /// serves) and reports a poisoned or unmapped page as an errno
    /// instead of a signal.
    pub(super) fn access(at: usize, store: Option<u8>) -> Result<u8, i32> {
        let mut b = [store.unwrap_or(0)];
        let local = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: the kernel copies one byte between `b` (ours, live for
        // the call) and address `at` of this process, which it checks
        // itself (EFAULT when unmapped or poisoned); no Rust reference to
        // the guest byte exists, so nothing aliases it.
        let n = unsafe {
            if store.is_some() {
                libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0)
            } else {
                libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0)
            }
        };
        if n == 1 {
            Ok(b[0])
        } else {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        }
    }

    /// Is the host page at `at` (page-aligned) resident?
    pub(super) fn resident(at: usize) -> bool {
        let mut v = 0u8;
        // SAFETY: mincore writes one byte to `v` (one page queried) and
        // only reads the page tables of `[at, at + 4096)`, which it checks
        // itself (ENOMEM when unmapped).
        let r = unsafe { libc::mincore(at as *mut libc::c_void, 4096, &mut v) };
        r == 0 && v & 1 != 0
    }

    /// Is the host page at `at` (page-aligned) mapped in this process's
    /// page table (`/proc/self/pagemap` bit 63; readable unprivileged, the
    /// frame numbers are not needed)? `None` when pagemap cannot be read.
    pub(super) fn mapped(at: usize) -> Option<bool> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open("/proc/self/pagemap").ok()?;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, (at / 4096 * 8) as u64).ok()?;
        Some(u64::from_le_bytes(e) >> 63 & 1 != 0)
    }

    /// The embedder's own `madvise(DONTNEED)` of `[at, at + len)`.
    pub(super) fn discard(at: usize, len: usize) -> bool {
        // SAFETY: drops the pages of a range of the guest's own host
        // mapping (the embedder's right: its contents read back as zeros,
        // or from the memfd); no Rust reference into guest memory exists.
        unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0 }
    }
}

/// One direct touch on a helper thread, waited for at most
/// [`TOUCH_WAIT`]: `Err("hung")` when nobody served its fault (the thread
/// stays blocked until the range is unregistered, then refaults).
fn touch(at: usize, store: Option<u8>) -> Result<u8, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("direct-touch".into())
        .spawn(move || {
            let _ = tx.send(direct::access(at, store));
        });
    if spawned.is_err() {
        return Err("no thread".into());
    }
    match rx.recv_timeout(TOUCH_WAIT) {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(format!("errno {e}")),
        Err(_) => Err("hung".into()),
    }
}

/// The PTE of guest page `gpn`, if its leaf exists.
fn pte(user: &MmUser, gpn: u64) -> Pte {
    let guard = crossbeam_epoch::pin();
    user.page_table()
        .pte(gpn, &guard)
        .map_or(Pte(0), |p| Pte(p.load(Ordering::SeqCst)))
}

/// Runs one input.
pub fn run_mode(data: &[u8], mode: &Mode) -> Option<Finding> {
    let (swarm, data) = crate::swarm::split(Target::TouchVsReap, data);
    let mut u = Unstructured::new(data);
    let mut setup = TouchSetup::arbitrary(&mut u).ok()?;
    setup.swarm = swarm;
    if swarm.off(Swarm::NO_SHARED) {
        setup.vmas.iter_mut().for_each(|v| v.shared = false);
    }
    let schedule = u.take_rest().to_vec();
    run_setup_mode(&setup, &schedule, mode)
}

fn run_setup_mode(setup: &TouchSetup, schedule: &[u8], mode: &Mode) -> Option<Finding> {
    let mut sim = Runner::new(mode, schedule);
    let clock = sim.clock();
    let specs = if setup.vmas.is_empty() {
        &DEFAULT_VMA[..]
    } else {
        &setup.vmas[..]
    };
    // Kill bit 7: a budget of the filled pages and one more, so the
    // handler's charge of a window shrinks to the faulting page, then
    // finds no room: the pressure path runs on the shard thread. Its OOM
    // kill can only choose this guest, and an OOM victim's own allocation
    // fails at once (mm-core `pressure`), so nothing waits on virtual time
    // the stopped executor cannot advance; after `PRESSURE_ROUNDS` rounds
    // the handler fails open (the page served over budget, as debt) or,
    // with a hard budget (the first VMA's fill bit 1), kills the guest
    // and poisons the page (`hard_limit`). Otherwise room for every page.
    let tight = setup.kill & 0x80 != 0;
    let hard = tight && specs.first().is_some_and(|v| v.fill & 2 != 0);
    let filled: u64 = specs
        .iter()
        .take(3)
        .map(|v| u64::from((v.filled & ((1u32 << (v.pages % 16 + 1)) - 1) as u16).count_ones()))
        .sum();
    let budget = if tight { (filled + 1) * P } else { 1 << 30 };
    let mm_config = mm_core::MmConfig {
        hard_budget: hard,
        ..Default::default()
    };
    let host = Host::new(HostConfig {
        clock: clock.clone(),
        oom_wait: sim.time(Duration::from_millis(300)),
        mm: mm_config,
        ..HostConfig::with_budget(budget)
    });
    let hook = sim.install_for_setup();
    let guest = host.create_guest("g0");
    let mm = guest.mm().ok()?;
    let watch = mm.watch();
    let mut vmas = Vec::new();
    let mut model: HashMap<(usize, u64), Option<u8>> = HashMap::new();
    let mut direct_ok = true;
    // Kill bits 5-6 reading 3: the first VMA straddles the boundary of
    // the first 2 MiB page-table leaf (its second half in the second
    // leaf), so the handler's window and leaf arithmetic runs on a leaf
    // other than the first (the others' VMAs all lie in the first).
    let straddle = setup.kill >> 5 & 3 == 3;
    for (k, v) in specs.iter().take(3).enumerate() {
        let pages = u64::from(v.pages % 16) + 1;
        let fa = 1u64 << (v.fault_around & 3);
        let mut opts = if v.shared {
            MapOptions::shared(pages * P)
        } else {
            MapOptions::anon(pages * P)
        }
        .tracked(true)
        .fault_around(fa * P);
        if straddle && k == 0 {
            opts = opts.at(LEAF_BYTES - (pages / 2).max(1) * P);
        }
        let Ok(addr) = futures_lite::future::block_on(mm.mmap(opts)) else {
            continue;
        };
        let host_at = {
            let state = futures_lite::future::block_on(mm.lock().read());
            let v = state.vmas().find(addr);
            let at = v.map(|v| (v.host_ptr() as usize, v.user_mode_only()));
            drop(state);
            at
        };
        let Some((host_at, umo)) = host_at else {
            continue;
        };
        direct_ok &= !umo;
        let i = vmas.len();
        for p in 0..pages {
            let byte = if v.filled >> p & 1 != 0 {
                let b = v.fill | 1;
                futures_lite::future::block_on(mm.fill(addr + p * P, P, b)).ok()?;
                b
            } else {
                0
            };
            model.insert((i, p), Some(byte));
        }
        vmas.push(Mapped {
            addr,
            pages,
            shared: v.shared,
            fa,
            host: host_at,
        });
    }
    drop(hook);
    if vmas.is_empty() {
        return None;
    }
    let exact = !sim.is_threads();
    // Each locked touch waits this long for the handler (the default,
    // 100 ms, would slow the hunt down 10-fold).
    mm_core::set_busy_timeout(Duration::from_millis(2));
    let lock_first = setup.kill >> 2 & 7 == 7;
    let killed = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
    let broken: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));

    // The vCPU: its own user reference (the guest's exit is not its last
    // user while it runs, so the host mappings stay: `Vma::host_ptr`).
    let mut ops: Vec<TouchOp> = setup
        .ops
        .iter()
        .filter(|op| op.allowed(setup.swarm))
        .take(8)
        .cloned()
        .collect();
    if setup.ops.is_empty() {
        ops = vec![
            TouchOp::Load { vma: 0, page: 1 },
            TouchOp::Store {
                vma: 0,
                page: 2,
                byte: 0x43,
            },
            TouchOp::Load { vma: 0, page: 0 },
        ];
    }
    {
        let (vmas, seen, killed, broken) =
            (vmas.clone(), seen.clone(), killed.clone(), broken.clone());
        let user = mm.clone();
        let g = guest.clone();
        sim.spawn("vcpu", async move {
            let how = How {
                direct_ok,
                exact,
                lock_first,
                tight,
                hard,
            };
            vcpu(&user, &g, &vmas, &ops, model, how, &killed, &seen, &broken).await;
            user.exit().await;
        });
    }
    drop(mm);
    match setup.kill & 3 {
        2 => {}
        1 => {
            let (g, h, k) = (guest.clone(), host.clone(), killed.clone());
            sim.spawn("mrelease", async move {
                g.kill();
                k.store(true, Ordering::SeqCst);
                let _ = mm_reaper::mrelease(&h, g.id()).await;
            });
        }
        _ => {
            let grab = guest.mm_grab()?;
            let (g, k) = (guest.clone(), killed.clone());
            let zap = ZapSplit::default();
            sim.spawn("reaper", async move {
                g.kill();
                k.store(true, Ordering::SeqCst);
                let _ = mm_reaper::oom_reap_task_mm(&grab, zap).await;
            });
        }
    }
    {
        let g = guest.clone();
        sim.spawn("exit", async move { g.exit().await });
    }

    let report = sim.run(20_000);
    crate::scenario::count_steps(report.trace.len() as u64);
    let threads = sim.is_threads();
    let finding = |what: String| {
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
        if let crate::exec::Ending::Deadlock(last) = &report.ending {
            return finding(format!("deadlock/hang: {last:?}"));
        }
    }
    if let Some(what) = ending_verdict(&report) {
        return finding(what);
    }
    if let Some(what) = lock(&broken).take() {
        return finding(what);
    }
    for s in lock(&seen).iter() {
        let at = format!("{} of vma {} page {}", s.op, s.vma, s.page);
        match (&s.got, s.want) {
            (Err(e), _) if e == "hung" => {
                return finding(format!(
                    "tracked: {at} never returned ({TOUCH_WAIT:?}): a direct fault nobody served"
                ));
            }
            // §5 / I-RP-5: a killed guest's touch may fail (poisoned:
            // SIGBUS for a vCPU), a live guest's never, while the budget
            // has room (a tight one: an API access may fail `OverBudget`
            // when the OOM killer finds no victim, a guest that exited
            // with its vCPU still running; a hard budget poisons the
            // fault it cannot charge).
            (Err(e), _) if !s.killed && !tight && exact => {
                return finding(format!("tracked: {at} of a live guest failed: {e}"));
            }
            (Ok(b), Some(w)) if *b != w => {
                return finding(format!(
                    "I-RP-5: {at} returned {b:#x}, expected {w:#x} (zeros after UNSTABLE, or lost data)"
                ));
            }
            _ => {}
        }
    }
    let charged = host.stats().charged_bytes;
    drop(guest);
    end_of_run_oracles(charged, host, &[watch]).and_then(finding)
}

/// How the vCPU runs its ops.
#[derive(Debug, Clone, Copy)]
struct How {
    /// Direct touches work here (a full uffd descriptor).
    direct_ok: bool,
    /// On the executor (not OS threads): the exact oracles hold.
    exact: bool,
    /// The first direct touch of a missing page holds the page's lock.
    lock_first: bool,
    /// The budget has room for one more page only.
    tight: bool,
    /// `MmConfig::hard_budget`.
    hard: bool,
}

/// A direct touch of host address `at` (guest page `gpn`) while the
/// harness holds the page's PTE lock, as an API accessor on another thread
/// does during its copy: the handler must not wait for the lock (it
/// try-locks), finds the page busy, and after the busy timeout serves it
/// without the lock (`resolve_busy`: a page, or poison after `UNSTABLE`);
/// once the lock is free it accounts the page it mapped (`settle_busy`:
/// charged, `PRESENT`). Waits (bounded) for that account, so the next step
/// does not race the shard thread. `None` when the page's leaf does not
/// exist (nothing to hold).
fn locked_touch(
    user: &MmUser,
    gpn: u64,
    at: usize,
    store: Option<u8>,
) -> Option<Result<u8, String>> {
    let guard = crossbeam_epoch::pin();
    let pte = user.page_table().pte(gpn, &guard)?;
    let old = mm_core::pgtable::pte_lock(pte);
    let got = touch(at, store);
    // Back as it was (not PRESENT): the handler mapped the page without
    // the lock and accounts it itself, in its next round.
    mm_core::pgtable::pte_unlock(pte, old);
    drop(guard);
    user.tracked_round_barrier();
    Some(got)
}

/// The vCPU's ops, then (guest never killed) the accounting audit.
#[allow(clippy::too_many_arguments)] // the actor's whole state
async fn vcpu(
    user: &MmUser,
    guest: &mm_core::Guest,
    vmas: &[Mapped],
    ops: &[TouchOp],
    mut model: HashMap<(usize, u64), Option<u8>>,
    how: How,
    killed: &AtomicBool,
    seen: &Mutex<Vec<Seen>>,
    broken: &Mutex<Option<String>>,
) {
    let fail = |what: String| {
        let mut b = lock(broken);
        if b.is_none() {
            *b = Some(what);
        }
    };
    let exact = how.exact;
    // Killed by the kill actor, or by the OOM killer for an allocation of
    // its own (a tight budget), by now.
    let dead = || killed.load(Ordering::SeqCst) || user.flags().test(mm_core::MmFlag::KILLED);
    // The access path's pressure loop (`Mm::access`): an access that finds
    // no room asks the OOM killer before it gives up. With one guest, the
    // killer's only candidate is this guest (killed, or marked as the
    // dying requester): an access that failed out of memory while its
    // guest lives left it an OOM victim. Catches fault.rs's retry-policy
    // mutants (`pressure_rounds <= 3` -> `>`, `+= 1` -> `-= 1`: the access
    // gave up without asking).
    let asked_oom = |r: &Result<(), mm_core::Error>, what: &str| {
        if exact
            && matches!(r, Err(mm_core::Error::OutOfMemory { .. }))
            && guest.is_alive()
            && !guest.is_oom_victim()
        {
            fail(format!(
                "access: an {what} failed out of memory without the OOM killer choosing its guest (its only candidate)"
            ));
        }
    };
    // The one locked touch of `How::lock_first` was made.
    let mut held_once = false;
    for op in ops {
        let i = usize::from(op.vma()) % vmas.len();
        let m = vmas[i];
        let want = |p: u64| model.get(&(i, p)).copied().flatten();
        match *op {
            TouchOp::Load { page, .. } | TouchOp::Store { page, .. } => {
                if !how.direct_ok {
                    continue;
                }
                mm_core::sched::point("touch:direct").await;
                let was_killed = dead();
                let p = u64::from(page) % m.pages;
                let gpn = m.addr / P + p;
                let missing = !pte(user, gpn).present();
                let store = match *op {
                    TouchOp::Store { byte, .. } => Some(byte | 1),
                    _ => None,
                };
                let at = m.host + (p * P) as usize;
                // `EAGAIN` retries so far: the descriptor is shared by the
                // shard's mms (other tests' too, in one process), and a
                // REMOVE unread on it makes the window's COPY stop short.
                let eagain = || user.tracked_stats().map_or(0, |st| st.eagain_retries);
                let eagain_before = eagain();
                let mut locked = None;
                if how.lock_first && missing && !held_once {
                    held_once = true;
                    locked = locked_touch(user, gpn, at, store);
                }
                let was_locked = locked.is_some();
                let got = locked.unwrap_or_else(|| {
                    let got = touch(at, store);
                    // The handler's follow-up of this fault (wakes,
                    // counters) ends before the next step.
                    user.tracked_round_barrier();
                    got
                });
                let (name, expect) = match store {
                    Some(b) => ("direct store", got.as_ref().ok().map(|_| b)),
                    None => ("direct load", want(p)),
                };
                if store.is_some() {
                    model.insert((i, p), got.as_ref().ok().copied());
                }
                // The fault-around window (`tracked/` step 3): a served
                // fault on a missing page populates every missing page of
                // its aligned window of `fa` pages, clipped to the VMA, and
                // marks them PRESENT (the budget has room for all).
                // A busy page is served alone (`resolve_busy`), then
                // accounted (`settle_busy`), and so is a window the budget
                // has no room for (`charge_window`): the window is the
                // page.
                if exact && got.is_ok() && missing && !was_killed && !dead() {
                    let (first, end) = (m.addr / P, m.addr / P + m.pages);
                    // ... and so is a window whose fill met a queued REMOVE
                    // (`EAGAIN`: the handler stops filling and the faulter
                    // refaults).
                    let short = eagain() != eagain_before;
                    let (lo, hi) = if was_locked || how.tight || short {
                        (gpn, gpn + 1)
                    } else {
                        (
                            (gpn & !(m.fa - 1)).max(first),
                            ((gpn & !(m.fa - 1)) + m.fa).min(end),
                        )
                    };
                    for g in lo..hi {
                        let q = g - first;
                        if !pte(user, g).present() {
                            fail(format!(
                                "tracked step 3: a {name} of vma {i} page {p} (window of {} pages) left page {q} of its window not PRESENT",
                                m.fa
                            ));
                        }
                    }
                }
                let hung = got.as_ref().is_err_and(|e| e == "hung");
                lock(seen).push(Seen {
                    op: name,
                    vma: i,
                    page: p,
                    want: expect,
                    // The touch itself may have run the OOM killer on its
                    // own guest (a tight budget).
                    killed: was_killed || dead(),
                    got,
                });
                if hung {
                    // Reported after the run; a second one would only
                    // cost another wait.
                    break;
                }
            }
            TouchOp::Read { page, .. } => {
                let p = u64::from(page) % m.pages;
                let mut b = [0u8];
                let r = user.read(m.addr + p * P, &mut b).await;
                asked_oom(&r, "API read");
                lock(seen).push(Seen {
                    op: "API read",
                    vma: i,
                    page: p,
                    want: want(p),
                    // The read yields: a kill during it counts.
                    killed: dead(),
                    got: r.map(|()| b[0]).map_err(|e| e.to_string()),
                });
            }
            TouchOp::Write { page, byte, .. } => {
                let p = u64::from(page) % m.pages;
                let b = byte | 1;
                let r = user.write(m.addr + p * P, &[b]).await;
                asked_oom(&r, "API write");
                model.insert((i, p), r.as_ref().ok().map(|()| b));
                if let Err(e) = r {
                    lock(seen).push(Seen {
                        op: "API write",
                        vma: i,
                        page: p,
                        want: None,
                        killed: dead(),
                        got: Err(e.to_string()),
                    });
                }
            }
            TouchOp::Discard { .. } => {
                if !direct::discard(m.host, (m.pages * P) as usize) {
                    fail(format!("embedder's madvise(DONTNEED) of vma {i} failed"));
                }
                // The handler clears the PTEs of private pages when it
                // reads the REMOVE (the madvise returned once it was
                // read); wait for that round to end, so what comes next
                // does not race the shard thread.
                if !user.tracked_round_barrier() && exact {
                    fail("tracked: the handler's shard did not finish a round in 2 s".into());
                }
                if !m.shared {
                    // Private pages read back as zeros.
                    for p in 0..m.pages {
                        model.insert((i, p), Some(0));
                    }
                    if exact && (0..m.pages).any(|p| pte(user, m.addr / P + p).present()) {
                        fail(format!(
                            "tracked step 6: the embedder discarded vma {i}, and a PTE stayed PRESENT (a foreign REMOVE not cleared)"
                        ));
                    }
                }
                // Shared: only this mapping's PTEs go; the memfd keeps
                // the pages (and their charge).
            }
            TouchOp::DontNeed { .. } => {
                let r = user.madvise(m.addr, m.pages * P, Advice::DontNeed).await;
                // A shared VMA's DONTNEED keeps the pages in the memfd
                // (and charged) but drops this mapping's PTEs of the
                // whole range: the kernel's page table says so
                // (`discard_shared`, under the PTE locks of each leaf).
                // A DONTNEED of a mapped VMA fails only for a killed
                // (reaped) guest.
                if exact && !dead() {
                    if let Err(e) = &r {
                        fail(format!("DONTNEED of vma {i} of a live guest failed: {e}"));
                    }
                }
                if exact && m.shared && r.is_ok() {
                    let left = (0..m.pages)
                        .find(|&p| direct::mapped(m.host + (p * P) as usize) == Some(true));
                    if let Some(p) = left {
                        fail(format!(
                            "tracked step 10: DONTNEED of shared vma {i} returned Ok and left page {p} mapped (pagemap)"
                        ));
                    }
                }
                if !m.shared {
                    for p in 0..m.pages {
                        model.insert((i, p), if r.is_ok() { Some(0) } else { None });
                    }
                }
            }
        }
    }
    // `tracked/` step 4: past the pressure path a fault fails open (served
    // over budget, as debt) unless the budget is hard, where it kills the
    // guest and poisons the page instead: never the other way round. A
    // busy page (the locked touch) is the exception: `resolve_busy` maps
    // it without its lock for the accessor whose copy faulted (which
    // must not take a poisoned fault), and `settle_busy` records it as
    // debt when the budget is full, hard or not.
    if let (true, Some(st)) = (exact, user.tracked_stats()) {
        if how.hard && !held_once && st.fail_open_pages != 0 {
            fail(format!(
                "tracked step 4: a hard budget served {} pages over budget (fail-open)",
                st.fail_open_pages
            ));
        }
        if !how.hard && st.hard_limit_kills != 0 {
            fail("tracked step 4: a soft budget's fault killed the guest (hard limit)".into());
        }
        // ... and only after `PRESSURE_ROUNDS` runs of the pressure path
        // freed nothing (a kill elsewhere might have made room).
        if st.hard_limit_kills != 0 && st.pressure_runs < u64::from(mm_core::PRESSURE_ROUNDS) {
            fail(format!(
                "tracked step 4: a hard limit killed the guest after {} pressure runs (< {})",
                st.pressure_runs,
                mm_core::PRESSURE_ROUNDS
            ));
        }
    }
    // The audit of a guest nobody killed: every PRESENT private page is
    // resident on the host and every resident one PRESENT (charged once,
    // by whoever populated it: the handler, the access path), and the
    // charge is the PRESENT pages' (`charged = present − debt`, no debt
    // with this budget).
    if !exact || dead() {
        return;
    }
    let mut present = 0;
    for (i, m) in vmas.iter().enumerate() {
        for p in 0..m.pages {
            let pte = pte(user, m.addr / P + p);
            present += u64::from(pte.present());
            if !m.shared && pte.present() != direct::resident(m.host + (p * P) as usize) {
                fail(format!(
                    "accounting: vma {i} page {p}: PTE PRESENT {} but host page resident {}",
                    pte.present(),
                    !pte.present()
                ));
            }
        }
    }
    if user.rss_pages() != present {
        fail(format!(
            "accounting: rss {} pages, {present} PRESENT",
            user.rss_pages()
        ));
    }
}
