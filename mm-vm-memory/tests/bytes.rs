//! The adapter behaves as vm-memory's own `GuestMemoryMmap`: the same
//! operations on the same guest-physical layout (a hole, then two adjacent
//! regions) give the same results and the same errors, with the adapter's
//! regions being guestmm VMAs (tracked and untracked mixed).

mod common;

use std::sync::atomic::Ordering;

use common::{reference, tracked_available, Fixture, LAYOUT, PAGE};
use mm_vm_memory::{Error, GuestMemoryMm, MmRegion};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestRegionCollection, GuestRegionCollectionError, MemoryRegionAddress,
};

/// The variant name of a vm-memory error (the reference and the adapter
/// must agree on it; fields such as `PartialBuffer`'s counts are compared
/// separately where they matter).
fn kind(e: &GuestMemoryError) -> String {
    let d = format!("{e:?}");
    d.split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    a: Result<T, GuestMemoryError>,
    b: Result<T, GuestMemoryError>,
) {
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y, "{what}: values differ"),
        (Err(x), Err(y)) => assert_eq!(kind(x), kind(y), "{what}: {x:?} vs {y:?}"),
        _ => panic!("{what}: adapter {a:?}, reference {b:?}"),
    }
}

/// Addresses around every boundary of `LAYOUT`, and the far end.
fn probe_addrs() -> Vec<u64> {
    let mut v = vec![0, 1, 0x100, u64::MAX, u64::MAX - 3];
    for &(b, l) in &LAYOUT {
        for d in [0i64, -1, -2, -4, -8, 1] {
            v.push((b as i64 + d).max(0) as u64);
            v.push((b as i64 + l as i64 + d).max(0) as u64);
        }
    }
    v
}

fn check_against_reference(mem: &GuestMemoryMm) {
    let r = reference();
    let sizes = [0usize, 1, 5, 8, 0x7ff, 0x1000, 0x4000, 0x4001, 0x8000];
    for &a in &probe_addrs() {
        let ga = GuestAddress(a);
        // Same pattern written to both, then read back from both.
        for &n in &sizes {
            let data: Vec<u8> = (0..n)
                .map(|i| (i as u8).wrapping_mul(7) ^ a as u8)
                .collect();
            same("write", mem.write(&data, ga), r.write(&data, ga));
            same(
                "write_slice",
                mem.write_slice(&data, ga),
                r.write_slice(&data, ga),
            );
            let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
            same("read", mem.read(&mut x, ga), r.read(&mut y, ga));
            assert_eq!(x, y, "read at {a:#x}+{n:#x}");
            let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
            same(
                "read_slice",
                mem.read_slice(&mut x, ga),
                r.read_slice(&mut y, ga),
            );
            assert_eq!(x, y, "read_slice at {a:#x}+{n:#x}");
            same(
                "check_range",
                Ok(GuestMemoryBackend::check_range(mem, ga, n)),
                Ok(GuestMemoryBackend::check_range(&r, ga, n)),
            );
            same(
                "get_slice",
                GuestMemoryBackend::get_slice(mem, ga, n).map(|s| s.len()),
                GuestMemoryBackend::get_slice(&r, ga, n).map(|s| s.len()),
            );
        }
        let v = 0x1122_3344_5566_7788u64 ^ a;
        same("write_obj", mem.write_obj(v, ga), r.write_obj(v, ga));
        same("read_obj", mem.read_obj::<u64>(ga), r.read_obj::<u64>(ga));
        same(
            "store",
            mem.store(v as u32, ga, Ordering::SeqCst),
            r.store(v as u32, ga, Ordering::SeqCst),
        );
        same(
            "load",
            mem.load::<u32>(ga, Ordering::SeqCst),
            r.load::<u32>(ga, Ordering::SeqCst),
        );
        same(
            "to_region_addr",
            Ok(mem.to_region_addr(ga).map(|(g, o)| (g.start_addr(), o))),
            Ok(r.to_region_addr(ga).map(|(g, o)| (g.start_addr(), o))),
        );
        same(
            "find_region",
            Ok(mem.find_region(ga).map(|g| (g.start_addr(), g.len()))),
            Ok(r.find_region(ga).map(|g| (g.start_addr(), g.len()))),
        );
        same(
            "address_in_range",
            Ok(mem.address_in_range(ga)),
            Ok(r.address_in_range(ga)),
        );
        same(
            "get_host_address",
            mem.get_host_address(ga).map(|_| ()),
            r.get_host_address(ga).map(|_| ()),
        );
    }
    assert_eq!(mem.num_regions(), r.num_regions());
    assert_eq!(mem.last_addr(), r.last_addr());
}

