//! The OOM killer (`mm/oom_kill.c`: `out_of_memory`, `select_bad_process`,
//! `oom_kill_process`, `mark_oom_victim`, `exit_oom_victim`,
//! `oom_killer_disable`).
//!
//! 1. The pressure path (a charge that does not fit) runs the reclaim
//!    plug-ins, then [`Host::out_of_memory`] under `oom_lock`.
//! 2. Selection walks the guests. A guest whose `oom_mm` lacks `OOM_SKIP`
//!    **aborts** the selection (I-RP-7): a victim is still dying, killing a
//!    second one would be needless. Victims with `OOM_SKIP` are skipped, as
//!    are unkillable guests and `oom_score_adj == -1000`.
//! 3. Badness = resident pages (the larger of the charged RSS and what
//!    `mincore` says, so directly touched untracked memory counts) + page
//!    table pages + `oom_score_adj × budget_pages / 1000`.
//! 4. Kill: a local grab, the embedder's [`Kill`] hook **before**
//!    `mark_oom_victim` (the kernel sends SIGKILL first), then
//!    `mark_oom_victim` (`TIF_MEMDIE` once; `oom_mm` set once with its own
//!    grab, I-RP-9; `oom_victims += 1`), then `queue_oom_reaper` once per mm
//!    (`OOM_REAP_QUEUED` test-and-set, I-RP-1).
//! 5. Only the victim's own [`Guest::exit`] calls `exit_oom_victim`, after its
//!    own mmput (seed 4): the reaper never does, so
//!    [`Host::oom_killer_disable`] is a real barrier (I-RP-8).

use crate::types::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Guest, Host, HostInner};
use crate::flags::MmFlag;
use crate::mm::MmGrab;
use crate::sys::PAGE_SIZE;

/// The embedder's way to kill a guest: stop its vCPUs, trap the wasm
/// instance. Called with `oom_lock` held; must not block on the guest (its
/// mmap lock, its threads): the thread running it may be the userfaultfd
/// pool thread that serves the victim's own faults (`tracked/pool.rs`), so
/// waiting there for a vCPU blocked in a tracked fault would never end. A panic in it is caught and logged (and counted
/// in `OomStats::kill_hook_panics`): the kill stands, and the thread that
/// ran the OOM killer (a userfaultfd handler serving another guest's
/// fault, an allocation) goes on.
pub trait Kill: Send + Sync {
    /// Deliver the kill.
    fn kill(&self, guest: &Guest);
}

/// Where the OOM killer hands a victim's mm for reaping (mm-reaper's
/// `Reaper` implements it).
pub trait OomReaperQueue: Send + Sync {
    /// Queue `mm` (the victim's `oom_mm`) for reaping. Called at most once
    /// per mm, after `OOM_REAP_QUEUED` was set.
    fn queue_oom_reaper(&self, guest: &Guest, mm: MmGrab);
}

/// Result of one [`Host::out_of_memory`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomOutcome {
    /// A victim was killed.
    Killed {
        /// The victim.
        guest: u64,
    },
    /// An earlier victim has not got `OOM_SKIP` yet: nothing killed.
    VictimPending {
        /// That victim.
        guest: u64,
    },
    /// The OOM killer is disabled (`oom_killer_disable`).
    Disabled,
    /// No eligible guest.
    NoVictim,
    /// The charge the pressure path asked for fits now (memory came back
    /// while it waited for `oom_lock` or walked the guests): nothing
    /// killed. Never returned by [`Host::out_of_memory`].
    Fits,
}

/// OOM killer counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomStats {
    /// Victims killed.
    pub kills: u64,
    /// Selections aborted because a victim still lacked `OOM_SKIP`.
    pub aborted: u64,
    /// Kills made while another victim still lacked `OOM_SKIP` (I-RP-7
    /// says this stays 0).
    pub second_kills: u64,
    /// Marked victims that have not finished their own exit.
    pub victims_running: usize,
    /// The OOM killer is disabled ([`Host::oom_killer_disable`] returned
    /// `true`, or waits; a disable that timed out enabled it again).
    pub disabled: bool,
    /// Kill hooks that panicked (caught; the kill stood).
    pub kill_hook_panics: u64,
}

