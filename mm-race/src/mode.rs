//! Run modes: the same setup and the same actors either on the
//! deterministic executor ([`Mode::Sim`], the input picks every
//! interleaving) or each on its own OS thread ([`Mode::Threads`], the OS
//! scheduler picks), so the value of the executor is a measured number.
//!
//! A scenario builds its actors through a [`Runner`] and never needs to know
//! which mode runs them: it takes its clock from [`Runner::clock`], scales
//! its delays with [`Runner::time`], and spawns `Send + 'static` futures.
//!
//! In thread mode no `sched` hook is installed: every
//! `mm_core::sched::point` is an immediate `Ready`, the mmap lock blocks
//! for real, time is real ([`mm_core::SystemClock`], delays scaled down
//! 100×), and a broken `sched::check` is caught by the process-global
//! fallback recorder (`mm_core::sched::record_unhooked`). A run that has
//! not finished after the wall-clock timeout is reported as a deadlock or
//! hang; its threads are leaked (never joined), at most [`MAX_HUNG`] in a
//! process. An actor that panics is a finding too. Cancellable actors are
//! killed (their future dropped on their thread) after a delay chosen by
//! the schedule bytes, at whatever wait they are in then.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mm_core::{BoxFuture, Clock, SystemClock};

use crate::exec::{Ending, Report, Sim};

/// How the actors of a run are executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The deterministic executor: the schedule bytes choose every step.
    Sim,
    /// One OS thread per actor, real time; unfinished after `timeout` =
    /// a deadlock/hang finding.
    Threads {
        /// Wall-clock limit of one run.
        timeout: Duration,
    },
}

impl Mode {
    /// Thread mode with the default timeout (2 s: a run normally takes
    /// well under 50 ms, delays being scaled down).
    pub fn threads() -> Mode {
        Mode::Threads {
            timeout: Duration::from_secs(2),
        }
    }
}

/// Threads left running by runs that hung, process-wide.
static HUNG: AtomicUsize = AtomicUsize::new(0);

/// At most this many hung threads are leaked per process; further thread
/// runs then report a hang at once instead of starting more.
pub const MAX_HUNG: usize = 64;

/// Thread runs are serialized: the fallback violation recorder is
/// process-global.
static SERIAL: Mutex<()> = Mutex::new(());

struct Spawned {
    name: String,
    cancellable: bool,
    fut: BoxFuture<'static, ()>,
}

enum Inner {
    Sim(Box<Sim>),
    Threads {
        timeout: Duration,
        schedule: Vec<u8>,
        actors: Vec<Spawned>,
    },
}

/// Builds and runs the actors of one run in a [`Mode`].
pub struct Runner {
    inner: Inner,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("threads", &self.is_threads())
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A run in `mode`; `schedule` drives the executor (Sim) or the kill
    /// delays of cancellable actors (threads).
    pub fn new(mode: &Mode, schedule: &[u8]) -> Runner {
        match mode {
            Mode::Sim => {
                let sim = Sim::new(schedule);
                let clock: Arc<dyn Clock> = Arc::new(sim.clock.clone());
                Runner {
                    inner: Inner::Sim(Box::new(sim)),
                    clock,
                }
            }
            Mode::Threads { timeout } => Runner {
                inner: Inner::Threads {
                    timeout: *timeout,
                    schedule: schedule.to_vec(),
                    actors: Vec::new(),
                },
                clock: Arc::new(SystemClock),
            },
        }
    }

    /// Whether the actors run on OS threads.
    pub fn is_threads(&self) -> bool {
        matches!(self.inner, Inner::Threads { .. })
    }

    /// The clock every sleep of the run must go through.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// A protocol delay as this mode runs it: unchanged in virtual time,
    /// 100× shorter in real time (a run must stay in the milliseconds).
    pub fn time(&self, d: Duration) -> Duration {
        match self.inner {
            Inner::Sim(_) => d,
            Inner::Threads { .. } => d / 100,
        }
    }

    /// Nth-failure injection (see [`Sim::fail_nth`]); thread mode has no
    /// hook and ignores it.
    pub fn fail_nth(&mut self, n: u32) {
        if let Inner::Sim(sim) = &mut self.inner {
            sim.fail_nth(n);
        }
    }

    /// Counts (and fails) only the sites `sites` accepts (see
    /// [`Sim::fail_sites`]); thread mode ignores it.
    pub fn fail_sites(&mut self, sites: fn(&str) -> bool) {
        if let Inner::Sim(sim) = &mut self.inner {
            sim.fail_sites(sites);
        }
    }

