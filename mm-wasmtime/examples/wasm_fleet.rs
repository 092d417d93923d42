//! # wasm_fleet: many wasm instances, one host budget, one OOM kill
//!
//! M instances (default 64) of one WAT module run on a few threads. Each
//! grows its linear memory in steps, writes a deterministic pattern into
//! every new word and, at the end, returns a checksum of its whole memory.
//! One instance ("big") has a larger working set; the sum of all of them
//! exceeds the host budget. When a grow (through the adapter's
//! `ResourceLimiter`) or a first touch (through the guest's userfaultfd)
//! finds no room, guestmm's OOM killer picks the largest instance: its
//! memory is closed (`PROT_NONE`) and its epoch deadline fires, so its call
//! ends in a wasm trap, and the OOM reaper returns its pages to the host.
//! Every other instance finishes with the right checksum, and the process
//! exits 0.
//!
//! Memory numbers come from `/proc` (`statm`, `mincore` through guestmm's
//! `resident_bytes`), not from guestmm's counters. While the victim is
//! reaped the other threads pause between steps (a worker in the middle of
//! a step finishes it), so the process RSS drop is the victim's.
//!
//! DISCLAIMER: the budget is fail-open for tracked first touches (guestmm's
//! default): a touch that finds no room after the OOM kill is served over
//! budget and recorded as debt, so `peak_charged_bytes` may pass the
//! budget by the pages in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use guestmm::procfs;
use mm_wasmtime::{GuestData, KillReport, MemoryLayout, WasmGuest, WasmHost, WasmHostConfig};
use serde::Serialize;
use wasmtime::{Instance, Module, Store, Trap, TypedFunc};

#[path = "../../examples/common/mod.rs"]
mod common;
use common::{round, MIB};

/// Many wasm instances over one host budget: the largest is OOM-killed,
/// traps, and its memory comes back.
#[derive(Debug, Clone, Parser)]
#[command(name = "wasm_fleet")]
struct Args {
    /// Instances.
    #[arg(long, default_value_t = 64, value_parser = common::at_least(2))]
    instances: u64,
    /// Worker threads running the instances.
    #[arg(long, default_value_t = 4, value_parser = common::at_least(1))]
    threads: u64,
    /// Final memory of each instance but the big one, MiB.
    #[arg(long, default_value_t = 4, value_parser = common::at_least(1))]
    small_mib: u64,
    /// Final memory of the big instance, MiB.
    #[arg(long, default_value_t = 96, value_parser = common::at_least(2))]
    big_mib: u64,
    /// Grow steps per instance.
    #[arg(long, default_value_t = 8, value_parser = common::at_least(1))]
    steps: u64,
    /// Host budget, MiB [default: the small instances' total + half the
    /// big one].
    #[arg(long)]
    budget_mib: Option<u64>,
    /// OOM reaper delay, ms (the kernel waits 2 s).
    #[arg(long, default_value_t = 0)]
    reaper_delay_ms: u64,
    /// One line of JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    instances: u64,
    completed: u64,
    checksums_ok: u64,
    killed: u64,
    victim: Option<String>,
    victim_trapped: bool,
    victim_trap: Option<String>,
    grow_failures: u64,
    budget_bytes: u64,
    peak_charged_bytes: u64,
    /// OOM kills (the must-show: 1).
    kills: u64,
    /// smaps Rss of the victim's linear memory at the kill.
    victim_rss_before_reap_bytes: u64,
    /// ... and after the reap.
    victim_rss_after_reap_bytes: u64,
    /// `/proc/self/statm` at the kill and after the reap (survivors paused
    /// between steps).
    process_rss_before_reap_bytes: u64,
    process_rss_after_reap_bytes: u64,
    /// `VmRSS` of this process read by a `cat` child after the reap.
    process_rss_after_reap_outside_bytes: u64,
    /// (process RSS before - after) / victim's smaps Rss before.
    rss_back_fraction: f64,
    reap_ms: f64,
    kill_to_reaped_ms: f64,
    elapsed_ms: f64,
}

