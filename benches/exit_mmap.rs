//! Teardown cost: guestmm's `exit_mmap` of a guest with 64 MiB touched,
//! beside the kernel's own `munmap` of a plain anonymous mapping with the
//! same 64 MiB touched (same run, same machine).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use guestmm::{Host, MapOptions};

const SIZE: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("teardown_64MiB");
    g.sample_size(10);
    let host = Host::with_budget(1 << 30);
    g.bench_function("guestmm_exit_mmap", |b| {
        b.iter_batched(
            || {
                let mm = host.new_mm("bench");
                let a = mm.mmap_blocking(MapOptions::anon(SIZE as u64)).unwrap();
                mm.fill_blocking(a, SIZE as u64, 1).unwrap();
                mm
            },
            drop,
            BatchSize::PerIteration,
        )
    });
    g.bench_function("kernel_munmap", |b| {
        b.iter_batched(
            || {
                // SAFETY: a fresh private anonymous mapping, filled, then unmapped by the routine.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        SIZE,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                // SAFETY: `p` is a writable mapping of SIZE bytes.
                unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, SIZE) };
                p as usize
            },
            // SAFETY: unmaps the mapping created in the setup, used by nobody else.
            |p| unsafe { libc::munmap(p as *mut libc::c_void, SIZE) },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, bench);
}

criterion_main!(group::benches);
