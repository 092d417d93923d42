//! Our KSM merge rate against the kernel's own ksmd, same data, one run.
//!
//! Two patterns (`--pattern`):
//!
//! * `contiguous` (the default, the best case): see below.
//! * `scattered` (issue 12, realistic guests): `--guests` guests of `--mib`
//!   MiB each (default 4 x 64) of untracked private anonymous RAM written
//!   through the host pointer; each page independently is unique (1/2),
//!   all zeros (1/8) or one of 2,048 shared contents (3/8), at independent
//!   random positions in each guest, so most duplicate runs are one page
//!   long. Both sides run 4 full scans (`pages_to_scan` 4096, sleep 0).
//!   Pages saved are the drop of this process's PSS (`smaps_rollup`) for
//!   both (and `ksm_merging_pages` for the kernel), CPU per saved page is this
//!   process's CPU (ours) or ksmd's (kernel), host maps are the lines of
//!   `/proc/self/maps` at the end of each side. After our side, 64
//!   unrelated one-page `mmap`s must still succeed (`unrelated_mmap_ok`):
//!   the map-count reserve at work.
//!
//! Contiguous data: two copies of `--mib / 2` MiB of distinct pages (page `i` of one
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
//! cargo run --release --example bench_ksm -- --pattern scattered --json
//! cargo run --release --example bench_ksm -- --pattern scattered --rounds 5 --json
//! cargo run --release --example bench_ksm -- --pattern scattered --guests 4 --mib 192
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
    /// contiguous: two copies of MIB/2 MiB of distinct pages (default 256);
    /// scattered: MiB per guest (default 64).
    #[arg(long, value_parser = common::at_least(1))]
    mib: Option<u64>,
    /// The data: `contiguous` (long runs at the same offsets) or
    /// `scattered` (issue 12's realistic mix).
    #[arg(long, value_enum, default_value_t = Pattern::Contiguous)]
    pattern: Pattern,
    /// scattered: guests (each `--mib` MiB).
    #[arg(long, default_value_t = 4, value_parser = common::at_least(1))]
    guests: u64,
    /// scattered: full scans each side runs.
    #[arg(long, default_value_t = 4, value_parser = common::at_least(2))]
    scans: u64,
    /// scattered: let our scanner raise `vm.max_map_count` (root only;
    /// `KsmConfig::raise_max_map_count`), restored at exit.
    #[arg(long)]
    raise_map_count: bool,
    /// scattered: rounds, each ours then ksmd in a fresh process; the
    /// report is the round with the median CPU ratio, plus every round's
    /// ratios (this machine's noise moves both sides by ±30 % between
    /// runs).
    #[arg(long, default_value_t = 1, value_parser = common::at_least(1))]
    rounds: u64,
    /// scattered: run ksmd's side before ours (with `--rounds`, every
    /// other round does, so the order favours neither).
    #[arg(long)]
    kernel_first: bool,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// `--pattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pattern {
    /// Two copies of distinct pages, page i = page i.
    Contiguous,
    /// Unique 1/2, zero 1/8, one of 2,048 shared contents 3/8.
    Scattered,
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
    if args.pattern == Pattern::Scattered {
        return scattered::main(&args);
    }
    let (json, mib) = (args.json, args.mib.unwrap_or(256));
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

/// `--pattern scattered` (issue 12): ours and ksmd on the same scattered
/// bytes, one run.
mod scattered {
    use std::time::{Duration, Instant};

    use guestmm::ksm::{Ksm, KsmConfig, KsmStats, Run};
    use guestmm::{Advice, Host, MapOptions, MmUser, ProcessMemory, PAGE_SIZE};
    use serde::Serialize;

    use super::common::{self, fill_page, round, AnonMap};
    use super::{ksmd_cpu, process_cpu, Args, KnobGuard, KSM_SYS, PAGE};

    /// Shared contents (`1..=SHARED`; seeds past `UNIQUE` are unique).
    const SHARED: u64 = 2048;
    const UNIQUE: u64 = 1 << 40;

