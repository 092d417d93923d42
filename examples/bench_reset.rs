//! Putting a guest back to its snapshot between test cases (issue 17):
//! guestmm's [`reset`](guestmm::MmUser::reset) against the two usual
//! userspace answers, in the same run:
//!
//! - `guestmm`: a dirty-logged guest of `--mib` MiB, every page populated,
//!   snapshotted once; each test case writes `d` random pages directly
//!   (through the host pointer, as a vCPU or a thread of the program under
//!   test does), then `reset` copies back exactly those pages;
//! - `fork`: a process holding the same amount of populated memory (a
//!   separate worker process, so guestmm's own mappings do not inflate its
//!   page tables) forks per test case; the child writes the same number of
//!   pages and exits; the parent waits for it (`fork` + `waitpid`);
//! - `memcpy`: a full copy of the snapshot over the memory (two plain
//!   populated mappings of `--mib` MiB).
//!
//! Medians of `--iters` test cases per dirty count (`--memcpy-iters` for the
//! copy). After sampled resets the dirtied pages and random others are
//! compared with the snapshot byte for byte (`sampled_pages_ok`).
//!
//! ```sh
//! cargo run --release --example bench_reset -- [--mib 1024] [--iters 200] [--json]
//! ```

use std::process::Command;
use std::time::Instant;

use clap::Parser;
use guestmm::PAGE_SIZE;
use serde::{Deserialize, Serialize};

mod common;
use common::{median, round, AnonMap, Rng, MIB};

/// Reset to a snapshot (guestmm's dirty log) against fork() per test case
/// and a full memcpy, same run, medians.
#[derive(Debug, Parser)]
#[command(name = "bench_reset")]
struct Args {
    /// Guest memory in MiB (every page populated).
    #[arg(long, default_value_t = 1024, value_parser = common::at_least(4))]
    mib: u64,
    /// Test cases per dirty count (the median is reported).
    #[arg(long, default_value_t = 200, value_parser = common::at_least(1))]
    iters: u64,
    /// Full-copy rounds (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = common::at_least(1))]
    memcpy_iters: u64,
    /// Pages each test case writes (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![16u64, 256, 4096])]
    dirty: Vec<u64>,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
    /// Internal: run the fork() side in this process and print its JSON.
    #[arg(long, hide = true)]
    fork_worker: bool,
}

/// One dirty count's results.
#[derive(Debug, Serialize)]
struct Row {
    dirty_pages: u64,
    /// `reset` alone.
    guestmm_reset_us: f64,
    /// The test case's writes (async write-protect faults) plus `reset`.
    guestmm_case_us: f64,
    /// `fork` + the child's writes + `exit` + `waitpid`.
    fork_case_us: f64,
    /// fork_case / guestmm_reset.
    fork_over_reset: f64,
    /// fork_case / guestmm_case.
    fork_over_case: f64,
    /// memcpy / guestmm_reset.
    memcpy_over_reset: f64,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    mib: u64,
    iters: u64,
    snapshot_ms: f64,
    memcpy_us: f64,
    rows: Vec<Row>,
    sampled_pages: u64,
    sampled_pages_ok: bool,
}

/// The fork worker's answer: median µs per dirty count.
#[derive(Debug, Serialize, Deserialize)]
struct ForkReport {
    fork_case_us: Vec<f64>,
}

/// Writes one byte into each of `d` random pages of `ptr..ptr+len`.
///
/// # Safety
///
/// `ptr..ptr+len` is a live writable mapping nothing frees meanwhile.
unsafe fn dirty_pages(ptr: *mut u8, len: usize, d: u64, rng: &mut Rng) {
    let pages = (len / PAGE_SIZE) as u64;
    for _ in 0..d {
        let off = (rng.next() % pages) as usize * PAGE_SIZE + (rng.next() % 4096) as usize;
        // SAFETY: inside the caller's writable mapping.
        unsafe { ptr.add(off).write_volatile(rng.next() as u8) };
    }
}

