//! First-touch cost of a tracked region against the kernel's own first
//! touch of a plain anonymous mapping of the same size, in the same run.
//!
//! One thread writes one byte per page through the host pointer. Tracked:
//! every fault goes to guestmm's userfaultfd handler, which charges the
//! budget and resolves a fault-around window with one `UFFDIO_COPY`. Kernel:
//! `mmap(MAP_PRIVATE|MAP_ANONYMOUS)` (THP as the system sets it for
//! mappings without `MADV_HUGEPAGE`), faulted page by page. Each round maps
//! fresh memory and frees it; the median of the rounds is reported.
//!
//! ```sh
//! cargo run --release --example bench_first_touch -- [--mib 1024] [--rounds 5] [--fault-around-kib 2048] [--json]
//! ```

use std::time::Instant;

use guestmm::{Host, MapOptions, PAGE_SIZE};

fn touch(ptr: *mut u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: `ptr..ptr+len` is a live writable mapping owned by the
        // caller for the duration of this call.
        unsafe { ptr.add(off).write_volatile(1) };
        off += PAGE_SIZE;
    }
}

fn tracked_once(bytes: u64, fault_around: u64) -> f64 {
    let host = Host::with_budget(bytes + (64 << 20));
    let mm = host.new_mm("bench");
    let addr = mm
        .mmap_blocking(
            MapOptions::anon(bytes)
                .tracked(true)
                .fault_around(fault_around),
        )
        .expect("tracked mmap");
    let ptr = mm.find_vma_blocking(addr).expect("vma").host_ptr();
    let t = Instant::now();
    touch(ptr, bytes as usize);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(host.stats().charged_bytes, bytes);
    drop(mm);
    ms
}

fn kernel_once(bytes: u64) -> f64 {
    let len = bytes as usize;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let t = Instant::now();
    touch(p.cast(), len);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(p, len) };
    ms
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let bytes = arg(&args, "--mib", 1024).max(2) << 20;
    let rounds = arg(&args, "--rounds", 5).max(1);
    let fa = arg(&args, "--fault-around-kib", 2048) << 10;
    if !(4..=2048).contains(&(fa >> 10)) || !fa.is_power_of_two() {
        eprintln!(
            "bench_first_touch: --fault-around-kib must be a power of two from 4 to 2048, got {}",
            fa >> 10
        );
        std::process::exit(2);
    }
    let (mut tr, mut kr) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // Alternate so drift (other load, page cache) hits both alike.
        kr.push(kernel_once(bytes));
        tr.push(tracked_once(bytes, fa));
    }
    let (t, k) = (median(tr.clone()), median(kr.clone()));
    let ratio = t / k;
    if json {
        println!(
            "{{\"bytes\":{bytes},\"rounds\":{rounds},\"fault_around\":{fa},\"tracked_ms\":{t:.1},\"kernel_ms\":{k:.1},\"ratio\":{ratio:.3}}}"
        );
    } else {
        println!(
            "first touch of {} MiB, median of {rounds} rounds, fault-around {} KiB",
            bytes >> 20,
            fa >> 10
        );
        println!("  tracked (uffd)  {t:8.1} ms   rounds {tr:.1?}");
        println!("  kernel          {k:8.1} ms   rounds {kr:.1?}");
        println!("  ratio           {ratio:8.3}");
    }
}
