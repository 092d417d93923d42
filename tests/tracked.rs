//! Tracked regions (userfaultfd) on real memory: direct touches by plain
//! threads are charged once per page, a reaped tracked page SIGBUSes instead
//! of reading zeros, teardown leaves no handler thread or descriptor behind,
//! and bad input gets a named error.
//!
//! Tests that need a process of their own (a signal, exact thread and fd
//! counts) re-run this test binary with `GUESTMM_TRACKED_CHILD` set and one
//! test selected; the child body runs only in that process.

mod common;

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{near, rss, serial, MIB};
use guestmm::{Error, Host, MapOptions, MmFlag, Prot, ZapReason, PAGE_SIZE};

const CHILD_ENV: &str = "GUESTMM_TRACKED_CHILD";

fn in_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).as_deref() == Ok(name)
}

/// The parent side of a child-process test: runs test `name` in a child
/// (one child at a time) and expects it to pass. Nothing in a child.
fn child_passes(name: &str) {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _g = serial();
    let st = run_child(name);
    assert!(st.success(), "child ended with {st:?}");
}

/// Drops the last user reference and runs the guest's exit: OOM_SKIP is
/// set, the tracker is gone and nothing stays charged.
fn exit_leaves_nothing(host: &Host, guest: &guestmm::Guest, mm: guestmm::MmUser) {
    let grab = mm.grab();
    drop(mm);
    guest.exit_blocking();
    assert!(grab.flags().test(MmFlag::OOM_SKIP));
    assert!(grab.tracked_stats().is_none());
    assert_eq!(host.stats().charged_bytes, 0);
}

/// A new mm with one tracked mapping made with `opts`: the mm, the
/// mapping's guest address and its host address.
fn tracked_mm(host: &Host, name: &str, opts: MapOptions) -> (guestmm::MmUser, u64, usize) {
    let mm = host.new_mm(name);
    let addr = mm.mmap_blocking(opts.tracked(true)).unwrap();
    let ptr = mm.find_vma_blocking(addr).unwrap().host_ptr() as usize;
    (mm, addr, ptr)
}

/// A bound on how long any wait of these tests may last: reaching it is a
/// failure (a hang made visible), never a measurement.
const HANG: Duration = Duration::from_secs(120);

/// Runs test `name` of this binary in a child process (child mode set).
/// A child still running after [`HANG`] is killed and the test fails, so a
/// hang (a fault nobody answers) cannot hang `cargo test`.
fn run_child(name: &str) -> ExitStatus {
    common::run_child(CHILD_ENV, name, HANG)
}

/// Spins until `cond` holds; panics (instead of hanging) after [`HANG`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "still waiting for {what} after {HANG:?}"
        );
        std::thread::yield_now();
    }
}

fn touch(ptr: usize, off: usize, len: usize, byte: u8) {
    let mut o = off;
    while o < off + len {
        // SAFETY: tests touch live tracked mappings they hold a user of.
        unsafe { ((ptr + o) as *mut u8).write_volatile(byte) };
        o += PAGE_SIZE;
    }
}

