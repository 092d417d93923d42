//! First-touch cost of a tracked region against the kernel's own first
//! touch of a plain anonymous mapping of the same size, in the same run.
//!
//! One thread writes one byte per page through the host pointer. Tracked:
//! every fault goes to guestmm's userfaultfd handler, which charges the
//! budget and resolves a fault-around window with one ioctl. Kernel:
//! `mmap(MAP_PRIVATE|MAP_ANONYMOUS)` (THP as the system sets it for
//! mappings without `MADV_HUGEPAGE`), faulted page by page. Each round maps
//! fresh memory and frees it; the median of the rounds is reported.
//!
//! `--backing anon` (default): a tracked private anonymous region, filled
//! with `UFFDIO_COPY` from a zero source. `--backing memfd`: a tracked
//! shared memfd region (issue 15 §3), whose holes are filled with
//! `UFFDIO_ZEROPAGE` (zeroed memfd pages); it also reports the **re-touch**
//! of the same region after a `DONTNEED` through the API (the pages stay in
//! the memfd: `MINOR` faults mapped with `UFFDIO_CONTINUE`), and the
//! kernel's own first touch of an untracked memfd mapping.
//!
//! ```sh
//! cargo run --release --example bench_first_touch -- [--mib 1024] [--rounds 5] [--fault-around-kib 2048] [--backing anon|memfd] [--json]
//! ```

use std::time::Instant;

use clap::Parser;
use guestmm::{Advice, Host, MapOptions};
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
    /// Backing of the tracked region: `anon` (private anonymous,
    /// `UFFDIO_COPY`) or `memfd` (shared memfd, `UFFDIO_ZEROPAGE` for the
    /// first touch, `MINOR` + `UFFDIO_CONTINUE` for the re-touch after a
    /// DONTNEED, also measured).
    #[arg(long, value_enum, default_value_t = Backing::Anon)]
    backing: Backing,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// `--backing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Backing {
    /// Private anonymous memory.
    Anon,
    /// A shared memfd.
    Memfd,
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
    backing: Backing,
    bytes: u64,
    rounds: u64,
    fault_around: u64,
    /// First touch of the tracked region.
    tracked_ms: f64,
    /// The kernel's first touch of a private anonymous mapping.
    kernel_ms: f64,
    /// `tracked_ms / kernel_ms`.
    ratio: f64,
    /// memfd: touch of the same region again after a DONTNEED (`MINOR`).
    #[serde(skip_serializing_if = "Option::is_none")]
    retouch_ms: Option<f64>,
    /// memfd: `retouch_ms / kernel_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    retouch_ratio: Option<f64>,
    /// memfd: the kernel's first touch of an untracked memfd mapping.
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_memfd_ms: Option<f64>,
}

/// One round of the tracked region: its first touch, and for a memfd the
/// re-touch after a DONTNEED through the API (ms).
fn tracked_once(bytes: u64, fault_around: u64, backing: Backing) -> (f64, Option<f64>) {
    let host = Host::with_budget(bytes + (64 << 20));
    let mm = host.new_mm("bench");
    let opts = match backing {
        Backing::Anon => MapOptions::anon(bytes),
        Backing::Memfd => MapOptions::shared(bytes),
    };
    let addr = mm
        .mmap_blocking(opts.tracked(true).fault_around(fault_around))
        .expect("tracked mmap");
    let ptr = mm.find_vma_blocking(addr).expect("vma").host_ptr();
    let t = Instant::now();
    // SAFETY: the tracked mapping stays mapped while `mm` is held.
    unsafe { common::touch(ptr, bytes as usize) };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(host.stats().charged_bytes, bytes);
    let retouch = (backing == Backing::Memfd).then(|| {
        mm.madvise_blocking(addr, bytes, Advice::DontNeed)
            .expect("DONTNEED");
        let t = Instant::now();
        // SAFETY: as above.
        unsafe { common::touch(ptr, bytes as usize) };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // Shared memory: the pages stayed in the memfd, charged once.
        assert_eq!(host.stats().charged_bytes, bytes);
        let st = mm.tracked_stats().expect("tracked");
        assert!(st.pages_continued >= bytes / 4096, "{st:?}");
        ms
    });
    drop(mm);
    (ms, retouch)
}

/// The kernel's first touch of an untracked shared memfd mapping (ms).
fn kernel_memfd_once(bytes: u64) -> f64 {
    let host = Host::with_budget(bytes + (64 << 20));
    let mm = host.new_mm("kernel-memfd");
    let addr = mm
        .mmap_blocking(MapOptions::shared(bytes))
        .expect("memfd mmap");
    let ptr = mm.find_vma_blocking(addr).expect("vma").host_ptr();
    let t = Instant::now();
    // SAFETY: the mapping stays mapped while `mm` is held.
    unsafe { common::touch(ptr, bytes as usize) };
    t.elapsed().as_secs_f64() * 1e3
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
    let memfd = args.backing == Backing::Memfd;
    let (mut tr, mut kr, mut rr, mut kmr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        // Alternate so drift (other load, page cache) hits both alike.
        kr.push(kernel_once(bytes));
        let (t, r) = tracked_once(bytes, fa, args.backing);
        tr.push(t);
        rr.extend(r);
        if memfd {
            kmr.push(kernel_memfd_once(bytes));
        }
    }
    let (t, k) = (median(tr.clone()), median(kr.clone()));
    let ratio = t / k;
    let retouch = memfd.then(|| median(rr.clone()));
    let kernel_memfd = memfd.then(|| median(kmr.clone()));
    if json {
        common::print_json(&Report {
            backing: args.backing,
            bytes,
            rounds,
            fault_around: fa,
            tracked_ms: round(t, 1),
            kernel_ms: round(k, 1),
            ratio: round(ratio, 3),
            retouch_ms: retouch.map(|r| round(r, 1)),
            retouch_ratio: retouch.map(|r| round(r / k, 3)),
            kernel_memfd_ms: kernel_memfd.map(|m| round(m, 1)),
        });
    } else {
        println!(
            "first touch of {} MiB ({:?}), median of {rounds} rounds, fault-around {} KiB",
            bytes >> 20,
            args.backing,
            fa >> 10
        );
        println!("  tracked (uffd)  {t:8.1} ms   rounds {tr:.1?}");
        println!("  kernel (anon)   {k:8.1} ms   rounds {kr:.1?}");
        println!("  ratio           {ratio:8.3}");
        if let (Some(r), Some(m)) = (retouch, kernel_memfd) {
            println!("  re-touch after DONTNEED (MINOR + CONTINUE) {r:8.1} ms   rounds {rr:.1?}");
            println!("  re-touch ratio  {:8.3}", r / k);
            println!("  kernel (memfd)  {m:8.1} ms   rounds {kmr:.1?}");
        }
    }
}
