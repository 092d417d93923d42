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
//! Every memory number printed comes from `/proc` (statm, smaps_rollup,
//! smaps), not from the library's counters.
//!
//! The reaper delay defaults to 0 here (`--reaper-delay-ms`); the kernel's
//! own oom_reaper waits 2 s so a victim can walk its robust-futex list first.
//!
//! DISCLAIMER: the workers touch memory directly and are not tracked by
//! userfaultfd, so a worker that already checked its kill flag may still
//! write one more page after the reap (repopulating it); the demo counts
//! what comes back and reports it. Tracked regions (SIGBUS after a reap)
//! close that gap.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmm::reaper::{Reaper, ReaperConfig};
use guestmm::{procfs, Guest, Host, Kill, MapOptions, OomOutcome, ProcessMemory};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
struct Args {
    guests: usize,
    victim_mib: u64,
    other_mib: u64,
    budget_mib: u64,
    workers: usize,
    fill_ms: u64,
    exit_delay_ms: u64,
    reaper_delay_ms: u64,
    thp: bool,
    json: bool,
    plot: Option<String>,
}

const HELP: &str = "oom_demo: guests over a host budget, an OOM kill, a reap before teardown

USAGE: cargo run --release --example oom_demo -- [OPTIONS]

  --guests N            guests (default 4)
  --victim-mib M        RAM of the first, largest guest (default 1024)
  --other-mib M         RAM of each other guest (default 3/4 of the first)
  --budget-mib M        host budget (default: total minus 3/4 of the first guest)
  --workers N           worker threads per guest (default 2)
  --fill-ms T           time for the other guests to fill their RAM (default 3000;
                        the first guest fills first, in half that time)
  --exit-delay-ms T     how long a killed guest's workers take to exit (default 500)
  --reaper-delay-ms T   OOM reaper delay (default 0 here; the kernel's is 2000)
  --no-thp              no MADV_HUGEPAGE on guest RAM
  --json                print one JSON line with the results
  --plot FILE.svg       write a plot of process RSS over time
";

fn parse() -> Result<Args, String> {
    let mut a = Args {
        guests: 4,
        victim_mib: 1024,
        other_mib: 0,
        budget_mib: 0,
        workers: 2,
        fill_ms: 3000,
        exit_delay_ms: 500,
        reaper_delay_ms: 0,
        thp: true,
        json: false,
        plot: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            it.next()
                .ok_or(format!("{name} needs a value"))?
                .parse::<u64>()
                .map_err(|e| format!("{name}: {e}"))
        };
        match flag.as_str() {
            "--guests" => a.guests = num("--guests")? as usize,
            "--victim-mib" => a.victim_mib = num("--victim-mib")?,
            "--other-mib" => a.other_mib = num("--other-mib")?,
            "--budget-mib" => a.budget_mib = num("--budget-mib")?,
            "--workers" => a.workers = num("--workers")? as usize,
            "--fill-ms" => a.fill_ms = num("--fill-ms")?,
            "--exit-delay-ms" => a.exit_delay_ms = num("--exit-delay-ms")?,
            "--reaper-delay-ms" => a.reaper_delay_ms = num("--reaper-delay-ms")?,
            "--no-thp" => a.thp = false,
            "--json" => a.json = true,
            "--plot" => a.plot = Some(it.next().ok_or("--plot needs a file name")?),
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other} (try --help)")),
        }
    }
    if a.guests < 2 || a.workers == 0 || a.victim_mib < 4 {
        return Err("need --guests >= 2, --workers >= 1, --victim-mib >= 4".into());
    }
    if a.other_mib == 0 {
        a.other_mib = a.victim_mib * 3 / 4;
    }
    let total = a.victim_mib + a.other_mib * (a.guests as u64 - 1);
    if a.budget_mib == 0 {
        a.budget_mib = total - a.victim_mib * 3 / 4;
    }
    if a.budget_mib >= total {
        return Err(format!(
            "budget {} MiB must be below the guests' total {total} MiB",
            a.budget_mib
        ));
    }
    Ok(a)
}