#[test]
fn threads_touching_directly_are_charged_once() {
    let _g = serial();
    const LEN: u64 = 64 * MIB;
    let host = Host::with_budget(256 * MIB);
    let (mm, addr, ptr) = tracked_mm(&host, "tracked", MapOptions::anon(LEN));
    let before = rss();
    // Four threads, interleaved page by page so they collide on windows.
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            std::thread::spawn(move || {
                let mut off = t * PAGE_SIZE;
                while off < LEN as usize {
                    let byte = ((off / PAGE_SIZE) % 251) as u8;
                    // SAFETY: as in `touch`.
                    unsafe { ((ptr + off) as *mut u8).write_volatile(byte) };
                    off += 4 * PAGE_SIZE;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let pages = LEN / PAGE_SIZE as u64;
    assert_eq!(host.stats().charged_bytes, LEN, "charged once per page");
    let st = mm.tracked_stats().unwrap();
    assert_eq!(st.pages_faulted, pages, "{st:?}");
    assert_eq!(mm.rss_pages(), pages);
    // The kernel agrees: the process grew by the region (± noise).
    let grown = rss().saturating_sub(before);
    assert!(near(grown, LEN, 8 * MIB), "rss grew {grown}, want {LEN}");
    assert_eq!(mm.resident_bytes_blocking().unwrap(), LEN);
    // The data is what the threads wrote; reading populates nothing.
    let mut page = vec![0u8; PAGE_SIZE];
    for p in (0..pages).step_by(97) {
        mm.read_blocking(addr + p * PAGE_SIZE as u64, &mut page)
            .unwrap();
        assert_eq!(page[0], (p % 251) as u8);
        assert!(page[1..].iter().all(|b| *b == 0));
    }
    assert_eq!(host.stats().charged_bytes, LEN);
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0);
}

#[test]
fn api_and_direct_touches_never_double_charge() {
    let _g = serial();
    let host = Host::with_budget(64 * MIB);
    const LEN: u64 = 8 * MIB;
    let opts = MapOptions::anon(LEN).fault_around(64 << 10);
    let (mm, addr, ptr) = tracked_mm(&host, "mixed", opts);
    let mm2 = mm.clone();
    let api = std::thread::spawn(move || {
        for p in (0..LEN / PAGE_SIZE as u64).step_by(3) {
            mm2.write_blocking(addr + p * PAGE_SIZE as u64 + 8, &[1])
                .unwrap();
        }
    });
    touch(ptr, 0, LEN as usize, 2);
    api.join().unwrap();
    assert_eq!(host.stats().charged_bytes, LEN);
    assert_eq!(mm.rss_pages(), LEN / PAGE_SIZE as u64);
    assert_eq!(mm.resident_bytes_blocking().unwrap(), LEN);
    // DONTNEED through the API: pages go back, the next touch charges again.
    mm.madvise_blocking(addr, LEN, guestmm::Advice::DontNeed)
        .unwrap();
    assert_eq!(host.stats().charged_bytes, 0);
    touch(ptr, 0, PAGE_SIZE, 3);
    assert_eq!(host.stats().charged_bytes, 64 << 10);
    assert!(mm.compare_blocking(addr, &[3]).unwrap());
}

#[test]
fn embedder_madvise_is_seen() {
    let _g = serial();
    let host = Host::with_budget(64 * MIB);
    let (mm, addr, ptr) = tracked_mm(&host, "balloon", MapOptions::anon(4 * MIB));
    touch(ptr, 0, 4 * MIB as usize, 1);
    assert_eq!(host.stats().charged_bytes, 4 * MIB);
    // A balloon driver discards 1 MiB behind our back. The REMOVE message
    // must be read before madvise returns, so this also proves the handler
    // answers it.
    // SAFETY: discarding guest memory we own; no Rust reference into it.
    let r = unsafe {
        libc::madvise(
            (ptr + MIB as usize) as *mut _,
            MIB as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    wait_until("the REMOVE message", || {
        mm.tracked_stats().unwrap().foreign_removes != 0
    });
    // Uncharged as soon as the handler could lock the pages.
    wait_until("the uncharge", || host.stats().charged_bytes == 3 * MIB);
    touch(ptr, MIB as usize, PAGE_SIZE, 4);
    assert!(mm.compare_blocking(addr + MIB, &[4]).unwrap());
    assert!(mm.compare_blocking(addr + MIB + 4096, &[0]).unwrap());
}

#[test]
fn reaped_tracked_page_sigbus_child() {
    if !in_child("reaped_tracked_page_sigbus_child") {
        return;
    }
    let host = Host::with_budget(64 * MIB);
    let (mm, _, ptr) = tracked_mm(&host, "victim", MapOptions::anon(2 * MIB));
    touch(ptr, 0, 2 * MIB as usize, 0x5a);
    // The reaper's protocol: UNSTABLE first, then zap under the read lock.
    mm.flags().set(MmFlag::UNSTABLE);
    {
        let state = futures_lite::future::block_on(mm.lock().read());
        for v in state.vmas().iter() {
            mm.zap_range(&state, v, v.start(), v.end(), ZapReason::Reap)
                .unwrap();
        }
    }
    eprintln!("child: reaped, reading");
    // SAFETY: the mapping is live (we hold a user); the page was zapped.
    let v = unsafe { (ptr as *const u8).read_volatile() };
    eprintln!("child: read {v:#x} instead of SIGBUS");
    std::process::exit(3);
}

#[test]
fn reaped_tracked_page_sigbus() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _g = serial();
    use std::os::unix::process::ExitStatusExt;
    // Without UFFDIO_POISON (Linux < 6.6) the fault is left unanswered by
    // design (the thread blocks rather than read zeros): nothing to test.
    let poison = {
        let host = Host::with_budget(8 * MIB);
        let mm = host.new_mm("probe");
        mm.mmap_blocking(MapOptions::anon(MIB).tracked(true))
            .unwrap();
        mm.tracked_stats().unwrap().poison
    };
    if !poison {
        eprintln!("reaped_tracked_page_sigbus: skipped (kernel has no UFFDIO_POISON)");
        return;
    }
    let st = run_child("reaped_tracked_page_sigbus_child");
    assert_eq!(st.signal(), Some(libc::SIGBUS), "child ended with {st:?}");
}

/// Threads of this process. The userfaultfd handler threads are the
/// process's pool (`guestmm::uffd_handler_threads`, started with the first
/// tracked mapping, alive for the process): never more of them than the
/// pool's size.
fn settled_tasks() -> usize {
    let pool = common::thread_names()
        .iter()
        .filter(|n| n.starts_with("guestmm-uffd"))
        .count();
    assert!(
        pool <= guestmm::uffd_handler_threads(),
        "{pool} handler threads, pool of {}",
        guestmm::uffd_handler_threads()
    );
    common::task_count()
}

/// Runs `cycle` three times and checks that it left no descriptor and no
/// thread behind. It runs once per pool shard first: each shard opens its
/// eventfd, its descriptor and its thread with its first tracker (shards
/// are given round robin), and keeps them for the process.
fn assert_cycles_leak_nothing(cycle: impl Fn()) {
    // Warm up process-wide lazies (the zero source, and the timer thread
    // that the first `SystemClock` sleep starts: the pressure path and the
    // EAGAIN backoff only sleep sometimes, so start it here, not by chance).
    futures_lite::future::block_on(guestmm::Clock::sleep(
        &guestmm::SystemClock,
        std::time::Duration::from_millis(1),
    ));
    for _ in 0..guestmm::uffd_handler_threads() {
        cycle();
    }
    let (fds, tasks) = (common::fd_count(), settled_tasks());
    for _ in 0..3 {
        cycle();
    }
    assert_eq!(common::fd_count(), fds, "fd leak");
    assert_eq!(
        settled_tasks(),
        tasks,
        "thread leak: {:?}",
        common::thread_names()
    );
}

#[test]
fn teardown_leaves_no_thread_or_fd_child() {
    if !in_child("teardown_leaves_no_thread_or_fd_child") {
        return;
    }
    let cycle = |touch_pages: bool| {
        let host = Host::with_budget(64 * MIB);
        let guest = host.create_guest("g");
        let mm = guest.mm().unwrap();
        let a = mm
            .mmap_blocking(MapOptions::anon(4 * MIB).tracked(true))
            .unwrap();
        let b = mm
            .mmap_blocking(MapOptions::anon(2 * MIB).tracked(true))
            .unwrap();
        assert!(mm.tracked_stats().unwrap().handler_alive);
        if touch_pages {
            let pa = mm.find_vma_blocking(a).unwrap().host_ptr() as usize;
            touch(pa, 0, 4 * MIB as usize, 1);
            mm.munmap_blocking(b, 2 * MIB).unwrap();
            mm.write_protect_blocking(a, 8 * PAGE_SIZE as u64).unwrap();
        }
        exit_leaves_nothing(&host, &guest, mm);
    };
    assert_cycles_leak_nothing(|| cycle(true));
}

#[test]
fn teardown_leaves_no_thread_or_fd() {
    child_passes("teardown_leaves_no_thread_or_fd_child");
}

/// Untracked mergeable regions get a write-protect-only registration (and
/// the mm a handler thread); munmap, DONTNEED and teardown must leave no
/// descriptor or thread behind.
#[test]
fn mergeable_untracked_leaves_no_thread_or_fd_child() {
    if !in_child("mergeable_untracked_leaves_no_thread_or_fd_child") {
        return;
    }
    let cycle = || {
        let host = Host::with_budget(64 * MIB);
        let guest = host.create_guest("g");
        let mm = guest.mm().unwrap();
        let a = mm.mmap_blocking(MapOptions::anon(4 * MIB)).unwrap();
        let b = mm.mmap_blocking(MapOptions::anon(2 * MIB)).unwrap();
        let pa = mm.find_vma_blocking(a).unwrap().host_ptr() as usize;
        touch(pa, 0, 4 * MIB as usize, 1);
        mm.write_blocking(b, &[2]).unwrap();
        assert!(mm.tracked_stats().is_none(), "untracked: no handler yet");
        mm.madvise_blocking(a, 4 * MIB, guestmm::Advice::Mergeable)
            .unwrap();
        mm.madvise_blocking(b, 2 * MIB, guestmm::Advice::Mergeable)
            .unwrap();
        let st = mm.tracked_stats().expect("write-protect tracker started");
        assert!(st.handler_alive, "{st:?}");
        // The embedder's own DONTNEED on the host pointer: a REMOVE message
        // the handler must read (else this madvise would block for ever).
        // SAFETY: madvise(DONTNEED) of our own live mapping; no Rust
        // reference points into it.
        let r =
            unsafe { libc::madvise(pa as *mut libc::c_void, MIB as usize, libc::MADV_DONTNEED) };
        assert_eq!(r, 0);
        mm.madvise_blocking(a + MIB, MIB, guestmm::Advice::DontNeed)
            .unwrap();
        mm.munmap_blocking(b, 2 * MIB).unwrap();
        exit_leaves_nothing(&host, &guest, mm);
    };
    assert_cycles_leak_nothing(cycle);
}

#[test]
fn mergeable_untracked_leaves_no_thread_or_fd() {
    child_passes("mergeable_untracked_leaves_no_thread_or_fd_child");
}

#[test]
fn bad_input_gets_named_errors() {
    let _g = serial();
    let host = Host::with_budget(64 * MIB);
    let mm = host.new_mm("bad");
    let plain = mm.mmap_blocking(MapOptions::anon(MIB)).unwrap();
    assert!(matches!(
        mm.write_protect_blocking(plain, 4096),
        Err(Error::NotTracked { .. })
    ));
    assert!(matches!(
        mm.mmap_blocking(MapOptions::shared(2 * MIB).hugepage(true).tracked(true)),
        Err(Error::NotAllowed { .. })
    ));
    assert!(matches!(
        mm.mmap_blocking(MapOptions::anon(2 * MIB).hugepage(true).tracked(true)),
        Err(Error::NotAllowed { .. })
    ));
    for fa in [0, 3000, 4 * MIB, 12288] {
        assert!(matches!(
            mm.mmap_blocking(MapOptions::anon(MIB).tracked(true).fault_around(fa)),
            Err(Error::BadFaultAround { bytes }) if bytes == fa
        ));
    }
    let t = mm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true).prot(Prot::READ_WRITE))
        .unwrap();
    assert!(matches!(
        mm.write_protect_blocking(t + 1, 4096),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        mm.write_protect_blocking(t, 0),
        Err(Error::ZeroLength { .. })
    ));
    assert!(matches!(
        mm.write_protect_blocking(t, 2 * MIB),
        Err(Error::Unmapped { .. })
    ));
    // Spanning a tracked and an untracked VMA.
    let lo = mm
        .mmap_blocking(MapOptions::anon(MIB).at(0x4000_0000))
        .unwrap();
    let hi = mm
        .mmap_blocking(MapOptions::anon(MIB).at(lo + MIB).tracked(true))
        .unwrap();
    assert!(matches!(
        mm.write_unprotect_blocking(lo, 2 * MIB),
        Err(Error::NotTracked { addr }) if addr == lo
    ));
    let _ = hi;
    assert_eq!(host.stats().charged_bytes, 0);
    let _ = Arc::new(());
}

#[path = "../examples/kvm_guest.rs"]
#[allow(dead_code)]
mod kvm_guest;

#[test]
fn kvm_guest_on_tracked_ram() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let _g = serial();
    let r = kvm_guest::run(16 * MIB).expect("kvm guest run");
    if let Some(why) = r.skipped {
        eprintln!("kvm_guest_on_tracked_ram: skipped ({why})");
        return;
    }
    assert!(r.guest_checksum_ok, "{r:?}");
    assert_eq!(r.progress_reports, 16); // one per MiB boundary reached
                                        // Every page but the code page was faulted in by KVM through the handler.
    assert_eq!(
        r.pages_faulted + r.pages_populated_api,
        16 * MIB / 4096,
        "{r:?}"
    );
    assert_eq!(r.charged_bytes, 16 * MIB);
}

