//! Teardown cost: guestmm's `exit_mmap` of a guest with 64 MiB touched,
//! beside the kernel's own `munmap` of a plain anonymous mapping with the
//! same 64 MiB touched (same run, same machine).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use guestmm::{Host, MapOptions};

// The examples' kernel-side mapping (`AnonMap`), shared.
#[path = "../examples/common/mod.rs"]
mod common;

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
                let mut m = common::AnonMap::new(SIZE, 0).expect("mmap");
                m.as_mut_slice().fill(1);
                m
            },
            // munmap
            drop,
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
