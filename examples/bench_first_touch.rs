//! First-touch cost of a tracked region against the kernel's own first
//! touch of a plain anonymous mapping of the same size, in the same run.
//!
//! One thread writes one byte per page through the host pointer. Tracked:
//! every fault goes to guestmm's userfaultfd handler, which charges the
//! budget and resolves a fault-around window with one `UFFDIO_COPY`. Kernel:
//! `mmap(MAP_PRIVATE|MAP_ANONYMOUS)` (THP as the system sets it for
//! mappings without `MADV_HUGEPAGE`), faulted page by page. Each round maps
//! fresh memory and frees it; the median of the rounds is reported.
//!
//! ```sh
//! cargo run --release --example bench_first_touch -- [--mib 1024] [--rounds 5] [--fault-around-kib 2048] [--json]
//! ```

use std::time::Instant;

use clap::Parser;
use guestmm::{Host, MapOptions};
use serde::Serialize;

mod common;
use common::{median, round, AnonMap};

/// First touch of a tracked (userfaultfd) region against the kernel's own
/// first touch of a plain anonymous mapping, median of the rounds.
#[derive(Debug, Parser)]
#[command(name = "bench_first_touch")]
struct Args {
    /// MiB to touch per round.
    #[arg(long, default_value_t = 1024, value_parser = common::at_least(2))]
    mib: u64,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = common::at_least(1))]
    rounds: u64,
    /// Fault-around window of the tracked region, KiB: a power of two from
    /// 4 to 2048.
    #[arg(long, default_value_t = 2048, value_parser = fault_around_kib)]
    fault_around_kib: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

fn fault_around_kib(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if (4..=2048).contains(&v) && v.is_power_of_two() {
        Ok(v)
    } else {
        Err(format!("a power of two from 4 to 2048, got {v}"))
    }
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    bytes: u64,
    rounds: u64,
    fault_around: u64,
    tracked_ms: f64,
    kernel_ms: f64,
    ratio: f64,
}

fn tracked_once(bytes: u64, fault_around: u64) -> f64 {
    let host = Host::with_budget(bytes + (64 << 20));
    let mm = host.new_mm("bench");
    let addr = mm
        .mmap_blocking(
            MapOptions::anon(bytes)
                .tracked(true)
                .fault_around(fault_around),
        )
        .expect("tracked mmap");
    let ptr = mm.find_vma_blocking(addr).expect("vma").host_ptr();
    let t = Instant::now();
    // SAFETY: the tracked mapping stays mapped while `mm` is held.
    unsafe { common::touch(ptr, bytes as usize) };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(host.stats().charged_bytes, bytes);
    drop(mm);
    ms
}

fn kernel_once(bytes: u64) -> f64 {
    let mut m = AnonMap::new(bytes as usize, libc::MAP_NORESERVE).expect("mmap");
    let t = Instant::now();
    m.touch();
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let args: Args = common::init();
    let (json, rounds) = (args.json, args.rounds);
    let bytes = args.mib << 20;
    let fa = args.fault_around_kib << 10;
    let (mut tr, mut kr) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // Alternate so drift (other load, page cache) hits both alike.
        kr.push(kernel_once(bytes));
        tr.push(tracked_once(bytes, fa));
    }
    let (t, k) = (median(tr.clone()), median(kr.clone()));
    let ratio = t / k;
    if json {
        common::print_json(&Report {
            bytes,
            rounds,
            fault_around: fa,
            tracked_ms: round(t, 1),
            kernel_ms: round(k, 1),
            ratio: round(ratio, 3),
        });
    } else {
        println!(
            "first touch of {} MiB, median of {rounds} rounds, fault-around {} KiB",
            bytes >> 20,
            fa >> 10
        );
        println!("  tracked (uffd)  {t:8.1} ms   rounds {tr:.1?}");
        println!("  kernel          {k:8.1} ms   rounds {kr:.1?}");
        println!("  ratio           {ratio:8.3}");
    }
}
