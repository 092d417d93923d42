//! Replays one input file against one target and prints the finding (or
//! `no finding`): how a saved `hunt` or libFuzzer artifact is looked at
//! without cargo-fuzz.
//!
//! `cargo run --release -p mm-race --example replay -- TARGET FILE`
//! (exit status 1 when the input finds something).

use mm_race::{run, Target};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args
        .get(1)
        .and_then(|n| Target::ALL.into_iter().find(|t| t.name() == n));
    let (Some(target), Some(path)) = (target, args.get(2)) else {
        eprintln!(
            "usage: replay TARGET FILE (targets: {:?})",
            Target::ALL.map(Target::name)
        );
        std::process::exit(2)
    };
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("replay: reading {path}: {e}");
            std::process::exit(2)
        }
    };
    match run(target, &data) {
        Some(f) => {
            println!("{f}");
            std::process::exit(1)
        }
        None => println!("no finding"),
    }
}
