//! Kill and reap through the adapter (an error, never zeros, never SIGBUS),
//! the host mapping outliving the guest's other users, `GuestRegionMmap`
//! over a guestmm VMA, and hot-plug with `GuestMemoryAtomic`.

mod common;

use std::sync::atomic::Ordering;

use common::{tracked_available, Fixture, PAGE};
use mm_core::ProcessMemory;
use mm_vm_memory::{
    guest_region_mmap, guest_region_mmap_unchecked, Error, GuestMemoryMm, GuestMemoryMmAtomic,
    MmRegion,
};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, GuestRegionCollection, GuestRegionMmap,
};

const MIB: u64 = 1 << 20;

fn adapter_error(e: &GuestMemoryError) -> &Error {
    Error::from_guest_memory(e).unwrap_or_else(|| panic!("not the adapter's error: {e:?}"))
}

/// Kill, then reap, a guest whose RAM (one tracked and one untracked VMA)
/// is reached through the adapter by a "device thread".
#[test]
fn test_kill_then_reap_is_an_error_before_touching_memory() {
    let f = Fixture::new(1 << 30);
    let tracked = tracked_available(&f, "test_kill_then_reap_is_an_error_before_touching_memory");
    let len = 32 * MIB;
    let a = f.map(len, tracked).unwrap();
    let b = f.map(len, false).unwrap();
    let mem: GuestMemoryMm = GuestMemoryMm::from_regions(vec![
        MmRegion::new(&f.user, a, len, GuestAddress(0)).unwrap(),
        MmRegion::new(&f.user, b, len, GuestAddress(len)).unwrap(),
    ])
    .unwrap();
    assert_eq!(
        mem.find_region(GuestAddress(0)).unwrap().is_tracked(),
        tracked
    );
    // Fill both regions through vm-memory (direct touches of the mapping).
    let chunk = vec![0x5au8; MIB as usize];
    for off in (0..2 * len).step_by(MIB as usize) {
        mem.write_slice(&chunk, GuestAddress(off)).unwrap();
    }
    let rss_full = ProcessMemory::current().unwrap().rss;

    // Kill: every access that starts now fails, memory untouched.
    f.guest.kill();
    let mut buf = [0u8; 16];
    let e = mem.read_slice(&mut buf, GuestAddress(0)).unwrap_err();
    assert!(matches!(adapter_error(&e), Error::Killed { .. }), "{e:?}");
    let e = mem.write_obj(1u64, GuestAddress(len + 8)).unwrap_err();
    assert!(matches!(adapter_error(&e), Error::Killed { .. }), "{e:?}");
    let e = mem
        .load::<u32>(GuestAddress(0), Ordering::SeqCst)
        .unwrap_err();
    assert!(matches!(adapter_error(&e), Error::Killed { .. }), "{e:?}");
    assert!(mem.get_host_address(GuestAddress(0)).is_err());
    assert!(!mem.check_range(GuestAddress(0), 16));
    // Bounds errors stay what they were (the address check comes first).
    assert!(matches!(
        mem.read_slice(&mut buf, GuestAddress(4 * len)),
        Err(GuestMemoryError::InvalidGuestAddress(_))
    ));

    // Reap (process_mrelease): the memory goes back to the host while the
    // adapter still holds its user references.
    let out = mm_reaper::mrelease_blocking(&f.host, f.guest.id()).unwrap();
    assert!(
        matches!(out, mm_reaper::MreleaseOutcome::Reaped { .. }),
        "{out:?}"
    );
    let rss_reaped = ProcessMemory::current().unwrap().rss;
    assert!(
        rss_full - rss_reaped >= 2 * len * 9 / 10,
        "RSS from /proc: {rss_full} -> {rss_reaped}"
    );
    // A device thread keeps trying: an error each time. Without the check,
    // the tracked region's read would take SIGBUS (the test process dies)
    // and the untracked one would read zeros.
    let dev = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut errors = 0;
        for i in 0..1000u64 {
            let at = GuestAddress((i * 4096 * 17) % (2 * len));
            match mem.read_slice(&mut buf, at) {
                Err(e) => {
                    assert!(matches!(adapter_error(&e), Error::Reaped { .. }), "{e:?}");
                    errors += 1;
                }
                Ok(()) => panic!("read {buf:?} from a reaped guest"),
            }
        }
        errors
    });
    assert_eq!(dev.join().unwrap(), 1000);
    // The host mapping is still there (the adapter held a user): mincore
    // finds it, empty.
    assert_eq!(f.user.resident_bytes_blocking().unwrap(), 0);
}

/// The regions hold the address space: the guest's own handles can go,
/// the memory stays mapped and populated until the last region goes.
#[test]
fn test_regions_hold_the_mapping() {
    let f = Fixture::new(1 << 30);
    let a = f.map(4 * PAGE, false).unwrap();
    let grab = f.user.grab();
    let mem: GuestMemoryMm =
        GuestMemoryMm::from_regions(vec![
            MmRegion::new(&f.user, a, 4 * PAGE, GuestAddress(0)).unwrap()
        ])
        .unwrap();
    mem.write_slice(b"still here", GuestAddress(0x10)).unwrap();
    let Fixture { user, guest, host } = f;
    drop(user);
    let users = grab.users();
    assert_eq!(users, 2, "the guest record and the region");
    guest.exit_blocking();
    drop(guest);
    assert!(
        !grab.exit_started(),
        "the region's user keeps exit_mmap away"
    );
    let mut buf = [0u8; 10];
    mem.read_slice(&mut buf, GuestAddress(0x10)).unwrap();
    assert_eq!(&buf, b"still here");
    drop(mem);
    assert!(grab.exit_started(), "the last region ran the teardown");
    drop(host);
}