#[derive(Default)]
pub(crate) struct OomState {
    /// `oom_lock`: serialises selection, kill and `oom_killer_disable`.
    lock: crate::sched::Mutex<()>,
    disabled: AtomicBool,
    /// `oom_victims`: changed only under `lock` (+1, mark_oom_victim) or
    /// by the victim's own exit (-1, exit_oom_victim).
    victims: AtomicUsize,
    /// `oom_victims_wait`: notified when `victims` reaches 0.
    victims_wait: event_listener::Event,
    reaper: Mutex<Option<Arc<dyn OomReaperQueue>>>,
    kills: AtomicU64,
    aborted: AtomicU64,
    second_kills: AtomicU64,
    kill_hook_panics: AtomicU64,
}

/// `exit_oom_victim`: called only from the victim's own `Guest::exit`, or,
/// when other holders kept its mm past that exit, by `Host::prune_exited`
/// once their last user is gone and the teardown is through.
pub(crate) fn exit_oom_victim(h: &HostInner, victim: &Guest) {
    // I-RP-8 / seed 4: only the victim, in its own exit, after its own
    // mmput; otherwise oom_killer_disable() could return while the victim
    // still runs (the 74070542099c race).
    crate::sched::check(
        victim.inner().exiting.load(Ordering::SeqCst),
        "I-RP-8: exit_oom_victim called outside the victim's own exit",
    );
    // ... and after its mmput: a victim that cleared its mark before
    // letting go of its address space would let oom_killer_disable()
    // return while the teardown it may be running still frees memory.
    crate::sched::check(
        victim.inner().mm_released.load(Ordering::SeqCst),
        "I-RP-8: exit_oom_victim before the victim's own mmput",
    );
    let left = h
        .oom
        .victims
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .map_or(0, |v| v - 1);
    if left == 0 {
        h.oom.victims_wait.notify(usize::MAX);
    }
}

impl Guest {
    /// Sets the embedder's kill hook.
    pub fn set_kill_hook(&self, hook: Arc<dyn Kill>) {
        *lock(&self.inner().kill_hook) = Some(hook);
    }

    /// Never let the OOM killer choose this guest.
    pub fn set_unkillable(&self, on: bool) {
        self.inner().unkillable.store(on, Ordering::SeqCst);
    }

    /// SIGKILL: marks the guest dying and calls its kill hook. Does not
    /// make it an OOM victim (process_mrelease works on any dying guest).
    pub fn kill(&self) {
        if !self.inner().killed.swap(true, Ordering::SeqCst) {
            if let Some(mm) = self.mm_grab() {
                mm.flags().set(MmFlag::KILLED);
            }
            let hook = lock(&self.inner().kill_hook).clone();
            if let Some(h) = hook {
                let hook_ran =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.kill(self)));
                if hook_ran.is_err() {
                    if let Some(h) = self.host_inner() {
                        h.oom.kill_hook_panics.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::error!(target: "mm_core::oom", guest = self.id(), "the kill hook panicked; the guest is marked killed all the same");
                }
            }
        }
    }

    /// Dying: killed, or exit started (`task_will_free_mem`'s test).
    pub fn is_dying(&self) -> bool {
        self.inner().killed.load(Ordering::SeqCst) || self.inner().exiting.load(Ordering::SeqCst)
    }

    /// Marked as OOM victim (`tsk_is_oom_victim`: `oom_mm` set).
    pub fn is_oom_victim(&self) -> bool {
        self.oom_mm().is_some()
    }

    /// `TIF_MEMDIE`: marked and not yet through its own exit.
    pub fn is_running_victim(&self) -> bool {
        self.inner().memdie.load(Ordering::SeqCst)
    }
}

impl Host {
    /// Registers the reaper the OOM killer queues victims to.
    pub fn set_oom_reaper(&self, q: Arc<dyn OomReaperQueue>) {
        *lock(&self.inner().oom.reaper) = Some(q);
    }

    /// Counters of the OOM killer. `victims_running` counts a victim whose
    /// exit lingered (other holders kept its mm) until a registry reader
    /// ([`Host::guests`], [`Host::stats`], the OOM killer) finds its
    /// teardown through; this read alone does not finish it.
    pub fn oom_stats(&self) -> OomStats {
        let o = &self.inner().oom;
        OomStats {
            kills: o.kills.load(Ordering::Relaxed),
            aborted: o.aborted.load(Ordering::Relaxed),
            second_kills: o.second_kills.load(Ordering::Relaxed),
            victims_running: o.victims.load(Ordering::SeqCst),
            disabled: o.disabled.load(Ordering::SeqCst),
            kill_hook_panics: o.kill_hook_panics.load(Ordering::Relaxed),
        }
    }

