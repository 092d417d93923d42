//! KSM across guests: several guests fill their RAM with a mix of pages
//! identical across guests (three in four) and pages unique to the guest,
//! and keep writing a few hot pages (through the host pointer, as a vCPU
//! would, and through the copy API) while ksmd merges. Savings are measured
//! with the process PSS (`/proc/self/smaps_rollup`), and the demo's own
//! checker reads every page back at the end: no write lost, nothing of one
//! guest visible in another.
//!
//! ```sh
//! cargo run --release --example ksm_demo            # live line + table
//! cargo run --release --example ksm_demo -- --json  # one line of results
//! ```
//!
//! Options: `--guests N` (4), `--mib M` per guest (64), `--passes P` full
//! scans to run (6).
//!
//! DISCLAIMER: the writers only touch their own hot pages; the checker
//! runs after they stopped (a page written during the final read would be
//! a race of the demo, not of KSM).
#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use guestmm::ksm::{Ksm, KsmConfig, Run};
use guestmm::{Advice, Host, MapOptions, MmUser, ProcessMemory, PAGE_SIZE};
use serde::Serialize;

mod common;

/// KSM across guests: shared pages merged while hot pages are written;
/// PSS from /proc, and a checker for lost writes and cross-guest leaks.
#[derive(Debug, Parser)]
#[command(name = "ksm_demo")]
struct Args {
    /// Guests.
    #[arg(long, default_value_t = 4, value_parser = common::at_least(2))]
    guests: u64,
    /// RAM per guest, MiB.
    #[arg(long, default_value_t = 64, value_parser = common::at_least(1))]
    mib: u64,
    /// Full scans to run.
    #[arg(long, default_value_t = 6, value_parser = common::at_least(3))]
    passes: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line.
#[derive(Debug, Serialize)]
struct Report {
    guests: u64,
    mib_per_guest: u64,
    duplicate_bytes: u64,
    pages_shared: u64,
    pages_sharing: u64,
    pages_unshared: u64,
    pages_volatile: u64,
    full_scans: u64,
    map_limit_hits: u64,
    process_pss_before_bytes: u64,
    process_pss_after_bytes: u64,
    saved_bytes: u64,
    lost_writes: u64,
    cross_guest_leaks: u64,
    wrong_pages: u64,
}

const PAGE: u64 = PAGE_SIZE as u64;
/// One page in `HOT_EVERY` is written by the guest's writer thread.
const HOT_EVERY: u64 = 64;

fn is_unique(i: u64) -> bool {
    i % 4 == 3
}

fn is_hot(i: u64) -> bool {
    i % HOT_EVERY == 1
}

/// The initial contents of page `i` of guest `g`.
fn content(g: u64, i: u64, page: &mut [u8]) {
    let seed = if is_unique(i) { (g + 1) << 48 | i } else { i };
    common::fill_page(page, seed);
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Args = common::init();
    let (json, guests, mib, passes) = (args.json, args.guests, args.mib, args.passes);
    let pages = (mib << 20) / PAGE;

    let host = Host::with_budget(u64::MAX / 2);
    let ksm = Ksm::new(KsmConfig {
        pages_to_scan: 4096,
        sleep: Duration::from_millis(1),
        ..KsmConfig::default()
    })?;
    let mut mms: Vec<(MmUser, u64)> = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for g in 0..guests {
        let mm = host.new_mm(&format!("guest{g}"));
        let addr = mm.mmap_blocking(MapOptions::anon(pages * PAGE).tracked(true))?;
        for i in 0..pages {
            content(g, i, &mut page);
            mm.write_blocking(addr + i * PAGE, &page)?;
        }
        ksm.madvise_blocking(&mm, addr, pages * PAGE, Advice::Mergeable)?;
        mms.push((mm, addr));
    }
    let shared_pages = (0..pages).filter(|i| !is_unique(*i) && !is_hot(*i)).count() as u64;
    let duplicate_bytes = (guests - 1) * shared_pages * PAGE;
    let pss_before = ProcessMemory::current()?.pss;

    // Writers: each guest rewrites its hot pages, tagging them with its id.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = mms
        .iter()
        .enumerate()
        .map(|(g, (mm, addr))| {
            let (mm, addr, stop) = (mm.clone(), *addr, stop.clone());
            std::thread::spawn(move || {
                let hot: Vec<u64> = (0..pages).filter(|i| is_hot(*i)).collect();
                let mut last = vec![None::<u64>; hot.len()];
                let (mut n, mut x) = (0u64, 0x2545_f491_4f6c_dd1d ^ g as u64);
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let h = (x % hot.len() as u64) as usize;
                    n += 1;
                    let v = ((g as u64 + 1) << 56) | n;
                    let at = addr + hot[h] * PAGE + 128;
                    if x & 1 == 0 {
                        mm.write_blocking(at, &v.to_le_bytes()).expect("write");
                    } else {
                        let vma = mm.find_vma_blocking(at).expect("vma");
                        let p = vma.host_ptr().wrapping_add((at - vma.start()) as usize);
                        // SAFETY: `p` is inside this guest's live mapping
                        // (we hold a user), 8-byte aligned, and only this
                        // thread writes these bytes; it is how a vCPU writes.
                        unsafe { (p as *mut u64).write_volatile(v) };
                    }
                    last[h] = Some(v);
                    if n % 256 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                (hot, last)
            })
        })
        .collect();

    let ksmd = ksm.spawn()?;
    ksm.set_run_blocking(Run::Merge)?;
    let status = common::status_line(json);
    while ksm.stats().full_scans < passes {
        std::thread::sleep(Duration::from_millis(200));
        if !status.is_hidden() {
            let s = ksm.stats();
            let pss = ProcessMemory::current()?.pss;
            status.set_message(format!(
                "pass {:2}  shared {:7}  sharing {:7}  volatile {:6}  PSS {:6} MiB (was {} MiB)",
                s.full_scans,
                s.pages_shared,
                s.pages_sharing,
                s.pages_volatile,
                pss >> 20,
                pss_before >> 20
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<_> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    ksmd.stop();
    status.finish_and_clear();

    // The checker: every page of every guest, read back through the API
    // (which also makes every merged page mapped for the PSS below).
    let (mut lost_writes, mut cross_guest_leaks, mut wrong) = (0u64, 0u64, 0u64);
    let mut got = vec![0u8; PAGE_SIZE];
    for (g, (mm, addr)) in mms.iter().enumerate() {
        let (hot, last) = &lasts[g];
        let mut hot_at = std::collections::HashMap::new();
        for (h, p) in hot.iter().enumerate() {
            hot_at.insert(*p, last[h]);
        }
        for i in 0..pages {
            mm.read_blocking(addr + i * PAGE, &mut got)?;
            content(g as u64, i, &mut page);
            if let Some(Some(v)) = hot_at.get(&i) {
                let w = u64::from_le_bytes(got[128..136].try_into()?);
                if w != *v {
                    lost_writes += 1;
                    if w >> 56 != 0 && w >> 56 != g as u64 + 1 {
                        cross_guest_leaks += 1;
                    }
                }
                page[128..136].copy_from_slice(&v.to_le_bytes());
            }
            if got != page {
                wrong += 1;
                // Another guest's unique page or tag seen here?
                let w = u64::from_le_bytes(got[128..136].try_into()?);
                if w >> 56 != 0 && w >> 56 != g as u64 + 1 {
                    cross_guest_leaks += 1;
                }
            }
        }
    }
    let pss_after = ProcessMemory::current()?.pss;
    let s = ksm.stats();
    let saved = pss_before.saturating_sub(pss_after);
    if json {
        common::print_json(&Report {
            guests,
            mib_per_guest: mib,
            duplicate_bytes,
            pages_shared: s.pages_shared,
            pages_sharing: s.pages_sharing,
            pages_unshared: s.pages_unshared,
            pages_volatile: s.pages_volatile,
            full_scans: s.full_scans,
            map_limit_hits: s.map_limit_hits,
            process_pss_before_bytes: pss_before,
            process_pss_after_bytes: pss_after,
            saved_bytes: saved,
            lost_writes,
            cross_guest_leaks,
            wrong_pages: wrong,
        });
    } else {
        println!("| guest | merging pages | rmap items |");
        println!("|---|---|---|");
        for (mm, _) in &mms {
            let st = ksm.process_stat(mm.id()).unwrap_or_default();
            println!(
                "| {} | {} | {} |",
                mm.name(),
                st.merging_pages,
                st.rmap_items
            );
        }
        println!();
        println!("| what | value |");
        println!("|---|---|");
        println!("| guests x RAM | {guests} x {mib} MiB |");
        println!("| duplicate bytes | {} MiB |", duplicate_bytes >> 20);
        println!(
            "| pages_shared / pages_sharing | {} / {} |",
            s.pages_shared, s.pages_sharing
        );
        println!("| full_scans | {} |", s.full_scans);
        println!(
            "| PSS before -> after | {} -> {} MiB (saved {} MiB = {:.0}% of the duplicates) |",
            pss_before >> 20,
            pss_after >> 20,
            saved >> 20,
            saved as f64 * 100.0 / duplicate_bytes.max(1) as f64
        );
        println!("| lost writes / cross-guest leaks | {lost_writes} / {cross_guest_leaks} |");
    }
    drop(mms);
    if lost_writes + cross_guest_leaks + wrong > 0 {
        std::process::exit(1);
    }
    Ok(())
}
