//! # bench_reap: our reap vs the kernel's own process_mrelease
//!
//! In one run, on the same amount of touched memory: (a) the kernel's
//! `process_mrelease(pidfd)` (syscall 448) on a SIGKILLed child process
//! that touched `--mib` MiB of private anonymous memory, and (b) guestmm's
//! `mrelease` of a killed guest whose RAM (same size) was touched the same
//! way. Paired rounds: each round times one kernel reap and one of ours
//! back to back (which one goes first alternates), and its ratio is ours /
//! kernel of that pair, so the machine's drift (2x over minutes on this
//! nested VM) cancels within a pair; `--warmup` pairs are run first and
//! thrown away. `--json` prints one line with `bytes`, the medians
//! `ours_ms`, `kernel_ms`, `ratio` (the median of the pairs' ratios), the
//! spread of the ratios (`ratio_min`, `ratio_p25`, `ratio_p75`,
//! `ratio_max`, every pair in `ratios`) and the same for THP.
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
    /// Paired rounds per page size (the median is reported, with the
    /// spread).
    #[arg(long, default_value_t = 9, value_parser = common::at_least(1))]
    rounds: u64,
    /// Pairs run first and not counted (page cache, allocator and CPU
    /// frequency settle).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    bytes: usize,
    rounds: u64,
    warmup: u64,
    ours_ms: f64,
    kernel_ms: f64,
    ratio: f64,
    ratio_min: f64,
    ratio_p25: f64,
    ratio_p75: f64,
    ratio_max: f64,
    ratios: Vec<f64>,
    thp_ours_ms: f64,
    thp_kernel_ms: f64,
    thp_ratio: f64,
    thp_ratio_min: f64,
    thp_ratio_max: f64,
    thp_ratios: Vec<f64>,
}

/// One page size's paired rounds.
struct Pairs {
    ours: Vec<f64>,
    kernel: Vec<f64>,
    ratios: Vec<f64>,
}

impl Pairs {
    /// The ratios sorted, and the value at fraction `q` of them.
    fn quantile(&self, q: f64) -> f64 {
        let mut r = self.ratios.clone();
        r.sort_by(f64::total_cmp);
        r[((r.len() - 1) as f64 * q).round() as usize]
    }
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
        let mut p = Pairs {
            ours: Vec::new(),
            kernel: Vec::new(),
            ratios: Vec::new(),
        };
        for i in 0..args.warmup + rounds {
            let kernel = || (0..20).find_map(|_| kernel_round(len, thp));
            // Alternate which side goes first: neither gets the warmer (or
            // the more fragmented) machine every time.
            let (k, o) = if i % 2 == 0 {
                let k = kernel();
                (k, ours_round(len, thp))
            } else {
                let o = ours_round(len, thp);
                (kernel(), o)
            };
            let (Some(k), Some(o)) = (k, o) else {
                eprintln!("bench_reap: a round failed (process_mrelease unsupported, or the child always exited first)");
                std::process::exit(1);
            };
            if i >= args.warmup {
                p.kernel.push(k);
                p.ours.push(o);
                p.ratios.push(round(o / k, 3));
            }
        }
        res.push(p);
    }
    let (p4, ph) = (&res[0], &res[1]);
    let (o4, k4) = (median(p4.ours.clone()), median(p4.kernel.clone()));
    let (oh, kh) = (median(ph.ours.clone()), median(ph.kernel.clone()));
    if json {
        common::print_json(&Report {
            bytes: len,
            rounds,
            warmup: args.warmup,
            ours_ms: round(o4, 3),
            kernel_ms: round(k4, 3),
            ratio: round(p4.quantile(0.5), 3),
            ratio_min: p4.quantile(0.0),
            ratio_p25: p4.quantile(0.25),
            ratio_p75: p4.quantile(0.75),
            ratio_max: p4.quantile(1.0),
            ratios: p4.ratios.clone(),
            thp_ours_ms: round(oh, 3),
            thp_kernel_ms: round(kh, 3),
            thp_ratio: round(ph.quantile(0.5), 3),
            thp_ratio_min: ph.quantile(0.0),
            thp_ratio_max: ph.quantile(1.0),
            thp_ratios: ph.ratios.clone(),
        });
    } else {
        println!(
            "reap of {mib} MiB touched, {rounds} paired rounds after {} warm-up",
            args.warmup
        );
        println!(
            "  4 KiB pages: guestmm mrelease {o4:7.2} ms   kernel process_mrelease {k4:7.2} ms   ratio {:.2} (pairs {:.2}-{:.2}, middle half {:.2}-{:.2})",
            p4.quantile(0.5), p4.quantile(0.0), p4.quantile(1.0), p4.quantile(0.25), p4.quantile(0.75)
        );
        println!(
            "  THP:         guestmm mrelease {oh:7.2} ms   kernel process_mrelease {kh:7.2} ms   ratio {:.2} (pairs {:.2}-{:.2})",
            ph.quantile(0.5), ph.quantile(0.0), ph.quantile(1.0)
        );
    }
}
