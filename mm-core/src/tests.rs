//! In-crate tests of the protocol pieces and the bad-input classes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_lite::future::block_on;

use crate::*;

const PAGE: u64 = PAGE_SIZE as u64;

const MIB: u64 = 1 << 20;
const P: u64 = PAGE_SIZE as u64;

fn host() -> Host {
    Host::with_budget(256 * MIB)
}

#[test]
fn test_bad_input_unaligned() {
    let mm = host().new_mm("t");
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(P + 1)),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(P).at(0x1001)),
        Err(Error::Unaligned { addr: 0x1001, .. })
    ));
    let a = mm.mmap_blocking(MapOptions::anon(4 * P)).unwrap();
    assert!(matches!(
        mm.munmap_blocking(a + 1, P),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        mm.mprotect_blocking(a, 3, Prot::READ),
        Err(Error::Unaligned { .. })
    ));
}

#[test]
fn test_bad_input_zero_length() {
    let mm = host().new_mm("t");
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(0)),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        mm.munmap_blocking(0x10000, 0),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        mm.mlock_blocking(0x10000, 0),
        Err(Error::ZeroLength { .. })
    ));
    // A zero-length access copies nothing, but its address must be the
    // guest's: outside every mapping it is `Unmapped`, like a longer one.
    assert!(matches!(
        mm.write_blocking(0x10000, &[]),
        Err(Error::Unmapped { addr: 0x10000 })
    ));
    assert!(matches!(
        mm.read_blocking(0x10000, &mut []),
        Err(Error::Unmapped { .. })
    ));
    let a = mm.mmap_blocking(MapOptions::anon(2 * PAGE)).unwrap();
    mm.write_blocking(a + 100, &[]).unwrap();
    // The end of a mapping, as the empty slice at the end of a buffer.
    mm.read_blocking(a + 2 * PAGE, &mut []).unwrap();
    assert_eq!(mm.rss_pages(), 0, "nothing populated");
}

#[test]
fn test_budget_refuses_impossible_requests() {
    let host = Host::with_budget(u64::MAX);
    let b = host.budget();
    b.try_charge(PAGE).unwrap();
    // Past u64: refused even by an unlimited budget, never saturated.
    assert!(b.try_charge(u64::MAX).is_err());
    assert_eq!(b.charged(), PAGE);
    // More than is charged: a named error, nothing changed (no panic).
    assert!(matches!(
        b.try_uncharge(2 * PAGE),
        Err(Error::Uncharge {
            requested,
            charged
        }) if requested == 2 * PAGE && charged == PAGE
    ));
    assert_eq!(b.charged(), PAGE);
    b.try_uncharge(PAGE).unwrap();
    assert_eq!(b.charged(), 0);
}

#[test]
fn test_bad_input_overflow() {
    let mm = host().new_mm("t");
    let addr = !(P - 1);
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(2 * P).at(addr)),
        Err(Error::Overflow { .. })
    ));
    assert!(matches!(
        mm.munmap_blocking(addr, 2 * P),
        Err(Error::Overflow { .. })
    ));
    let mut buf = [0u8; 16];
    assert!(matches!(
        mm.read_blocking(u64::MAX - 4, &mut buf),
        Err(Error::Overflow { .. })
    ));
}

#[test]
fn test_bad_input_out_of_range() {
    let mm = host().new_mm("t");
    let limit = mm.config().va_limit;
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(2 * P).at(limit - P)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(limit + P)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        mm.write_blocking(limit, b"x"),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn test_bad_input_overlap() {
    let mm = host().new_mm("t");
    let a = mm
        .mmap_blocking(MapOptions::anon(4 * P).at(0x100000))
        .unwrap();
    assert_eq!(a, 0x100000);
    let e = mm
        .mmap_blocking(MapOptions::anon(4 * P).at(0x102000))
        .unwrap_err();
    assert!(matches!(
        e,
        Error::Overlap {
            vma_start: 0x100000,
            vma_end: 0x104000,
            ..
        }
    ));
    // The failed mmap left nothing behind.
    assert_eq!(mm.vmas_blocking().len(), 1);
}

#[test]
fn test_bad_input_unmapped() {
    let mm = host().new_mm("t");
    let a = mm
        .mmap_blocking(MapOptions::anon(4 * P).at(0x100000))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(
        mm.read_blocking(0x200000, &mut buf),
        Err(Error::Unmapped { addr: 0x200000 })
    ));
    // An access running off the end of a mapping names the first hole.
    assert!(matches!(
        mm.read_blocking(a + 4 * P - 4, &mut buf),
        Err(Error::Unmapped { addr }) if addr == a + 4 * P
    ));
    assert!(matches!(
        mm.mprotect_blocking(a, 8 * P, Prot::READ),
        Err(Error::Unmapped { .. })
    ));
    assert!(matches!(
        mm.mlock_blocking(a + 4 * P, P),
        Err(Error::Unmapped { .. })
    ));
    assert!(matches!(
        mm.madvise_blocking(a, 8 * P, Advice::DontNeed),
        Err(Error::Unmapped { .. })
    ));
    // munmap over holes succeeds, as in the kernel.
    mm.munmap_blocking(a, 8 * P).unwrap();
}

