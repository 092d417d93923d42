//! Unit tests of tracked regions (one module, shared helpers).

use std::sync::mpsc;

use super::*;
use crate::pgtable::Pte;
use crate::{Advice, Host, MapOptions};

const PAGE: u64 = PAGE_SIZE as u64;

/// Fails (instead of hanging) if a result does not arrive in two
/// minutes. A bound on a hang, never a measurement.
const HANG: Duration = Duration::from_secs(120);

/// Spins until `cond` holds; panics (instead of hanging) after [`HANG`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !cond() {
        assert!(Instant::now() < deadline, "still waiting for {what}");
        std::thread::yield_now();
    }
}

fn touch(ptr: *mut u8, len: usize, byte: u8) {
    let mut off = 0;
    while off < len {
        // SAFETY: test-only direct touch of a live tracked mapping.
        unsafe { ptr.add(off).write_volatile(byte) };
        off += PAGE_SIZE;
    }
}

/// A 64 MiB host and a new mm with one tracked mapping of `len` bytes.
fn tracked_mm(len: u64) -> (Host, crate::MmUser, u64) {
    let host = Host::with_budget(64 << 20);
    let mm = host.new_mm("t");
    let addr = mm
        .mmap_blocking(MapOptions::anon(len).tracked(true))
        .unwrap();
    (host, mm, addr)
}

#[test]
fn test_registry_split() {
    let t = Tracker::new(1, false, false).unwrap();
    t.add_range(
        0x10000,
        0x10000,
        0x100000,
        DEFAULT_FAULT_AROUND,
        None,
        false,
    );
    t.forget_registry(0x14000, 0x18000);
    let r: Vec<_> = lock(&t.ranges)
        .iter()
        .map(|(s, r)| (*s, r.host_end, r.guest_start))
        .collect();
    assert_eq!(
        r,
        vec![(0x10000, 0x14000, 0x100000), (0x18000, 0x20000, 0x108000)]
    );
}

