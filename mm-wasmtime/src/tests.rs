//! Unit tests: layout, growth, budget, the guard, writes reaching the
//! guestmm mapping (wasmtime #12053), kills. Memory claims come from the
//! kernel (`/proc/self/maps`, `mincore`), not guestmm's counters.

use super::*;
use wasmtime::{Trap, TypedFunc};

/// Grow, fill (word at byte `i` = `i + seed`), sum, load/store a byte,
/// spin forever.
pub(crate) const WAT: &str = r#"(module
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
  (func (export "sum") (result i64)
    (local $i i32) (local $n i32) (local $s i64)
    (local.set $n (i32.mul (memory.size) (i32.const 65536)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $s (i64.add (local.get $s) (i64.extend_i32_u (i32.load (local.get $i)))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br $l)))
    (local.get $s))
  (func (export "load") (param $a i32) (result i32) (i32.load8_u (local.get $a)))
  (func (export "store") (param $a i32) (param $v i32) (i32.store8 (local.get $a) (local.get $v)))
  (func (export "spin") (loop $l (br $l))))"#;

/// The sum `fill(seed)` leaves in `bytes` of memory.
pub(crate) fn expected_sum(bytes: u64, seed: u32) -> u64 {
    (0..bytes / 4)
        .map(|w| u64::from((w as u32 * 4).wrapping_add(seed)))
        .sum()
}

const SMALL: MemoryLayout = MemoryLayout {
    reservation: 16 << 20,
    guard: 64 << 10,
};

fn wasm_host(budget: u64) -> WasmHost {
    let mut cfg = WasmHostConfig::with_budget(budget);
    cfg.layout = SMALL;
    WasmHost::new(cfg, Config::new()).expect("wasm host")
}

struct Inst {
    guest: WasmGuest,
    store: Store<GuestData<()>>,
    instance: Instance,
}

impl Inst {
    fn new(wasm: &WasmHost, module: &Module, name: &str) -> Inst {
        let guest = wasm.new_guest(name).expect("guest");
        let mut store = guest.store(());
        let instance = guest
            .instantiate(&mut store, module, &[])
            .expect("instantiate");
        Inst {
            guest,
            store,
            instance,
        }
    }
    fn func<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &str,
    ) -> TypedFunc<P, R> {
        self.instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .expect("export")
    }
    fn grow(&mut self, pages: i32) -> wasmtime::Result<i32> {
        let f = self.func::<i32, i32>("grow");
        f.call(&mut self.store, pages)
    }
    fn fill(&mut self, seed: i32) -> wasmtime::Result<()> {
        let f = self.func::<i32, ()>("fill");
        f.call(&mut self.store, seed)
    }
    fn sum(&mut self) -> wasmtime::Result<i64> {
        let f = self.func::<(), i64>("sum");
        f.call(&mut self.store, ())
    }
    fn load(&mut self, a: i32) -> wasmtime::Result<i32> {
        let f = self.func::<i32, i32>("load");
        f.call(&mut self.store, a)
    }
    fn base(&mut self) -> usize {
        let mem = self
            .instance
            .get_memory(&mut self.store, "mem")
            .expect("mem");
        mem.data_ptr(&self.store) as usize
    }
}

/// The protection string (`rw-p`, `---p`) of the `/proc/self/maps` line
/// containing `addr`.
fn maps_prot(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let range = it.next().unwrap();
        let perms = it.next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let a = usize::from_str_radix(a, 16).unwrap();
        let b = usize::from_str_radix(b, 16).unwrap();
        if a <= addr && addr < b {
            return perms.to_string();
        }
    }
    "unmapped".into()
}

fn trap_of(e: &wasmtime::Error) -> Option<Trap> {
    e.downcast_ref::<Trap>().copied()
}