    /// splitmix64: a fixed, seedable stream (the same bytes on both sides).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    /// Fills guest `g`'s RAM: per page, unique 1/2, zero 1/8, shared 3/8.
    fn fill_guest(mem: &mut [u8], g: u64) {
        let mut rng = Rng(0x5eed ^ g.wrapping_mul(0x1000_0001));
        for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let r = rng.next();
            match r % 8 {
                0..=3 => fill_page(page, UNIQUE + (g << 32) + i as u64),
                4 => page.fill(0),
                _ => fill_page(page, 1 + (r >> 8) % SHARED),
            }
        }
    }

    /// Lines of `/proc/self/maps`.
    fn maps_lines() -> u64 {
        std::fs::read_to_string("/proc/self/maps")
            .map(|s| s.lines().count() as u64)
            .unwrap_or(0)
    }

    fn pss() -> u64 {
        ProcessMemory::current().map(|m| m.pss).unwrap_or(0)
    }

    /// 64 unrelated one-page mappings (alternating protections, so they
    /// cannot merge into one VMA): do they all succeed? Unmapped again.
    fn unrelated_mmaps_ok() -> bool {
        let mut maps = Vec::new();
        let mut ok = true;
        for i in 0..64 {
            match AnonMap::new(PAGE_SIZE, 0) {
                Ok(m) => {
                    if i % 2 == 0 {
                        // SAFETY: mprotect of our own fresh one-page mapping.
                        unsafe { libc::mprotect(m.ptr().cast(), PAGE_SIZE, libc::PROT_READ) };
                    }
                    maps.push(m)
                }
                Err(_) => ok = false,
            }
        }
        ok
    }

    /// One side's numbers.
    #[derive(Debug, Serialize)]
    struct SideReport {
        pages_saved: u64,
        cpu_us_per_saved_page: f64,
        wall_ms: f64,
        host_maps: u64,
    }

    impl SideReport {
        fn new(saved: u64, cpu: Duration, wall: Duration, maps: u64) -> Self {
            SideReport {
                pages_saved: saved,
                cpu_us_per_saved_page: round(cpu.as_secs_f64() * 1e6 / saved.max(1) as f64, 2),
                wall_ms: round(wall.as_secs_f64() * 1e3, 1),
                host_maps: maps,
            }
        }
    }

    /// The `--json` line.
    #[derive(Debug, Serialize)]
    struct Report {
        pattern: &'static str,
        guests: u64,
        mib_per_guest: u64,
        pages: u64,
        scans: u64,
        max_map_count: u64,
        ours: SideReport,
        ours_stats: Stats,
        unrelated_mmap_ok: bool,
        /// Teardown (exit_mmap of every guest) after the scans, and of the
        /// same guests with nothing merged (issue 12: within 2x).
        teardown_ms: f64,
        teardown_unmerged_ms: f64,
        teardown_ratio: f64,
        rounds: u64,
        cpu_ratio_rounds: Vec<f64>,
        saved_ratio_rounds: Vec<f64>,
        kernel: Option<SideReport>,
        kernel_ksm_merging_pages: Option<u64>,
        saved_ratio: Option<f64>,
        cpu_ratio: Option<f64>,
    }

    /// The `KsmStats` fields the report shows.
    #[derive(Debug, Serialize)]
    struct Stats {
        pages_shared: u64,
        pages_sharing: u64,
        ksm_zero_pages: u64,
        map_limit_hits: u64,
        pages_unmerged_map_budget: u64,
        map_budget_refusals: u64,
    }

    impl From<KsmStats> for Stats {
        fn from(s: KsmStats) -> Self {
            Stats {
                pages_shared: s.pages_shared,
                pages_sharing: s.pages_sharing,
                ksm_zero_pages: s.ksm_zero_pages,
                map_limit_hits: s.map_limit_hits,
                pages_unmerged_map_budget: s.pages_unmerged_map_budget,
                map_budget_refusals: s.map_budget_refusals,
            }
        }
    }

    /// The guests of one side: `args.guests` untracked mappings of `len`
    /// bytes filled with the pattern, made mergeable when `ksm` is given.
    fn guests(
        host: &Host,
        args: &Args,
        len: u64,
        ksm: Option<&Ksm>,
    ) -> Result<Vec<MmUser>, Box<dyn std::error::Error>> {
        let mut guests: Vec<MmUser> = Vec::new();
        for g in 0..args.guests {
            let mm = host.new_mm(&format!("scatter{g}"));
            let addr = mm.mmap_blocking(MapOptions::anon(len))?;
            let v = mm.find_vma_blocking(addr)?;
            // SAFETY: the VMA just mapped, `len` bytes, readable and
            // writable; this mm is ours and nothing else touches it (the
            // scanner is not started yet).
            let mem = unsafe { std::slice::from_raw_parts_mut(v.host_ptr(), len as usize) };
            fill_guest(mem, g);
            if let Some(ksm) = ksm {
                ksm.madvise_blocking(&mm, addr, len, Advice::Mergeable)?;
            }
            guests.push(mm);
        }
        Ok(guests)
    }

    /// The teardown of the same guests with nothing merged.
    fn teardown_unmerged(args: &Args, len: u64) -> Result<Duration, Box<dyn std::error::Error>> {
        let host = Host::with_budget(u64::MAX / 2);
        let guests = guests(&host, args, len, None)?;
        let t = Instant::now();
        drop(guests);
        Ok(t.elapsed())
    }

    /// Our side: pages saved, CPU, maps; the stats; unrelated mmaps ok;
    /// the teardown of the merged guests.
    fn ours(
        args: &Args,
        len: u64,
    ) -> Result<(SideReport, KsmStats, bool, Duration), Box<dyn std::error::Error>> {
        let host = Host::with_budget(u64::MAX / 2);
        let pages = args.guests * len / PAGE;
        let ksm = Ksm::new(KsmConfig {
            pages_to_scan: 4096,
            sleep: Duration::ZERO,
            // Room for two maps per page of every guest, when asked.
            raise_max_map_count: args.raise_map_count.then_some(2 * pages + 65_536),
            ..KsmConfig::default()
        })?;
        let guests = guests(&host, args, len, Some(&ksm))?;
        ksm.set_run_blocking(Run::Merge)?;
        let pss0 = pss();
        let (t0, c0) = (Instant::now(), process_cpu());
        while ksm.stats().full_scans < args.scans {
            ksm.scan_step_blocking();
        }
        let (wall, cpu) = (t0.elapsed(), process_cpu() - c0);
        let saved = pss0.saturating_sub(pss()) / PAGE;
        let maps = maps_lines();
        let ok = unrelated_mmaps_ok();
        let stats = ksm.stats();
        let t = Instant::now();
        drop(guests);
        let teardown = t.elapsed();
        Ok((SideReport::new(saved, cpu, wall, maps), stats, ok, teardown))
    }

    fn sysfs(knob: &str) -> u64 {
        std::fs::read_to_string(format!("{KSM_SYS}/{knob}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn kernel(
        args: &Args,
        len: u64,
    ) -> Result<Option<(SideReport, u64)>, Box<dyn std::error::Error>> {
        if std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{KSM_SYS}/run"))
            .is_err()
        {
            eprintln!("skipped: {KSM_SYS} is not writable (kernel side of bench_ksm)");
            return Ok(None);
        }
        let mut maps = Vec::new();
        for g in 0..args.guests {
            let mut m = AnonMap::new(len as usize, 0)?;
            fill_guest(m.as_mut_slice(), g);
            m.madvise(libc::MADV_MERGEABLE)?;
            maps.push(m);
        }
        let mut guard = KnobGuard { saved: Vec::new() };
        guard.set("run", "0")?;
        if std::path::Path::new(&format!("{KSM_SYS}/advisor_mode")).exists() {
            guard.set("advisor_mode", "none")?;
        }
        guard.set("pages_to_scan", "4096")?;
        guard.set("sleep_millisecs", "0")?;
        let pss0 = pss();
        let c0 = ksmd_cpu().ok_or("no ksmd thread")?;
        let t0 = Instant::now();
        let scans0 = sysfs("full_scans");
        guard.set("run", "1")?;
        let deadline = t0 + Duration::from_secs(600);
        while sysfs("full_scans") < scans0 + args.scans && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let wall = t0.elapsed();
        // This process's pages that map a KSM page (the global
        // pages_sharing also counts other processes').
        let (saved, merging) = (pss0.saturating_sub(pss()) / PAGE, super::merging_pages());
        let host_maps = maps_lines();
        drop(guard);
        let cpu = ksmd_cpu().unwrap_or(c0) - c0;
        drop(maps);
        Ok(Some((
            SideReport::new(saved, cpu, wall, host_maps),
            merging,
        )))
    }

    /// `--rounds N`: N runs of this example in fresh processes (in one
    /// process later rounds drift: ours slower, ksmd faster, by up to 2x
    /// over four rounds here), each ours then ksmd; the report is the run
    /// with the median CPU ratio, with every run's ratios.
    fn rounds_in_children(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
        let mut argv: Vec<String> = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--rounds" => {
                    it.next();
                }
                "--json" | "--kernel-first" => {}
                _ if a.starts_with("--rounds=") => {}
                _ => argv.push(a),
            }
        }
        let exe = std::env::current_exe()?;
        let mut runs: Vec<serde_json::Value> = Vec::new();
        for k in 0..args.rounds {
            let order: &[&str] = if k % 2 == 1 { &["--kernel-first"] } else { &[] };
            let out = std::process::Command::new(&exe)
                .args(&argv)
                .args(["--rounds", "1", "--json"])
                .args(order)
                .stderr(std::process::Stdio::inherit())
                .output()?;
            if !out.status.success() {
                return Err(format!("round {k} failed: {}", out.status).into());
            }
            let text = String::from_utf8(out.stdout)?;
            let line = text.lines().last().ok_or("a round printed nothing")?;
            runs.push(serde_json::from_str(line)?);
        }
        let ratio = |v: &serde_json::Value, key: &str| v[key].as_f64();
        let cpu: Vec<f64> = runs.iter().filter_map(|v| ratio(v, "cpu_ratio")).collect();
        let saved: Vec<f64> = runs
            .iter()
            .filter_map(|v| ratio(v, "saved_ratio"))
            .collect();
        runs.sort_by(|a, b| {
            let (a, b) = (ratio(a, "cpu_ratio"), ratio(b, "cpu_ratio"));
            a.unwrap_or(0.0).total_cmp(&b.unwrap_or(0.0))
        });
        let mut median = runs.swap_remove(runs.len() / 2);
        median["rounds"] = args.rounds.into();
        median["cpu_ratio_rounds"] = cpu.into();
        median["saved_ratio_rounds"] = saved.into();
        if args.json {
            println!("{median}");
        } else {
            println!(
                "scattered, {} rounds in fresh processes; the median round:\n{:#}",
                args.rounds, median
            );
        }
        Ok(())
    }

    pub(super) fn main(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
        let mib = args.mib.unwrap_or(64);
        let len = mib * common::MIB;
        let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let ratios = |o: &SideReport, k: &Option<(SideReport, u64)>| {
            let saved = k
                .as_ref()
                .map(|(k, _)| round(o.pages_saved as f64 / k.pages_saved.max(1) as f64, 3));
            let cpu = k.as_ref().map(|(k, _)| {
                round(
                    o.cpu_us_per_saved_page / k.cpu_us_per_saved_page.max(1e-9),
                    3,
                )
            });
            (saved, cpu)
        };
        if args.rounds > 1 {
            return rounds_in_children(args);
        }
        let (k, (o, stats, ok, teardown)) = if args.kernel_first {
            let k = kernel(args, len)?;
            (k, ours(args, len)?)
        } else {
            let o = ours(args, len)?;
            (kernel(args, len)?, o)
        };
        let (saved_ratio, cpu_ratio) = ratios(&o, &k);
        let cpu_ratio_rounds: Vec<f64> = cpu_ratio.into_iter().collect();
        let saved_ratio_rounds: Vec<f64> = saved_ratio.into_iter().collect();
        let unmerged = teardown_unmerged(args, len)?;
        let ms = |d: Duration| round(d.as_secs_f64() * 1e3, 1);
        let r = Report {
            pattern: "scattered",
            guests: args.guests,
            mib_per_guest: mib,
            pages: args.guests * len / PAGE,
            scans: args.scans,
            max_map_count,
            ours: o,
            ours_stats: stats.into(),
            unrelated_mmap_ok: ok,
            teardown_ms: ms(teardown),
            teardown_unmerged_ms: ms(unmerged),
            teardown_ratio: round(teardown.as_secs_f64() / unmerged.as_secs_f64().max(1e-9), 3),
            rounds: args.rounds,
            cpu_ratio_rounds,
            saved_ratio_rounds,
            kernel_ksm_merging_pages: k.as_ref().map(|(_, s)| *s),
            kernel: k.map(|(k, _)| k),
            saved_ratio,
            cpu_ratio,
        };
        if args.json {
            common::print_json(&r);
        } else {
            println!(
                "scattered: {} guests x {mib} MiB = {} pages, {} full scans each, vm.max_map_count {}",
                r.guests, r.pages, r.scans, r.max_map_count
            );
            let line = |who: &str, s: &SideReport| {
                println!(
                    "{who}: {} pages saved, {:.2} us CPU/saved page, {:.0} ms, {} host maps",
                    s.pages_saved, s.cpu_us_per_saved_page, s.wall_ms, s.host_maps
                )
            };
            line("ours  ", &r.ours);
            println!(
                "        {:?}; unrelated mmaps ok: {}",
                r.ours_stats, r.unrelated_mmap_ok
            );
            match &r.kernel {
                Some(k) => line("kernel", k),
                None => println!("kernel: skipped ({KSM_SYS} not writable)"),
            }
            if let (Some(s), Some(c)) = (r.saved_ratio, r.cpu_ratio) {
                println!("ours/kernel: pages saved {s:.3}, CPU per saved page {c:.3}");
            }
            println!(
                "teardown: {} ms merged, {} ms with nothing merged ({:.2}x)",
                r.teardown_ms, r.teardown_unmerged_ms, r.teardown_ratio
            );
        }
        Ok(())
    }
}
