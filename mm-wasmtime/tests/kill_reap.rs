//! Kill and reap under wasmtime, in a child process (a host crash there,
//! a `SIGBUS` from a poisoned page say, fails the parent's test instead of
//! killing the test binary): two instances over one budget; a grow of the
//! small one kills the large one; the reaper returns its pages (seen by
//! `mincore` and in the process RSS from `/proc`); then the victim's code
//! touches its memory again and gets a wasm trap, and the other instance
//! and the host live on.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mm_wasmtime::{MemoryLayout, WasmHost, WasmHostConfig};
use wasmtime::{Config, Module, Trap};

const CHILD_ENV: &str = "MM_WASMTIME_CHILD";
const MIB: u64 = 1 << 20;
/// A bound on any wait here: reaching it is a failure, never a measurement.
const HANG: Duration = Duration::from_secs(120);

const WAT: &str = r#"(module
  (memory (export "mem") 1)
  (func (export "grow") (param $pages i32) (result i32)
    (if (i32.eq (memory.grow (local.get $pages)) (i32.const -1))
      (then (return (i32.const -1))))
    (memory.size))
  (func (export "fill") (param $seed i32)
    (local $i i32) (local $n i32)
    (local.set $n (i32.mul (memory.size) (i32.const 65536)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store (local.get $i) (i32.add (local.get $i) (local.get $seed)))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br $l))))
  (func (export "load") (param $a i32) (result i32) (i32.load (local.get $a))))"#;

fn run_child(name: &str) -> ExitStatus {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn child");
    let deadline = Instant::now() + HANG;
    loop {
        if let Some(st) = child.try_wait().expect("wait child") {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {name} still running after {HANG:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss() -> u64 {
    guestmm::procfs::statm_rss().expect("statm")
}

#[test]
fn reaped_instance_traps_and_the_host_lives() {
    const NAME: &str = "reaped_instance_traps_and_the_host_lives";
    if std::env::var(CHILD_ENV).as_deref() != Ok(NAME) {
        let st = run_child(NAME);
        assert!(st.success(), "child ended with {st:?} (a host crash?)");
        return;
    }
    let mut cfg = WasmHostConfig::with_budget(48 * MIB);
    cfg.layout = MemoryLayout {
        reservation: 128 * MIB,
        guard: 64 << 10,
    };
    let wasm = WasmHost::new(cfg, Config::new()).unwrap();
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let victim = wasm.new_guest("victim").unwrap();
    let other = wasm.new_guest("other").unwrap();
    let mut vs = victim.store(());
    let mut os = other.store(());
    let vi = victim.instantiate(&mut vs, &module, &[]).unwrap();
    let oi = other.instantiate(&mut os, &module, &[]).unwrap();
    let vgrow = vi.get_typed_func::<i32, i32>(&mut vs, "grow").unwrap();
    let vfill = vi.get_typed_func::<i32, ()>(&mut vs, "fill").unwrap();
    let vload = vi.get_typed_func::<i32, i32>(&mut vs, "load").unwrap();
    let ogrow = oi.get_typed_func::<i32, i32>(&mut os, "grow").unwrap();
    let ofill = oi.get_typed_func::<i32, ()>(&mut os, "fill").unwrap();
    let oload = oi.get_typed_func::<i32, i32>(&mut os, "load").unwrap();

    // The victim fills 32 MiB, the other 4 MiB.
    assert_eq!(vgrow.call(&mut vs, 511).unwrap(), 512);
    vfill.call(&mut vs, 1).unwrap();
    assert_eq!(ogrow.call(&mut os, 63).unwrap(), 64);
    ofill.call(&mut os, 2).unwrap();
    let victim_resident = victim.resident_bytes().unwrap();
    assert!(victim_resident >= 32 * MIB, "{victim_resident}");
    let rss_before = rss();

    // 16 MiB more for the other one: over the budget; the OOM killer takes
    // the largest (the victim) and the reaper returns its pages.
    assert_eq!(ogrow.call(&mut os, 256).unwrap(), 320);
    assert!(victim.is_killed() && !other.is_killed());
    let reaper = wasm.reaper().unwrap();
    let deadline = Instant::now() + HANG;
    while reaper.stats().reaped < 1 {
        assert!(Instant::now() < deadline, "no reap after {HANG:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = victim.resident_bytes().unwrap();
    assert!(
        after < victim_resident / 10,
        "victim resident {after} after the reap"
    );
    let rss_after = rss();
    assert!(
        rss_before.saturating_sub(rss_after) * 10 >= victim_resident * 9,
        "process RSS {rss_before} -> {rss_after}: not 90 % of the victim's {victim_resident} back"
    );

    // The victim's code is called again: a trap in that instance (the
    // epoch check at function entry fires first, `Interrupt`; a load that
    // got past it would hit the PROT_NONE memory, `MemoryOutOfBounds`).
    let e = vload.call(&mut vs, 4096).unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<Trap>(),
            Some(Trap::Interrupt | Trap::MemoryOutOfBounds)
        ),
        "{e:?}"
    );
    // And again: still a trap, no zero page, no SIGBUS.
    assert!(vload.call(&mut vs, 0).is_err());
    assert!(
        vgrow.call(&mut vs, 1).is_err(),
        "a killed guest's grow traps"
    );

    // The other instance and the host live on.
    ofill.call(&mut os, 2).unwrap();
    assert_eq!(oload.call(&mut os, 4000).unwrap(), 4002);
    assert_eq!(
        oload.call(&mut os, (320 << 16) - 4).unwrap(),
        (320 << 16) - 4 + 2
    );
    assert_eq!(wasm.host().oom_stats().kills, 1);
    println!("child: victim trapped after the reap; rss {rss_before} -> {rss_after}");
}
