//! Our KSM merge rate against the kernel's own ksmd, same data, one run.
//!
//! Data: two copies of `--mib / 2` MiB of distinct pages (page `i` of one
//! copy equals page `i` of the other), so a full merge is one sharing per
//! page pair. Ours: two guests (tracked regions, `MADV_MERGEABLE`), the
//! scanner driven on this thread with `pages_to_scan = 4096`, sleep 0.
//! Kernel: one `MADV_MERGEABLE` anonymous mapping holding both copies,
//! `/sys/kernel/mm/ksm` set to run=1, advisor_mode=none (where it
//! exists), pages_to_scan=4096, sleep_millisecs=0; every knob it touches is restored by a guard (also
//! on error or panic; not on a kill signal). Kernel progress is read from
//! `/proc/self/ksm_merging_pages` (this process only). Both sides need two passes (a page merges only once
//! its checksum held for a pass). Rates are pages merged per wall second
//! from the start of scanning; CPU is this process's CPU time (scanner +
//! userfaultfd handlers) for ours, ksmd's utime+stime for the kernel.
//!
//! DISCLAIMER: the kernel side is skipped (and said so) when
//! /sys/kernel/mm/ksm is not writable; ksmd's CPU has 10 ms resolution.
//!
//! ```sh
//! cargo run --release --example bench_ksm -- --json
//! ```
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use clap::Parser;
use guestmm::ksm::{Ksm, KsmConfig, Run};
use guestmm::{Advice, Host, MapOptions, PAGE_SIZE};
use serde::Serialize;

mod common;
use common::{fill_page, round, AnonMap};

const PAGE: u64 = PAGE_SIZE as u64;
const KSM_SYS: &str = "/sys/kernel/mm/ksm";

/// Our KSM merge rate against the kernel's ksmd on the same data (the
/// kernel side needs a writable /sys/kernel/mm/ksm; every knob it sets is
/// restored).
#[derive(Debug, Parser)]
#[command(name = "bench_ksm")]
struct Args {
    /// MiB of data: two copies of MIB/2 MiB of distinct pages.
    #[arg(long, default_value_t = 256, value_parser = common::at_least(1))]
    mib: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line (`null` for the kernel side when it was skipped).
#[derive(Debug, Serialize)]
struct Report {
    bytes: u64,
    pages: u64,
    ours_pages_merged: u64,
    ours_pages_per_s: u64,
    ours_cpu_us_per_page: f64,
    kernel_pages_merged: u64,
    kernel_pages_per_s: Option<f64>,
    kernel_cpu_us_per_page: Option<f64>,
    ratio: Option<f64>,
}

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Side {
    pages: u64,
    wall: Duration,
    cpu: Duration,
}

impl Side {
    fn rate(&self) -> f64 {
        self.pages as f64 / self.wall.as_secs_f64()
    }
    fn cpu_us_per_page(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.pages.max(1) as f64
    }
}

fn ours(pages: u64) -> Result<Side, Box<dyn std::error::Error>> {
    let host = Host::with_budget(u64::MAX / 2);
    let ksm = Ksm::new(KsmConfig {
        pages_to_scan: 4096,
        sleep: Duration::ZERO,
        ..KsmConfig::default()
    })?;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut guests = Vec::new();
    for g in 0..2 {
        let mm = host.new_mm(&format!("bench{g}"));
        let addr = mm.mmap_blocking(MapOptions::anon(pages * PAGE).tracked(true))?;
        for i in 0..pages {
            fill_page(&mut page, i);
            mm.write_blocking(addr + i * PAGE, &page)?;
        }
        ksm.madvise_blocking(&mm, addr, pages * PAGE, Advice::Mergeable)?;
        guests.push(mm);
    }
    ksm.set_run_blocking(Run::Merge)?;
    let (t0, c0) = (Instant::now(), process_cpu());
    while ksm.stats().pages_sharing < pages && ksm.stats().full_scans < 10 {
        ksm.scan_step_blocking();
    }
    let side = Side {
        pages: ksm.stats().pages_sharing,
        wall: t0.elapsed(),
        cpu: process_cpu() - c0,
    };
    drop(guests);
    Ok(side)
}

/// Restores every knob it saved, on drop (also on error and panic).
struct KnobGuard {
    saved: Vec<(String, String)>,
}

impl KnobGuard {
    fn set(&mut self, knob: &str, value: &str) -> std::io::Result<()> {
        let path = format!("{KSM_SYS}/{knob}");
        let old = std::fs::read_to_string(&path)?;
        // Choice knobs read as `[selected] other`: restore the selected one.
        let old = match (old.find('['), old.find(']')) {
            (Some(a), Some(b)) if a < b => old[a + 1..b].to_string(),
            _ => old.trim().to_string(),
        };
        std::fs::write(&path, value)?;
        if !self.saved.iter().any(|(k, _)| k == knob) {
            self.saved.push((knob.to_string(), old));
        }
        Ok(())
    }
}

impl Drop for KnobGuard {
    fn drop(&mut self) {
        // `run` first (stop ksmd), then the rest, in reverse order.
        for (k, v) in self.saved.iter().rev() {
            if let Err(e) = std::fs::write(format!("{KSM_SYS}/{k}"), v) {
                eprintln!("bench_ksm: could not restore {k}={v}: {e}");
            }
        }
    }
}

/// `/proc/self/ksm_merging_pages`: our pages that map a KSM page.
fn merging_pages() -> u64 {
    std::fs::read_to_string("/proc/self/ksm_merging_pages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn ksmd_cpu() -> Option<Duration> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "ksmd" {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            // SAFETY: sysconf has no memory-safety preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            return Some(Duration::from_micros(ticks * 1_000_000 / hz));
        }
    }
    None
}