#[test]
fn hugepage_advice_on_tracked_region_is_refused_like_mmap() {
    let host = Host::with_budget(64 * MIB);
    let (mm, addr, _) = tracked_mm(&host, "t", MapOptions::anon(2 * MIB));
    assert!(matches!(
        mm.madvise_blocking(addr, 2 * MIB, guestmm::Advice::HugePage),
        Err(Error::NotAllowed { addr: a, .. }) if a == addr
    ));
    assert!(!mm
        .find_vma_blocking(addr)
        .unwrap()
        .flags()
        .contains(guestmm::VmFlags::HUGEPAGE));
    // Untracked memory takes the advice as before.
    let plain = mm.mmap_blocking(MapOptions::anon(2 * MIB)).unwrap();
    mm.madvise_blocking(plain, 2 * MIB, guestmm::Advice::HugePage)
        .unwrap();
}

#[test]
fn mergeable_advice_that_cannot_be_honoured_is_an_error() {
    child_passes("mergeable_advice_that_cannot_be_honoured_is_an_error_child");
}

/// No descriptor left (RLIMIT_NOFILE at the current count): the
/// write-protect registration KSM needs cannot be made, so
/// `madvise(MERGEABLE)` of an untracked region fails by name and leaves
/// the flag unset, instead of `Ok` for a region that would never merge.
#[test]
fn mergeable_advice_that_cannot_be_honoured_is_an_error_child() {
    if !in_child("mergeable_advice_that_cannot_be_honoured_is_an_error_child") {
        return;
    }
    let host = Host::with_budget(64 * MIB);
    let mm = host.new_mm("m");
    let a = mm.mmap_blocking(MapOptions::anon(MIB)).unwrap();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one live struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = common::fd_count() as u64 + 4;
    // SAFETY: setrlimit reads one live struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    // Fill every number left under the limit (kept open: this process
    // ends with the test).
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
    }
    assert!(held.len() < 64, "RLIMIT_NOFILE did not bite");
    let r = mm.madvise_blocking(a, MIB, guestmm::Advice::Mergeable);
    assert!(
        matches!(r, Err(Error::MergeUnavailable { addr, .. }) if addr == a),
        "{r:?}"
    );
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("cannot be made mergeable"));
    let v = mm.find_vma_blocking(a).unwrap();
    assert!(!v.flags().contains(guestmm::VmFlags::MERGEABLE));
    assert_eq!(guestmm::core::ksm::wp_failures(&mm), 1);
}

