//! # mm-race: races on demand
//!
//! Every protocol path of guestmm is an `async fn` over the async mmap lock,
//! and every lock step and protocol step is a named yield point
//! (`mm_core::sched::point`, live with mm-core's `sched` feature). This crate
//! runs the actors of a race (teardown, the OOM killer, the reaper,
//! process_mrelease, a vCPU's faults, ...) as futures on a single-threaded
//! executor ([`exec::Sim`]) and lets the input choose, at every yield point,
//! which runnable actor goes next. Time is virtual ([`clock::VirtualClock`]).
//! After each run the oracles of PROTOCOL.md §12 are checked
//! ([`scenario::run`]); a finding names the broken invariant and prints the
//! schedule as an N-column trace.
//!
//! [`mode::Mode::Threads`] runs the same setup and actors each on its own
//! OS thread instead (no hook, real time), the baseline the executor is
//! measured against.
//!
//! [`swarm`]: an input may start with a header that turns some actors and
//! features off for that run (swarm testing, `hunt --swarm`); the input
//! replays through [`run`] like any other.
//!
//! The same input always replays the same interleaving, so the fuzz targets
//! in `fuzz/` are thin wrappers, and `cargo test` replays the committed
//! corpus and bounded random schedules on stable.

pub mod cli;
pub mod clock;
pub mod exec;
pub mod ksm_scenario;
pub mod mode;
pub mod scenario;
pub mod swarm;
pub mod touch_scenario;

pub use mode::Mode;
pub use scenario::{failures_injected, kills_made, run, run_mode, steps_executed, Finding, Target};
pub use swarm::Swarm;
