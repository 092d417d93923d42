//! # bench_wasm: instantiate + touch 64 MiB + drop, guestmm vs wasmtime
//!
//! One cycle: instantiate a module whose memory starts empty, grow it to
//! `--touch-mib` and write one byte per 4 KiB page from wasm, then drop the
//! instance (and, on our side, its guest: the guestmm teardown). The same
//! engine configuration on both sides ([`mm_wasmtime::configure_layout`]:
//! no CoW images, no moving memories, the same reservation and guard, epoch
//! interruption), the only difference being the memory: a tracked guestmm
//! mapping charged through userfaultfd, or wasmtime's on-demand
//! allocator's own `mmap`. Rounds alternate between the sides; the report
//! is the median of each and their ratio (target ≤ 1.2).
//!
//! DISCLAIMER: the first-touch cost of a tracked region depends on the
//! userfaultfd kind (user-mode-only here, as `WasmHostConfig::with_budget`
//! asks) and on fault-around (2 MiB windows by default).

use std::time::Instant;

use clap::Parser;
use mm_wasmtime::{configure_layout, MemoryLayout, WasmHost, WasmHostConfig};
use serde::Serialize;
use wasmtime::{Config, Engine, Instance, Module, Store};

#[path = "../../examples/common/mod.rs"]
mod common;
use common::{median, round, MIB};

/// Instantiate + touch + drop: guestmm's memory creator vs wasmtime's
/// default allocator, same run, medians.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench_wasm")]
struct Args {
    /// Memory touched per cycle, MiB.
    #[arg(long, default_value_t = 64, value_parser = common::at_least(1))]
    touch_mib: u64,
    /// Rounds (one cycle per side each).
    #[arg(long, default_value_t = 21, value_parser = common::at_least(1))]
    rounds: u64,
    /// One line of JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    touch_mib: u64,
    rounds: u64,
    guestmm_ms_median: f64,
    wasmtime_ms_median: f64,
    ratio: f64,
    guestmm_instantiate_ms_median: f64,
    wasmtime_instantiate_ms_median: f64,
    target_ratio: f64,
}

const WAT: &str = r#"(module
  (memory 0)
  (func (export "touch") (param $pages i32) (result i32)
    (local $i i32) (local $n i32)
    (if (i32.eq (memory.grow (local.get $pages)) (i32.const -1))
      (then (return (i32.const -1))))
    (local.set $n (i32.mul (memory.size) (i32.const 65536)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store8 (local.get $i) (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 4096)))
      (br $l)))
    (memory.size)))"#;

/// One cycle: `make` instantiates (and returns what must outlive the
/// store: our guest), then touch and drop. Returns (total ms, instantiate
/// ms).
fn cycle<S: 'static>(
    make: impl FnOnce() -> (Store<S>, Instance, Box<dyn std::any::Any>),
    pages: i32,
) -> (f64, f64) {
    let t0 = Instant::now();
    let (mut store, instance, keep) = make();
    let inst_ms = t0.elapsed().as_secs_f64() * 1e3;
    let touch = instance
        .get_typed_func::<i32, i32>(&mut store, "touch")
        .expect("touch export");
    assert_eq!(touch.call(&mut store, pages).expect("touch runs"), pages);
    drop(store);
    drop(keep);
    (t0.elapsed().as_secs_f64() * 1e3, inst_ms)
}

fn main() {
    let args: Args = common::init();
    let layout = MemoryLayout::default();
    let pages = (args.touch_mib * MIB / (64 << 10)) as i32;

    // Ours: a budget far above the touch (no pressure in this bench).
    let wasm = common::or_exit(
        WasmHost::new(
            WasmHostConfig::with_budget(args.touch_mib * MIB * 8),
            Config::new(),
        ),
        "wasm host",
    );
    let ours_module = common::or_exit(Module::new(wasm.engine(), WAT), "module");

    // Theirs: the same settings, wasmtime's own on-demand allocator.
    let mut cfg = Config::new();
    common::or_exit(configure_layout(&mut cfg, layout), "config");
    cfg.epoch_interruption(true);
    let engine = common::or_exit(Engine::new(&cfg), "engine");
    let their_module = common::or_exit(Module::new(&engine, WAT), "module");

    let ours = || {
        let guest = wasm.new_guest("bench").expect("guest");
        // The guest's store: its limiter and epoch callback included.
        let mut store = guest.store(());
        let instance = guest
            .instantiate(&mut store, &ours_module, &[])
            .expect("instantiate");
        (store, instance, Box::new(guest) as Box<dyn std::any::Any>)
    };
    let theirs = || {
        let mut store = Store::new(&engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = Instance::new(&mut store, &their_module, &[]).expect("instantiate");
        (store, instance, Box::new(()) as Box<dyn std::any::Any>)
    };

    let status = common::status_line(args.json);
    let (mut o, mut oi, mut t, mut ti) = (vec![], vec![], vec![], vec![]);
    // One warm-up cycle per side, not counted.
    for round_no in 0..=args.rounds {
        status.set_message(format!("round {round_no}/{}", args.rounds));
        let (a, ai) = cycle(ours, pages);
        let (b, bi) = cycle(theirs, pages);
        if round_no > 0 {
            o.push(a);
            oi.push(ai);
            t.push(b);
            ti.push(bi);
        }
    }
    status.finish_and_clear();
    let (om, tm) = (median(o), median(t));
    let report = Report {
        touch_mib: args.touch_mib,
        rounds: args.rounds,
        guestmm_ms_median: round(om, 3),
        wasmtime_ms_median: round(tm, 3),
        ratio: round(om / tm, 3),
        guestmm_instantiate_ms_median: round(median(oi), 3),
        wasmtime_instantiate_ms_median: round(median(ti), 3),
        target_ratio: 1.2,
    };
    if args.json {
        common::print_json(&report);
    } else {
        println!(
            "instantiate + touch {} MiB + drop, median of {} rounds",
            args.touch_mib, args.rounds
        );
        println!(
            "guestmm creator      {:>8.3} ms  (instantiate {:.3} ms)",
            report.guestmm_ms_median, report.guestmm_instantiate_ms_median
        );
        println!(
            "wasmtime on-demand   {:>8.3} ms  (instantiate {:.3} ms)",
            report.wasmtime_ms_median, report.wasmtime_instantiate_ms_median
        );
        println!(
            "ratio                {:>8.3}  (target <= 1.2)",
            report.ratio
        );
    }
}
