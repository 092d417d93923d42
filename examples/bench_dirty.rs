//! The cost of `mm_vm_memory::DirtyBitmap` (userfaultfd `WP_ASYNC` +
//! `PAGEMAP_SCAN`) against no dirty tracking and against the kernel's
//! soft-dirty bits, in the same run.
//!
//! One thread writes one `u64` per page of a populated, untracked guestmm
//! region through a plain vm-memory view (a direct write: no
//! `mark_dirty`), three ways, each on pages that are clean again:
//!
//! - `plain`: no tracking (the page is present and writable: no fault);
//! - `wp_async`: after `DirtyBitmap::get_and_reset` protected every page:
//!   each first write takes a write-protect fault the kernel resolves by
//!   itself;
//! - `soft_dirty`: after `echo 4 > /proc/self/clear_refs` (process-wide,
//!   so only usable as a baseline here): each first write takes the
//!   kernel's soft-dirty fault.
//!
//! Then the harvest: `get_and_reset` with every page dirty and with none,
//! and whether it reported exactly the pages written. Medians of the
//! rounds. A synchronous userfaultfd write-protect (mm-core's `tracked/wp`
//! machinery) would add a handler round trip per page; its cost is
//! `bench_first_touch --fault-around-kib 4` (BENCHMARKS.md).
//!
//! ```sh
//! cargo run --release --example bench_dirty -- [--mib 256] [--rounds 5] [--json]
//! ```

use std::time::Instant;

use clap::Parser;
use guestmm::{Host, MapOptions, PAGE_SIZE};
use mm_vm_memory::{DirtyBitmap, MmRegion};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, MemoryRegionAddress};

mod common;
use common::{median, round};

/// Dirty tracking by userfaultfd WP_ASYNC + PAGEMAP_SCAN against no
/// tracking and the kernel's soft-dirty bits (medians of the rounds).
#[derive(Debug, Parser)]
#[command(name = "bench_dirty")]
struct Args {
    /// MiB written per round.
    #[arg(long, default_value_t = 256, value_parser = common::at_least(1))]
    mib: u64,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = common::at_least(1))]
    rounds: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    skipped: Option<String>,
    bytes: u64,
    pages: u64,
    rounds: u64,
    plain_ns_per_page: f64,
    wp_async_ns_per_page: f64,
    soft_dirty_ns_per_page: Option<f64>,
    /// wp_async / plain.
    ratio_vs_plain: f64,
    /// wp_async / soft_dirty.
    ratio_vs_soft_dirty: Option<f64>,
    harvest_all_dirty_ms: f64,
    harvest_clean_ms: f64,
    /// Every harvest reported exactly the pages written.
    dirty_pages_exact: bool,
    exact_for_unpopulated: bool,
}

/// Writes one u64 per page through `view` (a vm-memory region with no
/// bitmap over the same memory: a direct write); ns per page.
fn write_pages(view: &MmRegion<()>, pages: u64, stamp: u64) -> f64 {
    let t = Instant::now();
    for p in 0..pages {
        view.write_obj(stamp ^ p, MemoryRegionAddress(p * PAGE_SIZE as u64))
            .expect("in bounds");
    }
    t.elapsed().as_nanos() as f64 / pages as f64
}

