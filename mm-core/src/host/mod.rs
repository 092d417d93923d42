//! `Host`: the registry of guests, the byte budget they share (a memcg
//! analogue), and the pressure path that runs reclaim plug-ins. Top layer
//! (see the layer diagram in `lib.rs`).
//!
//! Charging happens in the fault path (first touch of a page through the
//! access API, `mlock`); uncharging in every zap (DONTNEED, munmap, the
//! reaper, teardown). When a charge does not fit, the fault path drops all
//! its locks and calls its mm's injected pressure hook, which for an mm of
//! this host is [`HostPressure`]: `pressure` runs the [`Reclaim`] plug-ins
//! in order (a KSM pass, a balloon), then the OOM killer directly
//! (`Host::out_of_memory` in `host/oom.rs`; mm-reaper only reaps the victims it
//! is handed), then waits a bounded time (`HostConfig::oom_wait`) for the
//! victim's memory to come back.

use crate::types::lock;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::budget::Budget;
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::flags::MmFlag;
use crate::mm::{Mm, MmConfig, MmGrab, MmUser};
use crate::sched;
use crate::types::{BoxFuture, Pressure};

mod oom;

pub use oom::{Kill, OomOutcome, OomReaperQueue, OomStats};

/// A way to free memory under pressure, run in registration order before
/// the next one (a KSM pass, a balloon, finally the OOM killer).
pub trait Reclaim: Send + Sync {
    /// Short name for stats and traces.
    fn name(&self) -> &str;
    /// Try to make `bytes` available; return the bytes believed freed (0 if
    /// nothing). Called with no mm lock held by the caller.
    fn reclaim<'a>(&'a self, host: &'a Host, bytes: u64) -> BoxFuture<'a, u64>;
}

/// Host configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Byte budget shared by all guests.
    pub budget_bytes: u64,
    /// Configuration of every new mm.
    pub mm: MmConfig,
    /// Time source for the pressure path's bounded waits.
    pub clock: Arc<dyn Clock>,
    /// How long a faulting access waits in total for the OOM killer and
    /// reaper to make room before it fails with `OutOfMemory`.
    pub oom_wait: std::time::Duration,
}

impl HostConfig {
    /// A host with `budget_bytes` and default mm settings.
    pub fn with_budget(budget_bytes: u64) -> Self {
        HostConfig {
            budget_bytes,
            mm: MmConfig::default(),
            clock: Arc::new(SystemClock),
            oom_wait: std::time::Duration::from_secs(3),
        }
    }
}

/// Host counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStats {
    /// The budget.
    pub budget_bytes: u64,
    /// Bytes charged now.
    pub charged_bytes: u64,
    /// Highest charge seen.
    pub peak_charged_bytes: u64,
    /// Charges that did not fit.
    pub charge_failures: u64,
    /// Live guests registered.
    pub guests: usize,
}

pub(crate) struct HostInner {
    pub(crate) budget: Arc<Budget>,
    config: HostConfig,
    /// Only held for insert/remove/clone, never across an await.
    pub(crate) guests: Mutex<BTreeMap<u64, Guest>>,
    /// Only held for push/clone, never across an await.
    reclaimers: Mutex<Vec<Arc<dyn Reclaim>>>,
    /// The OOM killer's state (`oom_lock`, `oom_victims`, the reaper queue).
    pub(crate) oom: oom::OomState,
    pub(crate) clock: Arc<dyn Clock>,
}

/// The host: budget, guest registry, reclaim plug-ins. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Host {{ stats: {:?} }}", self.stats())
    }
}

impl Host {
    /// A host with this configuration.
    pub fn new(config: HostConfig) -> Host {
        Host {
            inner: Arc::new(HostInner {
                budget: Arc::new(Budget::new(config.budget_bytes)),
                clock: config.clock.clone(),
                config,
                guests: Mutex::new(BTreeMap::new()),
                reclaimers: Mutex::new(Vec::new()),
                oom: oom::OomState::default(),
            }),
        }
    }

    /// A host with a budget of `budget_bytes` and default settings.
    pub fn with_budget(budget_bytes: u64) -> Host {
        Host::new(HostConfig::with_budget(budget_bytes))
    }

