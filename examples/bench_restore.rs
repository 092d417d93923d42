//! Lazy restore of a snapshot against the kernel's own lazy path, a
//! `MAP_PRIVATE` mapping of the same snapshot file, in the same run.
//!
//! Setup: a guest with one tracked region of `--mib` MiB, every page
//! written, is snapshotted to a file in `--dir` (fsynced). Then, for each
//! round and each page-cache state (warm: the file's pages cached; cold:
//! `posix_fadvise(DONTNEED)` on the file, plus `drop_caches` when root):
//!
//! - **usable**: `Snapshot::open` + `MmUser::restore` into a fresh guest
//!   (guestmm), `open` + `mmap` of the file (kernel): the time until the
//!   region may be touched;
//! - **sequential read / write**: one thread reads (writes) one byte in
//!   every page through the host pointer. guestmm serves each fault-around
//!   window with one `UFFDIO_COPY` from its read-only mapping of the file;
//!   the kernel maps page-cache pages (read) or copies them on write;
//! - **random**: `--random` single-byte writes at random pages of a fresh
//!   restore, each timed; p50 / p99.
//!
//! Every measurement uses a fresh restore (and a fresh kernel mapping);
//! guestmm and kernel alternate inside each round; medians of the rounds.
//!
//! ```sh
//! cargo run --release --example bench_restore -- [--mib 1024] [--rounds 5] [--random 20000] [--fault-around-kib 2048] [--dir /var/tmp] [--json]
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use guestmm::{Host, MapOptions, MmUser, Snapshot, PAGE_SIZE};
use serde::Serialize;

mod common;
use common::{median, round, MIB};

/// Lazy restore from a snapshot file against a `MAP_PRIVATE` mapping of
/// it: time until usable, sequential touch, random touch latency; warm and
/// cold page cache; medians of the rounds.
#[derive(Debug, Parser)]
#[command(name = "bench_restore")]
struct Args {
    /// MiB of guest memory in the snapshot (every page written).
    #[arg(long, default_value_t = 1024, value_parser = common::at_least(2))]
    mib: u64,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = common::at_least(1))]
    rounds: u64,
    /// Random single-page touches per round (for p50 / p99).
    #[arg(long, default_value_t = 20_000, value_parser = common::at_least(100))]
    random: u64,
    /// Fault-around window of the restored region, KiB (a power of two
    /// from 4 to 2048).
    #[arg(long, default_value_t = 2048, value_parser = fault_around_kib)]
    fault_around_kib: u64,
    /// Directory of the snapshot file (a disk-backed one: cold-cache
    /// numbers on tmpfs mean nothing).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Never write /proc/sys/vm/drop_caches (cold = fadvise only).
    #[arg(long)]
    no_drop_caches: bool,
    /// Measure the warm page cache only (the cold numbers are reported as
    /// zeros).
    #[arg(long)]
    warm_only: bool,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

fn fault_around_kib(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if (4..=2048).contains(&v) && v.is_power_of_two() {
        Ok(v)
    } else {
        Err(format!("a power of two from 4 to 2048, got {v}"))
    }
}

/// One side's numbers in one cache state (medians of the rounds).
#[derive(Debug, Default, Serialize)]
struct Side {
    usable_ms: f64,
    seq_read_ms: f64,
    seq_write_ms: f64,
    random_p50_us: f64,
    random_p99_us: f64,
}

/// guestmm and the kernel in one cache state, with the ratios.
#[derive(Debug, Serialize)]
struct State {
    guestmm: Side,
    kernel: Side,
    seq_read_ratio: f64,
    seq_write_ratio: f64,
    /// Fraction of the file in the page cache before a measurement
    /// (mincore), the worst round: the most left after the cold
    /// preparation, the least after the warm one.
    resident_before: f64,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    bytes: u64,
    rounds: u64,
    random: u64,
    fault_around: u64,
    snapshot_write_ms: f64,
    file_blocks_bytes: u64,
    drop_caches: String,
    warm: State,
    cold: State,
}

