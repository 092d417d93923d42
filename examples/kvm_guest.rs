//! A real KVM guest whose RAM is a tracked guestmm region.
//!
//! The guest is 62 bytes of flat 32-bit code (protected mode, no paging, set
//! up directly with `KVM_SET_SREGS`: no GDT, no firmware). It writes each
//! page's own address into the page's first dword over all of its RAM,
//! reporting progress every MiB with `OUT 0x10`, then reads everything back
//! and reports its error count with `OUT 0x11`, and halts. Every page the
//! guest touches reaches guestmm's userfaultfd handler through KVM (the
//! descriptor is opened without `UFFD_USER_MODE_ONLY`), which charges it.
//!
//! ```sh
//! cargo run --release --example kvm_guest [-- --ram-mib 64] [--json]
//! ```
//!
//! Without a usable `/dev/kvm` it prints that it is skipped (JSON:
//! `"skipped": true`) and exits 0.
//!
//! DISCLAIMER: one vCPU, no interrupts, no MMIO; the guest is trusted to
//! stay inside its RAM (a stray access would be an MMIO exit we report as an
//! error).

use clap::Parser;
use guestmm::{Host, MapOptions, ProcessMemory};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;

// A path relative to this file, so that tests/tracked.rs (which includes
// this file as a module) finds it too.
#[path = "common/mod.rs"]
mod common;

/// A real KVM guest whose RAM is a tracked guestmm region (skipped, exit
/// 0, without a usable /dev/kvm).
#[derive(Debug, Parser)]
#[command(name = "kvm_guest")]
struct Args {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64, value_parser = common::at_least(2))]
    ram_mib: u64,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// The `--json` line of a run that was not skipped.
#[derive(Debug, Serialize)]
struct Ran<'a> {
    skipped: bool,
    #[serde(flatten)]
    report: &'a Report,
}

/// The `--json` line of a skipped run.
#[derive(Debug, Serialize)]
struct Skipped<'a> {
    skipped: bool,
    reason: &'a str,
}

/// The guest program (`as --32`; source in the doc comment of `run`).
const GUEST_CODE: [u8; 62] = [
    0xbf, 0x00, 0x10, 0x00, 0x00, 0x89, 0x3f, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0xf7, 0xc7, 0xff,
    0xff, 0x0f, 0x00, 0x75, 0x07, 0x89, 0xf8, 0x66, 0xba, 0x10, 0x00, 0xef, 0x39, 0xf7, 0x72, 0xe5,
    0xbf, 0x00, 0x10, 0x00, 0x00, 0x31, 0xdb, 0x39, 0x3f, 0x74, 0x01, 0x43, 0x81, 0xc7, 0x00, 0x10,
    0x00, 0x00, 0x39, 0xf7, 0x72, 0xf1, 0x89, 0xd8, 0x66, 0xba, 0x11, 0x00, 0xef, 0xf4,
];
const PORT_PROGRESS: u16 = 0x10;
const PORT_RESULT: u16 = 0x11;

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Set when KVM (or userfaultfd) is not usable here.
    #[serde(skip)]
    pub skipped: Option<String>,
    /// Guest RAM size.
    pub guest_ram_bytes: u64,
    /// Pages the tracked handler populated (guest faults through KVM).
    pub pages_faulted: u64,
    /// Pages the access API populated (the code page).
    pub pages_populated_api: u64,
    /// Bytes charged to the host budget after the run.
    pub charged_bytes: u64,
    /// Process RSS before the guest ran.
    pub process_rss_before_bytes: u64,
    /// Process RSS after the run (`/proc/self/smaps_rollup`).
    pub process_rss_bytes: u64,
    /// Progress reports received (one per MiB).
    pub progress_reports: u64,
    /// The guest found every page as written, and so did the host.
    pub guest_checksum_ok: bool,
}

