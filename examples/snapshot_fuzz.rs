//! Snapshot fuzzing on guestmm (issue 17): a small guest program with a
//! planted bug, fuzzed from an empty corpus, its memory put back to a
//! snapshot between test cases by [`reset`](guestmm::MmUser::reset); the
//! same fuzzer with `fork()` per test case beside it.
//!
//! The guest program runs on a thread that touches a tracked,
//! dirty-logged guest region directly (through the host pointer, as a vCPU
//! or JIT code would). Its state lives in guest memory: page 0 holds how
//! far it got through a magic word (`GUESTMM!`), and every input byte
//! appends a trace record to a page the byte picks (a few pages written
//! per input). When the whole word has gone by, the program "crashes":
//! the planted bug. Without a reset the state of one input would leak
//! into the next (the crash would come on an input that cannot reproduce
//! it); with the reset every input starts from the snapshot.
//!
//! The fuzzer is a plain loop: coverage is how far through the word an
//! input got; an input that goes further joins the corpus; mutations
//! insert, replace or append random bytes. Both modes run the same inputs
//! (same seed), so they find the bug at the same execution; what differs
//! is the executions per second.
//!
//! ```sh
//! cargo run --release --example snapshot_fuzz -- [--mib 64] [--seed 1] [--json]
//! ```

use std::time::Instant;

use clap::{Parser, ValueEnum};
use guestmm::PAGE_SIZE;
use serde::Serialize;

mod common;
use common::{round, AnonMap, Rng, MIB};

/// The planted bug: the program crashes once this word went by.
const MAGIC: &[u8] = b"GUESTMM!";
/// Longest input the mutator makes.
const MAX_LEN: usize = 64;

/// Fuzz a guest program with a planted bug from an empty corpus, resetting
/// its memory to a snapshot between inputs (and with fork() per input).
#[derive(Debug, Parser)]
#[command(name = "snapshot_fuzz")]
struct Args {
    /// Guest memory in MiB (every page populated before the snapshot).
    #[arg(long, default_value_t = 64, value_parser = common::at_least(1))]
    mib: u64,
    /// Seed of the fuzzer's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up after this many executions.
    #[arg(long, default_value_t = 1_000_000, value_parser = common::at_least(1))]
    max_execs: u64,
    /// Which executors to run.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Both,
    Reset,
    Fork,
}

/// One executor's campaign.
#[derive(Debug, Serialize)]
struct Campaign {
    executor: &'static str,
    found: bool,
    execs: u64,
    secs: f64,
    execs_per_sec: f64,
    /// The crashing input, escaped ASCII.
    crash_input: Option<String>,
    corpus: usize,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    mib: u64,
    seed: u64,
    campaigns: Vec<Campaign>,
    /// reset execs/s over fork execs/s (both modes run).
    speedup: Option<f64>,
}

/// How one execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Got this far through the magic word.
    Ok(u32),
    /// The planted bug.
    Crash,
}

/// The guest program, on the guest memory `mem..mem+len` (page 0: state).
///
/// # Safety
///
/// `mem..mem+len` is a live writable mapping only this thread touches
/// during the call.
unsafe fn program(mem: *mut u8, len: usize, input: &[u8]) -> Outcome {
    let pages = len / PAGE_SIZE;
    let stage = mem.cast::<u32>();
    for (i, &b) in input.iter().enumerate() {
        // A trace record on a page the byte picks.
        let p = 1 + (b as usize * 131 + i * 7) % (pages - 1);
        let rec = (p * PAGE_SIZE + (i * 8) % PAGE_SIZE) as isize;
        // SAFETY: inside the caller's mapping (p < pages, 8-byte aligned).
        unsafe {
            let at = mem.offset(rec).cast::<u64>();
            at.write_volatile(at.read_volatile().wrapping_add(u64::from(b) << 8 | 1));
            let s = stage.read_volatile();
            if (s as usize) < MAGIC.len() && b == MAGIC[s as usize] {
                stage.write_volatile(s + 1);
                if s as usize + 1 == MAGIC.len() {
                    return Outcome::Crash;
                }
            }
        }
    }
    // SAFETY: page 0 of the caller's mapping.
    Outcome::Ok(unsafe { stage.read_volatile() })
}

/// A corpus entry (or nothing) with one to four mutations.
fn mutate(corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut v = if corpus.is_empty() {
        Vec::new()
    } else {
        corpus[rng.below(corpus.len())].clone()
    };
    for _ in 0..1 + rng.below(4) {
        let b = rng.next() as u8;
        match rng.below(3) {
            0 if v.len() < MAX_LEN => {
                let at = rng.below(v.len() + 1);
                v.insert(at, b);
            }
            1 if !v.is_empty() => {
                let at = rng.below(v.len());
                v[at] = b;
            }
            _ if v.len() < MAX_LEN => v.push(b),
            _ => {}
        }
    }
    v
}