/// `GuestRegionMmap` (the type Firecracker and Cloud Hypervisor use) over
/// a guestmm VMA: vm-memory never unmaps it, the lease keeps it mapped.
#[test]
fn test_guest_region_mmap_over_a_vma() {
    let f = Fixture::new(1 << 30);
    let len = 8 * PAGE;
    let a = f.map(len, false).unwrap();
    let b = f.map(len, false).unwrap();

    // Safe form: the lease rides in the bitmap slot.
    let r0 = guest_region_mmap(&f.user, a, len, GuestAddress(0), ()).unwrap();
    assert!(!r0.owned(), "vm-memory must never unmap guestmm memory");
    let mem = GuestRegionCollection::from_regions(vec![r0]).unwrap();
    mem.write_slice(b"firecracker", GuestAddress(0x100))
        .unwrap();
    assert!(f.user.compare_blocking(a + 0x100, b"firecracker").unwrap());
    drop(mem);
    // Dropping the region left the mapping alone.
    assert!(f.user.compare_blocking(a + 0x100, b"firecracker").unwrap());

    // Unsafe form, Firecracker's own bitmap type.
    // SAFETY: the lease outlives the region (dropped after it, below).
    let (r1, lease) = unsafe {
        guest_region_mmap_unchecked::<Option<AtomicBitmap>>(
            &f.user,
            b,
            len,
            GuestAddress(0x10_0000),
            Some(AtomicBitmap::new(len as usize, 4096.try_into().unwrap())),
        )
    }
    .unwrap();
    let r1: GuestRegionMmap<Option<AtomicBitmap>> = r1;
    r1.write_obj(0xfeed_u32, vm_memory::MemoryRegionAddress(0x2000))
        .unwrap();
    assert!(r1.bitmap().dirty_at(0x2000));
    assert!(!r1.bitmap().dirty_at(0x1000));
    assert!(f
        .user
        .compare_blocking(b + 0x2000, &0xfeed_u32.to_ne_bytes())
        .unwrap());
    drop(r1);
    assert_eq!(lease.mm().id(), f.user.id());
    drop(lease);

    // Bad input: the same named errors as MmRegion.
    assert!(matches!(
        guest_region_mmap(&f.user, a + 1, PAGE, GuestAddress(0), ()),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        guest_region_mmap(&f.user, a, 2 * len, GuestAddress(0), ()),
        Err(Error::NotOneVma { .. })
    ));
}

/// The documented limit of `GuestRegionMmap`: no liveness check, so after
/// a reap an untracked region reads zeros (MmRegion returns an error).
#[test]
fn test_guest_region_mmap_has_no_kill_check() {
    let f = Fixture::new(1 << 30);
    let a = f.map(4 * PAGE, false).unwrap();
    let r = guest_region_mmap(&f.user, a, 4 * PAGE, GuestAddress(0), ()).unwrap();
    let checked = MmRegion::<()>::new(&f.user, a, 4 * PAGE, GuestAddress(0)).unwrap();
    r.write_obj(7u64, vm_memory::MemoryRegionAddress(0))
        .unwrap();
    f.guest.kill();
    mm_reaper::mrelease_blocking(&f.host, f.guest.id()).unwrap();
    let v: u64 = r.read_obj(vm_memory::MemoryRegionAddress(0)).unwrap();
    assert_eq!(v, 0, "zeros: the reason MmRegion checks first");
    assert!(checked
        .read_obj::<u64>(vm_memory::MemoryRegionAddress(0))
        .is_err());
}

/// Hot-plug: a region added through `GuestMemoryAtomic` is seen by new
/// snapshots; an old snapshot keeps its own view (and its regions' users).
#[test]
fn test_hotplug_with_guest_memory_atomic() {
    let f = Fixture::new(1 << 30);
    let a = f.map(4 * PAGE, false).unwrap();
    let b = f
        .map(4 * PAGE, true)
        .or_else(|_| f.map(4 * PAGE, false))
        .unwrap();
    let mem: GuestMemoryMm =
        GuestMemoryMm::from_regions(vec![
            MmRegion::new(&f.user, a, 4 * PAGE, GuestAddress(0)).unwrap()
        ])
        .unwrap();
    let atomic = GuestMemoryMmAtomic::new(mem);
    let before = atomic.memory();
    {
        let guard = atomic.lock().unwrap();
        let added = atomic
            .memory()
            .insert_region(
                MmRegion::new(&f.user, b, 4 * PAGE, GuestAddress(0x10_0000))
                    .unwrap()
                    .into_arc(),
            )
            .unwrap();
        guard.replace(added);
    }
    let after = atomic.memory();
    after.write_obj(9u32, GuestAddress(0x10_0010)).unwrap();
    assert!(f
        .user
        .compare_blocking(b + 0x10, &9u32.to_ne_bytes())
        .unwrap());
    assert_eq!(after.num_regions(), 2);
    assert_eq!(before.num_regions(), 1);
    assert!(before.write_obj(9u32, GuestAddress(0x10_0010)).is_err());
}
