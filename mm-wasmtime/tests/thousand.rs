//! 1,000 live instances in one process on the adapter, each its own
//! guestmm guest with a tracked linear memory, all touched and all alive
//! at once, with the userfaultfd handler threads bounded.
//!
//! Every tracked guest of the process is served by mm-core's shared
//! handler pool (`tracked/pool.rs`: `n` threads, at most `3 n`
//! descriptors, whatever the number of guests), so 1,000 instances cost
//! no thread and no descriptor of their own. The counts are the
//! process's, read from `/proc/self` while all 1,000 live: its threads
//! (`/proc/self/task`, by name for the pool's), its descriptors
//! (`/proc/self/fd`), and its resident memory (`VmRSS`).
//!
//! One test in this binary: the counts are the whole process's.

use mm_wasmtime::{MemoryLayout, WasmHost, WasmHostConfig};
use wasmtime::{Config, Module};

const N: usize = 1000;
const MIB: u64 = 1 << 20;
/// The pool size asked for (mm-core's default too).
const HANDLER_THREADS: usize = 2;

const WAT: &str = r#"(module
  (memory 1)
  (func (export "touch") (param $v i32) (result i32)
    (i32.store (i32.const 1024) (local.get $v))
    (i32.load (i32.const 1024))))"#;

/// The names of the process's threads (`/proc/self/task/*/comm`).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fd dir").count()
}

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS: line")
}

#[test]
fn thousand_live_instances_bounded_handler_threads() {
    mm_core::set_uffd_handler_threads(HANDLER_THREADS).expect("pool size before the first mmap");
    let mut cfg = WasmHostConfig::with_budget(1 << 30);
    // 1 MiB reservations: 1,000 x 4 GiB of address space is fine on
    // x86-64, but there is no need.
    cfg.layout = MemoryLayout {
        reservation: MIB,
        guard: 64 << 10,
    };
    let wasm = WasmHost::new(cfg, Config::new()).expect("wasm host");
    let module = Module::new(wasm.engine(), WAT).expect("module");
    let fds0 = fds();
    let mut live = Vec::with_capacity(N);
    for i in 0..N {
        let guest = wasm.new_guest(&format!("i{i}")).expect("guest");
        let mut store = guest.store(());
        let inst = guest
            .instantiate(&mut store, &module, &[])
            .expect("instantiate");
        let touch = inst
            .get_typed_func::<i32, i32>(&mut store, "touch")
            .expect("touch");
        assert_eq!(touch.call(&mut store, i as i32).expect("call"), i as i32);
        live.push((guest, store, touch));
    }
    // All alive at once: each still answers with its own value.
    for (i, (_, store, touch)) in live.iter_mut().enumerate() {
        assert_eq!(touch.call(store, i as i32).expect("call"), i as i32);
    }
    let names = thread_names();
    let fds1 = fds();
    let handlers = names
        .iter()
        .filter(|n| n.starts_with("guestmm-uffd"))
        .count();
    let rss = vm_rss_kib();
    println!(
        "{N} live instances: {} threads in the process ({handlers} userfaultfd handlers), \
         {fds1} fds ({fds0} before the first instance), VmRSS {} MiB",
        names.len(),
        rss >> 10
    );
    // The pool's threads, whatever the number of guests.
    assert_eq!(handlers, HANDLER_THREADS, "handler threads: {names:?}");
    // The whole process: the test harness, the reaper, the pool, the
    // runtime's own; nothing per instance.
    assert!(names.len() <= 16, "{} threads: {names:?}", names.len());
    // The pool's 3 n descriptors at most (opened by the first instance),
    // nothing per instance.
    assert!(
        fds1 <= fds0 + 3 * HANDLER_THREADS + 2,
        "{fds1} fds, {fds0} before"
    );
    // Each instance's touched page is resident (64 KiB-page memories,
    // one 4 KiB page touched each): at least N pages.
    assert!(rss >= (N as u64 * 4), "VmRSS {rss} KiB");
    drop(live);
}
