//! The OS-threads baseline of `fuzz/time-to-bug.sh`: random setups (the
//! same generator as `hunt`), each run with the same actors on plain OS
//! threads (no yield hook, real time, the real blocking mmap lock) until a
//! finding or a time limit.
//!
//! `cargo run --release -p mm-race --example threads -- TARGET SECONDS SEED [TIMEOUT_MS] [--swarm]`
//! prints one line: `found=1 after_s=X runs=N invariant=...` (plus the
//! finding on stderr) or `found=0 after_s=SECONDS runs=N invariant=-`.
//! A run still unfinished after TIMEOUT_MS (default 2000) is a
//! deadlock/hang finding.

use std::time::{Duration, Instant};

use mm_race::cli::{random_bytes, HuntArgs};
use mm_race::{run_mode, Mode};

fn main() {
    let args = HuntArgs::from_env("threads TARGET SECONDS SEED [TIMEOUT_MS] [--swarm]");
    let mut x = args.state;
    let timeout_ms: u64 = args
        .rest
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mode = Mode::Threads {
        timeout: Duration::from_millis(timeout_ms),
    };
    let t0 = Instant::now();
    let mut runs = 0u64;
    while t0.elapsed().as_secs_f64() < args.secs {
        let len = 32 + (x % 400) as usize;
        let body = random_bytes(&mut x, len);
        let data = args.input(&mut x, body);
        runs += 1;
        if let Some(f) = run_mode(args.target, &data, &mode) {
            eprintln!("{f}");
            let what = f.invariant.replace(char::is_whitespace, "_");
            println!(
                "found=1 after_s={:.3} runs={runs} invariant={what}",
                t0.elapsed().as_secs_f64()
            );
            return;
        }
    }
    println!("found=0 after_s={:.3} runs={runs} invariant=-", args.secs);
}