#[test]
fn test_bad_input_protection() {
    let mm = host().new_mm("t");
    let a = mm
        .mmap_blocking(MapOptions::anon(2 * P).prot(Prot::READ))
        .unwrap();
    assert!(matches!(
        mm.write_blocking(a, b"x"),
        Err(Error::Protection {
            access: Access::Write,
            ..
        })
    ));
    let mut buf = [1u8; 4];
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(buf, [0; 4]);
    mm.mprotect_blocking(a, 2 * P, Prot::NONE).unwrap();
    assert!(matches!(
        mm.read_blocking(a, &mut buf),
        Err(Error::Protection {
            access: Access::Read,
            ..
        })
    ));
}

#[test]
fn test_bad_input_exited() {
    let host = host();
    let g = host.create_guest("g");
    let grab = g.mm().unwrap().grab();
    g.exit_blocking();
    assert!(matches!(g.mm(), Err(Error::Exited { .. })));
    assert!(grab.upgrade().is_none());
    assert!(matches!(host.guest(g.id()), Err(Error::NoSuchGuest { .. })));
}

#[test]
fn test_budget_exhausted_is_an_error() {
    let host = Host::with_budget(8 * P);
    let mm = host.new_mm("t");
    let a = mm.mmap_blocking(MapOptions::anon(16 * P)).unwrap();
    mm.fill_blocking(a, 8 * P, 1).unwrap();
    let e = mm.fill_blocking(a + 8 * P, P, 1).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { requested, .. } if requested == P));
    assert_eq!(host.stats().charged_bytes, 8 * P);
    assert_eq!(host.stats().charge_failures, 1);
}

#[test]
fn test_reclaim_plugin_runs_on_pressure() {
    struct FreeOther(Mutex<Option<MmUser>>, AtomicUsize);
    impl Reclaim for FreeOther {
        fn name(&self) -> &str {
            "free-other"
        }
        fn reclaim<'a>(&'a self, _host: &'a Host, _bytes: u64) -> BoxFuture<'a, u64> {
            Box::pin(async move {
                self.1.fetch_add(1, Ordering::SeqCst);
                let other = self.0.lock().unwrap().take();
                match other {
                    Some(mm) => {
                        let rss = mm.rss_pages() * P;
                        mm.exit().await;
                        rss
                    }
                    None => 0,
                }
            })
        }
    }
    let host = Host::with_budget(8 * P);
    let hog = host.new_mm("hog");
    let a = hog.mmap_blocking(MapOptions::anon(8 * P)).unwrap();
    hog.fill_blocking(a, 8 * P, 7).unwrap();
    let plugin = Arc::new(FreeOther(Mutex::new(Some(hog)), AtomicUsize::new(0)));
    host.add_reclaim(plugin.clone());
    let mm = host.new_mm("t");
    let b = mm.mmap_blocking(MapOptions::anon(4 * P)).unwrap();
    mm.fill_blocking(b, 4 * P, 1).unwrap();
    assert_eq!(plugin.1.load(Ordering::SeqCst), 1);
    assert_eq!(host.stats().charged_bytes, 4 * P);
}