    /// The shared budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.inner.budget
    }

    /// A fresh address space charged to this host, not registered as a
    /// guest (for embedders with their own notion of guests).
    pub fn new_mm(&self, name: &str) -> MmUser {
        // Process-wide, never reused: scanners that serve several hosts
        // (one `Ksm` for all) key their slots and hooks by mm id.
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Mm::new_user(
            id,
            name.to_owned(),
            self.inner.budget.clone(),
            Arc::new(HostPressure(Arc::downgrade(&self.inner))),
            &crate::ksm::KsmHooks,
            self.inner.config.mm,
        )
    }

    /// The host's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    pub(crate) fn inner(&self) -> &Arc<HostInner> {
        &self.inner
    }

    pub(crate) fn from_inner(inner: Arc<HostInner>) -> Host {
        Host { inner }
    }

    /// Creates and registers a guest with a fresh address space.
    ///
    /// The `Guest` returned (and its clones) **owns** the guest: when the
    /// last owning handle is dropped without [`Guest::exit`], the drop runs
    /// the exit (blocking, like the kernel's last `mmput`: the teardown
    /// runs in the dropping thread). Handles from [`Host::guest`] and
    /// [`Host::guests`] are references (`get_task_struct`): they never keep
    /// a guest alive and their drop does nothing. In async code, call
    /// `guest.exit().await` before the last owner goes, as with
    /// [`MmUser::exit`]: a blocking teardown inside an executor thread can
    /// wait for an mmap lock that a task of the same executor holds.
    #[must_use = "dropping the owning Guest runs its exit at once"]
    pub fn create_guest(&self, name: &str) -> Guest {
        let mm = self.new_mm(name);
        let guest = Guest {
            inner: Arc::new(GuestInner {
                id: mm.id(),
                name: name.to_owned(),
                mm_id: mm.id(),
                mm: Mutex::new(Some(mm)),
                oom_score_adj: AtomicI32::new(0),
                oom_mm: OnceLock::new(),
                host: Arc::downgrade(&self.inner),
                killed: AtomicBool::new(false),
                exiting: AtomicBool::new(false),
                mm_released: AtomicBool::new(false),
                memdie: AtomicBool::new(false),
                unkillable: AtomicBool::new(false),
                kill_hook: Mutex::new(None),
                lingering: Mutex::new(None),
                exiting_mm: Mutex::new(None),
            }),
            owner: None,
        };
        lock(&self.inner.guests).insert(guest.id(), guest.clone());
        Guest {
            owner: Some(Arc::new(GuestOwner(guest.inner.clone()))),
            ..guest
        }
    }

    /// The registered guest with this id (a reference, not an owner).
    pub fn guest(&self, id: u64) -> Result<Guest> {
        self.prune_exited();
        lock(&self.inner.guests)
            .get(&id)
            .cloned()
            .ok_or(Error::NoSuchGuest { guest: id })
    }

    /// All registered guests, by id (references, not owners).
    pub fn guests(&self) -> Vec<Guest> {
        self.prune_exited();
        lock(&self.inner.guests).values().cloned().collect()
    }

    /// `release_task` of guests that exited while other holders still
    /// used their mm ([`Guest::exit`]): once the last user is gone and the
    /// teardown is through ([`Mm::exit_done`](crate::Mm::exit_done); not
    /// `OOM_SKIP`, which the teardown of an empty tree never sets), the
    /// record leaves the registry
    /// and, if it was an OOM victim, clears its mark (`exit_oom_victim`,
    /// after the teardown that freed its memory, as seed 4 requires). Run
    /// by every registry reader, so the OOM killer never sees a stale one.
    fn prune_exited(&self) {
        let done: Vec<Guest> = lock(&self.inner.guests)
            .values()
            .filter(|g| {
                lock(&g.inner.lingering)
                    .as_ref()
                    .is_some_and(|m| m.users() == 0 && m.exit_done())
            })
            .cloned()
            .collect();
        for g in done {
            *lock(&g.inner.lingering) = None;
            // Every user is gone and the teardown is through: the mm is
            // released, so the mark may go now (I-RP-8's order).
            g.inner.mm_released.store(true, Ordering::SeqCst);
            if g.inner.memdie.swap(false, Ordering::SeqCst) {
                oom::exit_oom_victim(&self.inner, &g);
            }
            lock(&self.inner.guests).remove(&g.inner.id);
        }
    }

    /// Adds a reclaim plug-in at the end of the list.
    pub fn add_reclaim(&self, r: Arc<dyn Reclaim>) {
        lock(&self.inner.reclaimers).push(r);
    }

    /// Counters.
    pub fn stats(&self) -> HostStats {
        let b = &self.inner.budget;
        HostStats {
            budget_bytes: b.limit(),
            charged_bytes: b.charged(),
            peak_charged_bytes: b.peak.load(Ordering::Relaxed),
            charge_failures: b.failures.load(Ordering::Relaxed),
            guests: {
                self.prune_exited();
                lock(&self.inner.guests).len()
            },
        }
    }

    /// Runs the reclaim plug-ins in order until one frees something.
    /// Returns whether anything was freed.
    pub async fn reclaim(&self, bytes: u64) -> bool {
        let list = lock(&self.inner.reclaimers).clone();
        for r in list {
            let freed = r.reclaim(self, bytes).await;
            tracing::debug!(target: "mm_core::host", plugin = r.name(), bytes, freed, "reclaim");
            if freed > 0 {
                return true;
            }
        }
        false
    }
}

