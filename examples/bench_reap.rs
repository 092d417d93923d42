//! # bench_reap: our reap vs the kernel's own process_mrelease
//!
//! In one run, on the same amount of touched memory: (a) the kernel's
//! `process_mrelease(pidfd)` (syscall 448) on a SIGKILLed child process
//! that touched `--mib` MiB of private anonymous memory, and (b) guestmm's
//! `mrelease` of a killed guest whose RAM (same size) was touched the same
//! way. Medians of `--rounds` rounds; `--json` prints one line with `bytes`,
//! `ours_ms`, `kernel_ms`, `ratio` (ours / kernel) and the THP variant.
//!
//! `process_mrelease` is called right after the SIGKILL, as lmkd does; when
//! the child's own exit reaches `exit_mm` first the call fails with ESRCH
//! and the round is retried. The child's exit_mmap may zap alongside the
//! measured call (both under the read lock), as in real use.

use std::time::Instant;

use clap::Parser;
use guestmm::reaper::mrelease_blocking;
use guestmm::{Host, MapOptions};
use serde::Serialize;

mod common;
use common::{median, round, AnonMap};

/// guestmm's reap of a killed guest against the kernel's
/// process_mrelease of a SIGKILLed child, same touched memory.
#[derive(Debug, Parser)]
#[command(name = "bench_reap")]
struct Args {
    /// MiB touched by the child and by the guest.
    #[arg(long, default_value_t = 1024, value_parser = common::at_least(1))]
    mib: u64,
    /// Rounds per page size (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = common::at_least(1))]
    rounds: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    bytes: usize,
    rounds: u64,
    ours_ms: f64,
    kernel_ms: f64,
    ratio: f64,
    thp_ours_ms: f64,
    thp_kernel_ms: f64,
    thp_ratio: f64,
}

/// One kernel round: fork a child that touches `len` bytes, SIGKILL it,
/// time process_mrelease.
fn kernel_round(len: usize, thp: bool) -> Option<f64> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: the child only calls async-signal-safe functions (mmap,
    // madvise, write, pause) and raw memory writes before it is killed.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: child side; see above.
        unsafe {
            let Ok(mut m) = AnonMap::new(len, 0) else {
                libc::_exit(1)
            };
            if thp {
                let _ = m.madvise(libc::MADV_HUGEPAGE);
            }
            m.touch();
            libc::write(fds[1], b"r".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    let mut b = [0u8; 1];
    // SAFETY: reading one byte from our pipe end.
    let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
    // SAFETY: closing our pipe ends.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    if n != 1 {
        return None;
    }
    // SAFETY: plain syscalls on our child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let t = Instant::now();
    // SAFETY: process_mrelease(pidfd, 0) on our own dying child.
    let r = unsafe { libc::syscall(448, pidfd, 0) };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: reap the child and close the pidfd.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::close(pidfd);
    }
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // ESRCH: the child reached exit_mm before our call (its exit won the
        // race); the round is retried.
        if e.raw_os_error() != Some(libc::ESRCH) {
            eprintln!("bench_reap: process_mrelease: {e}");
        }
        return None;
    }
    Some(ms)
}

fn ours_round(len: usize, thp: bool) -> Option<f64> {
    let host = Host::with_budget(u64::MAX / 2);
    let g = host.create_guest("victim");
    let mm = g.mm().ok()?;
    let a = mm
        .mmap_blocking(MapOptions::anon(len as u64).hugepage(thp))
        .ok()?;
    // SAFETY: the guest's mapping stays mapped while `mm` is held.
    unsafe { common::touch(mm.find_vma_blocking(a).ok()?.host_ptr(), len) };
    g.kill();
    let t = Instant::now();
    mrelease_blocking(&host, g.id()).ok()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    drop(mm);
    g.exit_blocking();
    Some(ms)
}

fn main() {
    let args: Args = common::init();
    let (mib, rounds, json) = (args.mib as usize, args.rounds, args.json);
    let len = mib << 20;
    let mut res = Vec::new();
    for thp in [false, true] {
        let (mut k, mut o) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let kernel = (0..20).find_map(|_| kernel_round(len, thp));
            match (kernel, ours_round(len, thp)) {
                (Some(a), Some(b)) => {
                    k.push(a);
                    o.push(b);
                }
                _ => {
                    eprintln!("bench_reap: a round failed (process_mrelease unsupported, or the child always exited first)");
                    std::process::exit(1);
                }
            }
        }
        res.push((median(o), median(k)));
    }
    let (o4, k4) = res[0];
    let (oh, kh) = res[1];
    if json {
        common::print_json(&Report {
            bytes: len,
            rounds,
            ours_ms: round(o4, 3),
            kernel_ms: round(k4, 3),
            ratio: round(o4 / k4, 3),
            thp_ours_ms: round(oh, 3),
            thp_kernel_ms: round(kh, 3),
            thp_ratio: round(oh / kh, 3),
        });
    } else {
        println!("reap of {mib} MiB touched, median of {rounds} rounds");
        println!("  4 KiB pages: guestmm mrelease {o4:7.2} ms   kernel process_mrelease {k4:7.2} ms   ratio {:.2}", o4 / k4);
        println!("  THP:         guestmm mrelease {oh:7.2} ms   kernel process_mrelease {kh:7.2} ms   ratio {:.2}", oh / kh);
    }
}
