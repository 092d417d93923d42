//! The fuzzers' half of mutation testing (issue 16 §3): random inputs from
//! nothing, on a fixed time budget, as `fuzz/mutants.sh --fuzz SECS` runs
//! them on every mutant. Ignored by a plain `cargo test` (it is a budget,
//! not a check of the tree; the bounded random schedules of `replay.rs`
//! are that). Run it with
//!
//! ```text
//! MM_RACE_HUNT_SECS=60 MM_RACE_HUNT_TARGETS=teardown_vs_ksm,ksm_vs_reaper \
//!   cargo test -p mm-race --test hunt -- --ignored
//! ```
//!
//! `MM_RACE_HUNT_SECS` (default 60) is the whole budget, spread over the
//! targets of `MM_RACE_HUNT_TARGETS` (comma-separated names; default every
//! target) in round-robin slices of a quarter second, plain and swarm
//! inputs in turn (the `hunt` example's generator, seed 1). The first
//! finding fails the test with the input (hex) and the trace.

use std::time::{Duration, Instant};

use mm_race::cli::{random_bytes, xorshift};
use mm_race::{run, swarm, Swarm, Target};

fn targets() -> Vec<Target> {
    let Ok(names) = std::env::var("MM_RACE_HUNT_TARGETS") else {
        return Target::ALL.to_vec();
    };
    names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            Target::ALL
                .into_iter()
                .find(|t| t.name() == n)
                .unwrap_or_else(|| {
                    panic!(
                        "MM_RACE_HUNT_TARGETS: no target {n:?} (targets: {:?})",
                        Target::ALL.map(Target::name)
                    )
                })
        })
        .collect()
}

#[test]
#[ignore = "a fuzzing budget for fuzz/mutants.sh --fuzz; run with --ignored"]
fn hunt_from_nothing() {
    let secs: f64 = std::env::var("MM_RACE_HUNT_SECS")
        .ok()
        .map(|s| s.parse().expect("MM_RACE_HUNT_SECS: a number of seconds"))
        .unwrap_or(60.0);
    let targets = targets();
    let budget = Duration::from_secs_f64(secs);
    let slice = Duration::from_millis(250);
    let t0 = Instant::now();
    let mut x: u64 = 1;
    let mut runs = 0u64;
    let mut round = 0usize;
    while t0.elapsed() < budget {
        for (i, &t) in targets.iter().enumerate() {
            // Plain and swarm in turn, for each target across rounds.
            let with_swarm = (round + i) % 2 == 1;
            let s0 = Instant::now();
            while s0.elapsed() < slice && t0.elapsed() < budget {
                // As the `hunt` example: lengths from 0 (a short input runs
                // the default schedule), the state stepped once per input.
                let len = (xorshift(&mut x) % 432) as usize;
                let body = random_bytes(&mut x, len);
                let data = if with_swarm {
                    swarm::encode(Swarm::draw(&mut x), &body)
                } else {
                    body
                };
                runs += 1;
                if let Some(f) = run(t, &data) {
                    // Hex (`xxd -r -p` writes it back to a file).
                    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
                    panic!(
                        "{} after {:.3} s ({runs} runs), input (hex) {hex}:\n{f}",
                        t.name(),
                        t0.elapsed().as_secs_f64(),
                    );
                }
            }
        }
        round += 1;
    }
    eprintln!("hunt_from_nothing: nothing found in {secs} s, {runs} runs");
}