/// The host's pressure path as the middle layer sees it: a weak handle
/// (an mm must not keep its host alive; the host's guests own the mms).
struct HostPressure(Weak<HostInner>);

impl Pressure for HostPressure {
    fn relieve(&self, bytes: u64, requester: Option<u64>) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(h) => pressure(&h, bytes, requester).await,
                None => false,
            }
        })
    }

    fn kill_requester(&self, requester: u64) {
        let Some(h) = self.0.upgrade() else { return };
        let host = Host::from_inner(h);
        if let Some(g) = host.guests().into_iter().find(|g| g.mm_id() == requester) {
            tracing::warn!(target: "mm_core::oom", guest = g.id(), "hard budget: the guest's fault found no memory after the pressure path; guest killed");
            g.kill();
        }
    }
}

/// The pressure path, called by the fault path with no lock held: the
/// reclaim plug-ins, then the OOM killer, then a bounded wait for the
/// victim's memory to come back (`Host::oom_wait` in total). `requester` is
/// the mm whose task allocates (`None`: a host thread, such as KSM's
/// unmerge). Returns true when the caller should retry its charge.
async fn pressure(inner: &Arc<HostInner>, bytes: u64, requester: Option<u64>) -> bool {
    use oom::OomOutcome;
    tracing::debug!(target: "mm_core::host", mm_id = requester, bytes, "memory pressure");
    let host = Host::from_inner(inner.clone());
    let fits = || {
        let b = &inner.budget;
        b.limit().saturating_sub(b.charged()) >= bytes
    };
    let deadline = inner.clock.now() + inner.config.oom_wait;
    loop {
        if fits() {
            return true;
        }
        if host.reclaim(bytes).await && fits() {
            return true;
        }
        let victim = match host.out_of_memory_unless(requester, &fits).await {
            OomOutcome::Killed { guest } | OomOutcome::VictimPending { guest } => guest,
            OomOutcome::Fits => return true,
            OomOutcome::Disabled | OomOutcome::NoVictim => return fits(),
        };
        // The victim is the requester's own guest (the killer chose it, or
        // it was dying already: `task_will_free_mem(current)`): its memory
        // comes back only through its own exit, which this very
        // allocation's task must reach. The page allocator never lets an
        // OOM victim wait for its own death (`tsk_is_oom_victim(current)`:
        // the reserves, `ALLOC_OOM`, else `nopage`): fail now. Waiting the
        // whole `oom_wait` here held the victim's fault, and with it its
        // exit, while every other allocation waited on that same victim
        // (I-KSM-1, found by `teardown_vs_ksm`: unmerge-all's wait ran out
        // just after the victim's exit began).
        let own = requester.is_some_and(|id| host.guest(victim).is_ok_and(|g| g.mm_id() == id));
        if own {
            return fits();
        }
        if inner.clock.now() >= deadline {
            // Oracle of I-KSM-1 (a wait-for cycle; PROTOCOL §10.1): the
            // victim's teardown started (users == 0) but never reached
            // OOM_SKIP in the whole wait. Between the two it only waits for
            // its mmap lock and, in the seed-3 bug, for a lock this
            // allocation holds (ksm_thread_mutex): no progress.
            if let Some(m) = host.guest(victim).ok().and_then(|g| g.oom_mm().cloned()) {
                sched::check(
                    m.users() > 0 || m.flags().test(MmFlag::OOM_SKIP),
                    "I-KSM-1: the OOM victim's exit made no progress while an allocation waited for its memory (wait-for cycle)",
                );
            }
            return fits();
        }
        // Like the page allocator's retry after an OOM kill: give the
        // reaper / the victim's exit a moment, then look again.
        inner.clock.sleep(std::time::Duration::from_millis(5)).await;
    }
}

