//! # oom_demo: guests over budget, an OOM kill, and a reap before teardown
//!
//! Several guests each run worker threads (the "vCPUs") that write straight
//! into their guest RAM through the host pointer. Their sum is larger than
//! the host budget. A monitor watches the process RSS (from `/proc`); when it
//! crosses the budget it calls the OOM killer, which picks the guest with the
//! highest badness, stops its workers (the kill hook) and queues its mm to
//! the OOM reaper. The reaper frees the victim's memory **while its worker
//! threads still hold user references** (the victim's exit is slow on
//! purpose, `--exit-delay-ms`), long before its teardown runs.
//!
//! Every memory number printed comes from the kernel (`/proc` statm and
//! smaps_rollup, `mincore` of each guest's host range), not from the
//! library's counters. Inside the timed window nothing reads
//! /proc/self/smaps: one read walks every mapping of the process (40 ms
//! with 3.5 GiB of 4 KiB pages) and was most of the measured latency.
//!
//! The reaper delay defaults to 0 here (`--reaper-delay-ms`); the kernel's
//! own oom_reaper waits 2 s so a victim can walk its robust-futex list first.
//!
//! DISCLAIMER: the workers touch memory directly and are not tracked by
//! userfaultfd, so a worker that already checked its kill flag may still
//! write one more page after the reap (repopulating it); the demo counts
//! what comes back and reports it. Tracked regions (SIGBUS after a reap)
//! close that gap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{CommandFactory as _, Parser};
use guestmm::reaper::{Reaper, ReaperConfig, ZapSplit};
use guestmm::{procfs, Guest, Host, Kill, MapOptions, OomOutcome, ProcessMemory};
use serde::Serialize;

mod common;
use common::{gib, round, MIB};

/// Guests over a host budget, an OOM kill, and a reap before teardown.
#[derive(Debug, Clone, Parser)]
#[command(name = "oom_demo")]
struct Args {
    /// Guests.
    #[arg(long, default_value_t = 4, value_parser = common::at_least(2))]
    guests: u64,
    /// RAM of the first, largest guest, MiB.
    #[arg(long, default_value_t = 1024, value_parser = common::at_least(4))]
    victim_mib: u64,
    /// RAM of each other guest, MiB [default (or 0): 3/4 of the first].
    #[arg(long)]
    other_mib: Option<u64>,
    /// Host budget, MiB [default (or 0): the guests' total minus 3/4 of the
    /// first].
    #[arg(long)]
    budget_mib: Option<u64>,
    /// Worker threads per guest.
    #[arg(long, default_value_t = 2, value_parser = common::at_least(1))]
    workers: u64,
    /// Time for the other guests to fill their RAM, ms (the first guest
    /// fills first, in half that time).
    #[arg(long, default_value_t = 3000)]
    fill_ms: u64,
    /// How long a killed guest's workers take to exit, ms.
    #[arg(long, default_value_t = 500)]
    exit_delay_ms: u64,
    /// OOM reaper delay, ms (the kernel's is 2000).
    #[arg(long, default_value_t = 0)]
    reaper_delay_ms: u64,
    /// No MADV_HUGEPAGE on guest RAM.
    #[arg(long)]
    no_thp: bool,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
    /// Write a plot of RSS over time (SVG).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
}

/// The sizes, with the defaults that depend on other options filled in.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    other_mib: u64,
    budget_mib: u64,
}

impl Args {
    fn sizes(&self) -> Sizes {
        let other_mib = (self.other_mib)
            .filter(|&m| m > 0)
            .unwrap_or(self.victim_mib * 3 / 4);
        let total = self.victim_mib + other_mib * (self.guests - 1);
        let budget_mib = self
            .budget_mib
            .filter(|&m| m > 0)
            .unwrap_or(total - self.victim_mib * 3 / 4);
        if budget_mib >= total {
            Args::command()
                .error(
                    clap::error::ErrorKind::ValueValidation,
                    format!("budget {budget_mib} MiB must be below the guests' total {total} MiB"),
                )
                .exit();
        }
        Sizes {
            other_mib,
            budget_mib,
        }
    }
}

/// The `--json` line (.ci/run checks it).
#[derive(Debug, Serialize)]
struct Report {
    guests: u64,
    budget_bytes: u64,
    victim: String,
    victim_rss_before_bytes: u64,
    process_rss_before_reap_bytes: u64,
    process_rss_after_reap_bytes: u64,
    reaped_bytes: u64,
    /// What the other guests' mappings gained (mincore) between the two
    /// process readings: they keep filling while the victim is reaped, so
    /// `reaped_bytes` alone undercounts what came back.
    survivors_rss_growth_during_reap_bytes: u64,
    reap_ms: f64,
    oom_latency_ms: f64,
    oom_kills: u64,
    second_kills: u64,
    oom_aborted_selections: u64,
    victim_users_at_reap: u64,
    reaper_delay_ms: u64,
    thp: bool,
    process_rss_end_bytes: u64,
}

