//! A single-threaded executor whose choices come from the input.
//!
//! Every actor is a future. A yield point (`mm_core::sched::point`) wakes
//! its own actor and returns `Pending`, so after every protocol step the
//! executor picks, from the next schedule byte, which *runnable* actor to
//! poll. An actor waiting for the mmap lock is not runnable until the lock's
//! waker fires. No runnable actor while some are unfinished and no virtual
//! timer is pending is a deadlock, reported with each actor's last step.
//! The same input replays the same interleaving: nothing here depends on
//! real time or on OS scheduling.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::clock::VirtualClock;

struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type Actor = Pin<Box<dyn Future<Output = ()>>>;

/// One recorded step: which actor, which named point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Actor index.
    pub actor: usize,
    /// Point name.
    pub name: &'static str,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Every actor finished.
    Done,
    /// No actor could run: each actor's last step.
    Deadlock(Vec<(String, &'static str)>),
    /// The step limit was hit.
    StepLimit,
}

#[derive(Default)]
struct Shared {
    current: Option<usize>,
    trace: Vec<Step>,
    violations: Vec<(String, usize)>,
    last: Vec<&'static str>,
    /// Nth-failure injection: fail the `fail_nth`-th `sched::fail` call
    /// (1-based; 0 = never).
    fail_nth: u32,
    fail_calls: u32,
    /// Only the sites this accepts count and may fail (`None`: every
    /// site), so that a target can aim its N at one protocol path.
    fail_sites: Option<fn(&str) -> bool>,
    injected: Option<&'static str>,
}

thread_local! {
    /// Failures injected on this thread so far (every run): an actor reads
    /// it before and after an operation to tell an injected failure from a
    /// real one in the poll where the operation returned.
    static INJECTIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Failures injected on this thread so far, by every [`Sim`] run on it.
pub fn injections() -> u64 {
    INJECTIONS.with(|c| c.get())
}

struct Hook(Rc<RefCell<Shared>>);

impl mm_core::sched::Hook for Hook {
    fn step(&self, name: &'static str) -> bool {
        let mut s = self.0.borrow_mut();
        if let Some(a) = s.current {
            s.trace.push(Step { actor: a, name });
            s.last[a] = name;
            true
        } else {
            // Outside any actor (setup, oracles): never yield.
            false
        }
    }
    fn violation(&self, what: &'static str) {
        let mut s = self.0.borrow_mut();
        // Shown as a step of the actor that broke it.
        if let Some(a) = s.current {
            s.trace.push(Step {
                actor: a,
                name: "!! INVARIANT BROKEN",
            });
        }
        let at = s.trace.len();
        s.violations.push((what.to_owned(), at));
    }
    fn fail(&self, name: &'static str) -> bool {
        let mut s = self.0.borrow_mut();
        if s.fail_sites.is_some_and(|f| !f(name)) {
            return false;
        }
        s.fail_calls = s.fail_calls.saturating_add(1);
        if s.fail_nth == 0 || s.fail_calls != s.fail_nth {
            return false;
        }
        s.injected = Some(name);
        INJECTIONS.with(|c| c.set(c.get() + 1));
        // Shown as a step of the actor that got the failure (none during
        // the setup, which runs outside the actors).
        if let Some(a) = s.current {
            s.trace.push(Step {
                actor: a,
                name: "!! INJECTED FAILURE",
            });
            s.trace.push(Step { actor: a, name });
        }
        true
    }
}

/// The executor of one run.
pub struct Sim {
    names: Vec<String>,
    actors: Vec<Option<Actor>>,
    /// Actor may be cancelled (SIGKILL) at a step chosen by the input.
    cancellable: Vec<bool>,
    flags: Vec<Arc<Flag>>,
    shared: Rc<RefCell<Shared>>,
    schedule: Vec<u8>,
    pos: usize,
    /// The virtual clock sleeps go through.
    pub clock: VirtualClock,
    /// Actors cancelled, by name.
    pub cancelled: Vec<String>,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim").field("actors", &self.names).finish()
    }
}

/// The result of [`Sim::run`].
#[derive(Debug, Clone)]
pub struct Report {
    /// How it ended.
    pub ending: Ending,
    /// Every step, in order.
    pub trace: Vec<Step>,
    /// Invariants broken during the run (what, index in the trace).
    pub violations: Vec<(String, usize)>,
    /// Actor names.
    pub names: Vec<String>,
    /// The fallible site whose call failed by injection, if any.
    pub injected: Option<&'static str>,
}

impl Sim {
    /// A run driven by `schedule` (one byte per choice; exhausted = always
    /// the first runnable actor).
    pub fn new(schedule: &[u8]) -> Sim {
        Sim {
            names: Vec::new(),
            actors: Vec::new(),
            cancellable: Vec::new(),
            flags: Vec::new(),
            shared: Rc::new(RefCell::new(Shared::default())),
            schedule: schedule.to_vec(),
            pos: 0,
            clock: VirtualClock::new(),
            cancelled: Vec::new(),
        }
    }

    /// Nth-failure injection: the `n`-th call of `sched::fail` while this
    /// run's hook is installed (setup under [`Sim::install`] included) fails;
    /// 0 = none.
    pub fn fail_nth(&mut self, n: u32) {
        self.shared.borrow_mut().fail_nth = n;
    }

    /// Counts (and fails) only the `sched::fail` sites `sites` accepts.
    pub fn fail_sites(&mut self, sites: fn(&str) -> bool) {
        self.shared.borrow_mut().fail_sites = Some(sites);
    }

    /// Installs this run's hook outside [`Sim::run`] (for the setup): no
    /// step yields or is traced there, but failure injection counts and
    /// violations are recorded.
    pub fn install(&self) -> mm_core::sched::Installed {
        mm_core::sched::install(Rc::new(Hook(self.shared.clone())))
    }

    /// Adds an actor.
    pub fn spawn(&mut self, name: &str, fut: impl Future<Output = ()> + 'static) {
        self.spawn_inner(name, Box::pin(fut), false);
    }

    /// Adds an actor the input may cancel at any of its steps (dropping its
    /// future: every guard it holds is released, as a killed task's would).
    pub fn spawn_cancellable(&mut self, name: &str, fut: impl Future<Output = ()> + 'static) {
        self.spawn_inner(name, Box::pin(fut), true);
    }

    fn spawn_inner(&mut self, name: &str, fut: Actor, cancellable: bool) {
        self.names.push(name.to_owned());
        self.actors.push(Some(fut));
        self.cancellable.push(cancellable);
        self.flags.push(Arc::new(Flag(AtomicBool::new(true))));
        self.shared.borrow_mut().last.push("start");
    }

    fn next_byte(&mut self) -> u8 {
        let b = self.schedule.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// Runs every actor to completion (or deadlock / `max_steps`).
    pub fn run(&mut self, max_steps: usize) -> Report {
        let _hook = mm_core::sched::install(Rc::new(Hook(self.shared.clone())));
        let mut steps = 0;
        let ending = loop {
            let runnable: Vec<usize> = (0..self.actors.len())
                .filter(|&i| self.actors[i].is_some() && self.flags[i].0.load(Ordering::SeqCst))
                .collect();
            if runnable.is_empty() {
                if self.actors.iter().all(Option::is_none) {
                    break Ending::Done;
                }
                if self.clock.advance() {
                    continue;
                }
                let s = self.shared.borrow();
                break Ending::Deadlock(
                    (0..self.actors.len())
                        .filter(|&i| self.actors[i].is_some())
                        .map(|i| (self.names[i].clone(), s.last[i]))
                        .collect(),
                );
            }
            steps += 1;
            if steps > max_steps {
                break Ending::StepLimit;
            }
            let b = self.next_byte();
            let pick = runnable[usize::from(b) % runnable.len()];
            // A byte with the top bits 0b111 cancels a cancellable actor
            // instead of polling it (kill_anywhere).
            if self.cancellable[pick] && b >= 0xF8 {
                self.actors[pick] = None;
                self.cancelled.push(self.names[pick].clone());
                continue;
            }
            self.flags[pick].0.store(false, Ordering::SeqCst);
            let waker = Waker::from(self.flags[pick].clone());
            let mut cx = Context::from_waker(&waker);
            self.shared.borrow_mut().current = Some(pick);
            let fut = self.actors[pick].as_mut().expect("runnable actors exist");
            let done = matches!(fut.as_mut().poll(&mut cx), Poll::Ready(()));
            self.shared.borrow_mut().current = None;
            if done {
                self.actors[pick] = None;
            }
        };
        // Unfinished actors (deadlock, step limit) are leaked, not dropped:
        // dropping a half-run teardown would abandon it and report a second,
        // derived finding instead of this one.
        for a in &mut self.actors {
            if let Some(f) = a.take() {
                std::mem::forget(f);
            }
        }
        let s = self.shared.borrow();
        Report {
            ending,
            trace: s.trace.clone(),
            violations: s.violations.clone(),
            names: self.names.clone(),
            injected: s.injected,
        }
    }
}

impl Report {
    /// The schedule as an N-column trace of protocol steps (one column per
    /// actor, one row per step), the last `rows` rows.
    pub fn trace_table(&self, rows: usize) -> String {
        let w = 34;
        let mut out = String::new();
        for n in &self.names {
            out.push_str(&format!("{n:<w$}| "));
        }
        out.push('\n');
        out.push_str(&"-".repeat((w + 2) * self.names.len()));
        out.push('\n');
        let start = self.trace.len().saturating_sub(rows);
        let mut prev: Option<Step> = None;
        for (i, st) in self.trace.iter().enumerate().skip(start) {
            if prev == Some(*st) {
                continue;
            }
            prev = Some(*st);
            for a in 0..self.names.len() {
                let cell = if a == st.actor { st.name } else { "" };
                out.push_str(&format!("{cell:<w$}| "));
            }
            if let Some((v, _)) = self.violations.iter().find(|(_, at)| *at == i + 1) {
                out.push_str(&format!(" {v}"));
            }
            out.push('\n');
        }
        out
    }
}
