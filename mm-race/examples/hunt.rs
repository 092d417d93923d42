//! Random inputs against one target until a finding or a time limit: the
//! "random schedules" baseline of `fuzz/time-to-bug.sh`, and a quick way to
//! check a history patch.
//!
//! `cargo run --release -p mm-race --example hunt -- TARGET SECONDS SEED [SAVE_AS] [--swarm]`
//! (with SAVE_AS, the input of a finding is written there: how the seed
//! corpus of classic interleavings was made, on the history patches; with
//! `--swarm`, each run first draws a random subset of the target's actors
//! and features to turn off, see `mm_race::swarm`, and the saved input
//! carries it in a header, so it replays through plain `mm_race::run`)
//! prints one line: `found=1 after_s=X runs=N` (plus the finding on stderr)
//! or `found=0 after_s=SECONDS runs=N`.

use std::time::Instant;

use mm_race::cli::{random_bytes, xorshift, HuntArgs};
use mm_race::run;

fn main() {
    let args = HuntArgs::from_env("hunt TARGET SECONDS SEED [SAVE_AS] [--swarm]");
    let mut x = args.state;
    let t0 = Instant::now();
    let mut runs = 0u64;
    while t0.elapsed().as_secs_f64() < args.secs {
        // Lengths from 0: a short input runs the default schedule after a
        // mostly-default setup, which found a deadlock that longer random
        // inputs never did. The state steps once per input here too: an
        // empty input draws no byte, and would otherwise repeat for ever.
        let len = (xorshift(&mut x) % 432) as usize;
        let body = random_bytes(&mut x, len);
        let data = args.input(&mut x, body);
        runs += 1;
        if let Some(f) = run(args.target, &data) {
            eprintln!("{f}");
            if let Some(path) = args.rest.first() {
                if let Err(e) = std::fs::write(path, &data) {
                    eprintln!("hunt: writing {path}: {e}");
                }
            }
            println!(
                "found=1 after_s={:.3} runs={runs}",
                t0.elapsed().as_secs_f64()
            );
            return;
        }
    }
    println!("found=0 after_s={:.3} runs={runs}", args.secs);
}
