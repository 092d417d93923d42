//! A real KVM vCPU writing into a dirty-tracked region: its writes (taken
//! through the host page tables, by the kernel on the process's behalf)
//! are recorded, and after a harvest re-protects the pages, the same
//! writes are recorded again (re-protection invalidates KVM's own
//! mappings through the MMU notifier). Skipped without `/dev/kvm`.

mod common;

use common::{Fixture, PAGE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use mm_vm_memory::{Error, GuestMemoryMm, MmRegion};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// The guest of `examples/kvm_guest.rs` (32-bit protected mode, no
/// paging): writes its own address into every page from 0x1000 up to
/// `esi`, reads them all back, OUTs the error count to port 0x11, HLT.
const GUEST_CODE: [u8; 62] = [
    0xbf, 0x00, 0x10, 0x00, 0x00, 0x89, 0x3f, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0xf7, 0xc7, 0xff,
    0xff, 0x0f, 0x00, 0x75, 0x07, 0x89, 0xf8, 0x66, 0xba, 0x10, 0x00, 0xef, 0x39, 0xf7, 0x72, 0xe5,
    0xbf, 0x00, 0x10, 0x00, 0x00, 0x31, 0xdb, 0x39, 0x3f, 0x74, 0x01, 0x43, 0x81, 0xc7, 0x00, 0x10,
    0x00, 0x00, 0x39, 0xf7, 0x72, 0xf1, 0x89, 0xd8, 0x66, 0xba, 0x11, 0x00, 0xef, 0xf4,
];
const RAM: u64 = 4 << 20;

fn bits(words: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (w, &x) in words.iter().enumerate() {
        for b in 0..64 {
            if x & (1 << b) != 0 {
                v.push((w * 64 + b) as u64);
            }
        }
    }
    v
}

/// Runs the guest from its first instruction to HLT; its error count.
fn run_guest(vcpu: &mut VcpuFd) -> u32 {
    let mut sregs = vcpu.get_sregs().unwrap();
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.limit = 0xffff_ffff;
        seg.g = 1;
        seg.db = 1;
        seg.s = 1;
        seg.present = 1;
        seg.dpl = 0;
        seg.type_ = 3;
    }
    sregs.cs.type_ = 11;
    sregs.cs.selector = 8;
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0;
    regs.rsi = RAM;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    let mut errors = None;
    // Bounded: the guest program ends in HLT after 2 × RAM/4 KiB pages.
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x10, _) => {}
            VcpuExit::IoOut(0x11, data) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                errors = Some(u32::from_le_bytes(b));
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    errors.expect("the guest reports its error count")
}

#[test]
fn test_vcpu_writes_are_dirty_every_round() {
    let f = Fixture::new(1 << 30);
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipped: /dev/kvm not usable ({e})");
            return;
        }
    };
    let vm = kvm.create_vm().unwrap();
    let addr = f.map(RAM, false).unwrap();
    let region = match MmRegion::dirty_tracked(&f.user, addr, RAM, GuestAddress(0)) {
        Ok(r) => r,
        Err(e @ Error::Unsupported { .. }) => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mem: GuestMemoryMm<_> = GuestMemoryMm::from_regions(vec![region]).unwrap();
    let r = mem.find_region(GuestAddress(0)).unwrap();
    mem.write_slice(&GUEST_CODE, GuestAddress(0)).unwrap();
    let bm = r.bitmap_ref();
    assert_eq!(
        bits(&bm.get_and_reset().unwrap()),
        vec![0],
        "the code write"
    );

    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: r.host_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region's host range stays mapped while `mem` lives (it
    // holds a user reference and the VMA); `vm` is dropped before `mem`
    // (explicitly, at the end).
    unsafe { vm.set_user_memory_region(slot) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let every_page_but_code: Vec<u64> = (1..RAM / PAGE).collect();
    for round in 0..3 {
        assert_eq!(run_guest(&mut vcpu), 0, "round {round}: the guest's check");
        let dirty = bits(&bm.get_and_reset().unwrap());
        assert_eq!(dirty, every_page_but_code, "round {round}");
        assert!(bits(&bm.get_and_reset().unwrap()).is_empty());
    }
    drop(vcpu);
    drop(vm);
    drop(mem);
}