#[test]
fn test_count_frees_struct_exactly_at_zero() {
    let mm = host().new_mm("t");
    let watch = mm.watch();
    assert_eq!((mm.users(), mm.count()), (1, 1));
    let g1 = mm.grab();
    let g2 = g1.clone();
    assert_eq!(mm.count(), 3);
    let u2 = g1.upgrade().unwrap();
    assert_eq!(mm.users(), 2);
    drop(u2);
    drop(mm); // last user: teardown, then the users' count goes
    assert_eq!(g1.users(), 0);
    assert_eq!(g1.count(), 2);
    assert!(g1.upgrade().is_none(), "users is never raised from 0");
    assert_eq!(g1.users(), 0);
    drop(g1);
    assert!(!watch.is_freed());
    assert_eq!(g2.count(), 1);
    drop(g2);
    assert!(watch.is_freed(), "struct freed when count reached 0");
}

#[test]
fn test_teardown_leaves_empty_tree_and_oom_skip() {
    let host = host();
    let mm = host.new_mm("t");
    let a = mm.mmap_blocking(MapOptions::anon(64 * P)).unwrap();
    mm.fill_blocking(a, 64 * P, 0xaa).unwrap();
    let _b = mm.mmap_blocking(MapOptions::shared(8 * P)).unwrap();
    let grab = mm.grab();
    assert!(grab.page_table().nodes() > 0);
    drop(mm);
    // A grab holder that takes the read lock after teardown sees OOM_SKIP and
    // zero VMAs (the invariant the reaper and mrelease rely on).
    let state = block_on(grab.lock().read());
    assert!(grab.flags().test(MmFlag::OOM_SKIP));
    assert!(state.vmas().is_empty());
    assert_eq!(grab.rss_pages(), 0);
    assert_eq!(grab.pgtables_bytes(), 0);
    drop(state);
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_exit_hooks_and_notifiers_order() {
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    struct N(Arc<Log>);
    impl MmNotifier for N {
        fn release(&self, mm: &Mm) {
            let vmas = block_on(mm.lock().read()).vmas().len();
            self.0
                 .0
                .lock()
                .unwrap()
                .push(format!("release users={} vmas={vmas}", mm.users()));
        }
    }
    struct H(Arc<Log>);
    impl ExitHook for H {
        fn exit<'a>(&'a self, mm: &'a Mm) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                // The write-lock barrier a scanner exit does.
                drop(mm.lock().write().await);
                self.0
                     .0
                    .lock()
                    .unwrap()
                    .push(format!("ksm_exit users={}", mm.users()));
            })
        }
    }
    let log = Arc::new(Log::default());
    let mm = host().new_mm("t");
    mm.mmap_blocking(MapOptions::anon(4 * P)).unwrap();
    mm.register_notifier(Arc::new(N(log.clone())));
    mm.add_exit_hook(Arc::new(H(log.clone())));
    block_on(mm.exit());
    let got = log.0.lock().unwrap().clone();
    assert_eq!(got, vec!["ksm_exit users=0", "release users=0 vmas=1"]);
}

#[test]
fn test_access_after_unstable_is_refused() {
    let mm = host().new_mm("t");
    let a = mm.mmap_blocking(MapOptions::anon(4 * P)).unwrap();
    mm.write_blocking(a, b"data").unwrap();
    mm.flags().set(MmFlag::UNSTABLE);
    let mut buf = [0u8; 4];
    assert!(matches!(
        mm.read_blocking(a, &mut buf),
        Err(Error::Unstable { .. })
    ));
    assert!(matches!(
        mm.write_blocking(a + P, b"x"),
        Err(Error::Unstable { .. })
    ));
    assert!(matches!(
        mm.compare_blocking(a, b"data"),
        Err(Error::Unstable { .. })
    ));
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(P)),
        Err(Error::Unstable { .. })
    ));
}

