//! Does `mmap` stay cheap as a guest's regions pile up? A WASM runtime or a
//! VMM with many small regions maps thousands of them in one address space.
//! Each `mmap` without an address looks for the lowest free gap; a walk
//! over every VMA from the floor made each call O(n) (100,000 small mmaps
//! took 8 s). This maps `--high` one-page regions and times windows of
//! `--window` mmaps when about `--low` and about `--high` regions exist;
//! the median over the windows of each is reported, and `ratio` =
//! high / low (goal < 2: O(log n)).
//!
//! ```sh
//! cargo run --release --example bench_mmap_scale -- [--low 1000] [--high 60000] [--window 500] [--json]
//! ```
//!
//! `--high` stays below `vm.max_map_count` (65,530 here): every region is
//! its own host mapping.

use std::time::Instant;

use clap::Parser;
use guestmm::{Host, MapOptions, PAGE_SIZE};
use serde::Serialize;

mod common;
use common::{median, round};

/// Time per `mmap` at a low and a high number of regions in one guest.
#[derive(Debug, Parser)]
#[command(name = "bench_mmap_scale")]
struct Args {
    /// Regions mapped when the low measurement starts.
    #[arg(long, default_value_t = 1000, value_parser = common::at_least(1))]
    low: u64,
    /// Regions mapped when the high measurement starts (below
    /// vm.max_map_count).
    #[arg(long, default_value_t = 60_000, value_parser = common::at_least(2))]
    high: u64,
    /// mmaps per timed window (five windows at each level).
    #[arg(long, default_value_t = 500, value_parser = common::at_least(1))]
    window: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    regions_low: u64,
    us_per_mmap_low: f64,
    regions_high: u64,
    us_per_mmap_high: f64,
    ratio: f64,
}

const WINDOWS: u64 = 5;

fn main() {
    let args: Args = common::init();
    if args.high <= args.low + WINDOWS * args.window {
        eprintln!(
            "bench_mmap_scale: --high must exceed --low + 5 x --window ({})",
            args.low + WINDOWS * args.window
        );
        std::process::exit(2);
    }
    let host = Host::with_budget(1 << 30);
    let mm = host.new_mm("regions");
    let page = PAGE_SIZE as u64;
    let map = |n: u64| {
        for _ in 0..n {
            common::or_exit(mm.mmap_blocking(MapOptions::anon(page)), "mmap");
        }
    };
    // Map up to `level` regions, then time WINDOWS windows of mmaps.
    let mut mapped = 0;
    let mut at_level = |level: u64| {
        map(level - mapped);
        let mut us = Vec::new();
        for _ in 0..WINDOWS {
            let t = Instant::now();
            map(args.window);
            us.push(t.elapsed().as_secs_f64() * 1e6 / args.window as f64);
        }
        mapped = level + WINDOWS * args.window;
        median(us)
    };
    let low = at_level(args.low);
    let high = at_level(args.high);
    let report = Report {
        regions_low: args.low,
        us_per_mmap_low: round(low, 2),
        regions_high: args.high,
        us_per_mmap_high: round(high, 2),
        ratio: round(high / low, 3),
    };
    if args.json {
        common::print_json(&report);
    } else {
        println!(
            "mmap at {} regions: {:.2} µs; at {} regions: {:.2} µs; ratio {:.3} (goal < 2)",
            report.regions_low,
            report.us_per_mmap_low,
            report.regions_high,
            report.us_per_mmap_high,
            report.ratio
        );
    }
}