#[test]
fn test_same_as_guest_memory_mmap_untracked() {
    let f = Fixture::new(64 << 20);
    let mem = f.layout([false; 3]).unwrap();
    check_against_reference(&mem);
}

#[test]
fn test_same_as_guest_memory_mmap_tracked_mixed() {
    let f = Fixture::new(64 << 20);
    if !tracked_available(&f, "test_same_as_guest_memory_mmap_tracked_mixed") {
        return;
    }
    let mem = f.layout([true, false, true]).unwrap();
    check_against_reference(&mem);
    // The tracked regions' direct touches were charged to the budget.
    assert!(f.host.stats().charged_bytes >= 2 * PAGE);
}

#[test]
fn test_cross_boundary_and_errors() {
    let f = Fixture::new(64 << 20);
    let mem = f.layout([false; 3]).unwrap();
    // Adjacent regions (two VMAs): one write spans both.
    let across = GuestAddress(0xc000 - 3);
    assert_eq!(mem.write(b"abcdef", across).unwrap(), 6);
    let mut buf = [0u8; 6];
    mem.read_slice(&mut buf, across).unwrap();
    assert_eq!(&buf, b"abcdef");
    // The bytes really are in the two guestmm VMAs.
    let (r0, o0) = mem.to_region_addr(GuestAddress(0xbffd)).unwrap();
    let (r1, o1) = mem.to_region_addr(GuestAddress(0xc000)).unwrap();
    assert_eq!(
        (r0.start_addr(), o0),
        (GuestAddress(0x8000), MemoryRegionAddress(0x3ffd))
    );
    assert_eq!(
        (r1.start_addr(), o1),
        (GuestAddress(0xc000), MemoryRegionAddress(0))
    );
    assert!(f
        .user
        .compare_blocking(r0.mm_addr() + 0x3ffd, b"abc")
        .unwrap());
    assert!(f.user.compare_blocking(r1.mm_addr(), b"def").unwrap());

    // Into the hole: a short write, then nothing.
    assert_eq!(mem.write(b"xyz", GuestAddress(0x3ffe)).unwrap(), 2);
    assert!(matches!(
        mem.write_slice(b"xyz", GuestAddress(0x3ffe)),
        Err(GuestMemoryError::PartialBuffer {
            expected: 3,
            completed: 2
        })
    ));
    assert!(matches!(
        mem.read_obj::<u32>(GuestAddress(0x5000)),
        Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(0x5000)))
    ));
    // Overflow of the guest address space.
    assert!(mem.write_slice(b"xyz", GuestAddress(u64::MAX - 1)).is_err());
    assert!(!GuestMemoryBackend::check_range(
        &mem,
        GuestAddress(0),
        usize::MAX
    ));
    assert!(mem
        .checked_offset(GuestAddress(0xfff0), usize::MAX)
        .is_none());
    // Region-level bounds.
    let r = mem.find_region(GuestAddress(0)).unwrap();
    assert_eq!(
        r.get_slice(MemoryRegionAddress(0x100), 0x200)
            .unwrap()
            .len(),
        0x200
    );
    assert!(r
        .get_slice(MemoryRegionAddress(0x200), 0)
        .unwrap()
        .is_empty());
    assert!(r.get_slice(MemoryRegionAddress(0x3f00), 0x200).is_err());
    assert!(r.get_slice(MemoryRegionAddress(u64::MAX), 2).is_err());
    assert!(r.get_host_address(MemoryRegionAddress(0x4000)).is_err());
    assert_eq!(
        r.get_host_address(MemoryRegionAddress(0x10)).unwrap(),
        r.host_ptr().wrapping_add(0x10)
    );
    // Atomics, as vm-memory's `check_atomic_accesses`.
    let a = GuestAddress(0x8000);
    assert_eq!(mem.load::<u32>(a, Ordering::Relaxed).unwrap(), 0);
    mem.store(100u32, a, Ordering::Relaxed).unwrap();
    assert_eq!(mem.load::<u32>(a, Ordering::Relaxed).unwrap(), 100);
    assert!(mem
        .load::<u32>(GuestAddress(0x4000), Ordering::Relaxed)
        .is_err());
    assert!(mem
        .store(1u32, GuestAddress(0x10000), Ordering::Relaxed)
        .is_err());
    // Misaligned atomics are refused, as by vm-memory.
    assert!(mem
        .load::<u32>(GuestAddress(0x8001), Ordering::Relaxed)
        .is_err());
}