#[test]
fn test_grow_in_place_guard_stays_closed() {
    let wasm = wasm_host(256 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let mut i = Inst::new(&wasm, &module, "a");
    let base = i.base();
    assert_eq!(maps_prot(base), "rw-p");
    assert_eq!(maps_prot(base + (64 << 10)), "---p", "not grown yet");
    assert_eq!(i.grow(3).unwrap(), 4);
    assert_eq!(i.base(), base, "grown in place");
    assert_eq!(maps_prot(base + (4 << 16) - 1), "rw-p");
    assert_eq!(maps_prot(base + (4 << 16)), "---p");
    // Up to the reservation (16 MiB = 256 pages), never into the guard.
    assert_eq!(i.grow(252).unwrap(), 256);
    assert_eq!(
        i.grow(1).unwrap(),
        -1,
        "past the capacity: memory.grow fails"
    );
    assert_eq!(maps_prot(base + (16 << 20) - 1), "rw-p");
    assert_eq!(
        maps_prot(base + (16 << 20)),
        "---p",
        "the guard stays closed"
    );
    // An access past the size traps (bounds), the instance lives on.
    let e = i.load(16 << 20).unwrap_err();
    assert_eq!(trap_of(&e), Some(Trap::MemoryOutOfBounds));
    assert_eq!(i.load(0).unwrap(), 0);
}

#[test]
fn test_touched_pages_charged_and_resident() {
    let wasm = wasm_host(256 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let mut i = Inst::new(&wasm, &module, "a");
    let before = wasm.host().stats().charged_bytes;
    assert_eq!(i.grow(63).unwrap(), 64); // 4 MiB
    let grown = wasm.host().stats().charged_bytes;
    assert!(
        grown - before < (1 << 20),
        "a grow alone charges nothing much"
    );
    i.fill(5).unwrap();
    assert_eq!(i.sum().unwrap() as u64, expected_sum(4 << 20, 5));
    assert!(wasm.host().stats().charged_bytes >= 4 << 20);
    // The kernel's view: 4 MiB resident in the guest's mapping.
    let resident = i.guest.resident_bytes().unwrap();
    assert!(resident >= 4 << 20, "resident {resident}");
}

/// wasmtime #12053 (custom memory creators losing writes in 33+): on 48
/// the JIT writes land in our mapping and ours are seen by JIT code.
#[test]
fn test_writes_reach_the_guestmm_mapping() {
    let wasm = wasm_host(256 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let mut i = Inst::new(&wasm, &module, "a");
    i.fill(9).unwrap();
    let mm = i.guest.shared.mm.clone();
    let vma = mm.vmas_blocking().into_iter().next().expect("one mapping");
    assert_eq!(vma.host_ptr() as usize, i.base(), "wasmtime uses our base");
    let mut word = [0u8; 4];
    mm.read_blocking(vma.start() + 4000, &mut word).unwrap();
    assert_eq!(
        u32::from_le_bytes(word),
        4000 + 9,
        "JIT write seen by guestmm"
    );
    mm.write_blocking(vma.start() + 8, &[0xab]).unwrap();
    assert_eq!(i.load(8).unwrap(), 0xab, "guestmm write seen by JIT code");
}

#[test]
fn test_grow_over_budget_unkillable_fails_cleanly() {
    let wasm = wasm_host(2 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let mut i = Inst::new(&wasm, &module, "a");
    i.guest.guest().set_unkillable(true);
    i.fill(1).unwrap();
    // 4 MiB more does not fit 2 MiB and nobody can be killed: -1.
    assert_eq!(i.grow(64).unwrap(), -1);
    assert!(!i.guest.is_killed());
    assert_eq!(i.sum().unwrap() as u64, expected_sum(64 << 10, 1));
}

#[test]
fn test_grow_over_budget_kills_the_largest() {
    let wasm = wasm_host(8 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let mut big = Inst::new(&wasm, &module, "big");
    let mut small = Inst::new(&wasm, &module, "small");
    assert_eq!(big.grow(79).unwrap(), 80); // 5 MiB
    big.fill(3).unwrap();
    small.fill(4).unwrap();
    // 4 MiB more for the small one: over budget, the big one is killed.
    assert_eq!(small.grow(64).unwrap(), 65);
    assert!(big.guest.is_killed() && !small.guest.is_killed());
    small.fill(4).unwrap();
    assert_eq!(small.sum().unwrap() as u64, expected_sum(65 << 16, 4));
    let e = big.sum().unwrap_err();
    assert!(trap_of(&e).is_some(), "the victim traps: {e:?}");
    assert_eq!(wasm.host().oom_stats().kills, 1);
}

#[test]
fn test_kill_interrupts_a_spinning_instance() {
    let wasm = wasm_host(64 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let mut i = Inst::new(&wasm, &module, "spinner");
    let guest = i.guest.guest().clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        guest.kill();
    });
    let spin = i.func::<(), ()>("spin");
    let e = spin.call(&mut i.store, ()).unwrap_err();
    killer.join().unwrap();
    assert_eq!(trap_of(&e), Some(Trap::Interrupt));
    // Every later call traps (the epoch check at entry, or the closed
    // memory), and a grow traps.
    assert!(trap_of(&i.load(0).unwrap_err()).is_some());
    assert!(i.grow(1).is_err());
}

#[test]
fn test_memory_outside_a_guest_is_refused() {
    let wasm = wasm_host(64 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let mut store = Store::new(wasm.engine(), ());
    let e = Instance::new(&mut store, &module, &[]).unwrap_err();
    assert!(
        format!("{e:#}").contains("no current guestmm guest"),
        "{e:#}"
    );
}

#[test]
fn test_bad_layout_is_a_named_error() {
    let mut cfg = WasmHostConfig::with_budget(1 << 20);
    cfg.layout = MemoryLayout {
        reservation: 1000,
        guard: 0,
    };
    let e = WasmHost::new(cfg, Config::new()).unwrap_err();
    assert!(matches!(e, Error::BadMemoryLayout { .. }), "{e}");
}

#[test]
fn test_killed_guest_cannot_instantiate() {
    let wasm = wasm_host(64 << 20);
    let module = Module::new(wasm.engine(), WAT).unwrap();
    let guest = wasm.new_guest("g").unwrap();
    guest.guest().kill();
    let mut store = guest.store(());
    assert!(guest.instantiate(&mut store, &module, &[]).is_err());
}