/// Per-round samples of one side.
#[derive(Debug, Default)]
struct Samples {
    usable: Vec<f64>,
    seq_read: Vec<f64>,
    seq_write: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl Samples {
    fn side(&self) -> Side {
        Side {
            usable_ms: round(median(self.usable.clone()), 3),
            seq_read_ms: round(median(self.seq_read.clone()), 1),
            seq_write_ms: round(median(self.seq_write.clone()), 1),
            random_p50_us: round(median(self.p50.clone()), 2),
            random_p99_us: round(median(self.p99.clone()), 2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touch {
    Read,
    Write,
    Random,
}

/// xorshift64*: the random page sequence (same for both sides).
fn pages(n: u64, pages: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d) % pages
        })
        .collect()
}

/// Runs `touch` on `ptr..ptr+len`; returns the total ms (sequential) or
/// the per-touch µs (random).
///
/// # Safety
///
/// `ptr..ptr+len` is a live readable and writable mapping.
unsafe fn run_touch(ptr: *mut u8, len: usize, touch: Touch, random: &[u64]) -> (f64, Vec<f64>) {
    let t = Instant::now();
    let mut lat = Vec::new();
    let mut sum = 0u8;
    match touch {
        Touch::Read => {
            for off in (0..len).step_by(PAGE_SIZE) {
                // SAFETY: inside the caller's live mapping.
                sum = sum.wrapping_add(unsafe { ptr.add(off).read_volatile() });
            }
        }
        Touch::Write => {
            for off in (0..len).step_by(PAGE_SIZE) {
                // SAFETY: inside the caller's live writable mapping.
                unsafe { ptr.add(off).write_volatile(sum) };
            }
        }
        Touch::Random => {
            lat.reserve(random.len());
            for &p in random {
                let s = Instant::now();
                // SAFETY: page `p` < len / PAGE_SIZE of the live mapping.
                unsafe { ptr.add(p as usize * PAGE_SIZE + 64).write_volatile(1) };
                lat.push(s.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    std::hint::black_box(sum);
    (t.elapsed().as_secs_f64() * 1e3, lat)
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// guestmm: restore into a fresh guest, then `touch`. Returns (usable ms,
/// touch ms, latencies).
fn guestmm_once(path: &Path, fa: u64, touch: Touch, random: &[u64]) -> (f64, f64, Vec<f64>) {
    let t = Instant::now();
    let snap = Snapshot::open(path).expect("open snapshot");
    let len = snap.vmas()[0].len;
    let host = Host::with_budget(len + 64 * MIB);
    let mm: MmUser = host.new_mm("restored");
    let opts = snap.map_options(0).expect("one VMA").fault_around(fa);
    let addr = mm.mmap_blocking(opts).expect("restore");
    let usable = t.elapsed().as_secs_f64() * 1e3;
    let ptr = mm.find_vma_blocking(addr).expect("vma").host_ptr();
    // SAFETY: the restored region stays mapped while `mm` is held.
    let (ms, lat) = unsafe { run_touch(ptr, len as usize, touch, random) };
    if touch != Touch::Random {
        assert_eq!(host.stats().charged_bytes, len, "every page charged once");
    }
    drop(mm);
    (usable, ms, lat)
}

/// The kernel: `MAP_PRIVATE` of the VMA's data area (`len` bytes at
/// `data_off`, known from the layout as a VMM knows its own) of the same
/// file. Timed from the `open`, as guestmm's side is.
fn kernel_once(
    path: &Path,
    snap_len: usize,
    data_off: u64,
    touch: Touch,
    random: &[u64],
) -> (f64, f64, Vec<f64>) {
    let t0 = Instant::now();
    let file = File::open(path).expect("open");
    // SAFETY: a fresh private mapping of our own file placed by the
    // kernel; unmapped below, never referenced as a Rust slice.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            snap_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            data_off as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of the snapshot");
    let usable = t0.elapsed().as_secs_f64() * 1e3;
    // SAFETY: the mapping made above, live until the munmap below.
    let (ms, lat) = unsafe { run_touch(p.cast(), snap_len, touch, random) };
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(p, snap_len) };
    (usable, ms, lat)
}

/// Evicts the file from the page cache; returns the fraction still
/// resident afterwards (mincore through a fresh mapping).
fn make_cold(path: &Path, drop_caches: bool) -> f64 {
    let file = File::open(path).expect("open");
    let len = file.metadata().expect("stat").len() as usize;
    // SAFETY: plain syscall on a valid descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if drop_caches {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    }
    resident_fraction(&file, len)
}

/// Warms the file's pages into the page cache (reads it once).
fn make_warm(path: &Path) -> f64 {
    let file = File::open(path).expect("open");
    let len = file.metadata().expect("stat").len() as usize;
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0u64;
    use std::os::unix::fs::FileExt;
    while (off as usize) < len {
        let n = file.read_at(&mut buf, off).expect("read");
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    resident_fraction(&file, len)
}

fn resident_fraction(file: &File, len: usize) -> f64 {
    // SAFETY: a fresh read-only shared mapping of our file, only passed to
    // mincore and unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return f64::NAN;
    }
    let pages = len.div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `p` maps `len` bytes; `vec` has one byte per page.
    let rc = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len) };
    if rc != 0 {
        return f64::NAN;
    }
    vec.iter().filter(|b| **b & 1 != 0).count() as f64 / pages as f64
}

/// Writes the snapshot of a guest whose `bytes` are all written.
fn make_snapshot(path: &Path, bytes: u64) -> f64 {
    let host = Host::with_budget(bytes + 64 * MIB);
    let mm = host.new_mm("source");
    let addr = mm
        .mmap_blocking(MapOptions::anon(bytes).tracked(true))
        .expect("mmap");
    let ptr = mm.find_vma_blocking(addr).expect("vma").host_ptr();
    for p in 0..(bytes as usize / PAGE_SIZE) {
        // SAFETY: page `p` of the live tracked mapping.
        let page = unsafe { std::slice::from_raw_parts_mut(ptr.add(p * PAGE_SIZE), PAGE_SIZE) };
        common::fill_page(page, p as u64 + 1);
    }
    let t = Instant::now();
    let st = mm.snapshot_to_file_blocking(path).expect("snapshot");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(st.pages * PAGE_SIZE as u64, bytes);
    File::open(path).and_then(|f| f.sync_all()).expect("fsync");
    ms
}

fn main() {
    let args: Args = common::init();
    let bytes = args.mib << 20;
    let fa = args.fault_around_kib << 10;
    let path = args
        .dir
        .join(format!("guestmm-bench-restore-{}.snap", std::process::id()));
    let root = {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    };
    let drop_caches = root && !args.no_drop_caches;
    let pb = common::status_line(args.json);
    pb.set_message("writing the snapshot");
    let write_ms = make_snapshot(&path, bytes);
    let blocks = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    let random = pages(args.random, bytes / PAGE_SIZE as u64, 0x5eed);
    let data_off = Snapshot::open(&path).expect("open snapshot").vmas()[0].data_off;
    let mut states = Vec::new();
    for cold in [false, true] {
        if cold && args.warm_only {
            states.push(State {
                guestmm: Side::default(),
                kernel: Side::default(),
                seq_read_ratio: 0.0,
                seq_write_ratio: 0.0,
                resident_before: 0.0,
            });
            continue;
        }
        let (mut g, mut k) = (Samples::default(), Samples::default());
        let mut worst_resident: f64 = 0.0;
        for r in 0..args.rounds {
            for touch in [Touch::Read, Touch::Write, Touch::Random] {
                for side in 0..2 {
                    // Alternate which side goes first, round by round.
                    let kernel = (side + r) % 2 == 1;
                    pb.set_message(format!(
                        "{} round {r} {touch:?} {}",
                        if cold { "cold" } else { "warm" },
                        if kernel { "kernel" } else { "guestmm" }
                    ));
                    let res = if cold {
                        make_cold(&path, drop_caches)
                    } else {
                        make_warm(&path)
                    };
                    // Cold: the most left cached; warm: the least cached.
                    worst_resident = if cold {
                        worst_resident.max(res)
                    } else if r == 0 && touch == Touch::Read && side == 0 {
                        res
                    } else {
                        worst_resident.min(res)
                    };
                    let (usable, ms, lat) = if kernel {
                        kernel_once(&path, bytes as usize, data_off, touch, &random)
                    } else {
                        guestmm_once(&path, fa, touch, &random)
                    };
                    let s = if kernel { &mut k } else { &mut g };
                    match touch {
                        Touch::Read => {
                            s.usable.push(usable);
                            s.seq_read.push(ms);
                        }
                        Touch::Write => s.seq_write.push(ms),
                        Touch::Random => {
                            s.p50.push(percentile(lat.clone(), 0.5));
                            s.p99.push(percentile(lat, 0.99));
                        }
                    }
                }
            }
        }
        let (gs, ks) = (g.side(), k.side());
        states.push(State {
            seq_read_ratio: round(gs.seq_read_ms / ks.seq_read_ms, 3),
            seq_write_ratio: round(gs.seq_write_ms / ks.seq_write_ms, 3),
            guestmm: gs,
            kernel: ks,
            resident_before: round(worst_resident, 4),
        });
    }
    pb.finish_and_clear();
    let _ = std::fs::remove_file(&path);
    let cold = states.pop().expect("cold");
    let warm = states.pop().expect("warm");
    let report = Report {
        bytes,
        rounds: args.rounds,
        random: args.random,
        fault_around: fa,
        snapshot_write_ms: round(write_ms, 1),
        file_blocks_bytes: blocks,
        drop_caches: if drop_caches {
            "written (root)".into()
        } else if root {
            "skipped (--no-drop-caches)".into()
        } else {
            "skipped (not root)".into()
        },
        warm,
        cold,
    };
    if args.json {
        common::print_json(&report);
        return;
    }
    println!(
        "lazy restore of {} MiB, median of {} rounds, fault-around {} KiB; snapshot written in {:.1} ms",
        bytes >> 20,
        args.rounds,
        fa >> 10,
        report.snapshot_write_ms
    );
    println!(
        "cold cache: fadvise(DONTNEED), drop_caches {}",
        report.drop_caches
    );
    for (name, s) in [("warm", &report.warm), ("cold", &report.cold)] {
        println!(
            "{name} page cache (resident before cold rounds: {:.2}%)",
            s.resident_before * 100.0
        );
        for (who, x) in [("guestmm", &s.guestmm), ("kernel ", &s.kernel)] {
            println!(
                "  {who}  usable {:7.3} ms  seq read {:8.1} ms  seq write {:8.1} ms  random p50 {:7.2} us  p99 {:8.2} us",
                x.usable_ms, x.seq_read_ms, x.seq_write_ms, x.random_p50_us, x.random_p99_us
            );
        }
        println!(
            "  ratio    seq read {:.3}  seq write {:.3}",
            s.seq_read_ratio, s.seq_write_ratio
        );
    }
}