#[test]
fn test_split_and_merge_like_the_kernel() {
    let mm = host().new_mm("t");
    let a = mm.mmap_blocking(MapOptions::anon(16 * P)).unwrap();
    mm.write_blocking(a + 5 * P, b"keep").unwrap();
    mm.mprotect_blocking(a + 4 * P, 4 * P, Prot::READ).unwrap();
    let v = mm.vmas_blocking();
    assert_eq!(v.len(), 3);
    assert_eq!(
        (v[1].start(), v[1].end(), v[1].prot()),
        (a + 4 * P, a + 8 * P, Prot::READ)
    );
    // The host mapping is one contiguous range: host_ptr offsets agree.
    assert_eq!(
        v[1].host_ptr() as usize - v[0].host_ptr() as usize,
        4 * PAGE_SIZE
    );
    mm.mlock_blocking(a + 6 * P, 4 * P).unwrap();
    assert_eq!(mm.vmas_blocking().len(), 5);
    mm.munlock_blocking(a, 16 * P).unwrap();
    mm.mprotect_blocking(a, 16 * P, Prot::READ_WRITE).unwrap();
    let v = mm.vmas_blocking();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(mm.compare_blocking(a + 5 * P, b"keep").unwrap());
    mm.madvise_blocking(a, 2 * P, Advice::Mergeable).unwrap();
    assert!(mm.vmas_blocking()[0].flags().contains(VmFlags::MERGEABLE));
    mm.madvise_blocking(a, 2 * P, Advice::Unmergeable).unwrap();
    assert_eq!(mm.vmas_blocking().len(), 1);
    // munmap of the middle leaves two VMAs on the same host region.
    mm.munmap_blocking(a + 4 * P, 4 * P).unwrap();
    assert_eq!(mm.vmas_blocking().len(), 2);
    let mut b = [0u8; 1];
    assert!(matches!(
        mm.read_blocking(a + 4 * P, &mut b),
        Err(Error::Unmapped { .. })
    ));
}

#[test]
fn test_separate_mmaps_do_not_merge() {
    let mm = host().new_mm("t");
    mm.mmap_blocking(MapOptions::anon(4 * P).at(0x100000))
        .unwrap();
    mm.mmap_blocking(MapOptions::anon(4 * P).at(0x104000))
        .unwrap();
    assert_eq!(mm.vmas_blocking().len(), 2);
}

#[test]
fn test_dontneed_zeroes_private_keeps_shared() {
    let host = host();
    let mm = host.new_mm("t");
    let a = mm.mmap_blocking(MapOptions::anon(4 * P)).unwrap();
    let s = mm.mmap_blocking(MapOptions::shared(4 * P)).unwrap();
    mm.fill_blocking(a, 4 * P, 9).unwrap();
    mm.fill_blocking(s, 4 * P, 9).unwrap();
    assert_eq!(host.stats().charged_bytes, 8 * P);
    mm.madvise_blocking(a, 4 * P, Advice::DontNeed).unwrap();
    mm.madvise_blocking(s, 4 * P, Advice::DontNeed).unwrap();
    assert_eq!(host.stats().charged_bytes, 4 * P);
    let mut buf = [1u8; 8];
    mm.read_blocking(a, &mut buf).unwrap();
    assert_eq!(buf, [0; 8]);
    mm.read_blocking(s, &mut buf).unwrap();
    assert_eq!(buf, [9; 8]);
    // Locked memory refuses DONTNEED (the kernel's EINVAL).
    mm.mlock_blocking(a, P).unwrap();
    assert!(matches!(
        mm.madvise_blocking(a, P, Advice::DontNeed),
        Err(Error::NotAllowed { .. })
    ));
}

