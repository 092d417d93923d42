//! What the examples share: argument parsing with a tracing subscriber,
//! JSON output, a progress line, `median`, `touch`, a plain anonymous
//! mapping for the kernel baselines.
//!
//! Included by each example with `mod common;`. Cargo builds only
//! `examples/*.rs` (and `examples/*/main.rs`) as examples, so this file is
//! never built on its own.
#![allow(dead_code)] // each example uses a part of it

use std::io::IsTerminal as _;
use std::time::Duration;

use guestmm::PAGE_SIZE;

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// Parses the command line (`--help` and a bad flag exit here, before the
/// example does anything) and then installs the tracing subscriber, so the
/// library's `warn!`/`error!` reach stderr. `RUST_LOG` filters (default
/// `warn`).
pub fn init<A: clap::Parser>() -> A {
    let args = A::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr must not panic a library thread (the fallback
        // report would be an eprintln! to that same stderr).
        .log_internal_errors(false)
        .init();
    args
}

/// Prints `value` as one line of JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("the examples' reports serialize")
    );
}

/// `x` rounded to `digits` decimals, as the JSON reports print their
/// timings.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// The median of `v` (the upper one for an even count); `v` is not empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A live status line on stderr (a spinner with a message), hidden when
/// `quiet` (`--json`) or when stdout or stderr is not a terminal.
pub fn status_line(quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("a valid template"),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// Writes one byte in every page of `ptr..ptr+len`.
///
/// # Safety
///
/// `ptr..ptr+len` is a live writable mapping that nothing else frees
/// during the call.
pub unsafe fn touch(ptr: *mut u8, len: usize) {
    for off in (0..len).step_by(PAGE_SIZE) {
        // SAFETY: inside the caller's writable mapping (see above).
        unsafe { ptr.add(off).write_volatile(1) };
    }
}

/// A private anonymous mapping made with plain `mmap` (the kernel's side
/// of the comparisons), unmapped on drop.
#[derive(Debug)]
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

impl AnonMap {
    /// Maps `len` bytes, readable and writable, with extra `MAP_*` flags.
    /// Only the `mmap` system call: safe to call in a forked child.
    pub fn new(len: usize, extra_flags: i32) -> std::io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping the kernel places;
        // nothing else refers to it. Unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr: p.cast(), len })
    }

    /// The first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The whole mapping as bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live, readable and writable for `len`
        // bytes while `self` is, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Writes one byte in every page.
    pub fn touch(&mut self) {
        // SAFETY: our own live writable mapping; `&mut self` keeps it so.
        unsafe { touch(self.ptr, self.len) }
    }

    /// `madvise(advice)` on the whole mapping.
    pub fn madvise(&self, advice: i32) -> std::io::Result<()> {
        // SAFETY: madvise on our own mapping.
        if unsafe { libc::madvise(self.ptr.cast(), self.len, advice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Page contents from a seed: 8-byte words `seed * φ ^ k`.
pub fn fill_page(page: &mut [u8], seed: u64) {
    for (k, c) in page.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k as u64).to_le_bytes());
    }
}

/// Sizes in GiB with two decimals, for the human-readable output.
pub fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// A clap value parser for a whole number of at least `min`.
pub fn at_least(min: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s| {
        let v: u64 = s.parse().map_err(|e| format!("{e}"))?;
        if v >= min {
            Ok(v)
        } else {
            Err(format!("must be at least {min}"))
        }
    }
}

/// The value, or the error on stderr and exit status 1 (a demo cannot go
/// on without it: no oom_reaper thread, no KSM thread).
pub fn or_exit<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("{what}: {e}");
        std::process::exit(1)
    })
}

/// Resident bytes of each host range `(base, len)` (page aligned), from
/// the kernel's page tables through `mincore(2)`: a walk of the range
/// alone, where a read of /proc/self/smaps walks every mapping of the
/// process (tens of ms with a few GiB of 4 KiB pages). A range that is
/// not (or no longer) fully mapped counts 0.
pub fn ranges_resident(ranges: &[(usize, u64)]) -> Vec<u64> {
    const PAGE: usize = 4096;
    let mut vec = Vec::new();
    ranges
        .iter()
        .map(|&(base, len)| {
            let pages = (len as usize).div_ceil(PAGE);
            vec.clear();
            vec.resize(pages, 0u8);
            // SAFETY: mincore only writes `pages` bytes into `vec`, which
            // holds that many; the range is only read by the kernel's page
            // table walk (ENOMEM if it is not mapped, counted as 0).
            let r =
                unsafe { libc::mincore(base as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
            if r != 0 {
                return 0;
            }
            vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE as u64
        })
        .collect()
}

/// Rss of each host range `(base, len)`, from one read of
/// /proc/self/smaps.
pub fn mappings_rss(ranges: &[(usize, u64)]) -> Vec<u64> {
    let mut total = vec![0; ranges.len()];
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else {
        return total;
    };
    let mut inside = None;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                {
                    inside = ranges
                        .iter()
                        .position(|&(base, len)| s >= base && e <= base + len as usize);
                    continue;
                }
            }
        }
        if let (Some(i), Some(v)) = (inside, line.strip_prefix("Rss:")) {
            let kb = v.trim().trim_end_matches("kB").trim();
            total[i] += kb.parse::<u64>().unwrap_or(0) * 1024;
        }
    }
    total
}

/// A guest with a dirty log (`MmConfig::dirty_log`) and one tracked
/// region of `mib` MiB, every page written by `fill(page, index)` through
/// the host pointer (this thread is the guest), under a budget of three
/// times that (the region, a snapshot, slack). Exits the process on error.
pub fn dirty_logged_guest(
    mib: u64,
    fill: impl Fn(&mut [u8], usize),
) -> (guestmm::Host, guestmm::Guest, guestmm::MmUser, u64, *mut u8) {
    use guestmm::{Host, HostConfig, MapOptions, MmConfig};
    let host = Host::new(HostConfig {
        mm: MmConfig {
            dirty_log: true,
            ..MmConfig::default()
        },
        ..HostConfig::with_budget(3 * mib * MIB)
    });
    let guest = host.create_guest("fuzz-target");
    let mm = or_exit(guest.mm(), "guest");
    let addr = or_exit(
        mm.mmap_blocking(MapOptions::anon(mib * MIB).tracked(true)),
        "mmap",
    );
    let ptr = or_exit(mm.find_vma_blocking(addr), "vma").host_ptr();
    for p in 0..(mib * MIB) as usize / PAGE_SIZE {
        // SAFETY: inside the live tracked mapping (the handler serves the
        // first touch of each 2 MiB); this thread is the guest.
        let page = unsafe { std::slice::from_raw_parts_mut(ptr.add(p * PAGE_SIZE), PAGE_SIZE) };
        fill(page, p);
    }
    (host, guest, mm, addr, ptr)
}

/// xorshift64: deterministic random choices (which pages a test case
/// writes, a fuzzer's mutations). The state must not be 0.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A file path under the temporary directory, unique to this process,
/// whose file (if any) is removed on drop.
#[derive(Debug)]
pub struct TempPath(std::path::PathBuf);

impl TempPath {
    /// `$TMPDIR/<pid>-<name>` (not created).
    pub fn new(name: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(format!("{}-{name}", std::process::id())))
    }

    /// The path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