fn fork_worker(args: &Args) -> ForkReport {
    let len = (args.mib * MIB) as usize;
    let mut mem = common::or_exit(AnonMap::new(len, 0), "mmap");
    for (i, p) in mem.as_mut_slice().chunks_exact_mut(PAGE_SIZE).enumerate() {
        common::fill_page(p, i as u64);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    for &d in &args.dirty {
        let mut t = Vec::new();
        for _ in 0..args.iters {
            let seed = rng.next() | 1;
            let t0 = Instant::now();
            // SAFETY: fork in a single-threaded process (this worker
            // starts no thread); the child only writes to its copy of
            // `mem` and calls _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let mut r = Rng(seed);
                // SAFETY: the child's private copy of the live mapping.
                unsafe {
                    dirty_pages(mem.ptr(), len, d, &mut r);
                    libc::_exit(0)
                }
            }
            if pid < 0 {
                eprintln!("fork: {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
            let mut st = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            t.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        out.push(median(t));
    }
    ForkReport { fork_case_us: out }
}

fn main() {
    let args: Args = common::init();
    if args.fork_worker {
        common::print_json(&fork_worker(&args));
        return;
    }
    let status = common::status_line(args.json);
    let len = (args.mib * MIB) as usize;

    // fork() per test case, in a worker holding only its own memory.
    status.set_message("fork() per test case (worker process)");
    let exe = common::or_exit(std::env::current_exe(), "current_exe");
    let dirty: Vec<String> = args.dirty.iter().map(u64::to_string).collect();
    let out = common::or_exit(
        Command::new(exe)
            .args(["--fork-worker", "--json", "--mib", &args.mib.to_string()])
            .args([
                "--iters",
                &args.iters.to_string(),
                "--dirty",
                &dirty.join(","),
            ])
            .output(),
        "fork worker",
    );
    if !out.status.success() {
        eprintln!(
            "fork worker failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::process::exit(1);
    }
    let fork: ForkReport =
        common::or_exit(serde_json::from_slice(&out.stdout), "fork worker output");

    // A full memcpy of the snapshot.
    status.set_message("full memcpy restore");
    let memcpy_us = {
        let mut src = common::or_exit(AnonMap::new(len, 0), "mmap");
        let mut dst = common::or_exit(AnonMap::new(len, 0), "mmap");
        for (i, p) in src.as_mut_slice().chunks_exact_mut(PAGE_SIZE).enumerate() {
            common::fill_page(p, i as u64);
        }
        dst.touch();
        let mut t = Vec::new();
        for _ in 0..args.memcpy_iters {
            let t0 = Instant::now();
            dst.as_mut_slice().copy_from_slice(src.as_mut_slice());
            t.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        median(t)
    };

    // guestmm.
    status.set_message("guestmm: populate and snapshot");
    let (_host, guest, mm, addr, ptr) =
        common::dirty_logged_guest(args.mib, |page, p| common::fill_page(page, p as u64));
    let t0 = Instant::now();
    let snap = common::or_exit(mm.snapshot_blocking(), "snapshot");
    let snapshot_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut rows = Vec::new();
    let (mut sampled, mut ok) = (0u64, true);
    for (k, &d) in args.dirty.iter().enumerate() {
        status.set_message(format!("guestmm: reset after {d} dirty pages"));
        let (mut reset_t, mut case_t) = (Vec::new(), Vec::new());
        for i in 0..args.iters {
            let seed = rng.next() | 1;
            let t0 = Instant::now();
            // SAFETY: the live tracked mapping; this thread is the guest,
            // paused (not writing) while reset runs below.
            unsafe { dirty_pages(ptr, len, d, &mut Rng(seed)) };
            let t1 = Instant::now();
            common::or_exit(mm.reset_blocking(&snap), "reset");
            let t2 = Instant::now();
            reset_t.push((t2 - t1).as_secs_f64() * 1e6);
            case_t.push((t2 - t0).as_secs_f64() * 1e6);
            if i % 16 == 0 {
                // The dirtied pages and as many random ones, byte for byte.
                let mut r = Rng(seed);
                let pages = (len / PAGE_SIZE) as u64;
                let mut check: Vec<u64> = (0..d)
                    .map(|_| {
                        let p = r.next() % pages;
                        r.next();
                        r.next();
                        p
                    })
                    .collect();
                check.extend((0..d.min(256)).map(|_| rng.next() % pages));
                for p in check {
                    // SAFETY: a populated page of the live mapping, read
                    // while nothing writes it.
                    let now = unsafe {
                        std::slice::from_raw_parts(ptr.add(p as usize * PAGE_SIZE), PAGE_SIZE)
                    };
                    sampled += 1;
                    ok &= Some(now) == snap.page(addr + p * PAGE_SIZE as u64);
                }
            }
        }
        let (reset, case) = (median(reset_t), median(case_t));
        rows.push(Row {
            dirty_pages: d,
            guestmm_reset_us: round(reset, 1),
            guestmm_case_us: round(case, 1),
            fork_case_us: round(fork.fork_case_us[k], 1),
            fork_over_reset: round(fork.fork_case_us[k] / reset, 2),
            fork_over_case: round(fork.fork_case_us[k] / case, 2),
            memcpy_over_reset: round(memcpy_us / reset, 1),
        });
    }
    status.finish_and_clear();
    drop(snap);
    drop(mm);
    guest.exit_blocking();

    let report = Report {
        mib: args.mib,
        iters: args.iters,
        snapshot_ms: round(snapshot_ms, 1),
        memcpy_us: round(memcpy_us, 1),
        rows,
        sampled_pages: sampled,
        sampled_pages_ok: ok,
    };
    if args.json {
        common::print_json(&report);
        return;
    }
    println!(
        "{} MiB guest, {} test cases per row (medians); snapshot {:.1} ms; full memcpy {:.0} µs",
        report.mib, report.iters, report.snapshot_ms, report.memcpy_us
    );
    println!(
        "{:>11} {:>12} {:>14} {:>12} {:>11} {:>11} {:>12}",
        "dirty pages",
        "reset µs",
        "case+reset µs",
        "fork µs",
        "fork/reset",
        "fork/case",
        "memcpy/reset"
    );
    for r in &report.rows {
        println!(
            "{:>11} {:>12.1} {:>14.1} {:>12.1} {:>10.1}× {:>10.1}× {:>11.1}×",
            r.dirty_pages,
            r.guestmm_reset_us,
            r.guestmm_case_us,
            r.fork_case_us,
            r.fork_over_reset,
            r.fork_over_case,
            r.memcpy_over_reset
        );
    }
    println!(
        "sampled {} pages after resets: {}",
        report.sampled_pages,
        if report.sampled_pages_ok {
            "all equal the snapshot"
        } else {
            "MISMATCH"
        }
    );
    if !report.sampled_pages_ok {
        std::process::exit(1);
    }
}