    /// The run's hook for the setup (Sim only; see [`Sim::install`]).
    pub fn install_for_setup(&self) -> Option<mm_core::sched::Installed> {
        match &self.inner {
            Inner::Sim(sim) => Some(sim.install()),
            Inner::Threads { .. } => None,
        }
    }

    /// Adds an actor.
    pub fn spawn(&mut self, name: &str, fut: impl Future<Output = ()> + Send + 'static) {
        self.spawn_inner(name, fut, false);
    }

    /// Adds an actor that may be killed (its future dropped) at any step
    /// (Sim: chosen by a schedule byte) or after a delay (threads).
    pub fn spawn_cancellable(
        &mut self,
        name: &str,
        fut: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn_inner(name, fut, true);
    }

    fn spawn_inner(
        &mut self,
        name: &str,
        fut: impl Future<Output = ()> + Send + 'static,
        cancellable: bool,
    ) {
        match &mut self.inner {
            Inner::Sim(sim) if cancellable => sim.spawn_cancellable(name, fut),
            Inner::Sim(sim) => sim.spawn(name, fut),
            Inner::Threads { actors, .. } => actors.push(Spawned {
                name: name.to_owned(),
                cancellable,
                fut: Box::pin(fut),
            }),
        }
    }

    /// Runs every actor (Sim: up to `max_steps` steps; threads: up to the
    /// timeout). Thread reports have no step trace.
    pub fn run(&mut self, max_steps: usize) -> Report {
        match &mut self.inner {
            Inner::Sim(sim) => sim.run(max_steps),
            Inner::Threads {
                timeout,
                schedule,
                actors,
            } => run_threads(std::mem::take(actors), schedule, *timeout),
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".to_owned())
}

fn run_threads(actors: Vec<Spawned>, schedule: &[u8], timeout: Duration) -> Report {
    let names: Vec<String> = actors.iter().map(|a| a.name.clone()).collect();
    let report = |ending, violations| Report {
        ending,
        trace: Vec::new(),
        violations,
        names: names.clone(),
        injected: None,
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if HUNG.load(Ordering::SeqCst) >= MAX_HUNG {
        return report(
            Ending::Deadlock(vec![(
                "harness".to_owned(),
                "too many hung threads from earlier runs",
            )]),
            Vec::new(),
        );
    }
    let recording = mm_core::sched::record_unhooked();
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    let n = actors.len();
    let mut done = vec![false; n];
    let mut violations = Vec::new();
    for (i, a) in actors.into_iter().enumerate() {
        // Kill a cancellable actor when its schedule byte says so (the same
        // ≥ 0xF8 rule as the executor), after 0..=2.55 ms given by the next.
        let kill = match (schedule.get(2 * i), schedule.get(2 * i + 1)) {
            (Some(&b), d) if a.cancellable && b >= 0xF8 => Some(Duration::from_micros(
                u64::from(d.copied().unwrap_or(0)) * 10,
            )),
            _ => None,
        };
        let tx = tx.clone();
        let fut = a.fut;
        let spawned = std::thread::Builder::new()
            .name(format!("race-{}", a.name))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    futures_lite::future::block_on(async move {
                        match kill {
                            // SIGKILL: the future is dropped at the wait it
                            // is in when the timer fires.
                            Some(d) => futures_lite::future::or(fut, SystemClock.sleep(d)).await,
                            None => fut.await,
                        }
                    })
                }));
                let _ = tx.send((i, r.err().map(|p| panic_message(&*p))));
            });
        if let Err(e) = spawned {
            done[i] = true;
            violations.push((format!("harness: spawning a thread failed: {e}"), 0));
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    while done.iter().any(|d| !d) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, panic)) => {
                done[i] = true;
                if let Some(msg) = panic {
                    violations.push((format!("panic in actor {}: {msg}", names[i]), 0));
                }
            }
            Err(_) => break,
        }
    }
    violations.extend(recording.take().into_iter().map(|v| (v.to_owned(), 0)));
    drop(recording);
    let stuck: Vec<(String, &'static str)> = (0..n)
        .filter(|&i| !done[i])
        .map(|i| {
            (
                names[i].clone(),
                "still running at the timeout (thread mode: deadlock or hang)",
            )
        })
        .collect();
    if stuck.is_empty() {
        report(Ending::Done, violations)
    } else {
        HUNG.fetch_add(stuck.len(), Ordering::SeqCst);
        report(Ending::Deadlock(stuck), violations)
    }
}