fn kernel(pages: u64) -> Result<Option<Side>, Box<dyn std::error::Error>> {
    let probe = format!("{KSM_SYS}/run");
    if std::fs::OpenOptions::new()
        .write(true)
        .open(&probe)
        .is_err()
    {
        eprintln!("bench_ksm: {KSM_SYS} is not writable: kernel side skipped");
        return Ok(None);
    }
    let mut map = AnonMap::new((2 * pages * PAGE) as usize, 0)?;
    for (i, page) in map.as_mut_slice().chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(page, i as u64 % pages);
    }
    map.madvise(libc::MADV_MERGEABLE)?;
    let mut guard = KnobGuard { saved: Vec::new() };
    guard.set("run", "0")?;
    // Linux 6.9+: with the scan-time advisor on, the kernel tunes
    // pages_to_scan itself and a write to it fails with EINVAL. Off for the
    // run (restored after pages_to_scan, since the guard restores in
    // reverse order).
    if std::path::Path::new(&format!("{KSM_SYS}/advisor_mode")).exists() {
        guard.set("advisor_mode", "none")?;
    }
    guard.set("pages_to_scan", "4096")?;
    guard.set("sleep_millisecs", "0")?;
    let c0 = ksmd_cpu().ok_or("no ksmd thread")?;
    let t0 = Instant::now();
    guard.set("run", "1")?;
    let deadline = t0 + Duration::from_secs(120);
    // Our own pages only (/proc/self): the global pages_sharing keeps
    // stale counts of exited processes until ksmd runs again.
    while merging_pages() < 2 * pages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = t0.elapsed();
    // Both copies map the KSM page once merged: one sharing per pair.
    let merged = merging_pages() / 2;
    drop(guard); // run=0 and the other knobs back before reading ksmd's CPU
    let cpu = ksmd_cpu().unwrap_or(c0) - c0;
    drop(map);
    Ok(Some(Side {
        pages: merged,
        wall,
        cpu,
    }))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before anything else: `--help` and a bad flag never touch the knobs.
    let args: Args = common::init();
    let (json, mib) = (args.json, args.mib);
    let bytes = mib << 20;
    let pages = bytes / 2 / PAGE;
    let o = ours(pages)?;
    let k = kernel(pages)?;
    let per_cpu = |s: &Side| s.pages as f64 / s.cpu.as_secs_f64().max(1e-9);
    let ratio = k.as_ref().map(|k| per_cpu(&o) / per_cpu(k));
    if json {
        let r3 = |v: Option<f64>| v.map(|v| round(v, 3));
        common::print_json(&Report {
            bytes,
            pages,
            ours_pages_merged: o.pages,
            ours_pages_per_s: o.rate().round() as u64,
            ours_cpu_us_per_page: round(o.cpu_us_per_page(), 3),
            kernel_pages_merged: k.as_ref().map_or(0, |k| k.pages),
            kernel_pages_per_s: r3(k.as_ref().map(|k| k.rate())),
            kernel_cpu_us_per_page: r3(k.as_ref().map(|k| k.cpu_us_per_page())),
            ratio: r3(ratio),
        });
    } else {
        println!("data: {mib} MiB = 2 x {pages} pages");
        println!(
            "ours:   {} pages in {:.1} ms = {:.0} pages/s, {:.2} us CPU/page",
            o.pages,
            o.wall.as_secs_f64() * 1e3,
            o.rate(),
            o.cpu_us_per_page()
        );
        match &k {
            Some(k) => println!(
                "kernel: {} pages in {:.1} ms = {:.0} pages/s, {:.2} us CPU/page",
                k.pages,
                k.wall.as_secs_f64() * 1e3,
                k.rate(),
                k.cpu_us_per_page()
            ),
            None => println!("kernel: skipped ({KSM_SYS} not writable)"),
        }
        if let Some(r) = ratio {
            println!("ratio (ours / kernel pages per CPU-second): {r:.2}");
        }
    }
    Ok(())
}