fn count_bits(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// `echo 4 > /proc/self/clear_refs`: clears the soft-dirty bits of the
/// whole process. `false` when the kernel has no soft-dirty support.
fn clear_soft_dirty() -> bool {
    std::fs::write("/proc/self/clear_refs", b"4").is_ok()
}

/// Is the soft-dirty bit (pagemap bit 55) of the page at `host` set?
fn soft_dirty(pagemap: &std::fs::File, host: usize) -> bool {
    use std::os::unix::fs::FileExt;
    let mut e = [0u8; 8];
    let off = (host / PAGE_SIZE * 8) as u64;
    pagemap.read_exact_at(&mut e, off).is_ok() && u64::from_ne_bytes(e) & (1 << 55) != 0
}

fn main() {
    let args: Args = common::init();
    let bytes = args.mib << 20;
    let pages = bytes / PAGE_SIZE as u64;
    let host = Host::with_budget(4 * bytes + (256 << 20));
    let mm = host.new_mm("bench_dirty");
    let mut rep = Report {
        skipped: None,
        bytes,
        pages,
        rounds: args.rounds,
        plain_ns_per_page: 0.0,
        wp_async_ns_per_page: 0.0,
        soft_dirty_ns_per_page: None,
        ratio_vs_plain: 0.0,
        ratio_vs_soft_dirty: None,
        harvest_all_dirty_ms: 0.0,
        harvest_clean_ms: 0.0,
        dirty_pages_exact: true,
        exact_for_unpopulated: false,
    };
    let plain_addr = common::or_exit(mm.mmap_blocking(MapOptions::anon(bytes)), "mmap");
    let dirty_addr = common::or_exit(mm.mmap_blocking(MapOptions::anon(bytes)), "mmap");
    // Populate both (the cost measured is the tracking's, not first touch).
    common::or_exit(mm.fill_blocking(plain_addr, bytes, 1), "fill");
    common::or_exit(mm.fill_blocking(dirty_addr, bytes, 1), "fill");
    let plain = common::or_exit(
        MmRegion::<()>::new(&mm, plain_addr, bytes, GuestAddress(0)),
        "region",
    );
    let dirty_view = common::or_exit(
        MmRegion::<()>::new(&mm, dirty_addr, bytes, GuestAddress(0)),
        "region",
    );
    let bitmap = match DirtyBitmap::new(&mm, dirty_addr, bytes) {
        Ok(b) => b,
        Err(e) => {
            rep.skipped = Some(format!("no dirty tracking: {e}"));
            if args.json {
                common::print_json(&rep);
            } else {
                println!("skipped: no dirty tracking: {e}");
            }
            return;
        }
    };
    rep.exact_for_unpopulated = bitmap.exact_for_unpopulated();
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok();
    let pb = common::status_line(args.json);
    let (mut plain_ns, mut wp_ns, mut sd_ns, mut full_ms, mut clean_ms) =
        (vec![], vec![], vec![], vec![], vec![]);
    for r in 0..args.rounds {
        pb.set_message(format!("round {}/{}", r + 1, args.rounds));
        plain_ns.push(write_pages(&plain, pages, r));

        common::or_exit(bitmap.get_and_reset(), "harvest");
        wp_ns.push(write_pages(&dirty_view, pages, r));
        let t = Instant::now();
        let words = common::or_exit(bitmap.get_and_reset(), "harvest");
        full_ms.push(t.elapsed().as_secs_f64() * 1e3);
        rep.dirty_pages_exact &= count_bits(&words) == pages;
        let t = Instant::now();
        let words = common::or_exit(bitmap.get_and_reset(), "harvest");
        clean_ms.push(t.elapsed().as_secs_f64() * 1e3);
        rep.dirty_pages_exact &= count_bits(&words) == 0;

        if let Some(pm) = &pagemap {
            if clear_soft_dirty() {
                let ns = write_pages(&plain, pages, r);
                let base = plain.host_ptr() as usize;
                // The bit really is the kernel's record of these writes.
                if soft_dirty(pm, base) && soft_dirty(pm, base + bytes as usize - PAGE_SIZE) {
                    sd_ns.push(ns);
                }
            }
        }
    }
    pb.finish_and_clear();
    rep.plain_ns_per_page = round(median(plain_ns), 1);
    rep.wp_async_ns_per_page = round(median(wp_ns), 1);
    rep.ratio_vs_plain = round(rep.wp_async_ns_per_page / rep.plain_ns_per_page, 2);
    if !sd_ns.is_empty() {
        let sd = round(median(sd_ns), 1);
        rep.soft_dirty_ns_per_page = Some(sd);
        rep.ratio_vs_soft_dirty = Some(round(rep.wp_async_ns_per_page / sd, 2));
    }
    rep.harvest_all_dirty_ms = round(median(full_ms), 2);
    rep.harvest_clean_ms = round(median(clean_ms), 2);
    if args.json {
        common::print_json(&rep);
        return;
    }
    println!(
        "{} MiB ({} pages), {} rounds, medians",
        args.mib, pages, args.rounds
    );
    println!(
        "  direct write, no tracking     {:>8.1} ns/page",
        rep.plain_ns_per_page
    );
    println!(
        "  direct write, WP_ASYNC        {:>8.1} ns/page  ({:.2}x)",
        rep.wp_async_ns_per_page, rep.ratio_vs_plain
    );
    match rep.soft_dirty_ns_per_page {
        Some(sd) => println!(
            "  direct write, soft-dirty      {:>8.1} ns/page  (WP_ASYNC / soft-dirty {:.2}x)",
            sd,
            rep.ratio_vs_soft_dirty.unwrap_or_default()
        ),
        None => println!("  direct write, soft-dirty      (not available on this kernel)"),
    }
    println!(
        "  harvest (get_and_reset)       {:.2} ms all dirty, {:.2} ms clean",
        rep.harvest_all_dirty_ms, rep.harvest_clean_ms
    );
    println!(
        "  exact                          {}",
        if rep.dirty_pages_exact {
            "yes: every harvest reported exactly the pages written"
        } else {
            "NO"
        }
    );
}
