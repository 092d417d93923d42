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

use guestmm::reaper::mrelease_blocking;
use guestmm::{Host, MapOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn touch(p: *mut u8, len: usize) {
    for off in (0..len).step_by(4096) {
        // SAFETY: `p..p+len` is a writable mapping owned by the caller.
        unsafe { std::ptr::write_volatile(p.add(off), 1) };
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
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                libc::_exit(1);
            }
            if thp {
                libc::madvise(p, len, libc::MADV_HUGEPAGE);
            }
            touch(p.cast(), len);
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
    touch(mm.find_vma_blocking(a).ok()?.host_ptr(), len);
    g.kill();
    let t = Instant::now();
    mrelease_blocking(&host, g.id()).ok()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    drop(mm);
    g.exit_blocking();
    Some(ms)
}

fn main() {
    let mut mib = 1024usize;
    let mut rounds = 5usize;
    let mut json = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mib" => mib = it.next().and_then(|v| v.parse().ok()).unwrap_or(mib),
            "--rounds" => {
                rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(rounds)
                    .max(1)
            }
            "--json" => json = true,
            _ => {
                eprintln!("bench_reap [--mib N] [--rounds N] [--json]");
                std::process::exit(2);
            }
        }
    }
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
        println!(
            "{{\"bytes\":{len},\"rounds\":{rounds},\"ours_ms\":{o4:.3},\"kernel_ms\":{k4:.3},\"ratio\":{:.3},\"thp_ours_ms\":{oh:.3},\"thp_kernel_ms\":{kh:.3},\"thp_ratio\":{:.3}}}",
            o4 / k4,
            oh / kh
        );
    } else {
        println!("reap of {mib} MiB touched, median of {rounds} rounds");
        println!("  4 KiB pages: guestmm mrelease {o4:7.2} ms   kernel process_mrelease {k4:7.2} ms   ratio {:.2}", o4 / k4);
        println!("  THP:         guestmm mrelease {oh:7.2} ms   kernel process_mrelease {kh:7.2} ms   ratio {:.2}", oh / kh);
    }
}