const WAT: &str = r#"(module
  (memory (export "memory") 0)
  ;; Grows by $pages and writes (offset + $seed) into every new word.
  ;; Returns the new size in pages, or -1 if the grow failed.
  (func (export "step") (param $pages i32) (param $seed i32) (result i32)
    (local $i i32) (local $n i32)
    (local.set $i (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.eq (memory.grow (local.get $pages)) (i32.const -1))
      (then (return (i32.const -1))))
    (local.set $n (i32.mul (memory.size) (i32.const 65536)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store (local.get $i) (i32.add (local.get $i) (local.get $seed)))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br $l)))
    (memory.size))
  ;; The sum of every 32-bit word of the memory.
  (func (export "checksum") (result i64)
    (local $i i32) (local $n i32) (local $s i64)
    (local.set $n (i32.mul (memory.size) (i32.const 65536)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $s (i64.add (local.get $s) (i64.extend_i32_u (i32.load (local.get $i)))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br $l)))
    (local.get $s)))"#;

/// The checksum of `bytes` filled with word(offset) = offset + seed (no
/// wrap: bytes + seed < 4 GiB).
fn expected(bytes: u64, seed: u64) -> u64 {
    let n = bytes / 4;
    4 * (n * n.saturating_sub(1) / 2) + n * seed
}

struct Instance1 {
    name: String,
    guest: WasmGuest,
    store: Store<GuestData<()>>,
    step: TypedFunc<(i32, i32), i32>,
    checksum: TypedFunc<(), i64>,
    /// Wasm pages per step.
    step_pages: u64,
    seed: u64,
    done_steps: u64,
    state: State,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Running,
    Trapped(String),
    GrowFailed,
    Done { ok: bool },
}

