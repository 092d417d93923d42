//! # misbehaving_victim: a victim that holds its mmap write lock forever
//!
//! An adversarial guest: one of its threads takes its own mmap lock for
//! writing and never lets go (a writer stuck in an allocation, a buggy
//! embedder). The OOM killer picks it; the reaper's `try_read` fails every
//! time; after `max_retries` attempts `retry_interval` apart the reaper gives
//! up and **sets `OOM_SKIP` anyway** (liveness over accuracy, as the kernel
//! does), so the OOM killer can choose the next victim instead of waiting
//! for ever.
//!
//! `--json` prints one line; the defaults are the kernel's (10 attempts,
//! 100 ms apart, reaper delay 0 here).
//!
//! DISCLAIMER: the stuck guest's memory is not freed until its lock holder
//! lets go (the demo releases it at the end); that is the price of the
//! reaper never blocking on a victim.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_lite::future::block_on;
use guestmm::reaper::{Reaper, ReaperConfig};
use guestmm::{procfs, Host, MapOptions, MmFlag, OomOutcome};
use serde::Serialize;

mod common;
use common::MIB;

/// A victim holding its mmap write lock: the reaper gives up and sets
/// OOM_SKIP, and the OOM killer picks the next victim.
#[derive(Debug, Parser)]
#[command(name = "misbehaving_victim")]
struct Args {
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    first: String,
    while_pending: String,
    reap_attempts: u64,
    gave_up: u64,
    gave_up_after_ms: f64,
    oom_skip_set: bool,
    next: String,
    process_rss_while_stuck_bytes: u64,
}

fn main() {
    let args: Args = common::init();
    let json = args.json;
    let host = Host::with_budget(1 << 30);
    let reaper = Reaper::new(ReaperConfig {
        delay: Duration::ZERO,
        ..ReaperConfig::default()
    });
    reaper.install(&host);
    let thread = common::or_exit(reaper.spawn(), "oom_reaper");

    let stuck = host.create_guest("stuck");
    let next = host.create_guest("next");
    for (g, mib) in [(&stuck, 256), (&next, 128)] {
        let mm = g.mm().expect("fresh guest");
        let a = mm.mmap_blocking(MapOptions::anon(mib * MIB)).expect("mmap");
        mm.fill_blocking(a, mib * MIB, 1).expect("fill");
    }

    // The misbehaving thread: holds the write lock until told to stop.
    let mm = stuck.mm().expect("alive");
    let release = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let holder = {
        let (mm, release) = (mm.clone(), release.clone());
        std::thread::spawn(move || {
            let _w = mm.lock().write_blocking();
            tx.send(()).expect("main waits");
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    rx.recv().expect("holder started");

    let t0 = Instant::now();
    let first = block_on(host.out_of_memory(None));
    let pending = block_on(host.out_of_memory(None));
    while reaper.stats().gave_up == 0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let gave_up_ms = t0.elapsed().as_secs_f64() * 1e3;
    let skip = mm.flags().test(MmFlag::OOM_SKIP);
    let rss_stuck = procfs::statm_rss().unwrap_or(0);
    let second = block_on(host.out_of_memory(None));
    let s = reaper.stats();

    release.store(true, Ordering::SeqCst);
    holder.join().expect("holder");
    drop(mm);
    stuck.exit_blocking();
    next.exit_blocking();
    thread.stop();

    let name = |o: OomOutcome| match o {
        OomOutcome::Killed { guest } if guest == stuck.id() => "killed stuck".to_owned(),
        OomOutcome::Killed { guest } if guest == next.id() => "killed next".to_owned(),
        other => format!("{other:?}"),
    };
    if json {
        common::print_json(&Report {
            first: name(first),
            while_pending: name(pending),
            reap_attempts: s.contended,
            gave_up: s.gave_up,
            gave_up_after_ms: common::round(gave_up_ms, 1),
            oom_skip_set: skip,
            next: name(second),
            process_rss_while_stuck_bytes: rss_stuck,
        });
    } else {
        println!("first OOM kill            {}", name(first));
        println!(
            "OOM while victim pending  {} (no second victim)",
            name(pending)
        );
        println!(
            "reaper attempts           {} try_read refused, gave up after {gave_up_ms:.0} ms",
            s.contended
        );
        println!("OOM_SKIP set anyway       {skip}");
        println!("next OOM kill             {}", name(second));
        println!(
            "process RSS while stuck   {} MiB (the stuck victim's memory is not freed)",
            rss_stuck / MIB
        );
    }
}
