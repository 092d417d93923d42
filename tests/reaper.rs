//! The OOM path on real guests: OOM killer, reaper, process_mrelease.
//! Memory claims are checked with /proc, not with library counters.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{rss, serial, MIB};
use futures_lite::future::block_on;
use guestmm::reaper::{
    mrelease_blocking, mrelease_interruptible, oom_reap_task_mm, MreleaseError, MreleaseOutcome,
    ReapOutcome, Reaper, ReaperConfig, ZapSplit,
};
use guestmm::{
    Error, Guest, Host, HostConfig, MapOptions, Mm, MmFlag, MmNotifier, OomOutcome, WouldBlock,
};

/// One OOM-killer call (no memcg), waited for.
fn oom(host: &Host) -> OomOutcome {
    block_on(host.out_of_memory(None))
}

fn fast_reaper(host: &Host) -> Reaper {
    let r = Reaper::new(ReaperConfig {
        delay: Duration::ZERO,
        max_retries: 10,
        retry_interval: Duration::from_millis(10),
        ..ReaperConfig::default()
    });
    r.install(host);
    r
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn guest_with(host: &Host, name: &str, bytes: u64) -> (Guest, u64) {
    let g = host.create_guest(name);
    let mm = g.mm().unwrap();
    let a = mm.mmap_blocking(MapOptions::anon(bytes)).unwrap();
    mm.fill_blocking(a, bytes, 0x11).unwrap();
    (g, a)
}

#[test]
fn test_reap_returns_memory_while_users_held() {
    let _s = serial();
    let host = Host::with_budget(1 << 30);
    let reaper = fast_reaper(&host);
    let thread = reaper.spawn().expect("oom_reaper thread");
    let size = 256 * MIB;
    let (victim, addr) = guest_with(&host, "victim", size);
    // A "vCPU thread" still holds a user: teardown cannot start.
    let worker = victim.mm().unwrap();
    let before = rss();
    assert_eq!(oom(&host), OomOutcome::Killed { guest: victim.id() });
    wait_until("the reap", || reaper.stats().reaped == 1);
    let after = rss();
    let returned = before.saturating_sub(after);
    assert!(
        returned * 10 >= size * 9,
        "reap returned {} MiB of {} MiB (RSS from /proc)",
        returned / MIB,
        size / MIB
    );
    assert!(worker.users() >= 1, "teardown has not started");
    assert!(worker.flags().test(MmFlag::UNSTABLE) && worker.flags().test(MmFlag::OOM_SKIP));
    // The worker's accesses now fail instead of reading zeros.
    let mut b = [0u8; 8];
    assert!(matches!(
        worker.read_blocking(addr, &mut b),
        Err(Error::Unstable { .. })
    ));
    assert!(matches!(
        worker.write_blocking(addr, &b),
        Err(Error::Unstable { .. })
    ));
    // The reaper never clears the victim mark: only the victim's own exit does.
    assert_eq!(host.oom_stats().victims_running, 1);
    drop(worker);
    victim.exit_blocking();
    assert_eq!(host.oom_stats().victims_running, 0);
    assert_eq!(host.stats().charged_bytes, 0);
    thread.stop();
}

#[test]
fn test_no_second_victim_while_first_lacks_oom_skip() {
    let host = Host::with_budget(1 << 30);
    let (a, _) = guest_with(&host, "a", 8 * MIB);
    let (b, _) = guest_with(&host, "b", 4 * MIB);
    // No reaper installed: the first victim keeps lacking OOM_SKIP.
    assert_eq!(oom(&host), OomOutcome::Killed { guest: a.id() });
    assert_eq!(oom(&host), OomOutcome::VictimPending { guest: a.id() });
    assert_eq!(host.oom_stats().kills, 1);
    // Once its exit_mmap sets OOM_SKIP, the next victim may be chosen.
    a.exit_blocking();
    assert_eq!(oom(&host), OomOutcome::Killed { guest: b.id() });
    assert_eq!(host.oom_stats().second_kills, 0);
    b.exit_blocking();
}

#[test]
fn test_unkillable_and_adj_min_never_chosen() {
    let host = Host::with_budget(1 << 30);
    let (big, _) = guest_with(&host, "big", 16 * MIB);
    big.set_unkillable(true);
    let (adj, _) = guest_with(&host, "adj", 8 * MIB);
    adj.set_oom_score_adj(-1000);
    let (small, _) = guest_with(&host, "small", 2 * MIB);
    assert_eq!(oom(&host), OomOutcome::Killed { guest: small.id() });
    small.exit_blocking();
    assert_eq!(oom(&host), OomOutcome::NoVictim);
    big.exit_blocking();
    adj.exit_blocking();
}

#[test]
fn test_misbehaving_victim_holding_write_lock() {
    let host = Host::with_budget(1 << 30);
    let reaper = fast_reaper(&host);
    let thread = reaper.spawn().expect("oom_reaper thread");
    let (victim, _) = guest_with(&host, "stuck", 8 * MIB);
    let (next, _) = guest_with(&host, "next", 4 * MIB);
    // The victim holds its own mmap write lock forever.
    let mm = victim.mm().unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let holder = {
        let mm = mm.clone();
        let release = release.clone();
        std::thread::spawn(move || {
            let _w = mm.lock().write_blocking();
            tx.send(()).unwrap();
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    rx.recv().unwrap();
    assert_eq!(oom(&host), OomOutcome::Killed { guest: victim.id() });
    wait_until("the reaper to give up", || reaper.stats().gave_up == 1);
    let s = reaper.stats();
    assert_eq!(s.contended, 10, "{s:?}");
    assert!(
        mm.flags().test(MmFlag::OOM_SKIP),
        "OOM_SKIP set although nothing was reaped"
    );
    assert!(
        !mm.flags().test(MmFlag::UNSTABLE),
        "never got the lock, never zapped"
    );
    // The OOM killer can move on to the next victim.
    assert_eq!(oom(&host), OomOutcome::Killed { guest: next.id() });
    release.store(true, Ordering::SeqCst);
    holder.join().unwrap();
    drop(mm);
    victim.exit_blocking();
    next.exit_blocking();
    thread.stop();
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_pressure_kills_and_the_charge_then_fits() {
    let host = Host::with_budget(64 * MIB);
    let reaper = fast_reaper(&host);
    let thread = reaper.spawn().expect("oom_reaper thread");
    let (hog, _) = guest_with(&host, "hog", 48 * MIB);
    let other = host.create_guest("other");
    let mm = other.mm().unwrap();
    let a = mm.mmap_blocking(MapOptions::anon(32 * MIB)).unwrap();
    // Over budget: the fault path runs the OOM killer, the reaper frees
    // the hog, the charge fits and the write completes.
    mm.fill_blocking(a, 32 * MIB, 1).unwrap();
    assert!(hog.is_oom_victim() && !other.is_oom_victim());
    assert_eq!(host.oom_stats().kills, 1);
    hog.exit_blocking();
    drop(mm);
    other.exit_blocking();
    thread.stop();
    assert_eq!(host.stats().charged_bytes, 0);
}

/// A clock whose sleeps return at once and move its time on, counting
/// them: a pressure path that waits for a victim shows up as sleeps, with
/// no real time spent and no timing in the assertion.
#[derive(Debug)]
struct SkipClock {
    base: Instant,
    offset: std::sync::Mutex<Duration>,
    sleeps: std::sync::atomic::AtomicU64,
}

impl guestmm::Clock for SkipClock {
    fn now(&self) -> Instant {
        self.base + *guestmm::lock(&self.offset)
    }
    fn sleep(&self, d: Duration) -> guestmm::BoxFuture<'static, ()> {
        *guestmm::lock(&self.offset) += d;
        self.sleeps.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }
}

/// An allocation whose OOM kill chose its own guest fails at once: it
/// never waits `oom_wait` for memory only its own exit can give back (the
/// page allocator's `tsk_is_oom_victim(current)`). Before the fix it slept
/// in 5 ms steps through the whole `oom_wait`.
#[test]
fn test_a_victims_own_allocation_does_not_wait_for_its_own_death() {
    let clock = Arc::new(SkipClock {
        base: Instant::now(),
        offset: std::sync::Mutex::new(Duration::ZERO),
        sleeps: std::sync::atomic::AtomicU64::new(0),
    });
    let host = Host::new(HostConfig {
        clock: clock.clone(),
        oom_wait: Duration::from_secs(30),
        ..HostConfig::with_budget(8 * MIB)
    });
    let (g, _) = guest_with(&host, "only", 6 * MIB);
    let mm = g.mm().unwrap();
    let b = mm.mmap_blocking(MapOptions::anon(4 * MIB)).unwrap();
    // Over budget: the fault path's OOM kill can only choose this guest.
    let r = mm.fill_blocking(b, 4 * MIB, 1);
    assert!(
        r.is_err(),
        "the fill of a guest killed for its own allocation succeeded"
    );
    assert!(g.is_oom_victim());
    let sleeps = clock.sleeps.load(Ordering::SeqCst);
    assert_eq!(
        sleeps, 0,
        "the victim's own allocation waited ({sleeps} sleeps) for its own death"
    );
    drop(mm);
    g.exit_blocking();
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_oom_killer_disable_waits_for_the_victims_own_exit() {
    let host = Host::with_budget(1 << 30);
    let reaper = fast_reaper(&host);
    let thread = reaper.spawn().expect("oom_reaper thread");
    let (victim, _) = guest_with(&host, "v", 4 * MIB);
    oom(&host);
    wait_until("the reap", || reaper.stats().reaped == 1);
    // Reaped, but still running: disable must not return true (seed 4:
    // the reaper never calls exit_oom_victim for the victim).
    assert!(!host.oom_killer_disable_blocking(Duration::from_millis(30)));
    assert_eq!(host.oom_stats().victims_running, 1);
    victim.exit_blocking();
    assert!(host.oom_killer_disable_blocking(Duration::from_millis(30)));
    let (g, _) = guest_with(&host, "g", MIB);
    assert_eq!(oom(&host), OomOutcome::Disabled);
    host.oom_killer_enable();
    g.exit_blocking();
    thread.stop();
}

#[test]
fn test_mrelease_outcomes() {
    let host = Host::with_budget(1 << 30);
    assert_eq!(
        mrelease_blocking(&host, 999),
        Err(MreleaseError::NoSuchGuest { guest: 999 })
    );
    let (g, a) = guest_with(&host, "g", 16 * MIB);
    assert_eq!(
        mrelease_blocking(&host, g.id()),
        Err(MreleaseError::NotDying { guest: g.id() })
    );
    g.kill();
    let pages = 16 * MIB / 4096;
    assert_eq!(
        mrelease_blocking(&host, g.id()),
        Ok(MreleaseOutcome::Reaped { pages })
    );
    assert_eq!(host.stats().charged_bytes, 0);
    let mm = g.mm().unwrap();
    assert!(matches!(
        mm.read_blocking(a, &mut [0u8; 4]),
        Err(Error::Unstable { .. })
    ));
    // mrelease does not set OOM_SKIP (it is not the reaper); the exit does.
    assert!(!mm.flags().test(MmFlag::OOM_SKIP));
    drop(mm);
    g.exit_blocking();
    assert_eq!(
        mrelease_blocking(&host, g.id()),
        Err(MreleaseError::NoSuchGuest { guest: g.id() })
    );
}

#[test]
fn test_mrelease_already_done_and_interrupted() {
    let host = Host::with_budget(1 << 30);
    let (g, _) = guest_with(&host, "g", MIB);
    let mm = g.mm().unwrap();
    // Not dying but OOM_SKIP: "error only if the work has not been done".
    mm.flags().set(MmFlag::OOM_SKIP);
    assert_eq!(
        mrelease_blocking(&host, g.id()),
        Ok(MreleaseOutcome::AlreadyDone)
    );
    let (h, _) = guest_with(&host, "h", MIB);
    h.kill();
    let hm = h.mm().unwrap();
    let w = hm.lock().write_blocking();
    let r = block_on(mrelease_interruptible(
        &host,
        h.id(),
        host.clock().sleep(Duration::from_millis(10)),
    ));
    assert_eq!(r, Err(MreleaseError::Interrupted { guest: h.id() }));
    drop(w);
    drop((mm, hm));
    g.exit_blocking();
    h.exit_blocking();
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

#[test]
fn test_blocking_notifier_makes_reap_partial() {
    let host = Host::with_budget(1 << 30);
    let (g, _) = guest_with(&host, "kvm", 4 * MIB);
    let mm = g.mm().unwrap();
    mm.register_notifier(Arc::new(Refuse));
    g.kill();
    assert_eq!(
        mrelease_blocking(&host, g.id()),
        Err(MreleaseError::Partial { guest: g.id() })
    );
    assert!(matches!(
        block_on(oom_reap_task_mm(&mm, ZapSplit::default())),
        ReapOutcome::Partial { pages: 0 }
    ));
    assert_eq!(
        host.stats().charged_bytes,
        4 * MIB,
        "nothing zapped behind the notifier's back"
    );
    drop(mm);
    // exit_mmap releases the notifier first, then zaps with no refusal.
    g.exit_blocking();
    assert_eq!(host.stats().charged_bytes, 0);
}

/// Reaper racing teardown, in both orders, many times: no leak, no
/// negative counter (debug assertions), struct freed at count 0, and the
/// reaper either reaped before the teardown's free or saw OOM_SKIP.
#[test]
fn test_stress_reaper_vs_teardown() {
    let _s = serial();
    let host = Host::with_budget(1 << 30);
    let maps_before = common::maps_count();
    for i in 0..300 {
        let (g, _) = guest_with(&host, "v", 2 * MIB + (i % 3) * 4096);
        let user = g.mm().unwrap();
        let grab = user.grab();
        let watch = user.watch();
        drop(user);
        let reaper_first = i % 2 == 0;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let b2 = barrier.clone();
        let grab2 = grab.clone();
        let t = std::thread::spawn(move || {
            b2.wait();
            if reaper_first {
                block_on(oom_reap_task_mm(&grab2, ZapSplit::default()))
            } else {
                std::thread::yield_now();
                block_on(oom_reap_task_mm(&grab2, ZapSplit::default()))
            }
        });
        barrier.wait();
        if reaper_first {
            std::thread::yield_now();
        }
        g.exit_blocking();
        let outcome = t.join().unwrap();
        assert!(
            matches!(
                outcome,
                ReapOutcome::Reaped { .. } | ReapOutcome::Skipped | ReapOutcome::Contended
            ),
            "{outcome:?}"
        );
        assert!(grab.flags().test(MmFlag::OOM_SKIP));
        assert_eq!(grab.rss_pages(), 0);
        // After the teardown a reader sees the flag and an empty tree.
        assert_eq!(
            block_on(oom_reap_task_mm(&grab, ZapSplit::default())),
            ReapOutcome::Skipped
        );
        assert_eq!(grab.lock().read_blocking().vmas().len(), 0);
        drop(grab);
        assert!(watch.is_freed());
    }
    assert_eq!(host.stats().charged_bytes, 0);
    assert!(
        common::maps_count() <= maps_before + 4,
        "host mappings leaked"
    );
}

/// mrelease racing the victim's own exit, many times.
#[test]
fn test_stress_mrelease_vs_exit() {
    let _s = serial();
    let host = Host::with_budget(1 << 30);
    let maps_before = common::maps_count();
    for i in 0..300 {
        let (g, _) = guest_with(&host, "v", 2 * MIB);
        let watch = g.mm().unwrap().watch();
        g.kill();
        let h2 = host.clone();
        let id = g.id();
        let t = std::thread::spawn(move || mrelease_blocking(&h2, id));
        if i % 2 == 0 {
            std::thread::yield_now();
        }
        g.exit_blocking();
        let r = t.join().unwrap();
        assert!(
            matches!(
                r,
                Ok(MreleaseOutcome::Reaped { .. })
                    | Ok(MreleaseOutcome::AlreadyDone)
                    | Err(MreleaseError::NoSuchGuest { .. })
            ),
            "{r:?}"
        );
        assert!(
            watch.is_freed(),
            "mrelease held only a count, and dropped it"
        );
    }
    assert_eq!(host.stats().charged_bytes, 0);
    assert!(
        common::maps_count() <= maps_before + 4,
        "host mappings leaked"
    );
    let _ = HostConfig::with_budget(0);
}

#[test]
fn test_second_mrelease_is_already_done() {
    let host = Host::with_budget(1 << 30);
    let (g, _) = guest_with(&host, "g", 4 * MIB);
    g.kill();
    assert_eq!(
        mrelease_blocking(&host, g.id()),
        Ok(MreleaseOutcome::Reaped {
            pages: 4 * MIB / 4096
        })
    );
    // The kernel's second call reaps nothing; ours says so by name.
    assert_eq!(
        mrelease_blocking(&host, g.id()),
        Ok(MreleaseOutcome::AlreadyDone)
    );
    g.exit_blocking();
}

#[test]
fn test_reaper_spawn_is_one_thread_per_reaper_and_install_replaces() {
    use guestmm::reaper::SpawnError;
    let host = Host::with_budget(1 << 30);
    let first = fast_reaper(&host);
    let thread = first.spawn().expect("oom_reaper thread");
    assert!(matches!(first.spawn(), Err(SpawnError::AlreadyRunning)));
    assert!(matches!(
        first.clone().spawn(),
        Err(SpawnError::AlreadyRunning)
    ));
    thread.stop();
    // Stopped: it can run again.
    let thread = first.spawn().expect("respawn after stop");
    // A second reaper installed replaces the first for later kills.
    let second = fast_reaper(&host);
    let (g, _) = guest_with(&host, "g", MIB);
    assert!(matches!(oom(&host), OomOutcome::Killed { .. }));
    assert_eq!(second.stats().queued, 1);
    assert_eq!(first.stats().queued, 0);
    // The second has no thread: reap by hand.
    block_on(second.step());
    assert_eq!(second.stats().reaped, 1);
    thread.stop();
    g.exit_blocking();
}

#[test]
fn test_killed_guest_cannot_map_or_write_but_can_read_and_free() {
    let host = Host::with_budget(1 << 30);
    let (g, a) = guest_with(&host, "g", MIB);
    let mm = g.mm().unwrap();
    g.kill();
    let killed = |r: Result<(), Error>| matches!(r, Err(Error::Killed { .. }));
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(MIB)),
        Err(Error::Killed { .. })
    ));
    assert!(killed(mm.write_blocking(a, b"x")));
    assert!(killed(mm.fill_blocking(a, 4096, 1)));
    assert!(killed(mm.mprotect_blocking(a, MIB, guestmm::Prot::READ)));
    assert!(killed(mm.mlock_blocking(a, MIB)));
    assert!(killed(mm.madvise_blocking(
        a,
        MIB,
        guestmm::Advice::HugePage
    )));
    // What it wrote before is still there; memory can still be freed.
    let mut b = [0u8];
    mm.read_blocking(a, &mut b).unwrap();
    assert_eq!(b[0], 0x11);
    mm.madvise_blocking(a, MIB / 2, guestmm::Advice::DontNeed)
        .unwrap();
    mm.munmap_blocking(a, MIB).unwrap();
    assert_eq!(host.stats().charged_bytes, 0);
    drop(mm);
    g.exit_blocking();
}

/// A kill hook that panics.
struct PanickingHook;
impl guestmm::Kill for PanickingHook {
    fn kill(&self, _: &Guest) {
        panic!("the embedder's kill hook panicked");
    }
}

/// The OOM killer runs on the userfaultfd handler of the guest that needs
/// memory; a victim whose kill hook panics must not take that handler (and
/// with it the faulting guest's tracking) down: the panic is caught and
/// counted, the kill stands, the victim is reaped, the fault is served.
#[test]
fn test_panicking_kill_hook_is_contained() {
    let _s = serial();
    let host = Host::new(HostConfig {
        oom_wait: Duration::from_secs(20),
        ..HostConfig::with_budget(16 * MIB)
    });
    let reaper = fast_reaper(&host);
    let thread = reaper.spawn().expect("oom_reaper thread");
    let (victim, _) = guest_with(&host, "victim", 12 * MIB);
    victim.set_kill_hook(Arc::new(PanickingHook));
    let g = host.create_guest("toucher");
    let mm = g.mm().unwrap();
    let a = mm
        .mmap_blocking(MapOptions::anon(8 * MIB).tracked(true))
        .unwrap();
    let p = mm.find_vma_blocking(a).unwrap().host_ptr() as usize;
    // Direct touches: the handler charges them and, over budget, runs the
    // OOM killer, which kills the victim and calls its hook.
    std::thread::spawn(move || {
        for i in 0..(8 * MIB / 4096) as usize {
            // SAFETY: inside the tracked mapping, alive while `mm` is.
            unsafe { ((p + i * 4096) as *mut u8).write_volatile(1) };
        }
    })
    .join()
    .expect("toucher");
    let s = host.oom_stats();
    assert_eq!((s.kills, s.kill_hook_panics), (1, 1), "{s:?}");
    assert!(victim.is_dying());
    let t = mm.tracked_stats().unwrap();
    assert!(t.handler_alive, "{t:?}");
    assert!(t.pages_faulted >= 8 * MIB / 4096, "{t:?}");
    wait_until("the reap", || reaper.stats().reaped == 1);
    drop(mm);
    g.exit_blocking();
    victim.exit_blocking();
    thread.stop();
    assert_eq!(host.stats().charged_bytes, 0);
}