#[test]
fn test_direct_touch_charged_once() {
    let (host, mm, addr) = tracked_mm(4 << 20);
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
    touch(ptr, 4 << 20, 7);
    assert_eq!(host.stats().charged_bytes, 4 << 20);
    // The API sees the direct writes and populates nothing new.
    let mut b = [0u8; 1];
    mm.read_blocking(addr + 0x3000, &mut b).unwrap();
    assert_eq!(b[0], 7);
    assert_eq!(host.stats().charged_bytes, 4 << 20);
    let s = mm.tracked_stats().unwrap();
    assert_eq!(s.pages_faulted, 1024, "{s:?} addr={addr:#x}");
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_handler_panic_degrades() {
    let (host, mm, addr) = tracked_mm(2 << 20);
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
    let t = mm.tracker().unwrap();
    t.panic_next_fault.store(true, Ordering::SeqCst);
    // The fault is not lost: the dying handler unregisters the range and
    // the kernel serves the refault.
    touch(ptr, PAGE_SIZE, 9);
    // SAFETY: test-only read of the page just written.
    assert_eq!(unsafe { ptr.read_volatile() }, 9);
    assert!(t.is_dead());
    assert!(!mm.tracked_stats().unwrap().handler_alive);
    assert!(matches!(
        mm.write_protect_blocking(addr, PAGE),
        Err(Error::TrackerDead { .. })
    ));
    // The access path falls back to the untracked populate.
    mm.write_blocking(addr + 0x5000, b"x").unwrap();
    assert!(mm.compare_blocking(addr + 0x5000, b"x").unwrap());
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn test_write_protect_blocks_writer() {
    let (_host, mm, addr) = tracked_mm(1 << 20);
    if !mm.tracked_stats().unwrap().write_protect {
        return;
    }
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
    mm.write_protect_blocking(addr, 2 * PAGE).unwrap();
    let wrote = Arc::new(AtomicBool::new(false));
    let w2 = wrote.clone();
    let th = std::thread::spawn(move || {
        touch(ptr as *mut u8, PAGE_SIZE, 5);
        w2.store(true, Ordering::SeqCst);
    });
    // The writer blocks until the protection goes (no timed assertion:
    // wait until the handler has seen its WP fault).
    wait_until("the WP fault", || {
        mm.tracked_stats().unwrap().wp_faults != 0
    });
    assert!(!wrote.load(Ordering::SeqCst));
    mm.write_unprotect_blocking(addr, 2 * PAGE).unwrap();
    th.join().unwrap();
    assert!(wrote.load(Ordering::SeqCst));
    assert!(mm.compare_blocking(addr, &[5]).unwrap());
}

/// An API write to a write-protected page must not block in
/// the kernel holding PTE locks and the mmap read lock. With a munmap
/// (writer) queued behind it, `write_unprotect` (a reader) could never
/// run: nothing completed.
#[test]
fn test_wp_api_write_waits_without_locks() {
    let (_host, mm, addr) = tracked_mm(1 << 20);
    if !mm.tracked_stats().unwrap().write_protect {
        eprintln!("skipped: no userfaultfd write-protect");
        return;
    }
    let other = mm.mmap_blocking(MapOptions::anon(1 << 20)).unwrap();
    mm.write_blocking(addr, &[1]).unwrap();
    mm.write_protect_blocking(addr, PAGE).unwrap();
    let (tx, rx) = mpsc::channel();
    let mm2 = mm.clone();
    let writer = std::thread::spawn(move || {
        mm2.write_blocking(addr, &[2]).unwrap();
        tx.send(()).unwrap();
    });
    wait_until("the API writer to wait", || {
        mm.tracked_stats().unwrap().api_wp_waits != 0
    });
    // A writer of the mmap lock: must not wait for the API writer.
    let (tx2, rx2) = mpsc::channel();
    let mm3 = mm.clone();
    let unmapper = std::thread::spawn(move || {
        tx2.send(mm3.munmap_blocking(other, 1 << 20)).unwrap();
    });
    rx2.recv_timeout(HANG)
        .expect("munmap stuck behind a write-protected API write")
        .unwrap();
    unmapper.join().unwrap();
    assert!(
        rx.try_recv().is_err(),
        "the API write ignored the protection"
    );
    mm.write_unprotect_blocking(addr, PAGE).unwrap();
    rx.recv_timeout(HANG)
        .expect("API writer not woken by unprotect");
    writer.join().unwrap();
    assert!(mm.compare_blocking(addr, &[2]).unwrap());
}

/// Once failed open, stay failed open until a real charge
/// succeeds: one pressure cycle in all, not one per page.
#[test]
fn test_fail_open_is_not_a_pressure_cycle_per_page() {
    let host = Host::with_budget(1 << 20);
    let mm = host.new_mm("t");
    let addr = mm
        .mmap_blocking(MapOptions::anon(4 << 20).tracked(true).fault_around(PAGE))
        .unwrap();
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
    touch(ptr, 2 << 20, 1);
    let s = mm.tracked_stats().unwrap();
    assert_eq!(s.fail_open_pages, 256, "{s:?}");
    assert_eq!(s.overcommit_bytes, 1 << 20, "{s:?}");
    assert!(
        s.pressure_runs <= 2 * u64::from(PRESSURE_ROUNDS),
        "a pressure cycle per page: {s:?}"
    );
    assert_eq!(host.stats().charged_bytes, 1 << 20);
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

/// `UNSTABLE` set (and the window zapped) after the faulting
/// page is locked but before the rest of the window is: the fault must
/// be poisoned, not served with zeros.
#[test]
fn test_unstable_rechecked_with_the_whole_window_locked() {
    let (host, mm, addr) = tracked_mm(2 << 20);
    let t = mm.tracker().unwrap();
    if !t.poison {
        eprintln!("skipped: no UFFDIO_POISON (a poisoned fault would hang)");
        return;
    }
    if t.user_mode_only {
        eprintln!("skipped: needs a full userfaultfd (kernel-mode faults: /dev/userfaultfd access or CAP_SYS_PTRACE)");
        return;
    }
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
    t.unstable_after_first_lock.store(true, Ordering::SeqCst);
    // Fault the page from the kernel (write(2) reads it into a pipe): a
    // poisoned page gives EFAULT here instead of SIGBUS to the test.
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) writes two descriptors into the live array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: reads 16 bytes of a live tracked mapping; fds[1] is ours.
    let r = unsafe { libc::write(fds[1], ptr.cast(), 16) };
    let err = std::io::Error::last_os_error();
    for fd in fds {
        // SAFETY: closing descriptors we own and no longer use.
        unsafe { libc::close(fd) };
    }
    assert_eq!(r, -1, "served zeros after UNSTABLE");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    // POISON wakes the faulter before the handler bumps its counter.
    wait_until("the poison counter", || {
        mm.tracked_stats().unwrap().pages_poisoned != 0
    });
    let s = mm.tracked_stats().unwrap();
    assert_eq!((s.pages_poisoned, s.pages_faulted), (1, 0), "{s:?}");
    assert_eq!(host.stats().charged_bytes, 0);
}

/// Our own zap's madvise returns once the handler has read
/// its REMOVE, so it may pop its entry before the handler looks the
/// message up; it must still not be taken for the embedder's.
#[test]
fn test_own_remove_not_foreign_after_zapper_returned() {
    let (host, mm, addr) = tracked_mm(2 << 20);
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
    touch(ptr, PAGE_SIZE, 1);
    // The fault-around window of the first page (clamped to the VMA).
    let window = host.stats().charged_bytes;
    assert!(window >= PAGE);
    let t = mm.tracker().unwrap();
    t.hold_after_read.store(true, Ordering::SeqCst);
    mm.madvise_blocking(addr, 2 << 20, Advice::DontNeed)
        .unwrap();
    t.hold_after_read.store(false, Ordering::SeqCst);
    assert_eq!(host.stats().charged_bytes, 0);
    // This fault is answered after the round that classified the REMOVE.
    touch(ptr, PAGE_SIZE, 2);
    let s = mm.tracked_stats().unwrap();
    assert_eq!(s.foreign_removes, 0, "{s:?}");
    assert_eq!(host.stats().charged_bytes, window);
    assert!(mm.compare_blocking(addr, &[2]).unwrap());
}

/// A handler panic with the window locked releases the PTE
/// locks and the charge (a leaked LOCK bit made every later
/// `pte_lock` spin forever).
#[test]
fn test_handler_panic_after_lock_releases_locks() {
    let (host, mm, addr) = tracked_mm(2 << 20);
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr();
    let t = mm.tracker().unwrap();
    t.panic_after_lock.store(true, Ordering::SeqCst);
    touch(ptr, PAGE_SIZE, 9);
    assert!(t.is_dead());
    {
        let guard = crossbeam_epoch::pin();
        for gpn in addr / PAGE..(addr + (2 << 20)) / PAGE {
            if let Some(p) = mm.page_table().pte(gpn, &guard) {
                let w = p.load(Ordering::Acquire);
                assert_eq!(w & Pte::LOCK, 0, "PTE {gpn:#x} left locked: {w:#x}");
                assert!(!Pte(w).present());
            }
        }
    }
    assert_eq!(host.stats().charged_bytes, 0);
    let (tx, rx) = mpsc::channel();
    let mm2 = mm.clone();
    let th = std::thread::spawn(move || {
        tx.send(mm2.write_blocking(addr, b"x")).unwrap();
    });
    rx.recv_timeout(HANG)
        .expect("access path stuck on a leaked PTE lock")
        .unwrap();
    th.join().unwrap();
    assert!(mm.compare_blocking(addr, b"x").unwrap());
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

/// A page served without its lock (the lock stayed busy) is
/// charged once the lock is free if its PTE is still empty.
#[test]
fn test_busy_break_is_charged_after_the_lock_goes() {
    let host = Host::with_budget(64 << 20);
    let mm = host.new_mm("t");
    let addr = mm
        .mmap_blocking(MapOptions::anon(1 << 20).tracked(true).fault_around(PAGE))
        .unwrap();
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
    let state = futures_lite::future::block_on(mm.lock().read());
    let guard = crossbeam_epoch::pin();
    let pte = mm
        .page_table()
        .leaf_alloc(addr / PAGE, &guard)
        .pte(addr / PAGE);
    // A "zapper" holding the page lock, leaving the PTE empty.
    let old = crate::pgtable::pte_lock(pte);
    let (tx, rx) = mpsc::channel();
    let th = std::thread::spawn(move || {
        touch(ptr as *mut u8, PAGE_SIZE, 3);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(HANG).expect("busy fault never resolved");
    th.join().unwrap();
    assert_eq!(mm.tracked_stats().unwrap().busy_breaks, 1);
    crate::pgtable::pte_unlock(pte, old);
    drop(guard);
    drop(state);
    wait_until("the busy page to be charged", || {
        host.stats().charged_bytes == PAGE
    });
    assert_eq!(mm.rss_pages(), 1);
    assert!(mm.compare_blocking(addr, &[3]).unwrap());
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

/// A failed tracked populate drops only the pages that were
/// missing (the present ones keep their data) and returns the tracker's
/// error unchanged.
#[test]
fn test_populate_error_keeps_present_pages() {
    let host = Host::with_budget(64 << 20);
    let mm = host.new_mm("t");
    let addr = mm
        .mmap_blocking(MapOptions::anon(2 << 20).tracked(true).fault_around(PAGE))
        .unwrap();
    let at = addr + 100 * PAGE;
    mm.write_blocking(at, &[7]).unwrap();
    mm.tracker()
        .unwrap()
        .fail_next_populate
        .store(true, Ordering::SeqCst);
    let r = mm.write_blocking(at + PAGE - 1, &[1, 2]);
    assert!(
        matches!(&r, Err(Error::Host { op: "UFFDIO_COPY", source }) if source.raw_os_error() == Some(libc::EIO)),
        "{r:?}"
    );
    assert_eq!(host.stats().charged_bytes, PAGE);
    assert!(mm.compare_blocking(at, &[7]).unwrap(), "present page lost");
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

/// Every routing entry of a guest goes with its exit (the pool is
/// process-wide: a stale entry would stay for the process's life).
#[test]
fn test_exit_leaves_no_route() {
    let host = Host::with_budget(64 << 20);
    let g = host.create_guest("r");
    let mm = g.mm().unwrap();
    let a = mm
        .mmap_blocking(MapOptions::anon(16 << 12).tracked(true))
        .unwrap();
    mm.write_blocking(a, &[1u8; 4096]).unwrap();
    let _b = mm
        .mmap_blocking(MapOptions::anon(4 << 12).tracked(true))
        .unwrap();
    // A split: the entry of the first region becomes two.
    mm.munmap_blocking(a + 4096, 4096).unwrap();
    let t = mm.tracker().unwrap();
    let owner = std::sync::Arc::downgrade(&t);
    let shard = t.shard.clone();
    drop(t);
    let mine = || {
        shard
            .routes
            .iter()
            .filter(|e| std::sync::Weak::ptr_eq(&e.value().owner, &owner))
            .count()
    };
    assert_eq!(mine(), 3, "two regions, the first split in two");
    drop(mm);
    g.exit_blocking();
    assert_eq!(mine(), 0, "routes left after the guest's exit");
}

/// Rss of `/proc/self/smaps` over the mappings inside `[start, end)`.
fn smaps_rss(start: usize, end: usize) -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut rss = 0;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                {
                    inside = s >= start && e <= end;
                    continue;
                }
            }
        }
        if let (true, Some(v)) = (inside, line.strip_prefix("Rss:")) {
            rss += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024;
        }
    }
    rss
}

/// The fault-around window stops at the faulting page's VMA. A tracked
/// range read-write at its start and `PROT_NONE` above (a wasm linear
/// memory, mm-wasmtime) used to livelock: the 2 MiB window's
/// `UFFDIO_COPY` crossed the `mprotect` boundary, failed with `ENOENT`,
/// and the faulter was woken only to refault on the same window. Now the
/// copy is retried shorter until it fits the VMA; the `PROT_NONE` part
/// stays unpopulated (smaps).
#[test]
fn test_fault_around_stops_at_the_vma() {
    let host = Host::with_budget(64 << 20);
    let mm = host.new_mm("t");
    let len = 4u64 << 20;
    let addr = mm
        .mmap_blocking(MapOptions::anon(len).prot(crate::Prot::NONE).tracked(true))
        .unwrap();
    mm.mprotect_blocking(addr, 64 << 10, crate::Prot::READ_WRITE)
        .unwrap();
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
    let (tx, rx) = mpsc::channel();
    let th = std::thread::spawn(move || {
        touch(ptr as *mut u8, PAGE_SIZE, 5);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(HANG)
        .expect("a fault next to a PROT_NONE part never resolved");
    th.join().unwrap();
    let rss = smaps_rss(ptr, ptr + len as usize);
    assert!(
        (PAGE..=64 << 10).contains(&rss),
        "Rss {rss}: the read-write VMA only"
    );
    assert!(mm.compare_blocking(addr, &[5]).unwrap());
    // The whole read-write part, touched: exactly it is resident.
    touch(ptr as *mut u8, 64 << 10, 6);
    assert_eq!(smaps_rss(ptr, ptr + len as usize), 64 << 10);
}

/// Untracked mergeable regions are registered on the shard's quiet
/// descriptor (write-protect only, no events): an `mmap` or `DONTNEED` over
/// them, KSM's own or the embedder's, produces no message, so it never
/// waits for a handler round trip (issue 12: ~130 µs of CPU per merged
/// page). A tracked region of the same mm still reports its REMOVE.
#[test]
fn test_untracked_mergeable_ranges_deliver_no_messages() {
    let (_host, mm, tracked) = tracked_mm(4 * PAGE);
    let a = mm.mmap_blocking(MapOptions::anon(4 * PAGE)).unwrap();
    mm.madvise_blocking(a, 4 * PAGE, Advice::Mergeable).unwrap();
    let t = mm.tracker().unwrap();
    let quiet = mm.find_vma_blocking(a).unwrap().host_ptr();
    let full = mm.find_vma_blocking(tracked).unwrap().host_ptr();
    assert!(t.is_quiet(quiet as usize) && !t.is_quiet(full as usize));
    touch(quiet, 4 * PAGE_SIZE, 1);
    touch(full, 4 * PAGE_SIZE, 1);
    for p in [quiet, full] {
        // SAFETY: discards one page of a live mapping of ours (the
        // embedder's own madvise through the host pointer).
        let rc = unsafe { libc::madvise(p.cast(), PAGE_SIZE, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
    }
    let removes = || mm.tracked_stats().unwrap().foreign_removes;
    wait_until("the tracked region's REMOVE", || removes() >= 1);
    // A message of the quiet range would have been read before the
    // tracked one (its madvise returned first); give it a moment anyway.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(removes(), 1, "a REMOVE came from the quiet range");
}

/// Pool point 9 (`Shard::route_barrier`): a REMOVE the shard has read for
/// a range that is then unmapped must not be routed to the mm that maps
/// the same host addresses next. The shard looks a message up after
/// reading it; without the barrier, A's munmap returns while the message
/// waits, B gets the addresses back, and the message clears B's page and
/// takes its charge back (`foreign_removes` 1), while the page stays in
/// the host. Seen as "absent" merged pages in `ksm_vs_reaper` (issue 16).
#[test]
fn test_message_read_before_munmap_not_routed_to_the_next_mapping() {
    use super::pool::test_hooks::{HOLD_ROUTE, ROUTE_HELD};
    const LEN: u64 = 8 * PAGE;
    let host = Host::with_budget(64 << 20);
    // Address reuse is the kernel's choice (top-down first fit): another
    // test mapping in between may take the hole. Try a few times.
    for _ in 0..20 {
        let a = host.new_mm("a");
        let addr_a = a
            .mmap_blocking(MapOptions::anon(LEN).tracked(true))
            .unwrap();
        let shard = a.tracker().unwrap().shard.clone();
        // B: an mm on A's shard (trackers get shards round robin).
        let b = (0..64)
            .map(|_| {
                let m = host.new_mm("b");
                m.mmap_blocking(MapOptions::anon(PAGE).tracked(true))
                    .unwrap();
                m
            })
            .find(|m| Arc::ptr_eq(&m.tracker().unwrap().shard, &shard))
            .expect("an mm on A's shard");
        let host_a = a.find_vma_blocking(addr_a).unwrap().host_ptr() as usize;
        *lock(&HOLD_ROUTE) = Some((host_a, host_a + LEN as usize));
        // The embedder's own DONTNEED on A: a foreign REMOVE. It returns
        // once the shard has read the message, which then waits unrouted.
        // SAFETY: the first page of A's live tracked mapping; its contents
        // may go (it was never written).
        let r =
            unsafe { libc::madvise(host_a as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
        assert_eq!(r, 0);
        wait_until("the shard held before routing", || {
            ROUTE_HELD.load(Ordering::SeqCst)
        });
        let (tx, rx) = mpsc::channel();
        let unmapper = std::thread::spawn(move || {
            a.munmap_blocking(addr_a, LEN).unwrap();
            tx.send(()).unwrap();
            a
        });
        // With the barrier the munmap waits for the held shard; without it,
        // it returns at once.
        let waited = rx.recv_timeout(Duration::from_secs(1)).is_err();
        let release = || {
            *lock(&HOLD_ROUTE) = None;
            wait_until("the shard released", || !ROUTE_HELD.load(Ordering::SeqCst));
        };
        if waited {
            release();
        }
        let _a = unmapper.join().unwrap();
        let addr_b = b
            .mmap_blocking(MapOptions::anon(LEN).tracked(true))
            .unwrap();
        let host_b = b.find_vma_blocking(addr_b).unwrap().host_ptr() as usize;
        futures_lite::future::block_on(b.fill(addr_b, PAGE, 7)).unwrap();
        let charged = host.stats().charged_bytes;
        if !waited {
            release();
        }
        // Every message read so far went to its mm.
        shard.route_barrier();
        if host_b != host_a {
            continue;
        }
        let s = b.tracked_stats().unwrap();
        assert_eq!(s.foreign_removes, 0, "A's REMOVE was routed to B: {s:?}");
        assert_eq!(
            host.stats().charged_bytes,
            charged,
            "B's page was uncharged"
        );
        assert!(
            waited,
            "A's munmap returned while the shard held A's message"
        );
        assert!(b.compare_blocking(addr_b, &[7]).unwrap());
        return;
    }
    panic!("the kernel never gave B A's old addresses back in 20 tries");
}