    /// `oom_badness`: None if the guest is not eligible.
    pub fn badness(&self, guest: &Guest) -> Option<i64> {
        if guest.inner().unkillable.load(Ordering::SeqCst) || guest.oom_score_adj() == -1000 {
            return None;
        }
        // A count, not a user: selection must never be the one that drops
        // the last user and runs a teardown.
        let mm = guest.mm_grab()?;
        if mm.users() == 0 || mm.flags().test(MmFlag::OOM_SKIP) {
            return None;
        }
        // Untracked regions are sampled: what mincore says is resident
        // counts even if the embedder touched it directly. try_read only:
        // selection must never wait for a guest's lock.
        let sampled = mm
            .lock()
            .try_read()
            .and_then(|st| crate::mm::Mm::resident_bytes(&mm, &st).ok())
            .unwrap_or(0)
            / PAGE_SIZE as u64;
        let pages = mm.rss_pages().max(sampled) + mm.pgtables_bytes() / PAGE_SIZE as u64;
        let total = (self.budget().limit() / PAGE_SIZE as u64).max(1) as i64;
        Some(pages as i64 + i64::from(guest.oom_score_adj()) * total / 1000)
    }

    /// `out_of_memory`: select a victim and kill it, unless an earlier
    /// victim is still dying. Takes `oom_lock`.
    pub async fn out_of_memory(&self, requester: Option<u64>) -> OomOutcome {
        self.out_of_memory_unless(requester, &|| false).await
    }

    /// [`out_of_memory`](Self::out_of_memory) for the pressure path, with
    /// the allocator's last-second check: `fits` (does the charge fit the
    /// budget now?) is asked under `oom_lock`, once when it is taken (as
    /// `__alloc_pages_may_oom` retries the allocation at the high watermark
    /// after `mutex_trylock(&oom_lock)`) and once after the selection,
    /// right before the kill, because the selection is not cheap here (it
    /// samples each guest's resident pages with `mincore`): an earlier
    /// victim can be reaped, and set `OOM_SKIP`, while the walk is past it,
    /// and its memory back would make the kill a needless second one.
    pub(crate) async fn out_of_memory_unless(
        &self,
        requester: Option<u64>,
        fits: &(dyn Fn() -> bool + Sync),
    ) -> OomOutcome {
        let oom = &self.inner().oom;
        let _oom_lock = oom.lock.lock().await;
        crate::sched::point("oom:locked").await;
        if oom.disabled.load(Ordering::SeqCst) {
            return OomOutcome::Disabled;
        }
        if fits() {
            return OomOutcome::Fits;
        }
        // task_will_free_mem(current): the guest asking for memory is itself
        // dying. Mark it and queue its mm (at most once: OOM_REAP_QUEUED)
        // instead of killing someone else.
        if let Some(g) =
            requester.and_then(|id| self.guests().into_iter().find(|g| g.mm_id() == id))
        {
            if let Some(grab) = g.mm_grab() {
                if g.is_dying() && !grab.flags().test(MmFlag::OOM_SKIP) {
                    self.mark_oom_victim(&g, &grab);
                    self.queue_oom_reaper(&g);
                    return OomOutcome::VictimPending { guest: g.id() };
                }
            }
        }
        // select_bad_process / oom_evaluate_task.
        let mut chosen: Option<(i64, Guest)> = None;
        for g in self.guests() {
            if let Some(mm) = g.oom_mm() {
                if mm.flags().test(MmFlag::OOM_SKIP) {
                    continue;
                }
                // I-RP-7: someone is already dying and has not released its
                // memory (no OOM_SKIP from exit_mmap or the reaper): do not
                // kill more. Counterpart: the reaper always ends with OOM_SKIP
                // (I-RP-6), so this wait is bounded.
                oom.aborted.fetch_add(1, Ordering::Relaxed);
                return OomOutcome::VictimPending { guest: g.id() };
            }
            if let Some(points) = self.badness(&g) {
                if chosen.as_ref().is_none_or(|(p, _)| points > *p) {
                    chosen = Some((points, g));
                }
            }
        }
        let Some((points, victim)) = chosen else {
            tracing::warn!(target: "mm_core::oom", ?requester, "out of memory and no killable guest");
            return OomOutcome::NoVictim;
        };
        if fits() {
            return OomOutcome::Fits;
        }
        self.oom_kill_process(&victim, points)
    }