#[test]
fn test_bad_construction_is_a_named_error() {
    let f = Fixture::new(64 << 20);
    let a = f.map(4 * PAGE, false).unwrap();
    let g = GuestAddress(0);
    let new = |addr, len, g| MmRegion::<()>::new(&f.user, addr, len, g);
    assert!(matches!(new(a, 0, g), Err(Error::ZeroLength { .. })));
    assert!(matches!(new(a + 1, PAGE, g), Err(Error::Unaligned { .. })));
    assert!(matches!(new(a, PAGE + 1, g), Err(Error::Unaligned { .. })));
    assert!(matches!(new(a, 8 * PAGE, g), Err(Error::NotOneVma { .. })));
    assert!(matches!(
        new(!0xfffu64, 2 * PAGE, g),
        Err(Error::Overflow { .. })
    ));
    assert!(matches!(
        new(a, PAGE, GuestAddress(!0xfffu64)),
        Err(Error::Overflow { .. })
    ));
    // No VMA there: guestmm's own error.
    assert!(matches!(new(a + 64 * PAGE, PAGE, g), Err(Error::Mm(_))));
    // Read-only.
    f.user
        .mprotect_blocking(a, PAGE, mm_core::Prot::READ)
        .unwrap();
    assert!(matches!(new(a, PAGE, g), Err(Error::NotReadWrite { .. })));
    // A slice of a VMA is fine.
    let r = new(a + PAGE, 2 * PAGE, GuestAddress(0x1000)).unwrap();
    assert_eq!(r.len(), 2 * PAGE);
    // Overlapping guest ranges: vm-memory's own error.
    let r2 = new(a + 3 * PAGE, PAGE, GuestAddress(0x2000)).unwrap();
    assert!(matches!(
        GuestRegionCollection::from_regions(vec![r, r2]),
        Err(GuestRegionCollectionError::MemoryRegionOverlap)
    ));
}

#[test]
fn test_virtio_queue_descriptor_chain() {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;

    let f = Fixture::new(64 << 20);
    let len = 16 * PAGE;
    let addr = f.map(len, false).unwrap();
    let mem: GuestMemoryMm =
        GuestMemoryMm::from_regions(vec![
            MmRegion::new(&f.user, addr, len, GuestAddress(0)).unwrap()
        ])
        .unwrap();

    // virtio-queue's own mock driver lays out a split queue in the adapter's
    // memory: a chain of three descriptors (two readable, one writable).
    let vq = MockSplitQueue::new(&mem, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x4000, 0x10, VRING_DESC_F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(0x5000, 0x20, VRING_DESC_F_NEXT, 2)),
        RawDescriptor::from(SplitDescriptor::new(0x6000, 0x30, VRING_DESC_F_WRITE, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    mem.write_slice(b"request header..", GuestAddress(0x4000))
        .unwrap();

    let mut q: Queue = vq.create_queue().unwrap();
    let mut chain = q.iter(&mem).unwrap().next().expect("one chain");
    let d0 = chain.next().unwrap();
    assert_eq!(
        (d0.addr(), d0.len(), d0.is_write_only()),
        (GuestAddress(0x4000), 0x10, false)
    );
    let mut hdr = [0u8; 16];
    mem.read_slice(&mut hdr, d0.addr()).unwrap();
    assert_eq!(&hdr, b"request header..");
    let d1 = chain.next().unwrap();
    assert_eq!((d1.addr(), d1.len()), (GuestAddress(0x5000), 0x20));
    let d2 = chain.next().unwrap();
    assert_eq!(
        (d2.addr(), d2.len(), d2.is_write_only()),
        (GuestAddress(0x6000), 0x30, true)
    );
    assert!(chain.next().is_none());
    // The device answers into the writable descriptor and returns the chain.
    mem.write_slice(b"ok", d2.addr()).unwrap();
    let head = chain.head_index();
    q.add_used(&mem, head, 2).unwrap();
    assert!(f.user.compare_blocking(addr + 0x6000, b"ok").unwrap());
    // The used ring, read back through guestmm's copy API.
    let used_idx: u16 = mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 1);
}