/// One guest of the demo and its workers' shared state.
struct DemoGuest {
    guest: Guest,
    bytes: u64,
    host_base: usize,
    killed: AtomicBool,
    killed_at: Mutex<Option<Instant>>,
    /// Resident bytes of the guest's mapping (mincore) when it was killed.
    rss_at_kill: AtomicU64,
    /// Workers that have written every page of their slice.
    workers_filled: AtomicU64,
}

struct StopWorkers(Arc<DemoGuest>);

impl Kill for StopWorkers {
    /// The kill hook: the "vCPUs" stop at their next check.
    fn kill(&self, _guest: &Guest) {
        // Measured here, before mark_oom_victim queues the mm: the reaper
        // cannot have started yet.
        self.0.rss_at_kill.store(
            mapping_rss(self.0.host_base, self.0.bytes),
            Ordering::SeqCst,
        );
        *self.0.killed_at.lock().unwrap() = Some(Instant::now());
        self.0.killed.store(true, Ordering::SeqCst);
    }
}

fn worker(
    g: Arc<DemoGuest>,
    index: usize,
    workers: usize,
    (start_after, fill): (Duration, Duration),
    exit_delay: Duration,
    done: Arc<AtomicBool>,
) {
    std::thread::sleep(start_after);
    // A user reference, as a vCPU thread holds: teardown cannot start while
    // any worker lives.
    let Ok(mm) = g.guest.mm() else { return };
    let page = 4096u64;
    let pages = g.bytes / page;
    let (lo, hi) = (
        pages * index as u64 / workers as u64,
        pages * (index as u64 + 1) / workers as u64,
    );
    let start = Instant::now();
    let mut p = lo;
    while !done.load(Ordering::Relaxed) && !g.killed.load(Ordering::SeqCst) {
        if p < hi {
            // Pace the fill: page p is due at (p - lo) / (hi - lo) of `fill`.
            let due = fill.mul_f64((p - lo) as f64 / (hi - lo).max(1) as f64);
            let now = start.elapsed();
            if due > now + Duration::from_millis(2) {
                std::thread::sleep(due - now);
                continue;
            }
            let end = (p + 256).min(hi);
            for q in p..end {
                // SAFETY: the page lies inside the guest's RAM mapping, which
                // stays mapped while `mm` (a user reference) is held.
                unsafe {
                    std::ptr::write_volatile(
                        (g.host_base + (q * page) as usize) as *mut u8,
                        (q % 251) as u8 + 1,
                    )
                };
                if g.killed.load(Ordering::Relaxed) {
                    break;
                }
            }
            p = end;
            if p == hi {
                g.workers_filled.fetch_add(1, Ordering::SeqCst);
            }
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if g.killed.load(Ordering::SeqCst) {
        // A slow exit (exit_aio waiting for I/O, robust futexes): the user
        // reference is held all this time, so only the reaper can free the
        // memory early.
        std::thread::sleep(exit_delay);
    }
    drop(mm);
}

/// The sum of every guest's bytes but guest `skip`'s.
fn others_sum(per_guest: &[u64], skip: usize) -> u64 {
    per_guest
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != skip)
        .map(|(_, b)| b)
        .sum()
}

/// Resident bytes of the host mapping starting at `base` (mincore).
fn mapping_rss(base: usize, len: u64) -> u64 {
    common::ranges_resident(&[(base, len)])[0]
}

/// What the monitor recorded for the plot.
#[derive(Debug, Default)]
struct Samples {
    /// (seconds, process RSS above the start) every 10 ms.
    total: Vec<(f64, u64)>,
    /// (seconds, each guest's RSS) every 50 ms.
    guests: Vec<(f64, Vec<u64>)>,
}

fn main() {
    let args: Args = common::init();
    let sizes = args.sizes();
    let (nguests, nworkers) = (args.guests as usize, args.workers as usize);
    let thp = !args.no_thp;
    let budget = sizes.budget_mib * MIB;
    let host = Host::with_budget(budget);
    let reaper = Reaper::new(ReaperConfig {
        delay: Duration::from_millis(args.reaper_delay_ms),
        zap: ZapSplit::with_threads(2),
        ..ReaperConfig::default()
    });
    reaper.install(&host);
    let reaper_thread = common::or_exit(reaper.spawn(), "oom_reaper");

    let baseline = procfs::statm_rss().unwrap_or(0);
    let mut guests = Vec::new();
    for i in 0..nguests {
        let bytes = if i == 0 {
            args.victim_mib
        } else {
            sizes.other_mib
        } * MIB;
        let g = host.create_guest(&format!("guest-{i}"));
        let mm = g.mm().expect("fresh guest");
        let addr = match mm.mmap_blocking(MapOptions::anon(bytes).hugepage(thp)) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("oom_demo: mapping {} for {}: {e}", gib(bytes), g.name());
                std::process::exit(1);
            }
        };
        let host_base = mm.find_vma_blocking(addr).expect("just mapped").host_ptr() as usize;
        let dg = Arc::new(DemoGuest {
            guest: g.clone(),
            bytes,
            host_base,
            killed: AtomicBool::new(false),
            killed_at: Mutex::new(None),
            rss_at_kill: AtomicU64::new(0),
            workers_filled: AtomicU64::new(0),
        });
        g.set_kill_hook(Arc::new(StopWorkers(dg.clone())));
        guests.push(dg);
    }
    let ranges: Vec<(usize, u64)> = guests.iter().map(|g| (g.host_base, g.bytes)).collect();

    let done = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (i, g) in guests.iter().enumerate() {
        // The first (largest) guest fills first, alone; the others start
        // when it is full, so the OOM kill meets a fully populated victim.
        let first = Duration::from_millis(args.fill_ms / 2);
        let fill = if i == 0 {
            (Duration::ZERO, first)
        } else {
            (first, Duration::from_millis(args.fill_ms))
        };
        for w in 0..nworkers {
            let (g, done) = (g.clone(), done.clone());
            let delay = Duration::from_millis(args.exit_delay_ms);
            workers.push(std::thread::spawn(move || {
                worker(g, w, nworkers, fill, delay, done)
            }));
        }
    }

    let status = common::status_line(args.json);
    // The monitor: RSS from /proc/self/statm (cheap) every 2 ms; each
    // guest's from mincore every 50 ms for the plot and the status line.
    let t0 = Instant::now();
    let mut samples = Samples::default();
    let mut exceeded_at: Option<Instant> = None;
    // The victim and its index in `guests` (for the others' resident sums).
    let mut victim: Option<(usize, Arc<DemoGuest>)> = None;
    let mut victim_rss_before = 0;
    let mut rss_before_reap = 0;
    let mut rss_after_reap = 0;
    // The other guests' resident bytes (mincore), read inside the window of
    // the two process readings, so their growth is never overcounted.
    let mut survivors_before: Option<u64> = None;
    let mut survivors_growth = 0;
    let mut back_at: Option<Instant> = None;
    let mut victim_users_at_reap = 0;
    let finish_after = Duration::from_millis(args.fill_ms * 3 / 2 + 1000);
    loop {
        let now = Instant::now();
        let secs = (now - t0).as_secs_f64();
        let rss = procfs::statm_rss().unwrap_or(0).saturating_sub(baseline);
        if samples.total.last().is_none_or(|(t, _)| secs - t >= 0.01) {
            samples.total.push((secs, rss));
        }
        let want_guests = args.plot.is_some() || !status.is_hidden();
        if want_guests && samples.guests.last().is_none_or(|(t, _)| secs - t >= 0.05) {
            let per_guest = common::ranges_resident(&ranges);
            if !status.is_hidden() {
                status.set_message(status_message(
                    rss, budget, &guests, &per_guest, &host, &reaper,
                ));
            }
            samples.guests.push((secs, per_guest));
        }
        if rss > budget && victim.is_none() {
            exceeded_at.get_or_insert(now);
            let before = procfs::statm_rss().unwrap_or(0);
            let per_guest_before = common::ranges_resident(&ranges);
            if let OomOutcome::Killed { guest } =
                futures_lite::future::block_on(host.out_of_memory(None))
            {
                let i = guests
                    .iter()
                    .position(|g| g.guest.id() == guest)
                    .expect("a demo guest");
                let v = &guests[i];
                victim_rss_before = v.rss_at_kill.load(Ordering::SeqCst);
                rss_before_reap = before;
                survivors_before = Some(others_sum(&per_guest_before, i));
                victim = Some((i, v.clone()));
            }
        }
        if let (Some((i, v)), None) = (&victim, back_at) {
            let stats = reaper.stats();
            if stats.reaped + stats.gave_up > 0 {
                // "Back" = the victim's own mapping has lost >= 90% of what
                // it had (mincore of its host range): the other guests keep
                // filling meanwhile, so the process total alone would not tell.
                if mapping_rss(v.host_base, v.bytes) <= victim_rss_before / 10 {
                    back_at = Some(Instant::now());
                    let after = others_sum(&common::ranges_resident(&ranges), *i);
                    survivors_growth = after.saturating_sub(survivors_before.unwrap_or(after));
                    rss_after_reap = procfs::statm_rss().unwrap_or(0);
                    victim_users_at_reap = v.guest.oom_mm().map_or(0, |m| m.users()) as u64;
                }
            }
        }
        // Done when the victim's memory is back (and the others had a
        // moment to finish), or when every guest filled without a kill; the
        // fill pace is a target, not a promise, on a loaded machine.
        let all_filled = guests.iter().all(|g| {
            g.killed.load(Ordering::SeqCst)
                || g.workers_filled.load(Ordering::SeqCst) == args.workers
        });
        if now - t0 > finish_after && all_filled && (victim.is_none() || back_at.is_some()) {
            break;
        }
        if now - t0 > finish_after + Duration::from_secs(120) {
            status.suspend(|| {
                eprintln!("oom_demo: gave up waiting for the victim's memory to come back")
            });
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    status.finish_and_clear();
    done.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let final_rows: Vec<(String, u64, bool, bool)> = guests
        .iter()
        .map(|g| {
            (
                g.guest.name().to_owned(),
                g.bytes,
                g.killed.load(Ordering::SeqCst),
                g.guest
                    .oom_mm()
                    .is_some_and(|m| m.flags().test(guestmm::MmFlag::UNSTABLE)),
            )
        })
        .collect();
    let rss_end_guests = ProcessMemory::current().map(|m| m.rss).unwrap_or(0);
    for g in &guests {
        g.guest.exit_blocking();
    }
    let rss_end = ProcessMemory::current().map(|m| m.rss).unwrap_or(0);
    reaper_thread.stop();

    let oom = host.oom_stats();
    let rstats = reaper.stats();
    let latency_ms = match (exceeded_at, back_at) {
        (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e3,
        _ => -1.0,
    };
    let victim_name = victim
        .as_ref()
        .map_or("none".to_owned(), |(_, v)| v.guest.name().to_owned());
    let reaped = rss_before_reap.saturating_sub(rss_after_reap);

    if let Some(path) = &args.plot {
        let kill_t = victim
            .as_ref()
            .and_then(|(_, v)| *v.killed_at.lock().unwrap())
            .map(|t| (t - t0).as_secs_f64());
        let names: Vec<String> = guests.iter().map(|g| g.guest.name().to_owned()).collect();
        let marks = Marks {
            budget,
            kill: kill_t,
            back: back_at.map(|t| (t - t0).as_secs_f64()),
        };
        if let Err(e) = plot(path, &samples, &names, &marks) {
            eprintln!("oom_demo: writing {}: {e}", path.display());
        }
    }

    if args.json {
        common::print_json(&Report {
            guests: args.guests,
            budget_bytes: budget,
            victim: victim_name,
            victim_rss_before_bytes: victim_rss_before,
            process_rss_before_reap_bytes: rss_before_reap,
            process_rss_after_reap_bytes: rss_after_reap,
            reaped_bytes: reaped,
            survivors_rss_growth_during_reap_bytes: survivors_growth,
            reap_ms: round(rstats.last_reap_us as f64 / 1e3, 3),
            oom_latency_ms: round(latency_ms, 3),
            oom_kills: oom.kills,
            second_kills: oom.second_kills,
            oom_aborted_selections: oom.aborted,
            victim_users_at_reap,
            reaper_delay_ms: args.reaper_delay_ms,
            thp,
            process_rss_end_bytes: rss_end,
        });
    } else {
        println!("guest             ram  state");
        for (name, bytes, killed, reaped) in &final_rows {
            let state = match (killed, reaped) {
                (true, true) => "killed, reaped",
                (true, false) => "killed",
                _ => "ran to the end",
            };
            println!("{:<10} {:>10}  {}", name, gib(*bytes), state);
        }
        println!();
        println!("budget                     {}", gib(budget));
        println!(
            "victim                     {victim_name} ({} resident before the kill, mincore)",
            gib(victim_rss_before)
        );
        println!("process RSS before reap    {}", gib(rss_before_reap));
        println!(
            "process RSS after reap     {}  ({} returned; the other guests grew {} meanwhile)",
            gib(rss_after_reap),
            gib(reaped + survivors_growth),
            gib(survivors_growth)
        );
        println!("victim users at reap       {victim_users_at_reap} (teardown had not started)");
        println!(
            "reap took                  {:.1} ms (reaper delay {} ms)",
            rstats.last_reap_us as f64 / 1e3,
            args.reaper_delay_ms
        );
        println!("OOM latency                {latency_ms:.1} ms (budget first exceeded -> victim's memory back; statm, mincore)");
        println!("OOM kills                  {} (second kills while a victim lacked OOM_SKIP: {}, selections aborted: {})", oom.kills, oom.second_kills, oom.aborted);
        println!(
            "process RSS at the end     {} with guests, {} after their teardown",
            gib(rss_end_guests),
            gib(rss_end)
        );
        if let Some(p) = &args.plot {
            println!("plot                       {}", p.display());
        }
    }
}

/// The live status line: process RSS, each guest's, kills and reaps.
fn status_message(
    rss: u64,
    budget: u64,
    guests: &[Arc<DemoGuest>],
    per_guest: &[u64],
    host: &Host,
    reaper: &Reaper,
) -> String {
    let mut line = format!("rss {} / budget {} |", gib(rss), gib(budget));
    for (g, r) in guests.iter().zip(per_guest) {
        let state = if g.killed.load(Ordering::Relaxed) {
            "✝"
        } else {
            ""
        };
        line += &format!(" {}{} {}M", g.guest.name(), state, r / MIB);
    }
    line += &format!(
        " | kills {} reaps {}",
        host.oom_stats().kills,
        reaper.stats().reaped
    );
    line
}

/// The budget and the moments marked on the plot (seconds from the start).
#[derive(Debug)]
struct Marks {
    budget: u64,
    kill: Option<f64>,
    back: Option<f64>,
}

/// The RSS plot: one line per guest (mincore), the process total (statm),
/// the budget, and the kill and memory-back moments as vertical lines.
/// Every label is in the legend at the right, one row each, so no two
/// labels can overlap however close the moments are.
fn plot(
    path: &std::path::Path,
    samples: &Samples,
    names: &[String],
    marks: &Marks,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;

    let g = |b: u64| b as f64 / (1u64 << 30) as f64;
    let tmax = samples.total.last().map_or(1.0, |s| s.0).max(0.1);
    let ymax = samples
        .total
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(0)
        .max(marks.budget);
    let ymax = g(ymax) * 1.1;

    // Guests in colors apart from the budget's red and the markers'
    // orange and green.
    const GUEST_COLORS: [RGBColor; 6] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0x17, 0xbe, 0xcf),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(760);
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "guestmm oom_demo: RSS over time (/proc)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("RSS (GiB)")
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;

    // (label, color, dashed) of every legend row, in drawing order.
    let mut legend: Vec<(String, RGBColor, bool)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let color = GUEST_COLORS[i % GUEST_COLORS.len()];
        chart.draw_series(LineSeries::new(
            samples.guests.iter().map(|(t, r)| (*t, g(r[i]))),
            color.stroke_width(1),
        ))?;
        legend.push((format!("{name} (mincore)"), color, false));
    }
    chart.draw_series(LineSeries::new(
        samples.total.iter().map(|(t, r)| (*t, g(*r))),
        BLACK.stroke_width(2),
    ))?;
    legend.push((
        "process total (statm, above start)".to_owned(),
        BLACK,
        false,
    ));
    let budget = g(marks.budget);
    chart.draw_series(DashedLineSeries::new(
        [(0.0, budget), (tmax, budget)],
        8,
        5,
        RED.stroke_width(2),
    ))?;
    legend.push((format!("budget {}", gib(marks.budget)), RED, true));
    let orange = RGBColor(0xff, 0x7f, 0x0e);
    let green = RGBColor(0x2c, 0xa0, 0x2c);
    for (t, what, color) in [
        (marks.kill, "OOM kill", orange),
        (marks.back, "victim's memory back", green),
    ] {
        if let Some(t) = t {
            chart.draw_series(DashedLineSeries::new(
                [(t, 0.0), (t, ymax)],
                4,
                3,
                color.stroke_width(2),
            ))?;
            legend.push((format!("{what} at {t:.2} s"), color, true));
        }
    }

    let font = ("sans-serif", 14).into_font();
    for (row, (label, color, dashed)) in legend.iter().enumerate() {
        let y = 50 + 24 * row as i32;
        let style = color.stroke_width(2);
        if *dashed {
            right.draw(&PathElement::new([(10, y), (18, y)], style))?;
            right.draw(&PathElement::new([(24, y), (32, y)], style))?;
        } else {
            right.draw(&PathElement::new([(10, y), (32, y)], style))?;
        }
        right.draw(&Text::new(
            label.clone(),
            (40, y - 7),
            font.clone().color(&BLACK),
        ))?;
    }
    root.present()?;
    Ok(())
}