pub(crate) struct GuestInner {
    id: u64,
    name: String,
    mm_id: u64,
    /// `task->mm`: cleared by `exit` (exit_mm). Only held to clone or take.
    mm: Mutex<Option<MmUser>>,
    oom_score_adj: AtomicI32,
    /// `signal->oom_mm`: set at most once (cmpxchg from empty), holding one
    /// count for as long as the guest record lives (seed 4, I-RP-9).
    oom_mm: OnceLock<MmGrab>,
    host: Weak<HostInner>,
    /// SIGKILL delivered (`SIGNAL_GROUP_EXIT`): the guest is dying.
    pub(crate) killed: AtomicBool,
    /// `exit` has started (`PF_EXITING`).
    pub(crate) exiting: AtomicBool,
    /// `exit` has let go of the address space (`exit_mm`'s mmput
    /// returned): the point after which `exit_oom_victim` may run.
    pub(crate) mm_released: AtomicBool,
    /// `TIF_MEMDIE`: marked as OOM victim and not yet through its own exit.
    pub(crate) memdie: AtomicBool,
    /// Never chosen by the OOM killer (global init, a control plane).
    pub(crate) unkillable: AtomicBool,
    /// The embedder's way to stop the guest (vCPUs, a wasm trap).
    pub(crate) kill_hook: Mutex<Option<Arc<dyn oom::Kill>>>,
    /// Set by `exit` when other holders still use the mm (`MmUser` clones:
    /// a vCPU thread, a device worker): the mm as those holders keep it,
    /// by count. The kernel's mm stays visible to the OOM killer through
    /// any task still using it; so does ours, through this: `mm_grab`
    /// returns it while it has users, and the record stays registered
    /// until `Host::prune_exited` sees the teardown done. Only held to
    /// set, take or clone.
    lingering: Mutex<Option<MmGrab>>,
    /// The mm while `exit` lets go of its own user: `mm_grab` finds it
    /// there (a kill inside the exit still marks it `KILLED`), but
    /// `prune_exited` does not (only the exit itself may finish a record
    /// whose exit is still running: the victim mark goes after its
    /// mmput). Only held to set, take or clone.
    exiting_mm: Mutex<Option<MmGrab>>,
}

/// A guest (the task / `signal_struct` analogue): a name, an OOM score, its
/// address space while it lives, and the OOM victim slot.
///
/// The handle from [`Host::create_guest`] and its clones own the guest:
/// the last one dropped runs [`Guest::exit`] (blocking). Handles from
/// [`Host::guest`] / [`Host::guests`] only refer to it.
#[derive(Clone)]
pub struct Guest {
    inner: Arc<GuestInner>,
    /// `Some` on owning handles (shared by their clones). Never read:
    /// held for its drop.
    #[allow(dead_code, reason = "held for its drop: the last owner runs the exit")]
    owner: Option<Arc<GuestOwner>>,
}

/// The owners' share of a guest: dropped with the last owning handle.
struct GuestOwner(Arc<GuestInner>);