/// Pauses the workers between steps while the victim is reaped.
#[derive(Default)]
struct Gate {
    paused: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn set(&self, on: bool) {
        *guestmm::lock(&self.paused) = on;
        self.cv.notify_all();
    }
    fn wait(&self) {
        let mut p = guestmm::lock(&self.paused);
        while *p {
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// What the kill hook saw (of the first kill; `kills` counts them all).
#[derive(Default)]
struct KillInfo {
    kills: u64,
    at: Option<Instant>,
    report: Option<KillReport>,
    rss_before: u64,
    /// The victim's linear memory (host base, length).
    range: Option<(usize, u64)>,
    /// smaps Rss of that range at the kill.
    victim_rss_before: u64,
}

fn describe(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(t) => format!("trap: {t}"),
        None => format!("error: {e:#}"),
    }
}

fn main() {
    let args: Args = common::init();
    let m = args.instances;
    let small = args.small_mib * MIB;
    let big = args.big_mib * MIB;
    let budget = args
        .budget_mib
        .map(|b| b * MIB)
        .unwrap_or((m - 1) * small + big / 2);
    let mut cfg = WasmHostConfig::with_budget(budget);
    cfg.reaper.delay = Duration::from_millis(args.reaper_delay_ms);
    let layout = MemoryLayout::default();
    cfg.layout = layout;
    let wasm = common::or_exit(WasmHost::new(cfg, wasmtime::Config::new()), "wasm host");
    let module = common::or_exit(Module::new(wasm.engine(), WAT), "module");

    let kill = Arc::new(Mutex::new(KillInfo::default()));
    // Each instance's linear memory (host base, reservation + guard), for
    // the victim's smaps Rss.
    let ranges: Arc<Mutex<HashMap<String, (usize, u64)>>> = Arc::default();
    let gate = Arc::new(Gate::default());
    {
        let kill = kill.clone();
        let gate = gate.clone();
        let ranges = ranges.clone();
        wasm.set_on_kill(move |r| {
            // Under the OOM killer's lock, before the reap is queued: only
            // /proc reads here (the kernel's mmap lock, not a guest's).
            gate.set(true);
            let mut k = guestmm::lock(&kill);
            k.kills += 1;
            if k.report.is_some() {
                return;
            }
            k.at = Some(Instant::now());
            k.rss_before = procfs::statm_rss().unwrap_or(0);
            k.range = guestmm::lock(&ranges).get(&r.name).copied();
            k.victim_rss_before = k.range.map_or(0, |rg| common::mappings_rss(&[rg])[0]);
            k.report = Some(r.clone());
        });
    }

    let big_index = m / 2;
    let wasm_pages = |bytes: u64| bytes.div_ceil(64 << 10);
    let mut per_thread: Vec<Vec<Instance1>> = (0..args.threads).map(|_| Vec::new()).collect();
    for i in 0..m {
        let name = if i == big_index {
            format!("big-{i}")
        } else {
            format!("wasm-{i}")
        };
        let guest = common::or_exit(wasm.new_guest(&name), "guest");
        let mut store = guest.store(());
        let instance: Instance =
            common::or_exit(guest.instantiate(&mut store, &module, &[]), "instantiate");
        let step = common::or_exit(
            instance.get_typed_func::<(i32, i32), i32>(&mut store, "step"),
            "step",
        );
        let checksum = common::or_exit(
            instance.get_typed_func::<(), i64>(&mut store, "checksum"),
            "checksum",
        );
        let memory = common::or_exit(
            instance
                .get_memory(&mut store, "memory")
                .ok_or("no exported memory"),
            "memory",
        );
        guestmm::lock(&ranges).insert(
            name.clone(),
            (
                memory.data_ptr(&store) as usize,
                layout.reservation + layout.guard,
            ),
        );
        let bytes = if i == big_index { big } else { small };
        per_thread[(i % args.threads) as usize].push(Instance1 {
            name,
            guest,
            store,
            step,
            checksum,
            step_pages: wasm_pages(bytes).div_ceil(args.steps),
            seed: 1000 + i,
            done_steps: 0,
            state: State::Running,
        });
    }

    let status = common::status_line(args.json);
    let steps_done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let steps = args.steps;
    let workers: Vec<_> = per_thread
        .into_iter()
        .map(|mut mine| {
            let gate = gate.clone();
            let steps_done = steps_done.clone();
            std::thread::spawn(move || {
                for _ in 0..steps {
                    for inst in mine.iter_mut().filter(|x| x.state == State::Running) {
                        gate.wait();
                        let r = inst
                            .step
                            .call(&mut inst.store, (inst.step_pages as i32, inst.seed as i32));
                        match r {
                            Ok(-1) => inst.state = State::GrowFailed,
                            Ok(_) => inst.done_steps += 1,
                            Err(e) => inst.state = State::Trapped(describe(&e)),
                        }
                        steps_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for inst in mine.iter_mut().filter(|x| x.state == State::Running) {
                    gate.wait();
                    let bytes = inst.done_steps * inst.step_pages * (64 << 10);
                    inst.state = match inst.checksum.call(&mut inst.store, ()) {
                        Ok(s) => State::Done {
                            ok: s as u64 == expected(bytes, inst.seed),
                        },
                        Err(e) => State::Trapped(describe(&e)),
                    };
                }
                mine
            })
        })
        .collect();

    // Monitor: live progress, and the end of the reap (then the workers go
    // on).
    let reaper = wasm
        .reaper()
        .expect("WasmHost::new starts a reaper")
        .clone();
    let mut reaped_at = None;
    let mut rss_after = 0;
    let mut rss_after_outside = 0;
    let mut victim_rss_after = 0;
    let total_steps = m * steps;
    // Until every worker is done and every kill's reap has ended (the gate
    // is open again).
    while !workers.iter().all(|w| w.is_finished()) || reaps_pending(&kill, &reaper) {
        let st = wasm.host().stats();
        status.set_message(format!(
            "steps {}/{}  charged {} MiB / {} MiB  kills {}",
            steps_done.load(Ordering::Relaxed),
            total_steps,
            st.charged_bytes / MIB,
            budget / MIB,
            wasm.host().oom_stats().kills
        ));
        if kill_pending(&kill) && !reaps_pending(&kill, &reaper) {
            if reaped_at.is_none() {
                // The first victim reaped; the others are still paused.
                reaped_at = Some(Instant::now());
                rss_after = procfs::statm_rss().unwrap_or(0);
                rss_after_outside = rss_from_outside().unwrap_or(0);
                victim_rss_after = guestmm::lock(&kill)
                    .range
                    .map_or(0, |rg| common::mappings_rss(&[rg])[0]);
            }
            gate.set(false);
        }
        if t0.elapsed() > Duration::from_secs(300) {
            eprintln!("wasm_fleet: gave up after 300 s");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    gate.set(false);
    let all: Vec<Instance1> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker panicked"))
        .collect();
    status.finish_and_clear();
    let elapsed = t0.elapsed();

    let k = guestmm::lock(&kill);
    let victim = k.report.as_ref().map(|r| r.name.clone());
    let victim_inst = victim
        .as_ref()
        .and_then(|v| all.iter().find(|i| &i.name == v));
    let victim_trap = victim_inst.and_then(|v| match &v.state {
        State::Trapped(t) => Some(t.clone()),
        _ => None,
    });
    let completed = all
        .iter()
        .filter(|i| matches!(i.state, State::Done { .. }))
        .count() as u64;
    let checksums_ok = all
        .iter()
        .filter(|i| i.state == State::Done { ok: true })
        .count() as u64;
    let killed = all.iter().filter(|i| i.guest.is_killed()).count() as u64;
    let grow_failures = all.iter().filter(|i| i.state == State::GrowFailed).count() as u64;
    let back = k.rss_before.saturating_sub(rss_after);
    let report = Report {
        instances: m,
        completed,
        checksums_ok,
        killed,
        victim: victim.clone(),
        victim_trapped: victim_trap
            .as_deref()
            .is_some_and(|t| t.starts_with("trap")),
        victim_trap: victim_trap.clone(),
        grow_failures,
        budget_bytes: budget,
        peak_charged_bytes: wasm.host().stats().peak_charged_bytes,
        kills: k.kills,
        victim_rss_before_reap_bytes: k.victim_rss_before,
        victim_rss_after_reap_bytes: victim_rss_after,
        process_rss_before_reap_bytes: k.rss_before,
        process_rss_after_reap_bytes: rss_after,
        process_rss_after_reap_outside_bytes: rss_after_outside,
        rss_back_fraction: if k.victim_rss_before > 0 {
            round(back as f64 / k.victim_rss_before as f64, 3)
        } else {
            0.0
        },
        reap_ms: round(reaper.stats().last_reap_us as f64 / 1e3, 3),
        kill_to_reaped_ms: match (k.at, reaped_at) {
            (Some(a), Some(b)) => round((b - a).as_secs_f64() * 1e3, 3),
            _ => 0.0,
        },
        elapsed_ms: round(elapsed.as_secs_f64() * 1e3, 1),
    };
    if args.json {
        common::print_json(&report);
    } else {
        println!("instance        memory    state");
        for i in &all {
            let mem = i.done_steps * i.step_pages * (64 << 10);
            let state = match &i.state {
                State::Done { ok: true } => "checksum ok".to_string(),
                State::Done { ok: false } => "CHECKSUM WRONG".to_string(),
                State::GrowFailed => "memory.grow failed".to_string(),
                State::Trapped(t) => format!("killed: {t}"),
                State::Running => "?".to_string(),
            };
            if i.name.starts_with("big") || !matches!(i.state, State::Done { ok: true }) {
                println!("{:<12} {:>7} MiB  {state}", i.name, mem / MIB);
            }
        }
        println!(
            "... and {} more instances with the right checksum",
            all.iter()
                .filter(|i| !i.name.starts_with("big") && i.state == State::Done { ok: true })
                .count()
        );
        println!();
        println!("budget                       {} MiB", budget / MIB);
        println!("completed / checksums ok     {completed} / {checksums_ok} of {m}");
        println!(
            "killed                       {killed} ({})",
            victim.as_deref().unwrap_or("none")
        );
        println!(
            "victim's call                {}",
            victim_trap.as_deref().unwrap_or("-")
        );
        println!(
            "victim RSS at kill           {} MiB (its mapping in /proc/self/smaps)",
            k.victim_rss_before / MIB
        );
        println!(
            "victim RSS after reap        {} MiB",
            victim_rss_after / MIB
        );
        println!(
            "process RSS before reap      {} MiB (/proc/self/statm)",
            k.rss_before / MIB
        );
        println!(
            "process RSS after reap       {} MiB ({:.0} % of the victim back; {} MiB seen by `cat /proc/PID/status`)",
            rss_after / MIB,
            report.rss_back_fraction * 100.0,
            rss_after_outside / MIB
        );
        println!(
            "reap                         {:.1} ms (kill to reaped {:.1} ms)",
            report.reap_ms, report.kill_to_reaped_ms
        );
    }
    drop(k);
    drop(all);
}

fn kill_pending(k: &Arc<Mutex<KillInfo>>) -> bool {
    guestmm::lock(k).kills > 0
}

/// A kill whose reap has not ended yet (reaped, skipped or given up).
fn reaps_pending(k: &Arc<Mutex<KillInfo>>, reaper: &mm_reaper::Reaper) -> bool {
    let r = reaper.stats();
    guestmm::lock(k).kills > r.reaped + r.skipped + r.gave_up + r.exited_before_reap
}

/// This process's `VmRSS` as another process sees it (`cat
/// /proc/PID/status`).
fn rss_from_outside() -> Option<u64> {
    let out = std::process::Command::new("cat")
        .arg(format!("/proc/{}/status", std::process::id()))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}