/// Runs the guest with `ram` bytes of RAM (a multiple of 1 MiB, ≥ 2 MiB).
///
/// ```text
///     mov $0x1000, %edi         # page 0 holds the code
/// fill:
///     mov %edi, (%edi)          # pattern: the page's own address
///     add $0x1000, %edi
///     test $0xFFFFF, %edi       # every MiB: OUT 0x10 <- address
///     jnz 1f
///     mov %edi, %eax; mov $0x10, %dx; out %eax, %dx
/// 1:  cmp %esi, %edi            # esi = RAM size (set by the host)
///     jb fill
///     mov $0x1000, %edi; xor %ebx, %ebx
/// check:
///     cmp %edi, (%edi); je 2f; inc %ebx
/// 2:  add $0x1000, %edi; cmp %esi, %edi; jb check
///     mov %ebx, %eax; mov $0x11, %dx; out %eax, %dx   # errors
///     hlt
/// ```
pub fn run(ram: u64) -> Result<Report, String> {
    let mut rep = Report {
        guest_ram_bytes: ram,
        ..Report::default()
    };
    // Declared before the VM: locals drop in reverse order, so on every
    // path (the `?` returns included) the VM and its memslot over the
    // tracked mapping go before `mm`, which keeps the mapping alive.
    let host = Host::with_budget(ram + (16 << 20));
    let mm = host.new_mm("kvm-guest");
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            rep.skipped = Some(format!("/dev/kvm not usable: {e}"));
            return Ok(rep);
        }
    };
    let vm = match kvm.create_vm() {
        Ok(v) => v,
        Err(e) => {
            rep.skipped = Some(format!("KVM_CREATE_VM failed: {e}"));
            return Ok(rep);
        }
    };
    let base = match mm.mmap_blocking(MapOptions::anon(ram).tracked(true)) {
        Ok(b) => b,
        Err(e) => {
            rep.skipped = Some(format!("tracked region not available: {e}"));
            return Ok(rep);
        }
    };
    // KVM faults on guest RAM from kernel mode: a region on a
    // user-mode-only userfaultfd (no privilege for a full one) would give
    // the vCPU EFAULT on its first touch. Refuse it here, by name.
    if let Err(e) = mm.check_kernel_access_blocking(base, ram) {
        rep.skipped = Some(format!("not usable as a KVM memslot: {e}"));
        return Ok(rep);
    }
    let host_ptr = mm
        .find_vma_blocking(base)
        .map_err(|e| e.to_string())?
        .host_ptr();
    mm.write_blocking(base, &GUEST_CODE)
        .map_err(|e| e.to_string())?;
    rep.process_rss_before_bytes = ProcessMemory::current().map_err(|e| e.to_string())?.rss;

    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: ram,
        userspace_addr: host_ptr as u64,
        flags: 0,
    };
    // SAFETY: `host_ptr..host_ptr+ram` is the tracked mapping, which stays
    // mapped while `mm` (a user reference) lives; the VM (and its memslot)
    // is dropped before `mm`: explicitly below, and on an early return
    // because `mm` is declared first.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.limit = 0xffff_ffff;
        seg.g = 1;
        seg.db = 1;
        seg.s = 1;
        seg.present = 1;
        seg.dpl = 0;
        seg.type_ = 3; // data, read/write, accessed
    }
    sregs.cs.type_ = 11; // code, execute/read, accessed
    sregs.cs.selector = 8;
    sregs.cr0 |= 1; // PE, no paging
    vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
    let mut regs = vcpu.get_regs().map_err(|e| e.to_string())?;
    regs.rip = 0;
    regs.rsi = ram;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;

    let mut guest_errors = None;
    loop {
        match vcpu.run().map_err(|e| e.to_string())? {
            VcpuExit::IoOut(PORT_PROGRESS, _) => rep.progress_reports += 1,
            VcpuExit::IoOut(PORT_RESULT, data) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                guest_errors = Some(u32::from_le_bytes(b));
            }
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
    drop(vcpu);
    drop(vm);

    // The host checks the guest's pattern through the access API (which
    // populates nothing: every page is present).
    let mut host_ok = true;
    for page in 1..ram / 4096 {
        let a = page * 4096;
        host_ok &= mm
            .compare_blocking(base + a, &(a as u32).to_le_bytes())
            .map_err(|e| e.to_string())?;
    }
    let st = mm.tracked_stats().unwrap_or_default();
    rep.pages_faulted = st.pages_faulted;
    rep.pages_populated_api = st.pages_populated_api;
    rep.charged_bytes = host.stats().charged_bytes;
    rep.process_rss_bytes = ProcessMemory::current().map_err(|e| e.to_string())?.rss;
    rep.guest_checksum_ok = guest_errors == Some(0) && host_ok;
    drop(mm);
    Ok(rep)
}

#[allow(dead_code)] // the test includes this file as a module and calls `run`
fn main() {
    let args: Args = common::init();
    let (json, ram_mib) = (args.json, args.ram_mib);
    match run(ram_mib << 20) {
        Ok(r) if r.skipped.is_some() => {
            let why = r.skipped.unwrap_or_default();
            if json {
                common::print_json(&Skipped {
                    skipped: true,
                    reason: &why,
                });
            } else {
                println!("kvm_guest: skipped ({why})");
            }
        }
        Ok(r) => {
            if json {
                common::print_json(&Ran {
                    skipped: false,
                    report: &r,
                });
            } else {
                println!(
                    "guest RAM            {} MiB (tracked)",
                    r.guest_ram_bytes >> 20
                );
                println!(
                    "progress reports     {} (one per MiB, OUT 0x10)",
                    r.progress_reports
                );
                println!(
                    "pages faulted in     {} by the uffd handler, {} by the API",
                    r.pages_faulted, r.pages_populated_api
                );
                println!("budget charged       {} MiB", r.charged_bytes >> 20);
                println!(
                    "process RSS          {} MiB before the guest ran, {} MiB after",
                    r.process_rss_before_bytes >> 20,
                    r.process_rss_bytes >> 20
                );
                println!(
                    "guest's own check    {}",
                    if r.guest_checksum_ok { "ok" } else { "FAILED" }
                );
            }
            if !r.guest_checksum_ok {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("kvm_guest: {e}");
            std::process::exit(1);
        }
    }
}