impl Drop for GuestOwner {
    /// Drop = exit, like the kernel's last `mmput` of an exiting task: a
    /// guest nobody owns any more leaves the registry and gives its memory
    /// back (before this, its registry entry and its charge leaked for the
    /// host's lifetime). Blocking: see [`Host::create_guest`] for async
    /// owners. Nothing here can panic into a caller's unwinding drop: exit
    /// is idempotent and returns no error.
    fn drop(&mut self) {
        let g = Guest {
            inner: self.0.clone(),
            owner: None,
        };
        g.exit_blocking();
    }
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("id", &self.inner.id)
            .field("name", &self.inner.name)
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl Guest {
    /// Guest id (equal to its first mm's id).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Id of the guest's address space.
    pub fn mm_id(&self) -> u64 {
        self.inner.mm_id
    }

    /// The host, while it lives.
    pub(crate) fn host_inner(&self) -> Option<Arc<HostInner>> {
        self.inner.host.upgrade()
    }

    /// A user reference to the guest's address space (`get_task_mm`), or
    /// `Exited` once the guest has passed `exit`.
    pub fn mm(&self) -> Result<MmUser> {
        lock(&self.inner.mm).as_ref().cloned().ok_or(Error::Exited {
            mm_id: self.inner.mm_id,
        })
    }

    /// A count reference to the guest's address space while it has one
    /// (`find_lock_task_mm` + `mmgrab` under `task_lock`): never a user, so
    /// dropping it can never run the teardown. After [`exit`](Self::exit),
    /// still the mm while other holders use it (another task of the
    /// kernel's thread group keeping the mm).
    pub fn mm_grab(&self) -> Option<MmGrab> {
        if let Some(g) = lock(&self.inner.mm).as_ref().map(MmUser::grab) {
            return Some(g);
        }
        if let Some(g) = lock(&self.inner.exiting_mm)
            .as_ref()
            .filter(|m| m.users() > 0)
        {
            return Some(g.clone());
        }
        lock(&self.inner.lingering)
            .as_ref()
            .filter(|m| m.users() > 0)
            .cloned()
    }

    /// Has the guest not yet passed `exit`?
    pub fn is_alive(&self) -> bool {
        lock(&self.inner.mm).is_some()
    }

    /// `oom_score_adj` (-1000 = never kill, 1000 = kill first).
    pub fn oom_score_adj(&self) -> i32 {
        self.inner.oom_score_adj.load(Ordering::Relaxed)
    }

    /// Sets `oom_score_adj`, clamped to -1000..=1000.
    pub fn set_oom_score_adj(&self, adj: i32) {
        self.inner
            .oom_score_adj
            .store(adj.clamp(-1000, 1000), Ordering::Relaxed);
    }

    /// `signal->oom_mm`: the victim's mm, pinned by count, once marked.
    pub fn oom_mm(&self) -> Option<&MmGrab> {
        self.inner.oom_mm.get()
    }

    /// Sets `oom_mm` once (the cmpxchg in `mark_oom_victim`); returns false
    /// if it was already set (the new grab is dropped).
    pub(crate) fn set_oom_mm(&self, grab: MmGrab) -> bool {
        self.inner.oom_mm.set(grab).is_ok()
    }

    pub(crate) fn inner(&self) -> &GuestInner {
        &self.inner
    }

    /// `exit_mm` + `release_task`: the guest lets go of its address space
    /// (running the teardown if it held the last user), then, if it was an
    /// OOM victim, clears its own victim mark (`exit_oom_victim`: only ever
    /// from here, the victim's own exit, after its own mmput — seed 4), and
    /// leaves the registry. Idempotent.
    ///
    /// When other holders still use the mm (`MmUser` clones), the guest
    /// stays registered and selectable by the OOM killer through that mm
    /// until they let go and its teardown is through (`Host::prune_exited`
    /// then finishes the exit); before, it left the registry at once and
    /// the OOM killer, blind to the memory it still held, killed an
    /// innocent guest instead.
    pub async fn exit(&self) {
        self.inner.exiting.store(true, Ordering::SeqCst);
        let user = {
            let mut slot = lock(&self.inner.mm);
            let user = slot.take();
            // The mm goes to `exiting_mm` in the same critical section that
            // takes it out of `mm`, before our user goes: `mm_grab` always
            // finds it while anybody still uses it. A kill landing inside
            // the `MmUser::exit` below found neither and left the mm
            // without `KILLED`; a vCPU still holding a user wrote on into
            // memory the OOM killer counted as its victim's (the race
            // harness's killed-writes oracle, issue 16). Not `lingering`
            // yet: a registry reader would then finish this exit (and
            // clear the victim mark) before its mmput returned.
            if let Some(u) = &user {
                *lock(&self.inner.exiting_mm) = Some(u.grab());
            }
            user
        };
        if let Some(user) = user {
            let grab = user.grab();
            user.exit().await;
            if grab.users() > 0 || !grab.exit_done() {
                // Other holders: the mm lives on in them (or the last of
                // them is tearing it down right now). Stay registered
                // (`lingering`, published before `exiting_mm` goes, so
                // `mm_grab` never misses it); the victim mark (if any) is
                // cleared when they are gone and the teardown is through.
                *lock(&self.inner.lingering) = Some(grab);
                *lock(&self.inner.exiting_mm) = None;
                return;
            }
            // Ours was the last user: the teardown ran in our exit.
            *lock(&self.inner.exiting_mm) = None;
        }
        if lock(&self.inner.lingering).is_some() {
            // A second exit of a guest whose mm still has users.
            return;
        }
        self.inner.mm_released.store(true, Ordering::SeqCst);
        if let Some(h) = self.inner.host.upgrade() {
            if self.inner.memdie.swap(false, Ordering::SeqCst) {
                oom::exit_oom_victim(&h, self);
            }
            lock(&h.guests).remove(&self.inner.id);
        }
    }

    /// Blocking [`exit`](Self::exit).
    pub fn exit_blocking(&self) {
        futures_lite::future::block_on(self.exit())
    }
}
