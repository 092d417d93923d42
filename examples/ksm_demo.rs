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

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::ksm::{Ksm, KsmConfig, Run};
use guestmm::{Advice, Host, MapOptions, MmUser, ProcessMemory, PAGE_SIZE};

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
    for (k, c) in page.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k as u64).to_le_bytes());
    }
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let guests = arg(&args, "--guests", 4).max(2);
    let mib = arg(&args, "--mib", 64).max(1);
    let passes = arg(&args, "--passes", 6).max(3);
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
    let t0 = Instant::now();
    while ksm.stats().full_scans < passes {
        std::thread::sleep(Duration::from_millis(200));
        if !json {
            let s = ksm.stats();
            let pss = ProcessMemory::current()?.pss;
            print!(
                "\r[{:5.1}s] pass {:2}  shared {:7}  sharing {:7}  volatile {:6}  PSS {:6} MiB (was {} MiB)   ",
                t0.elapsed().as_secs_f64(),
                s.full_scans,
                s.pages_shared,
                s.pages_sharing,
                s.pages_volatile,
                pss >> 20,
                pss_before >> 20
            );
            std::io::stdout().flush()?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<_> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    ksmd.stop();
    if !json {
        println!();
    }

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
        println!(
            "{{\"guests\":{guests},\"mib_per_guest\":{mib},\"duplicate_bytes\":{duplicate_bytes},\"pages_shared\":{},\"pages_sharing\":{},\"pages_unshared\":{},\"pages_volatile\":{},\"full_scans\":{},\"map_limit_hits\":{},\"process_pss_before_bytes\":{pss_before},\"process_pss_after_bytes\":{pss_after},\"saved_bytes\":{saved},\"lost_writes\":{lost_writes},\"cross_guest_leaks\":{cross_guest_leaks},\"wrong_pages\":{wrong}}}",
            s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile, s.full_scans, s.map_limit_hits
        );
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