#[test]
fn test_data_across_leaves_and_vmas() {
    let mm = host().new_mm("t");
    // 3 MiB at an address that is not 2 MiB aligned: accesses cross leaves.
    let a = mm
        .mmap_blocking(MapOptions::anon(3 * MIB).at(0x1ff000))
        .unwrap();
    let data: Vec<u8> = (0..(3 * MIB as usize - 100))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    mm.write_blocking(a + 50, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    mm.read_blocking(a + 50, &mut back).unwrap();
    assert!(back == data);
    assert!(mm.compare_blocking(a + 50, &data).unwrap());
    assert!(!mm.compare_blocking(a + 49, &data[..10]).unwrap());
}

#[test]
fn test_concurrent_first_touch_charges_once() {
    let host = host();
    let mm = host.new_mm("t");
    let a = mm.mmap_blocking(MapOptions::anon(8 * MIB)).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let mm = mm.clone();
            std::thread::spawn(move || {
                for i in 0..(8 * MIB / P) {
                    mm.write_blocking(a + i * P + u64::from(t), &[t + 1])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(host.stats().charged_bytes, 8 * MIB);
    assert_eq!(mm.rss_pages(), 8 * MIB / P);
    let mut b = [0u8; 4];
    mm.read_blocking(a + 77 * P, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
}

#[test]
fn test_hugepage_populates_whole_blocks() {
    let host = host();
    let mm = host.new_mm("t");
    let a = mm
        .mmap_blocking(MapOptions::anon(4 * MIB).hugepage(true))
        .unwrap();
    assert_eq!(a % (2 * MIB), 0);
    mm.write_blocking(a + 5, b"x").unwrap();
    assert_eq!(host.stats().charged_bytes, 2 * MIB);
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_async_exit_runs_teardown_once() {
    let host = host();
    let mm = host.new_mm("t");
    let a = mm.mmap_blocking(MapOptions::anon(4 * P)).unwrap();
    mm.fill_blocking(a, 4 * P, 3).unwrap();
    let other = mm.clone();
    let grab = mm.grab();
    block_on(mm.exit());
    assert_eq!(grab.users(), 1);
    assert_eq!(grab.vmas_len_for_test(), 1);
    block_on(other.exit());
    assert_eq!(grab.users(), 0);
    assert_eq!(grab.vmas_len_for_test(), 0);
    assert_eq!(host.stats().charged_bytes, 0);
}

impl Mm {
    fn vmas_len_for_test(&self) -> usize {
        block_on(self.lock().read()).vmas().len()
    }
}

#[test]
fn test_ksm_calls_with_bad_arguments_are_errors() {
    let host = host();
    let mm = host.new_mm("ksm-args");
    let a = mm
        .mmap_blocking(MapOptions::anon(4 * PAGE_SIZE as u64).tracked(true))
        .unwrap();
    mm.fill_blocking(a, 4 * PAGE_SIZE as u64, 1).unwrap();
    let state = block_on(mm.lock().read());
    let ksm = KsmMm::new(&mm, &state).unwrap();
    let want = [true; 2];
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    let mut out = [KsmPage::Absent; 2];
    assert!(matches!(
        ksm.snapshot(a + 1, &want, &mut buf, &mut out),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        ksm.snapshot(a, &want, &mut buf[..PAGE_SIZE], &mut out),
        Err(Error::InvalidArgument { .. })
    ));
    // A run crossing a 2 MiB leaf boundary.
    let leaf = 512 * PAGE_SIZE as u64;
    let across = (a / leaf + 1) * leaf - PAGE_SIZE as u64;
    assert!(matches!(
        ksm.snapshot(across, &want, &mut buf, &mut out),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(ksm.snapshot(a, &want, &mut buf, &mut out).is_ok());
    assert_eq!(out, [KsmPage::Private; 2]);
}

/// A guard of one mm's lock is no proof for another mm: the lock-taking
/// entry points refuse it with `ForeignLock` instead of acting unlocked.
#[test]
fn test_lock_of_another_mm_is_refused() {
    let host = host();
    let a = host.new_mm("lock-a");
    let b = host.new_mm("lock-b");
    let addr = a.mmap_blocking(MapOptions::anon(1 << 20)).unwrap();
    a.fill_blocking(addr, PAGE_SIZE as u64, 7).unwrap();
    b.mmap_blocking(MapOptions::anon(1 << 20)).unwrap();
    let sa = block_on(a.lock().read());
    let sb = block_on(b.lock().read());
    assert_eq!(sa.mm_id(), a.id());
    let vma = sa.vmas().find(addr).unwrap().clone();
    let zap = (*a).zap_range(
        &sb,
        &vma,
        addr,
        addr + PAGE_SIZE as u64,
        ZapReason::DontNeed,
    );
    assert!(matches!(zap, Err(Error::ForeignLock { .. })), "{zap:?}");
    assert!(matches!(
        (*a).resident_bytes(&sb),
        Err(Error::ForeignLock { .. })
    ));
    assert!(matches!(
        KsmMm::new(&a, &sb),
        Err(Error::ForeignLock { .. })
    ));
    // A range outside the VMA the caller names is refused, not zapped.
    assert!(matches!(
        (*a).zap_range(
            &sa,
            &vma,
            addr + (2 << 20),
            addr + (3 << 20),
            ZapReason::DontNeed
        ),
        Err(Error::InvalidArgument { .. })
    ));
    // With its own lock the zap works and frees the page.
    assert_eq!(
        (*a).zap_range(
            &sa,
            &vma,
            addr,
            addr + PAGE_SIZE as u64,
            ZapReason::DontNeed
        )
        .unwrap(),
        1
    );
    drop((sa, sb));
}

/// `find_gap`'s hint never changes where `mmap` puts a mapping: always the
/// lowest gap that fits above the floor, checked against a brute-force
/// first fit over the VMA list after every step of a random mix of
/// mmaps (1-4 pages), fixed mmaps and munmaps.
#[test]
fn test_mmap_is_lowest_first_fit_with_the_hint() {
    let mm = host().new_mm("gaps");
    let floor = MmConfig::default().mmap_floor;
    let first_fit = |vmas: &[Vma], len: u64| {
        let mut cand = floor;
        for v in vmas {
            if v.end() <= cand {
                continue;
            }
            if cand + len <= v.start() {
                return cand;
            }
            cand = v.end();
        }
        cand
    };
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut live: Vec<(u64, u64)> = Vec::new();
    for step in 0..3000 {
        match rnd(10) {
            0..=5 => {
                let len = (1 + rnd(4)) * PAGE;
                let want = first_fit(&mm.vmas_blocking(), len);
                let got = mm.mmap_blocking(MapOptions::anon(len)).unwrap();
                assert_eq!(got, want, "step {step}: mmap of {len:#x}");
                live.push((got, len));
            }
            6 => {
                // A fixed mapping just above the lowest gap, when free.
                let at = first_fit(&mm.vmas_blocking(), PAGE) + rnd(3) * PAGE;
                if let Ok(a) = mm.mmap_blocking(MapOptions::anon(PAGE).at(at)) {
                    live.push((a, PAGE));
                }
            }
            _ if !live.is_empty() => {
                let (a, len) = live.swap_remove(rnd(live.len() as u64) as usize);
                mm.munmap_blocking(a, len).unwrap();
            }
            _ => {}
        }
    }
}

/// Issue 11 §3: dropping the last owning `Guest` without `exit` is its
/// exit (before, its registry entry and its charge leaked for the host's
/// lifetime); a handle from `Host::guest` is only a reference.
#[test]
fn test_guest_drop_is_exit() {
    let host = host();
    let g = host.create_guest("dropped");
    let id = g.id();
    let mm = g.mm().unwrap();
    let a = mm.mmap_blocking(MapOptions::anon(MIB)).unwrap();
    mm.fill_blocking(a, MIB, 1).unwrap();
    assert_eq!(host.stats().charged_bytes, MIB);
    let grab = mm.grab();
    drop(mm);
    let lookup = host.guest(id).unwrap();
    let owner2 = g.clone();
    drop(g);
    assert!(host.guest(id).is_ok(), "a clone of the owner still owns it");
    assert_eq!(host.stats().charged_bytes, MIB);
    drop(owner2);
    assert!(matches!(host.guest(id), Err(Error::NoSuchGuest { .. })));
    assert_eq!(host.stats().charged_bytes, 0);
    assert_eq!(host.stats().guests, 0);
    assert!(grab.flags().test(MmFlag::OOM_SKIP));
    assert!(!lookup.is_alive());
    drop(lookup);
}

/// A 16 MiB host with guest "big" (10 MiB written at `a`, its mm held
/// only by `vcpu`, a vCPU thread's user reference) and guest "innocent"
/// (2 MiB written).
fn big_with_vcpu_and_innocent() -> (Host, Guest, MmUser, u64, Guest) {
    let host = Host::with_budget(16 * MIB);
    let big = host.create_guest("big");
    let mm = big.mm().unwrap();
    let a = mm.mmap_blocking(MapOptions::anon(10 * MIB)).unwrap();
    mm.fill_blocking(a, 10 * MIB, 1).unwrap();
    let vcpu = mm.clone();
    drop(mm);
    let innocent = host.create_guest("innocent");
    let m2 = innocent.mm().unwrap();
    let b = m2.mmap_blocking(MapOptions::anon(2 * MIB)).unwrap();
    m2.fill_blocking(b, 2 * MIB, 2).unwrap();
    (host, big, vcpu, a, innocent)
}

/// Issue 11 §3: `exit` while another holder (a vCPU thread) still uses the
/// mm keeps the mm selectable by the OOM killer, as the kernel's mm stays
/// visible through any task still using it. Before, the guest left the
/// registry at once and the OOM killer killed the innocent guest.
#[test]
fn test_exited_guest_with_users_stays_selectable() {
    let (host, big, vcpu, _, innocent) = big_with_vcpu_and_innocent();
    big.exit_blocking(); // returns at once: the vCPU still uses the mm
    assert_eq!(host.stats().charged_bytes, 12 * MIB);
    let out = block_on(host.out_of_memory(None));
    assert!(
        !innocent.is_dying(),
        "an innocent guest was killed: {out:?}"
    );
    assert_eq!(out, OomOutcome::Killed { guest: big.id() });
    assert_eq!(host.stats().guests, 2, "the exited guest stays registered");
    assert!(vcpu.flags().test(MmFlag::KILLED));
    // The vCPU lets go: the last user runs the teardown; the record goes
    // and the victim mark is cleared.
    drop(vcpu);
    assert_eq!(host.stats().guests, 1);
    assert_eq!(host.stats().charged_bytes, 2 * MIB);
    assert_eq!(host.oom_stats().victims_running, 0);
    assert!(matches!(
        host.guest(big.id()),
        Err(Error::NoSuchGuest { .. })
    ));
}

/// The lingering exit ends when the teardown is through, not at
/// `OOM_SKIP`: a teardown of an empty tree (the vCPU had unmapped
/// everything) never sets that flag (exit_mmap step 4, as in the kernel).
/// Waiting for it left the victim counted for ever with no reaper
/// installed, and every later OOM selection aborted on it (a victim
/// without `OOM_SKIP`, I-RP-7): the host could never kill again. Found by
/// the I-RP-8 balance oracle on `teardown_vs_ksm`'s regression input
/// `killed_guest_that_stays_lacks_oom_skip`.
#[test]
fn test_lingering_victim_with_an_empty_tree_is_counted_out() {
    let (host, big, vcpu, a, innocent) = big_with_vcpu_and_innocent();
    big.exit_blocking(); // lingers: the vCPU still uses the mm
    let out = block_on(host.out_of_memory(None));
    assert_eq!(out, OomOutcome::Killed { guest: big.id() });
    // No reaper. The vCPU unmaps everything, then lets go: the teardown
    // finds an empty tree.
    vcpu.munmap_blocking(a, 10 * MIB).unwrap();
    drop(vcpu);
    // A registry read finishes the lingering exit that is through.
    assert_eq!(
        host.stats().guests,
        1,
        "the exited guest is still registered"
    );
    assert_eq!(
        host.oom_stats().victims_running,
        0,
        "the victim is still counted"
    );
    // And the OOM killer can kill again.
    assert_eq!(
        block_on(host.out_of_memory(None)),
        OomOutcome::Killed {
            guest: innocent.id()
        }
    );
}

/// The pressure path's last-second check under `oom_lock`: memory that
/// came back while the caller waited for the lock, or while the selection
/// walked the guests (an earlier victim reaped meanwhile), means no kill.
/// Without it, mm-wasmtime's `wasm_fleet` killed a second, innocent
/// instance: the selection (a `mincore` per 4 GiB reservation) took 0.8 s,
/// the first victim was reaped during it, and the walk, past it already,
/// picked the next largest guest though the charge fitted again.
#[test]
fn test_oom_last_second_check_kills_nobody() {
    let host = Host::with_budget(16 * MIB);
    let g = host.create_guest("big");
    let mm = g.mm().unwrap();
    let a = mm.mmap_blocking(MapOptions::anon(8 * MIB)).unwrap();
    mm.fill_blocking(a, 8 * MIB, 1).unwrap();
    let out = block_on(host.out_of_memory_unless(None, &|| true));
    assert_eq!(out, OomOutcome::Fits);
    assert!(!g.is_dying(), "killed though the charge fitted");
    assert_eq!(host.oom_stats().kills, 0);
    // And the plain call (no check) still kills.
    assert_eq!(
        block_on(host.out_of_memory(None)),
        OomOutcome::Killed { guest: g.id() }
    );
}