/// One guest of the demo and its workers' shared state.
struct DemoGuest {
    guest: Guest,
    bytes: u64,
    host_base: usize,
    killed: AtomicBool,
    killed_at: Mutex<Option<Instant>>,
    /// Rss of the guest's mapping (/proc/self/smaps) when it was killed.
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

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Rss of the host mapping starting at `base`, from /proc/self/smaps.
fn mapping_rss(base: usize, len: u64) -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut total = 0;
    let mut inside = false;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                {
                    inside = s >= base && e <= base + len as usize;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    * 1024;
            }
        }
    }
    total
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("oom_demo: {e}");
            std::process::exit(2);
        }
    };
    let budget = args.budget_mib * MIB;
    let host = Host::with_budget(budget);
    let reaper = Reaper::new(ReaperConfig {
        delay: Duration::from_millis(args.reaper_delay_ms),
        zap_threads: 2,
        ..ReaperConfig::default()
    });
    reaper.install(&host);
    let reaper_thread = reaper.spawn();

    let baseline = procfs::statm_rss().unwrap_or(0);
    let mut guests = Vec::new();
    for i in 0..args.guests {
        let bytes = if i == 0 {
            args.victim_mib
        } else {
            args.other_mib
        } * MIB;
        let g = host.create_guest(&format!("guest-{i}"));
        let mm = g.mm().expect("fresh guest");
        let addr = match mm.mmap_blocking(MapOptions::anon(bytes).hugepage(args.thp)) {
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
        for w in 0..args.workers {
            let (g, done) = (g.clone(), done.clone());
            let delay = Duration::from_millis(args.exit_delay_ms);
            let nw = args.workers;
            workers.push(std::thread::spawn(move || {
                worker(g, w, nw, fill, delay, done)
            }));
        }
    }

    // SAFETY: isatty only inspects the file descriptor.
    let tty = unsafe { libc::isatty(2) } == 1;
    // The monitor: RSS from /proc/self/statm (cheap) every 2 ms.
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut exceeded_at: Option<Instant> = None;
    let mut victim: Option<Arc<DemoGuest>> = None;
    let mut victim_rss_before = 0;
    let mut rss_before_reap = 0;
    let mut rss_after_reap = 0;
    let mut back_at: Option<Instant> = None;
    let mut victim_users_at_reap = 0;
    let mut last_print = Instant::now() - Duration::from_secs(1);
    let finish_after = Duration::from_millis(args.fill_ms * 3 / 2 + 1000);
    loop {
        let now = Instant::now();
        let rss = procfs::statm_rss().unwrap_or(0).saturating_sub(baseline);
        if samples
            .last()
            .is_none_or(|(t, _)| (now - t0).as_secs_f64() - t >= 0.01)
        {
            samples.push(((now - t0).as_secs_f64(), rss));
        }
        if rss > budget && victim.is_none() {
            exceeded_at.get_or_insert(now);
            let before = procfs::statm_rss().unwrap_or(0);
            if let OomOutcome::Killed { guest } =
                futures_lite::future::block_on(host.out_of_memory(None))
            {
                let v = guests
                    .iter()
                    .find(|g| g.guest.id() == guest)
                    .expect("a demo guest");
                victim_rss_before = v.rss_at_kill.load(Ordering::SeqCst);
                rss_before_reap = before;
                victim = Some(v.clone());
            }
        }
        if let (Some(v), None) = (&victim, back_at) {
            let stats = reaper.stats();
            if stats.reaped + stats.gave_up > 0 {
                // "Back" = the victim's own mapping has lost >= 90% of what
                // it had (smaps Rss of its host range): the other guests keep
                // filling meanwhile, so the process total alone would not tell.
                let rss_now = procfs::statm_rss().unwrap_or(0);
                if mapping_rss(v.host_base, v.bytes) <= victim_rss_before / 10 {
                    back_at = Some(Instant::now());
                    rss_after_reap = rss_now;
                    victim_users_at_reap = v.guest.oom_mm().map_or(0, |m| m.users());
                }
            }
        }
        let every = if tty { 100 } else { 1000 };
        if !args.json && now - last_print >= Duration::from_millis(every) {
            last_print = now;
            let mut line = format!(
                "{}{:5.1}s rss {} / budget {} |",
                if tty { "\r" } else { "" },
                (now - t0).as_secs_f64(),
                gib(rss),
                gib(budget)
            );
            for g in &guests {
                let state = if g.killed.load(Ordering::Relaxed) {
                    "✝"
                } else {
                    ""
                };
                let _ = write!(
                    line,
                    " {}{} {:.0}M",
                    g.guest.name(),
                    state,
                    mapping_rss(g.host_base, g.bytes) as f64 / MIB as f64
                );
            }
            let s = reaper.stats();
            let _ = write!(
                line,
                " | kills {} reaps {}   ",
                host.oom_stats().kills,
                s.reaped
            );
            if tty {
                eprint!("{line}");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
        }
        // Done when the victim's memory is back (and the others had a
        // moment to finish), or when every guest filled without a kill; the
        // fill pace is a target, not a promise, on a loaded machine.
        let all_filled = guests.iter().all(|g| {
            g.killed.load(Ordering::SeqCst)
                || g.workers_filled.load(Ordering::SeqCst) == args.workers as u64
        });
        if now - t0 > finish_after && all_filled && (victim.is_none() || back_at.is_some()) {
            break;
        }
        if now - t0 > finish_after + Duration::from_secs(120) {
            eprintln!("\noom_demo: gave up waiting for the victim's memory to come back");
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
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
        .map_or("none".to_owned(), |v| v.guest.name().to_owned());
    let reaped = rss_before_reap.saturating_sub(rss_after_reap);

    if let Some(path) = &args.plot {
        let kill_t = victim
            .as_ref()
            .and_then(|v| *v.killed_at.lock().unwrap())
            .map(|t| (t - t0).as_secs_f64());
        if let Err(e) = std::fs::write(
            path,
            svg(
                &samples,
                budget,
                kill_t,
                back_at.map(|t| (t - t0).as_secs_f64()),
            ),
        ) {
            eprintln!("oom_demo: writing {path}: {e}");
        }
    }

    if args.json {
        println!(
            "{{\"guests\":{},\"budget_bytes\":{},\"victim\":\"{}\",\"victim_rss_before_bytes\":{},\"process_rss_before_reap_bytes\":{},\"process_rss_after_reap_bytes\":{},\"reaped_bytes\":{},\"reap_ms\":{:.3},\"oom_latency_ms\":{:.3},\"oom_kills\":{},\"second_kills\":{},\"oom_aborted_selections\":{},\"victim_users_at_reap\":{},\"reaper_delay_ms\":{},\"thp\":{},\"process_rss_end_bytes\":{}}}",
            args.guests,
            budget,
            victim_name,
            victim_rss_before,
            rss_before_reap,
            rss_after_reap,
            reaped,
            rstats.last_reap_us as f64 / 1e3,
            latency_ms,
            oom.kills,
            oom.second_kills,
            oom.aborted,
            victim_users_at_reap,
            args.reaper_delay_ms,
            args.thp,
            rss_end,
        );
    } else {
        eprintln!();
        println!();
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
        println!("victim                     {victim_name} ({} resident before the kill, /proc/self/smaps)", gib(victim_rss_before));
        println!("process RSS before reap    {}", gib(rss_before_reap));
        println!(
            "process RSS after reap     {}  ({} returned)",
            gib(rss_after_reap),
            gib(reaped)
        );
        println!("victim users at reap       {victim_users_at_reap} (teardown had not started)");
        println!(
            "reap took                  {:.1} ms (reaper delay {} ms)",
            rstats.last_reap_us as f64 / 1e3,
            args.reaper_delay_ms
        );
        println!("OOM latency                {latency_ms:.1} ms (budget first exceeded -> victim's memory back, RSS from /proc)");
        println!("OOM kills                  {} (second kills while a victim lacked OOM_SKIP: {}, selections aborted: {})", oom.kills, oom.second_kills, oom.aborted);
        println!(
            "process RSS at the end     {} with guests, {} after their teardown",
            gib(rss_end_guests),
            gib(rss_end)
        );
        if let Some(p) = &args.plot {
            println!("plot                       {p}");
        }
    }
}

/// A small hand-written SVG: process RSS over time, the budget, the kill
/// and the moment the victim's memory was back.
fn svg(samples: &[(f64, u64)], budget: u64, kill: Option<f64>, back: Option<f64>) -> String {
    let (w, h, m) = (800.0, 400.0, 50.0);
    let tmax = samples.last().map_or(1.0, |s| s.0).max(0.1);
    let ymax = samples.iter().map(|s| s.1).max().unwrap_or(1).max(budget) as f64 * 1.1;
    let x = |t: f64| m + t / tmax * (w - 2.0 * m);
    let y = |b: f64| h - m - b / ymax * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    let pts: Vec<String> = samples
        .iter()
        .map(|(t, b)| format!("{:.1},{:.1}", x(*t), y(*b as f64)))
        .collect();
    let _ = writeln!(
        s,
        "<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{}'/>",
        pts.join(" ")
    );
    let by = y(budget as f64);
    let _ = writeln!(s, "<line x1='{m}' x2='{}' y1='{by:.1}' y2='{by:.1}' stroke='#d62728' stroke-dasharray='6 4'/>", w - m);
    let _ = writeln!(
        s,
        "<text x='{}' y='{:.1}' fill='#d62728'>budget {}</text>",
        w - m - 120.0,
        by - 5.0,
        gib(budget)
    );
    for (t, label, color) in [
        (kill, "OOM kill", "#ff7f0e"),
        (back, "memory back", "#2ca02c"),
    ] {
        if let Some(t) = t {
            let _ = writeln!(s, "<line x1='{0:.1}' x2='{0:.1}' y1='{m}' y2='{1}' stroke='{color}'/><text x='{2:.1}' y='{3}' fill='{color}'>{label}</text>", x(t), h - m, x(t) + 4.0, m + 14.0);
        }
    }
    let _ = writeln!(s, "<line x1='{m}' x2='{m}' y1='{m}' y2='{0}' stroke='black'/><line x1='{m}' x2='{1}' y1='{0}' y2='{0}' stroke='black'/>", h - m, w - m);
    let _ = writeln!(
        s,
        "<text x='{m}' y='{}'>0 s</text><text x='{}' y='{}'>{tmax:.1} s</text>",
        h - m + 16.0,
        w - m - 30.0,
        h - m + 16.0
    );
    let _ = writeln!(s, "<text x='5' y='{}'>{}</text>", m - 5.0, gib(ymax as u64));
    let _ = writeln!(s, "<text x='{}' y='20' font-size='14'>guestmm oom_demo: process RSS (from /proc/self/statm) over time</text>", m);
    s.push_str("</svg>\n");
    s
}
