//! The OS-threads baseline of `fuzz/time-to-bug.sh`: random setups (the
//! same generator as `hunt`), each run with the same actors on plain OS
//! threads (no yield hook, real time, the real blocking mmap lock) until a
//! finding or a time limit.
//!
//! `cargo run --release -p mm-race --example threads -- TARGET SECONDS SEED [TIMEOUT_MS]`
//! prints one line: `found=1 after_s=X runs=N invariant=...` (plus the
//! finding on stderr) or `found=0 after_s=SECONDS runs=N invariant=-`.
//! A run still unfinished after TIMEOUT_MS (default 2000) is a
//! deadlock/hang finding.

use std::time::{Duration, Instant};

use mm_race::{run_mode, Mode, Target};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args
        .get(1)
        .and_then(|n| Target::ALL.into_iter().find(|t| t.name() == n))
        .unwrap_or_else(|| {
            eprintln!(
                "usage: threads TARGET SECONDS SEED [TIMEOUT_MS] (targets: {:?})",
                Target::ALL.map(Target::name)
            );
            std::process::exit(2)
        });
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let mut x: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1) | 1;
    let timeout_ms: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let mode = Mode::Threads {
        timeout: Duration::from_millis(timeout_ms),
    };
    let t0 = Instant::now();
    let mut runs = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        let len = 32 + (x % 400) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        runs += 1;
        if let Some(f) = run_mode(target, &data, &mode) {
            eprintln!("{f}");
            let what = f.invariant.replace(char::is_whitespace, "_");
            println!(
                "found=1 after_s={:.3} runs={runs} invariant={what}",
                t0.elapsed().as_secs_f64()
            );
            return;
        }
    }
    println!("found=0 after_s={secs:.3} runs={runs} invariant=-");
}