    /// `oom_kill_process` / `__oom_kill_process`. Caller holds `oom_lock`.
    fn oom_kill_process(&self, victim: &Guest, points: i64) -> OomOutcome {
        let oom = &self.inner().oom;
        // find_lock_task_mm + mmgrab: a local pin on the victim's mm.
        let Some(grab) = victim.mm_grab() else {
            return OomOutcome::NoVictim; // already exiting
        };
        // SIGKILL before mark_oom_victim, as the kernel does.
        victim.kill();
        self.mark_oom_victim(victim, &grab);
        if self.guests().iter().any(|g| {
            g.id() != victim.id()
                && g.oom_mm()
                    .is_some_and(|m| !m.flags().test(MmFlag::OOM_SKIP))
        }) {
            oom.second_kills.fetch_add(1, Ordering::Relaxed);
        }
        oom.kills.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            target: "mm_core::oom::mark_victim",
            guest = victim.id(),
            name = victim.name(),
            points,
            rss_pages = grab.rss_pages(),
            "Out of memory: killed guest"
        );
        self.queue_oom_reaper(victim);
        OomOutcome::Killed { guest: victim.id() }
    }

    /// `mark_oom_victim`. Caller holds `oom_lock`, so the killer is not
    /// disabled meanwhile (I-RP-8).
    fn mark_oom_victim(&self, victim: &Guest, mm: &MmGrab) {
        if victim.inner().memdie.swap(true, Ordering::SeqCst) {
            return;
        }
        // signal->oom_mm: set once (cmpxchg from NULL), with its own count,
        // kept for as long as the guest record lives (seed 4): the reaper
        // and selection find the mm here even after the guest dropped it.
        victim.set_oom_mm(mm.clone());
        self.inner().oom.victims.fetch_add(1, Ordering::SeqCst);
    }

    /// `queue_oom_reaper`: at most once per mm (I-RP-1).
    fn queue_oom_reaper(&self, victim: &Guest) {
        let Some(mm) = victim.oom_mm() else { return };
        if mm.flags().test_and_set(MmFlag::OOM_REAP_QUEUED) {
            return;
        }
        let reaper = lock(&self.inner().oom.reaper).clone();
        if let Some(r) = reaper {
            tracing::debug!(target: "mm_core::oom::wake_reaper", guest = victim.id(), "queue_oom_reaper");
            r.queue_oom_reaper(victim, mm.clone());
        }
    }

    /// `oom_killer_disable`: no new victims from now on (the flag is set
    /// under `oom_lock`, so no selection is half-way through a kill), then
    /// waits up to `timeout` (on the host's clock) for every marked victim
    /// to pass its own exit: its mmput, then `exit_oom_victim` (I-RP-8).
    /// On timeout the killer is enabled again and false is returned.
    pub async fn oom_killer_disable(&self, timeout: Duration) -> bool {
        let oom = &self.inner().oom;
        {
            // Under oom_lock: a selection that got the lock first finishes
            // its kill (and its mark) before we set the flag; one that
            // comes after sees the flag under the lock (I-RP-8).
            let _g = oom.lock.lock().await;
            crate::sched::point("oom_killer_disable:locked").await;
            oom.disabled.store(true, Ordering::SeqCst);
        }
        crate::sched::point("oom_killer_disable:disabled").await;
        let mut expired = self.clock().sleep(timeout);
        loop {
            if oom.victims.load(Ordering::SeqCst) == 0 {
                return true;
            }
            // Listen, then re-check: a victim's notify between the load
            // and the listen would otherwise be lost.
            let listener = oom.victims_wait.listen();
            if oom.victims.load(Ordering::SeqCst) == 0 {
                return true;
            }
            let woke = futures_lite::future::or(
                async {
                    listener.await;
                    true
                },
                async {
                    (&mut expired).await;
                    false
                },
            )
            .await;
            if !woke && oom.victims.load(Ordering::SeqCst) != 0 {
                self.oom_killer_enable();
                return false;
            }
        }
    }

    /// Blocking [`oom_killer_disable`](Self::oom_killer_disable).
    pub fn oom_killer_disable_blocking(&self, timeout: Duration) -> bool {
        futures_lite::future::block_on(self.oom_killer_disable(timeout))
    }

    /// `oom_killer_enable`.
    pub fn oom_killer_enable(&self) {
        self.inner().oom.disabled.store(false, Ordering::SeqCst);
    }
}