/// Issue 11 §2: a reaped guest's worker touches its tracked RAM after the
/// reap. Without containment the SIGBUS kills the process (and every other
/// guest in it); with `contain::install` only that thread stops.
#[test]
fn reaped_guest_touch_is_contained_to_its_thread() {
    child_passes("reaped_guest_touch_is_contained_to_its_thread_child");
}

static CALLBACK_ADDR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn note_fault(addr: usize) {
    // Async-signal-safe: one atomic store.
    CALLBACK_ADDR.store(addr, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn reaped_guest_touch_is_contained_to_its_thread_child() {
    if !in_child("reaped_guest_touch_is_contained_to_its_thread_child") {
        return;
    }
    use guestmm::contain;
    let host = Host::with_budget(64 * MIB);
    let (victim, other) = (host.create_guest("victim"), host.create_guest("other"));
    let vm = victim.mm().unwrap();
    if !vm
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .map(|_| vm.tracked_stats().unwrap().poison)
        .unwrap()
    {
        eprintln!("skipped: no UFFDIO_POISON (a reaped touch blocks instead of SIGBUS)");
        return;
    }
    contain::install(Some(note_fault)).unwrap();
    assert!(matches!(
        contain::install(None),
        Err(Error::InvalidArgument { .. })
    ));
    let va = vm.vmas_blocking()[0].start();
    vm.fill_blocking(va, MIB, 0x77).unwrap();
    let om = other.mm().unwrap();
    let oa = om
        .mmap_blocking(MapOptions::anon(MIB).tracked(true))
        .unwrap();
    om.fill_blocking(oa, MIB, 0x42).unwrap();
    // The victim is killed and reaped while its worker still holds a user.
    victim.kill();
    let r = guestmm::reaper::mrelease_blocking(&host, victim.id()).unwrap();
    assert!(matches!(r, guestmm::reaper::MreleaseOutcome::Reaped { .. }));
    let p = vm.find_vma_blocking(va).unwrap().host_ptr() as usize;
    let worker = std::thread::spawn(move || {
        // SAFETY: the mapping is alive (`vm` holds a user); the reaped page
        // is poisoned, so this read takes SIGBUS.
        let b = unsafe { ((p + 4096) as *const u8).read_volatile() };
        panic!("read {b:#x} from a reaped page");
    });
    wait_until("the contained fault", || contain::contained() == 1);
    assert_eq!(
        CALLBACK_ADDR.load(std::sync::atomic::Ordering::SeqCst),
        p + 4096
    );
    assert!(!worker.is_finished(), "the faulting thread is parked");
    // The process and the other guest are intact.
    let mut buf = vec![0u8; MIB as usize];
    om.read_blocking(oa, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x42));
    assert!(other.is_alive());
    // The parked thread cannot be joined: end the child here, successfully.
    std::process::exit(0);
}

/// Issue 11 §4: with `MmConfig::hard_budget` the budget caps tracked
/// memory too: a direct touch that finds no room after the pressure path
/// kills its guest and gets SIGBUS (contained to the thread), instead of
/// being served over budget.
#[test]
fn hard_budget_kills_the_faulting_guest_instead_of_overcommitting() {
    child_passes("hard_budget_kills_the_faulting_guest_instead_of_overcommitting_child");
}

#[test]
fn hard_budget_kills_the_faulting_guest_instead_of_overcommitting_child() {
    if !in_child("hard_budget_kills_the_faulting_guest_instead_of_overcommitting_child") {
        return;
    }
    use guestmm::{contain, HostConfig, MmConfig};
    let host = Host::new(HostConfig {
        mm: MmConfig {
            hard_budget: true,
            ..MmConfig::default()
        },
        oom_wait: Duration::from_millis(50),
        ..HostConfig::with_budget(MIB)
    });
    let g = host.create_guest("g");
    // The OOM killer finds no victim: only the hard budget can act.
    g.set_unkillable(true);
    let mm = g.mm().unwrap();
    let a = mm
        .mmap_blocking(MapOptions::anon(4 * MIB).tracked(true).fault_around(4096))
        .unwrap();
    if !mm.tracked_stats().unwrap().poison {
        eprintln!("skipped: no UFFDIO_POISON (the over-budget fault would block)");
        return;
    }
    contain::install(None).unwrap();
    let p = mm.find_vma_blocking(a).unwrap().host_ptr() as usize;
    let _worker = std::thread::spawn(move || {
        for i in 0..1024usize {
            // SAFETY: inside the tracked mapping, alive while `mm` is.
            unsafe { ((p + i * 4096) as *mut u8).write_volatile(1) };
        }
    });
    wait_until("the contained fault", || contain::contained() == 1);
    let s = mm.tracked_stats().unwrap();
    assert_eq!((s.hard_limit_kills, s.fail_open_pages), (1, 0), "{s:?}");
    assert!(g.is_dying(), "the faulting guest was killed");
    assert!(host.stats().charged_bytes <= MIB, "never over the budget");
    assert_eq!(s.overcommit_bytes, 0);
    std::process::exit(0);
}

/// Issue 11 §5: 5,000 tracked guests in one process under `ulimit -n 1024`
/// (soft and hard, as bash sets it), half with full descriptors (or the
/// user-mode-only fallback when unprivileged) and half asking for
/// user-mode-only ones: at most the pool's threads serve them, the
/// descriptors stay a handful, and each guest's first touch from a host
/// thread is served and charged (budget, and the page resident per
/// `mincore` and in RSS per /proc). Before the pool the ~510th guest failed
/// with `EMFILE`.
#[test]
fn five_thousand_tracked_guests_under_ulimit_1024() {
    child_passes("five_thousand_tracked_guests_under_ulimit_1024_child");
}

#[test]
fn five_thousand_tracked_guests_under_ulimit_1024_child() {
    if !in_child("five_thousand_tracked_guests_under_ulimit_1024_child") {
        return;
    }
    const GUESTS: usize = 5000;
    const PAGE: u64 = PAGE_SIZE as u64;
    let lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: setrlimit reads a live rlimit struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let pool = guestmm::uffd_handler_threads();
    let budget = 2 * GUESTS as u64 * PAGE;
    let full = Host::with_budget(budget);
    let user_only = Host::new(guestmm::HostConfig {
        mm: guestmm::MmConfig {
            user_mode_only_uffd: true,
            ..Default::default()
        },
        ..guestmm::HostConfig::with_budget(budget)
    });
    let fds0 = common::fd_count();
    let mut guests = Vec::with_capacity(GUESTS);
    for i in 0..GUESTS {
        let host = if i % 2 == 0 { &full } else { &user_only };
        let g = host.create_guest(&format!("g{i}"));
        let mm = g.mm().unwrap();
        let opts = MapOptions::anon(4 * PAGE).tracked(true).fault_around(PAGE);
        let a = match mm.mmap_blocking(opts) {
            Ok(a) => a,
            Err(Error::Host {
                op: "userfaultfd",
                source,
            }) if i == 0 => {
                println!("skipped: no userfaultfd at all here ({source})");
                return;
            }
            Err(e) => panic!("guest {i}: tracked mmap failed: {e}"),
        };
        let p = mm.find_vma_blocking(a).unwrap().host_ptr() as usize;
        guests.push((g, mm, p));
    }
    let fds = common::fd_count();
    // One eventfd and at most two descriptors per shard.
    assert!(
        fds - fds0 <= 3 * pool,
        "{} descriptors for {GUESTS} guests",
        fds - fds0
    );
    let handlers = || {
        common::thread_names()
            .iter()
            .filter(|n| n.starts_with("guestmm-uffd"))
            .count()
    };
    assert!(handlers() <= pool, "{} handler threads", handlers());
    assert_eq!(
        full.stats().charged_bytes + user_only.stats().charged_bytes,
        0
    );

    // First touches from plain host threads, straight through the pointer.
    let rss0 = rss();
    let ptrs: Vec<usize> = guests.iter().map(|g| g.2).collect();
    std::thread::scope(|s| {
        for chunk in ptrs.chunks(GUESTS / 4) {
            s.spawn(move || {
                for &p in chunk {
                    // SAFETY: the first byte of a live tracked mapping of
                    // 4 pages; nothing else references it.
                    unsafe { (p as *mut u8).write_volatile(0x5a) };
                }
            });
        }
    });
    assert!(handlers() <= pool, "{} handler threads", handlers());
    // Charged: exactly one page per guest (fault-around of one page).
    assert_eq!(full.stats().charged_bytes, (GUESTS as u64 / 2) * PAGE);
    assert_eq!(user_only.stats().charged_bytes, (GUESTS as u64 / 2) * PAGE);
    for (i, (_, mm, p)) in guests.iter().enumerate() {
        let st = mm.tracked_stats().unwrap();
        assert_eq!((st.faults, st.pages_faulted), (1, 1), "guest {i}: {st:?}");
        if i % 2 == 1 {
            assert!(st.user_mode_only, "guest {i} asked for user-mode-only");
        }
        // The kernel's view: the touched page is resident, the next not.
        let mut vec = [0u8; 2];
        // SAFETY: mincore over two pages of a live mapping into a 2-byte
        // vector.
        let r = unsafe { libc::mincore(*p as *mut libc::c_void, 2 * PAGE_SIZE, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        assert_eq!((vec[0] & 1, vec[1] & 1), (1, 0), "guest {i}");
        // SAFETY: reads the byte written above.
        assert_eq!(unsafe { (*p as *const u8).read_volatile() }, 0x5a);
    }
    let grown = rss().saturating_sub(rss0);
    assert!(
        grown >= GUESTS as u64 * PAGE * 9 / 10,
        "RSS grew by {grown} bytes for {GUESTS} first touches"
    );
    for (g, mm, _) in guests {
        drop(mm);
        g.exit_blocking();
    }
    assert_eq!(
        full.stats().charged_bytes + user_only.stats().charged_bytes,
        0
    );
    assert!(
        common::fd_count() <= fds,
        "descriptors left after the exits"
    );
}