/// Runs the fuzz loop with `exec` as the executor.
fn campaign(
    executor: &'static str,
    args: &Args,
    status: &indicatif::ProgressBar,
    mut exec: impl FnMut(&[u8]) -> Outcome,
) -> Campaign {
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut best = 0u32;
    let t0 = Instant::now();
    let mut crash = None;
    let mut execs = 0;
    while execs < args.max_execs {
        let input = mutate(&corpus, &mut rng);
        execs += 1;
        match exec(&input) {
            Outcome::Crash => {
                crash = Some(input);
                break;
            }
            Outcome::Ok(stage) if stage > best => {
                best = stage;
                corpus.push(input);
                status.set_message(format!(
                    "{executor}: {execs} execs, {best}/{} of the word",
                    MAGIC.len()
                ));
            }
            Outcome::Ok(_) => {}
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Campaign {
        executor,
        found: crash.is_some(),
        execs,
        secs: round(secs, 3),
        execs_per_sec: round(execs as f64 / secs, 0),
        crash_input: crash.map(|c| c.escape_ascii().to_string()),
        corpus: corpus.len(),
    }
}

/// The guest memory before any input: a deterministic pattern, page 0
/// (the state) zero.
fn initial_page(page: &mut [u8], p: usize) {
    if p == 0 {
        page.fill(0);
    } else {
        common::fill_page(page, p as u64);
    }
}

/// `fork()` per input: the child runs the program on its copy of the
/// memory and exits with the outcome as its status.
fn fork_campaign(args: &Args, status: &indicatif::ProgressBar) -> Campaign {
    let len = (args.mib * MIB) as usize;
    let mut mem = common::or_exit(AnonMap::new(len, 0), "mmap");
    for (p, page) in mem.as_mut_slice().chunks_exact_mut(PAGE_SIZE).enumerate() {
        initial_page(page, p);
    }
    let ptr = mem.ptr();
    campaign("fork", args, status, |input| {
        // SAFETY: the child only runs `program` on its private copy of the
        // mapping (plain loads and stores) and calls _exit: nothing that
        // needs a lock another thread of the parent might have held.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: the child's copy of the live mapping; _exit ends it.
            unsafe {
                let code = match program(ptr, len, input) {
                    Outcome::Crash => 100,
                    Outcome::Ok(s) => s as i32,
                };
                libc::_exit(code)
            }
        }
        if pid < 0 {
            eprintln!("fork: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        let mut st = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        match libc::WEXITSTATUS(st) {
            100 => Outcome::Crash,
            s => Outcome::Ok(s as u32),
        }
    })
}

/// guestmm: the program on a dirty-logged tracked region, reset to the
/// snapshot after every input.
fn reset_campaign(args: &Args, status: &indicatif::ProgressBar) -> Campaign {
    let len = (args.mib * MIB) as usize;
    let (_host, guest, mm, _addr, ptr) = common::dirty_logged_guest(args.mib, initial_page);
    let snap = common::or_exit(mm.snapshot_blocking(), "snapshot");
    let c = campaign("guestmm reset", args, status, |input| {
        // SAFETY: the live tracked mapping; this thread is the guest and
        // is not running while `reset` puts the memory back.
        let out = unsafe { program(ptr, len, input) };
        common::or_exit(mm.reset_blocking(&snap), "reset");
        out
    });
    drop(snap);
    drop(mm);
    guest.exit_blocking();
    c
}

fn main() {
    let args: Args = common::init();
    let status = common::status_line(args.json);
    let mut campaigns = Vec::new();
    // fork first, while the process holds no guestmm memory (its page
    // tables would be copied by every fork).
    if args.mode != Mode::Reset {
        campaigns.push(fork_campaign(&args, &status));
    }
    if args.mode != Mode::Fork {
        campaigns.push(reset_campaign(&args, &status));
    }
    status.finish_and_clear();
    let speedup = (campaigns.len() == 2)
        .then(|| round(campaigns[1].execs_per_sec / campaigns[0].execs_per_sec, 1));
    let report = Report {
        mib: args.mib,
        seed: args.seed,
        campaigns,
        speedup,
    };
    let found = report.campaigns.iter().all(|c| c.found);
    if args.json {
        common::print_json(&report);
    } else {
        println!(
            "guest program with a planted bug, {} MiB of guest memory, empty corpus, seed {}",
            report.mib, report.seed
        );
        println!(
            "{:>14} {:>6} {:>8} {:>8} {:>10}  crash input",
            "executor", "found", "execs", "secs", "execs/s"
        );
        for c in &report.campaigns {
            println!(
                "{:>14} {:>6} {:>8} {:>8.2} {:>10.0}  {}",
                c.executor,
                c.found,
                c.execs,
                c.secs,
                c.execs_per_sec,
                c.crash_input.as_deref().unwrap_or("-")
            );
        }
        if let Some(s) = report.speedup {
            println!("reset vs fork(): {s}x the executions per second");
        }
    }
    if !found {
        std::process::exit(2);
    }
}
