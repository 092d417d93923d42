//! # linux_guests: real Linux VMs on guestmm memory, OOM-reaped and
//! deduplicated while they run
//!
//! A small KVM VMM on rust-vmm crates (`vmm.rs`: kvm-ioctls, linux-loader,
//! vm-memory, vm-superio) boots N (3) Debian cloud kernels with a busybox
//! initramfs built at run time (`initramfs.rs`), each in its own VM whose
//! RAM is a **tracked** guestmm region: every page a vCPU touches first
//! reaches guestmm's userfaultfd handler through KVM and is charged to one
//! host budget, smaller than what the guests fill. Then:
//!
//! 1. the same kernel first boots on plain `mmap` memory (the baseline of
//!    the boot time, same run), then on guestmm;
//! 2. the guests fill their tmpfs in steps; the charge that crosses the
//!    budget runs the OOM killer, whose kill hook stops the victim's vCPU
//!    (`immediate_exit` + a signal); the OOM reaper returns its memory while
//!    the VM and its memslot still exist; the others keep printing
//!    heartbeats;
//! 3. mm-ksm merges the survivors' identical pages (the same kernel, the
//!    same initramfs, the same check file) while they run; their heartbeats
//!    go on and the checksum each guest recomputes over its check file
//!    still matches;
//! 4. with `--snapshot` (`--guest tiny` only): a survivor's vCPU is
//!    stopped (its registers and TSC read after one more `KVM_RUN` with
//!    `immediate_exit`, which completes a pending port I/O), its memory
//!    written to a snapshot file (`MmUser::snapshot_to_file`), and the
//!    file restored **lazily** into a new guest (`Snapshot::open` +
//!    `map_options`: pages served from the file through userfaultfd on
//!    first touch, KVM's touches included) and a new VM started from that
//!    state; it must go on printing heartbeats and a right checksum of its
//!    check area (read back through the restore). A Linux guest would
//!    need its whole vCPU, LAPIC, PIT and clock state saved: not done.
//!
//! Every memory number is from `/proc` (statm, smaps, smaps_rollup).
//!
//! ```sh
//! bash scripts/fetch-guest-kernel.sh          # once: kernel + busybox into target/
//! cargo run --release --example linux_guests  # live lines + table
//! cargo run --release --example linux_guests -- --json
//! cargo run --release --example linux_guests -- --guest tiny --snapshot
//! ```
//!
//! Without a usable `/dev/kvm`, or without the fetched kernel, it prints one
//! `skipped: <reason>` line (JSON: `"skipped": "<reason>"`) and exits 0.
//!
//! DISCLAIMER: one vCPU per guest, no devices but COM1 (no virtio, no
//! ACPI, no PCI); the guests are trusted (a guest that never prints its
//! marker just fails the run). The boot times are measured on a shared
//! machine: the ratio of medians in the same run is the number to read.

mod initramfs;
mod tiny;
mod vmm;

#[path = "../common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use guestmm::ksm::{Ksm, KsmConfig, Run};
use guestmm::reaper::{Reaper, ReaperConfig, ZapSplit};
use guestmm::{procfs, Advice, Guest, Host, Kill, MapOptions, MmUser, ProcessMemory, Snapshot};
use kvm_ioctls::Kvm;
use mm_vm_memory::{GuestMemoryMm, MmRegion};
use serde::Serialize;

use common::MIB;
use vmm::{BootImage, GuestArgs, Vm};

/// What the guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum GuestKind {
    /// Debian's cloud kernel with a busybox initramfs.
    Linux,
    /// The tiny guest (`tiny.s`): the same line protocol without a kernel,
    /// for a KVM that cannot boot Linux in reasonable time.
    Tiny,
}

/// Real Linux VMs on guestmm memory: boot, OOM kill + reap, KSM, while
/// they run (skipped, exit 0, without /dev/kvm or the fetched kernel).
#[derive(Debug, Parser)]
#[command(name = "linux_guests")]
struct Args {
    /// What the guests run.
    #[arg(long, value_enum, default_value_t = GuestKind::Linux)]
    guest: GuestKind,
    /// Tiny guest: MiB of the check area, the same in every guest (what
    /// KSM can merge, as the kernel image is for Linux guests).
    #[arg(long, default_value_t = 16, value_parser = common::at_least(1))]
    check_mib: u64,
    /// Guests (VMs).
    #[arg(long, default_value_t = 3, value_parser = common::at_least(2))]
    guests: u64,
    /// RAM of each guest, MiB.
    #[arg(long, default_value_t = 256, value_parser = common::at_least(128))]
    ram_mib: u64,
    /// Fill steps of each guest (a `dd` of --step-mib random MiB into tmpfs).
    #[arg(long, default_value_t = 12)]
    steps: u64,
    /// MiB per fill step.
    #[arg(long, default_value_t = 8, value_parser = common::at_least(1))]
    step_mib: u64,
    /// Pause between fill steps, ms.
    #[arg(long, default_value_t = 150)]
    step_ms: u64,
    /// Host budget, MiB [default: what the guests need after boot plus 1.5
    /// guests' fill, estimated from --ram-mib and the fill].
    #[arg(long)]
    budget_mib: Option<u64>,
    /// KSM full scans to run on the survivors.
    #[arg(long, default_value_t = 3, value_parser = common::at_least(1))]
    ksm_passes: u64,
    /// Directory with `vmlinuz` and `busybox` [default: $GUEST_KERNEL_DIR,
    /// else ${CARGO_TARGET_DIR:-target}/guest-kernel, as
    /// scripts/fetch-guest-kernel.sh fills it].
    #[arg(long)]
    kernel_dir: Option<PathBuf>,
    /// Copy the guests' consoles to stderr (and boot without `quiet`).
    #[arg(long)]
    echo: bool,
    /// Extra words for the guests' kernel command line.
    #[arg(long, default_value = "")]
    cmdline_extra: String,
    /// How long a guest may take to print its boot marker, s.
    #[arg(long, default_value_t = 60, value_parser = common::at_least(1))]
    boot_timeout_s: u64,
    /// Boot even when /dev/kvm emulates guest kernel code (see the skip
    /// line; expect many minutes).
    #[arg(long)]
    force: bool,
    /// Then pause a survivor, snapshot its memory to a file, restore it
    /// lazily (userfaultfd, pages served from the file on first touch)
    /// into a new guest and a new VM, and check that it goes on
    /// (heartbeats, checksums). Tiny guest only: a Linux guest's vCPU,
    /// LAPIC, PIT and clock state are not saved.
    #[arg(long)]
    snapshot: bool,
    /// Print one JSON line with the results.
    #[arg(long)]
    json: bool,
}

/// Per-guest memory the kernel and its boot touch with --ram-mib 256 (the
/// default budget's estimate; measured: 70-80 MiB with fault-around).
const BOOT_FOOTPRINT_MIB: u64 = 96;

/// Below this guest speed (million instructions/s) /dev/kvm emulates guest
/// kernel code and the run is skipped (hardware virtualization: ~1000;
/// PVM with a stock kernel: ~1).
const MIN_GUEST_MIPS: f64 = 50.0;

/// What kind of KVM this is, for the skip line.
fn kvm_flavour() -> &'static str {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm: PVM, software virtualization, which runs only PVM-enabled guest kernels natively"
    } else if Path::new("/sys/module/kvm_intel").exists()
        || Path::new("/sys/module/kvm_amd").exists()
    {
        "kvm_intel/kvm_amd loaded, yet slow"
    } else {
        "no kvm_intel/kvm_amd module"
    }
}

/// Where the tiny guest's check area starts (its code is at 1 MiB).
const TINY_CHECK_BASE: u64 = 2 << 20;

/// The `--json` line (.ci/run checks it).
#[derive(Debug, Default, Serialize)]
struct Report {
    guest: Option<GuestKind>,
    guests: u64,
    ram_bytes_per_guest: u64,
    budget_bytes: u64,
    kernel: String,
    kernel_image_bytes: u64,
    shared_image_bytes: u64,
    guest_mips: f64,
    initramfs_bytes: u64,
    booted: u64,
    boot_ms: Vec<f64>,
    boot_ms_plain: Vec<f64>,
    boot_ms_median: f64,
    boot_ms_plain_median: f64,
    boot_ratio: f64,
    victim: Option<String>,
    victim_rss_before_bytes: u64,
    victim_rss_after_reap_bytes: u64,
    process_rss_before_reap_bytes: u64,
    process_rss_after_reap_bytes: u64,
    process_rss_after_reap_outside_bytes: u64,
    survivors_rss_growth_during_reap_bytes: u64,
    reap_ms: f64,
    reaped_with_vm_alive: bool,
    oom_kills: u64,
    second_kills: u64,
    survivor_heartbeats_before_kill: Vec<u64>,
    survivor_heartbeats_after_kill: Vec<u64>,
    survivor_heartbeats_after_ksm: Vec<u64>,
    ksm_full_scans: u64,
    ksm_pages_shared: u64,
    ksm_pages_sharing: u64,
    process_pss_before_ksm_bytes: u64,
    process_pss_after_ksm_bytes: u64,
    checksum_checks_after_ksm: Vec<u64>,
    checksum_mismatches: u64,
    guest_checksums_ok: bool,
    /// `--snapshot`: the snapshot and the lazy restore.
    snapshot: Option<SnapshotReport>,
    total_ms: f64,
}

/// `--snapshot`: a survivor paused, written to a file, restored lazily
/// into a new guest and VM.
#[derive(Debug, Default, Serialize)]
struct SnapshotReport {
    guest: String,
    /// Pages written (present in the guest).
    pages: u64,
    /// `snapshot_to_file`, the vCPU stopped.
    snapshot_ms: f64,
    /// `Snapshot::open` until the new VM's vCPU runs (memory mapped and
    /// registered, nothing read yet).
    usable_ms: f64,
    /// Heartbeats and checksum checks (the check area read back through
    /// the restore) printed by the restored guest.
    heartbeats_after_restore: u64,
    checksum_checks_after_restore: u64,
    checksum_mismatches_after_restore: u64,
    /// What the restored guest touched and so was served (smaps Rss of
    /// its mapping) against what was saved.
    restored_resident_bytes: u64,
    saved_bytes: u64,
    /// The restored guest went on: heartbeats, checksums right.
    ok: bool,
}

/// The kill hook's record of the kill (the kill hook runs before
/// `mark_oom_victim` queues the reaper, so the numbers are pre-reap).
#[derive(Debug, Default)]
struct KillRecord {
    at: Option<Instant>,
    victim: Option<usize>,
    victim_rss: u64,
    process_rss: u64,
    /// Every guest's mapping RSS at the kill.
    all_rss: Vec<u64>,
}

/// The kill hook: stops the victim's vCPU. The VM file and the memslot
/// stay (the reaper works on the memory under them).
struct StopVcpu {
    index: usize,
    kick: Arc<vmm::VcpuKick>,
    mapping: (usize, u64),
    /// Every guest's mapping, for the survivors' RSS at the kill.
    all: Arc<Mutex<Vec<(usize, u64)>>>,
    record: Arc<Mutex<KillRecord>>,
}

impl Kill for StopVcpu {
    fn kill(&self, _guest: &Guest) {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let all = self.all.lock().unwrap_or_else(|e| e.into_inner()).clone();
        r.all_rss = common::mappings_rss(&all);
        r.victim_rss = common::mappings_rss(&[self.mapping])[0];
        r.process_rss = procfs::statm_rss().unwrap_or(0);
        r.at = Some(Instant::now());
        r.victim = Some(self.index);
        drop(r);
        self.kick.stop();
    }
}

/// This process's RSS as another process sees it: `cat /proc/<pid>/statm`
/// run as a child.
fn rss_from_outside() -> u64 {
    let out = std::process::Command::new("cat")
        .arg(format!("/proc/{}/statm", std::process::id()))
        .output();
    let Ok(out) = out else { return 0 };
    let text = String::from_utf8_lossy(&out.stdout);
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * guestmm::PAGE_SIZE as u64
}

fn default_kernel_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GUEST_KERNEL_DIR") {
        return d.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("guest-kernel")
}

/// The kernel command line of every guest; `fill` = (steps, MiB/step,
/// ms between steps, ms before the first).
fn cmdline(args: &Args, fill: (u64, u64, u64, u64)) -> String {
    let echo = args.echo;
    // nokaslr: the same kernel text in every guest (KSM merges it); no
    // ACPI/PCI/keyboard probing (no such devices); one UART.
    let mut c = String::from(
        "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 pci=off acpi=off nokaslr \
         i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check \
         rdinit=/init",
    );
    if !echo {
        c.push_str(" quiet");
    }
    if !args.cmdline_extra.is_empty() {
        c.push(' ');
        c.push_str(&args.cmdline_extra);
    }
    c.push_str(&format!(
        " gm_steps={} gm_step_mib={} gm_step_ms={} gm_start_ms={}",
        fill.0, fill.1, fill.2, fill.3
    ));
    c
}

fn ms(us: u64) -> f64 {
    common::round(us as f64 / 1000.0, 1)
}

fn skip(json: bool, why: String) -> ! {
    if json {
        common::print_json(&serde_json::json!({ "skipped": why }));
    } else {
        println!("skipped: {why}");
    }
    std::process::exit(0)
}

fn main() {
    let args: Args = common::init();
    match run(&args) {
        Ok(rep) => {
            if args.json {
                common::print_json(&rep);
            } else {
                print_table(&rep);
            }
        }
        Err(Failure::Skip(why)) => skip(args.json, why),
        Err(Failure::Error(e)) => {
            eprintln!("linux_guests: {e}");
            std::process::exit(1);
        }
    }
}

/// Why a run did not produce a report.
#[derive(Debug)]
enum Failure {
    /// Not runnable here (no KVM, no kernel): exit 0.
    Skip(String),
    /// A real failure: exit 1.
    Error(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Error(s)
    }
}

/// One guest of the tracked phase.
struct Running {
    name: String,
    guest: Guest,
    mm: MmUser,
    addr: u64,
    mapping: (usize, u64),
    vm: Option<Vm>,
}

fn run(args: &Args) -> Result<Report, Failure> {
    let t_start = Instant::now();
    if args.snapshot && args.guest == GuestKind::Linux {
        return Err("--snapshot needs --guest tiny: a Linux guest's vCPU, LAPIC, PIT and clock state are not saved"
            .to_string()
            .into());
    }
    let kvm = Kvm::new().map_err(|e| Failure::Skip(format!("/dev/kvm not usable: {e}")))?;
    let (mips, tsc_khz) =
        vmm::probe_mips(&kvm).map_err(|e| Failure::Skip(format!("/dev/kvm not usable: {e}")))?;
    vmm::install_kick_handler().map_err(|e| format!("signal handler: {e}"))?;
    let mut kernel_name = String::new();
    let image = match args.guest {
        GuestKind::Linux => {
            let dir = args.kernel_dir.clone().unwrap_or_else(default_kernel_dir);
            let (kpath, bpath) = (dir.join("vmlinuz"), dir.join("busybox"));
            let (Ok(kernel), Ok(busybox)) = (std::fs::read(&kpath), std::fs::read(&bpath)) else {
                return Err(Failure::Skip(format!(
                    "no guest kernel in {} (run: bash scripts/fetch-guest-kernel.sh)",
                    dir.display()
                )));
            };
            // A KVM that emulates guest kernel code (a software
            // hypervisor) is not usable for Linux guests: one boot takes
            // many minutes.
            if mips < MIN_GUEST_MIPS && !args.force {
                return Err(Failure::Skip(format!(
                    "/dev/kvm runs guest kernel code at {mips:.1} M instructions/s ({}), not hardware virtualization: a Linux boot would take many minutes (--force boots anyway; --guest tiny runs the same phases without a kernel)",
                    kvm_flavour()
                )));
            }
            kernel_name = std::fs::canonicalize(&kpath)
                .unwrap_or(kpath.clone())
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            BootImage::Linux {
                initramfs: initramfs::build(&busybox),
                kernel,
            }
        }
        GuestKind::Tiny => BootImage::Tiny,
    };
    let n = args.guests as usize;
    let ram = args.ram_mib * MIB;
    let fill_bytes = args.steps * args.step_mib * MIB;
    let check_bytes = args.check_mib * MIB;
    let base_bytes = match args.guest {
        GuestKind::Linux => BOOT_FOOTPRINT_MIB * MIB * args.ram_mib / 256,
        GuestKind::Tiny => TINY_CHECK_BASE + check_bytes + 2 * MIB,
    };
    if args.guest == GuestKind::Tiny && TINY_CHECK_BASE + check_bytes + fill_bytes > ram {
        return Err(format!(
            "--check-mib + --steps x --step-mib do not fit in --ram-mib {}",
            args.ram_mib
        )
        .into());
    }
    // Over the budget with all guests filled, under it with one fewer: one
    // kill, and the survivors fit.
    let per_guest = base_bytes + fill_bytes;
    let budget = args
        .budget_mib
        .map(|m| m * MIB)
        .unwrap_or(per_guest * (2 * args.guests - 1) / 2);
    let guest_args = |i: usize, fill: bool| -> GuestArgs {
        // Guest 0 starts filling at once, the others a little later: the
        // OOM kill meets one guest clearly larger than the rest.
        let start_ms = if i == 0 { 0 } else { 1500 };
        let (steps, start_ms) = if fill { (args.steps, start_ms) } else { (0, 0) };
        match args.guest {
            GuestKind::Linux => GuestArgs::Cmdline(cmdline(
                args,
                (steps, args.step_mib, args.step_ms, start_ms),
            )),
            GuestKind::Tiny => {
                let per_ms = u64::from(tsc_khz);
                GuestArgs::Tiny(tiny::TinyParams {
                    steps,
                    step_bytes: args.step_mib * MIB,
                    start_delay: start_ms * per_ms,
                    step_delay: args.step_ms * per_ms,
                    hb_period: 100 * per_ms,
                    fill_base: TINY_CHECK_BASE + check_bytes,
                    check_base: TINY_CHECK_BASE,
                    check_pages: check_bytes / guestmm::PAGE_SIZE as u64,
                    seed: (i as u64 + 1) << 40,
                    ck_period: 2000 * per_ms,
                })
            }
        }
    };
    let mut rep = Report {
        guests: args.guests,
        ram_bytes_per_guest: ram,
        budget_bytes: budget,
        guest: Some(args.guest),
        kernel: kernel_name,
        kernel_image_bytes: match &image {
            BootImage::Linux { kernel, .. } => kernel.len() as u64,
            BootImage::Tiny => 0,
        },
        // What is the same in every guest and so what KSM must at least
        // give back: the kernel image, or the tiny guest's check area.
        shared_image_bytes: match &image {
            BootImage::Linux { kernel, .. } => kernel.len() as u64,
            BootImage::Tiny => check_bytes,
        },
        guest_mips: common::round(mips, 1),
        initramfs_bytes: match &image {
            BootImage::Linux { initramfs, .. } => initramfs.len() as u64,
            BootImage::Tiny => 0,
        },
        ..Report::default()
    };
    let status = common::status_line(args.json);
    let boot_timeout = Duration::from_secs(args.boot_timeout_s);

    // 1. The baseline: the same kernel and initramfs on plain mmap memory,
    // all guests at once (as the tracked ones boot below), stopped at the
    // marker.
    status.set_message("booting on plain mmap memory (baseline)");
    {
        let mut vms = Vec::new();
        for i in 0..n {
            let map = common::AnonMap::new(ram as usize, 0)
                .map_err(|e| format!("mmap of {} MiB: {e}", args.ram_mib))?;
            let ptr = map.ptr();
            let echo = args.echo.then(|| format!("plain{i}"));
            // SAFETY: `map` is a live read-write mapping of `ram` bytes,
            // handed to the VM as its keeper: it is unmapped only when the VM
            // drops it, after its VM file and after `mem`.
            let mem = unsafe { vmm::plain_guest_memory(ptr, ram) }?;
            // SAFETY: as above: `mem` is over `map`, which the VM keeps.
            let vm = unsafe {
                Vm::boot(
                    &kvm,
                    ptr,
                    ram,
                    mem,
                    &image,
                    &guest_args(i, false),
                    echo,
                    Box::new(map),
                )
            }?;
            vms.push(vm);
        }
        wait_booted(&vms, boot_timeout, "plain")?;
        rep.boot_ms_plain = vms
            .iter()
            .map(|v| ms(v.console.boot_us.load(Ordering::SeqCst)))
            .collect();
    }

    // 2. The tracked guests on one host budget, with the OOM reaper.
    let host = Host::with_budget(budget);
    let reaper = Reaper::new(ReaperConfig {
        delay: Duration::ZERO,
        zap: ZapSplit::with_threads(2),
        ..ReaperConfig::default()
    });
    reaper.install(&host);
    let _reaper_thread = reaper.spawn().map_err(|e| format!("oom_reaper: {e}"))?;
    let record = Arc::new(Mutex::new(KillRecord::default()));
    let all_mappings = Arc::new(Mutex::new(Vec::new()));
    let mut guests: Vec<Running> = Vec::new();
    status.set_message("booting on tracked guestmm memory");
    for i in 0..n {
        let name = format!(
            "{}{i}",
            match args.guest {
                GuestKind::Linux => "linux",
                GuestKind::Tiny => "tiny",
            }
        );
        let guest = host.create_guest(&name);
        let mm = guest.mm().map_err(|e| e.to_string())?;
        let addr = match mm.mmap_blocking(MapOptions::anon(ram).tracked(true)) {
            Ok(a) => a,
            Err(e) => return Err(Failure::Skip(format!("tracked region not available: {e}"))),
        };
        // KVM touches guest RAM from kernel mode: a user-mode-only
        // userfaultfd (no privilege for a full one) cannot serve it.
        if let Err(e) = mm.check_kernel_access_blocking(addr, ram) {
            return Err(Failure::Skip(format!("not usable as a KVM memslot: {e}")));
        }
        // The guest's RAM through the adapter: one MmRegion (it holds a
        // user reference, so the mapping outlives it; it refuses access
        // once the guest is killed) in a vm-memory collection, which
        // linux-loader writes the kernel through.
        let region = MmRegion::<()>::new(&mm, addr, ram, vm_memory::GuestAddress(0))
            .map_err(|e| format!("adapter region: {e}"))?;
        let host_ptr = region.host_ptr();
        let mem = GuestMemoryMm::from_regions(vec![region])
            .map_err(|e| format!("adapter collection: {e}"))?;
        let cl = guest_args(i, true);
        let echo = args.echo.then(|| name.clone());
        // SAFETY: the tracked mapping stays mapped while a user reference of
        // `mm` lives; `mem`'s region holds one and the VM's keeper is one
        // too (`mm.clone()`), so the mapping outlives the VM file (dropped
        // first by `Vm`).
        let vm = unsafe {
            Vm::boot(
                &kvm,
                host_ptr,
                ram,
                mem,
                &image,
                &cl,
                echo,
                Box::new(mm.clone()),
            )
        }?;
        guest.set_kill_hook(Arc::new(StopVcpu {
            index: i,
            kick: vm.kick.clone(),
            mapping: (host_ptr as usize, ram),
            all: all_mappings.clone(),
            record: record.clone(),
        }));
        all_mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((host_ptr as usize, ram));
        guests.push(Running {
            name,
            guest,
            mm,
            addr,
            mapping: (host_ptr as usize, ram),
            vm: Some(vm),
        });
    }
    let vms: Vec<&Vm> = guests.iter().filter_map(|g| g.vm.as_ref()).collect();
    wait_booted(&vms, boot_timeout, "tracked")?;
    rep.boot_ms = vms
        .iter()
        .map(|v| ms(v.console.boot_us.load(Ordering::SeqCst)))
        .collect();
    rep.booted = vms.iter().filter(|v| v.console.booted()).count() as u64;
    rep.boot_ms_median = common::median(rep.boot_ms.clone());
    rep.boot_ms_plain_median = common::median(rep.boot_ms_plain.clone());
    rep.boot_ratio = common::round(rep.boot_ms_median / rep.boot_ms_plain_median, 3);
    drop(vms);

    let ranges: Vec<(usize, u64)> = guests.iter().map(|g| g.mapping).collect();
    let show = |phase: &str, ksm: Option<&Ksm>| {
        if status.is_hidden() {
            return;
        }
        let rss = common::mappings_rss(&ranges);
        let mut msg = format!(
            "{phase}: budget {} / {} MiB charged, OOM kills {}{}",
            host.stats().charged_bytes >> 20,
            budget >> 20,
            host.oom_stats().kills,
            ksm.map(|k| format!(", KSM pages_sharing {}", k.stats().pages_sharing))
                .unwrap_or_default()
        );
        for (g, r) in guests.iter().zip(rss) {
            let c = &g.vm.as_ref().expect("running").console;
            let state = if g.guest.is_dying() {
                "killed"
            } else if c.booted() {
                "running"
            } else {
                "booting"
            };
            msg.push_str(&format!(
                "\n  {:7} {:8} heartbeats {:5}  fill {:3} MiB  RSS {:4} MiB",
                g.name,
                state,
                c.heartbeats.load(Ordering::SeqCst),
                c.fill_steps.load(Ordering::SeqCst) * args.step_mib,
                r >> 20
            ));
        }
        status.set_message(msg);
    };

    // 3. Fill until the OOM killer kills one, then the reap.
    let fill_timeout = Duration::from_secs(60 + args.steps * args.step_ms / 500);
    let t_fill = Instant::now();
    let all_filled = |gs: &[Running]| {
        gs.iter().all(|g| {
            g.guest.is_dying()
                || g.vm
                    .as_ref()
                    .is_some_and(|v| v.console.filled.load(Ordering::SeqCst))
        })
    };
    while host.oom_stats().kills == 0 && !all_filled(&guests) {
        if t_fill.elapsed() > fill_timeout {
            return Err("the guests neither filled nor crossed the budget in time"
                .to_string()
                .into());
        }
        show("filling", None);
        check_alive(&guests)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = record.lock().unwrap_or_else(|e| e.into_inner()).victim;
    let Some(v) = victim else {
        return Err(format!(
            "every guest filled without an OOM kill (budget {} MiB, charged {} MiB): lower --budget-mib",
            budget >> 20,
            host.stats().charged_bytes >> 20
        )
        .into());
    };
    let survivors: Vec<usize> = (0..n).filter(|&i| i != v).collect();
    let hb = |i: usize, gs: &[Running]| {
        gs[i]
            .vm
            .as_ref()
            .map_or(0, |vm| vm.console.heartbeats.load(Ordering::SeqCst))
    };
    rep.survivor_heartbeats_before_kill = survivors.iter().map(|&i| hb(i, &guests)).collect();
    rep.victim = Some(guests[v].name.clone());
    let (killed_at, victim_rss, process_rss, all_rss) = {
        let r = record.lock().unwrap_or_else(|e| e.into_inner());
        (
            r.at.unwrap_or_else(Instant::now),
            r.victim_rss,
            r.process_rss,
            r.all_rss.clone(),
        )
    };
    rep.victim_rss_before_bytes = victim_rss;
    rep.process_rss_before_reap_bytes = process_rss;
    let reaped = vmm::wait_until(Duration::from_secs(20), || {
        let s = reaper.stats();
        s.reaped + s.gave_up > 0
    });
    let reap_done = Instant::now();
    if !reaped {
        return Err("the OOM reaper did not finish in 20 s".to_string().into());
    }
    rep.reap_ms = common::round((reap_done - killed_at).as_secs_f64() * 1000.0, 1);
    rep.process_rss_after_reap_bytes = procfs::statm_rss().unwrap_or(0);
    rep.process_rss_after_reap_outside_bytes = rss_from_outside();
    let rss_now = common::mappings_rss(&ranges);
    rep.victim_rss_after_reap_bytes = rss_now[v];
    // The survivors kept running (and filling) during the reap: what
    // their mappings grew by meanwhile, so that the process RSS drop plus
    // this is what the reap gave back.
    rep.survivors_rss_growth_during_reap_bytes = survivors
        .iter()
        .map(|&i| rss_now[i].saturating_sub(all_rss.get(i).copied().unwrap_or(0)))
        .sum();
    rep.reaped_with_vm_alive = guests[v].vm.as_ref().is_some_and(|vm| vm.vm_alive());

    // The survivors go on: their fill completes (within the budget now)
    // and their heartbeats keep rising.
    let t_rest = Instant::now();
    loop {
        let filled = survivors.iter().all(|&i| {
            guests[i]
                .vm
                .as_ref()
                .is_some_and(|vm| vm.console.filled.load(Ordering::SeqCst))
        });
        if filled && t_rest.elapsed() > Duration::from_secs(1) {
            break;
        }
        if t_rest.elapsed() > fill_timeout {
            return Err("the survivors did not finish their fill in time"
                .to_string()
                .into());
        }
        show("after the kill", None);
        check_alive_except(&guests, v)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    rep.survivor_heartbeats_after_kill = survivors.iter().map(|&i| hb(i, &guests)).collect();

    // 4. KSM on the running survivors.
    let ksm = Ksm::new(KsmConfig {
        pages_to_scan: 8192,
        sleep: Duration::from_millis(1),
        ..KsmConfig::default()
    })
    .map_err(|e| format!("KSM: {e}"))?;
    rep.process_pss_before_ksm_bytes = ProcessMemory::current().map(|m| m.pss).unwrap_or(0);
    for &i in &survivors {
        let g = &guests[i];
        ksm.madvise_blocking(&g.mm, g.addr, ram, Advice::Mergeable)
            .map_err(|e| format!("madvise(MERGEABLE) of {}: {e}", g.name))?;
    }
    let ksmd = ksm.spawn().map_err(|e| format!("ksmd: {e}"))?;
    ksm.set_run_blocking(Run::Merge)
        .map_err(|e| format!("KSM run=merge: {e}"))?;
    let t_ksm = Instant::now();
    while ksm.stats().full_scans < args.ksm_passes {
        if t_ksm.elapsed() > Duration::from_secs(60) {
            return Err("KSM did not finish its passes in 60 s".to_string().into());
        }
        show("KSM merging", Some(&ksm));
        check_alive_except(&guests, v)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = ksm.stats();
    rep.ksm_full_scans = s.full_scans;
    rep.ksm_pages_shared = s.pages_shared;
    rep.ksm_pages_sharing = s.pages_sharing;
    rep.process_pss_after_ksm_bytes = ProcessMemory::current().map(|m| m.pss).unwrap_or(0);
    // The guests recompute their checksum every 2 s: wait for two more
    // checks each, after the merge.
    let ck_at_merge: Vec<u64> = survivors
        .iter()
        .map(|&i| {
            guests[i]
                .vm
                .as_ref()
                .map_or(0, |vm| vm.console.ck_ok.load(Ordering::SeqCst))
        })
        .collect();
    let hb_at_merge: Vec<u64> = survivors.iter().map(|&i| hb(i, &guests)).collect();
    vmm::wait_until(Duration::from_secs(8), || {
        show("after KSM", Some(&ksm));
        survivors.iter().zip(&ck_at_merge).all(|(&i, &c)| {
            guests[i]
                .vm
                .as_ref()
                .is_some_and(|vm| vm.console.ck_ok.load(Ordering::SeqCst) >= c + 2)
        })
    });
    rep.survivor_heartbeats_after_ksm = survivors.iter().map(|&i| hb(i, &guests)).collect();
    rep.checksum_checks_after_ksm = survivors
        .iter()
        .zip(&ck_at_merge)
        .map(|(&i, &c)| {
            guests[i]
                .vm
                .as_ref()
                .map_or(0, |vm| vm.console.ck_ok.load(Ordering::SeqCst) - c)
        })
        .collect();
    rep.checksum_mismatches = guests
        .iter()
        .filter_map(|g| g.vm.as_ref())
        .map(|vm| vm.console.ck_bad.load(Ordering::SeqCst))
        .sum();
    let ck0: Vec<Option<String>> = survivors
        .iter()
        .map(|&i| {
            guests[i].vm.as_ref().and_then(|vm| {
                vm.console
                    .ck0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
        })
        .collect();
    rep.guest_checksums_ok = rep.checksum_mismatches == 0
        && rep.checksum_checks_after_ksm.iter().all(|&c| c >= 1)
        && ck0.iter().all(|c| c.is_some() && *c == ck0[0])
        && rep
            .survivor_heartbeats_after_ksm
            .iter()
            .zip(&hb_at_merge)
            .all(|(a, b)| a > b);
    check_alive_except(&guests, v)?;
    let o = host.oom_stats();
    rep.oom_kills = o.kills;
    rep.second_kills = o.second_kills;

    // 5. --snapshot: a survivor goes on in a new VM from a snapshot file.
    if args.snapshot {
        status.set_message("snapshot and lazy restore");
        let g = &mut guests[survivors[0]];
        rep.snapshot = Some(snapshot_and_restore(&kvm, &host, g, ram, args.echo)?);
    }
    status.finish_and_clear();

    // Teardown: the VMs (vCPUs, memslots) first, then KSM, then each
    // guest's exit (exit_mmap).
    for g in &mut guests {
        g.vm.take();
    }
    ksmd.stop();
    for g in guests {
        drop(g.mm);
        g.guest.exit_blocking();
    }
    rep.total_ms = common::round(t_start.elapsed().as_secs_f64() * 1000.0, 0);
    Ok(rep)
}

/// Stops `g`'s vCPU (its state read at the stop), snapshots its memory to
/// a file, restores it lazily into a new guest of `host` and a new VM
/// started from that state, and waits for the restored guest to print
/// heartbeats and a checksum check of its check area (served from the
/// file). The new VM and guest are gone when this returns; `g` stays
/// stopped.
fn snapshot_and_restore(
    kvm: &Kvm,
    host: &Host,
    g: &mut Running,
    ram: u64,
    echo: bool,
) -> Result<SnapshotReport, String> {
    let vm = g.vm.as_mut().ok_or("the guest has no VM")?;
    vm.stop();
    let state = vm
        .saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or("the vCPU did not stop")?
        .map_err(|e| format!("the stopped vCPU's state: {e}"))?;
    let file = common::TempPath::new(&format!("linux_guests-{}.snap", g.name));
    let t = Instant::now();
    let st =
        g.mm.snapshot_to_file_blocking(file.path())
            .map_err(|e| format!("snapshot of {}: {e}", g.name))?;
    let snapshot_ms = common::round(t.elapsed().as_secs_f64() * 1e3, 1);

    let t = Instant::now();
    let snap = Snapshot::open(file.path()).map_err(|e| format!("opening the snapshot: {e}"))?;
    let opts = snap.map_options(0).ok_or("the snapshot holds no VMA")?;
    let name = format!("{}-restored", g.name);
    let guest = host.create_guest(&name);
    let mm = guest.mm().map_err(|e| e.to_string())?;
    let addr = mm
        .mmap_blocking(opts)
        .map_err(|e| format!("lazy restore of {name}: {e}"))?;
    mm.check_kernel_access_blocking(addr, ram)
        .map_err(|e| format!("restored RAM not usable as a memslot: {e}"))?;
    let region = MmRegion::<()>::new(&mm, addr, ram, vm_memory::GuestAddress(0))
        .map_err(|e| format!("adapter region: {e}"))?;
    let host_ptr = region.host_ptr();
    let mem = GuestMemoryMm::from_regions(vec![region])
        .map_err(|e| format!("adapter collection: {e}"))?;
    // SAFETY: as for the tracked guests in `run`: `mem`'s region and the
    // keeper (`mm.clone()`) hold user references, so the restored mapping
    // outlives the VM file.
    let rvm = unsafe {
        Vm::restore(
            kvm,
            host_ptr,
            ram,
            mem,
            &state,
            echo.then(|| name.clone()),
            Box::new(mm.clone()),
        )
    }?;
    let usable_ms = common::round(t.elapsed().as_secs_f64() * 1e3, 3);
    // Heartbeats every 100 ms and a checksum of the check area every 2 s
    // (TSC deadlines carried over with the TSC): three of the first, one
    // of the second.
    let c = rvm.console.clone();
    let went_on = vmm::wait_until(Duration::from_secs(15), || {
        c.heartbeats.load(Ordering::SeqCst) >= 3 && c.ck_ok.load(Ordering::SeqCst) >= 1
    });
    let rep = SnapshotReport {
        guest: g.name.clone(),
        pages: st.pages,
        snapshot_ms,
        usable_ms,
        heartbeats_after_restore: c.heartbeats.load(Ordering::SeqCst),
        checksum_checks_after_restore: c.ck_ok.load(Ordering::SeqCst),
        checksum_mismatches_after_restore: c.ck_bad.load(Ordering::SeqCst),
        restored_resident_bytes: common::mappings_rss(&[(host_ptr as usize, ram)])[0],
        saved_bytes: st.pages * guestmm::PAGE_SIZE as u64,
        ok: went_on && c.ck_bad.load(Ordering::SeqCst) == 0,
    };
    drop(rvm);
    drop(mm);
    guest.exit_blocking();
    Ok(rep)
}

/// Waits for every VM's boot marker; an error names the first that ended
/// or did not print it, with its last console lines.
fn wait_booted(vms: &[impl AsRef<Vm>], timeout: Duration, what: &str) -> Result<(), String> {
    vmm::wait_until(timeout, || {
        vms.iter()
            .all(|v| v.as_ref().console.booted() || v.as_ref().vcpu_finished())
    });
    for (i, v) in vms.iter().enumerate() {
        let v = v.as_ref();
        if !v.console.booted() {
            let tail = v
                .console
                .tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .join("\n  ");
            return Err(format!(
                "{what} guest {i} did not boot to its init script (vCPU {}); last console lines:\n  {tail}",
                if v.vcpu_finished() { "ended" } else { "still running" }
            ));
        }
    }
    Ok(())
}

fn check_alive(guests: &[Running]) -> Result<(), String> {
    check_alive_except(guests, usize::MAX)
}

/// Every guest but `except` (and those the OOM killer killed) must still
/// run its vCPU.
fn check_alive_except(guests: &[Running], except: usize) -> Result<(), String> {
    for (i, g) in guests.iter().enumerate() {
        if i == except || g.guest.is_dying() {
            continue;
        }
        if let Some(vm) = &g.vm {
            if vm.vcpu_finished() {
                let tail = vm
                    .console
                    .tail
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .join("\n  ");
                return Err(format!(
                    "{} stopped running; last console lines:\n  {tail}",
                    g.name
                ));
            }
        }
    }
    Ok(())
}

impl AsRef<Vm> for Vm {
    fn as_ref(&self) -> &Vm {
        self
    }
}

fn print_table(r: &Report) {
    println!("| guest | boot (guestmm) | boot (plain mmap) |");
    println!("|---|---|---|");
    for (i, (a, b)) in r.boot_ms.iter().zip(&r.boot_ms_plain).enumerate() {
        println!("| guest {i} | {a:.1} ms | {b:.1} ms |");
    }
    println!();
    println!("| what | value |");
    println!("|---|---|");
    println!(
        "| guests x RAM, budget | {} x {} MiB, {} MiB |",
        r.guests,
        r.ram_bytes_per_guest >> 20,
        r.budget_bytes >> 20
    );
    if r.guest == Some(GuestKind::Tiny) {
        println!(
            "| guest | the tiny guest (tiny.s), {} MiB check area the same in every guest |",
            r.shared_image_bytes >> 20
        );
    } else {
        println!(
            "| kernel | {} ({:.1} MiB image), initramfs {} KiB |",
            r.kernel,
            r.kernel_image_bytes as f64 / MIB as f64,
            r.initramfs_bytes >> 10
        );
    }
    println!(
        "| guest kernel code speed (probe) | {:.1} M instructions/s |",
        r.guest_mips
    );
    println!(
        "| booted, median boot | {} / {}, {:.1} ms on guestmm vs {:.1} ms on plain mmap ({:.2}x) |",
        r.booted, r.guests, r.boot_ms_median, r.boot_ms_plain_median, r.boot_ratio
    );
    println!(
        "| OOM victim | {} ({} MiB RSS; {} MiB after the reap, VM alive: {}) |",
        r.victim.as_deref().unwrap_or("-"),
        r.victim_rss_before_bytes >> 20,
        r.victim_rss_after_reap_bytes >> 20,
        r.reaped_with_vm_alive
    );
    println!(
        "| process RSS around the reap | {} -> {} MiB ({} MiB seen by another process), {:.1} ms |",
        r.process_rss_before_reap_bytes >> 20,
        r.process_rss_after_reap_bytes >> 20,
        r.process_rss_after_reap_outside_bytes >> 20,
        r.reap_ms
    );
    println!(
        "| survivors' heartbeats: at kill -> after fill -> after KSM | {:?} -> {:?} -> {:?} |",
        r.survivor_heartbeats_before_kill,
        r.survivor_heartbeats_after_kill,
        r.survivor_heartbeats_after_ksm
    );
    println!(
        "| OOM kills (second kills) | {} ({}) |",
        r.oom_kills, r.second_kills
    );
    println!(
        "| KSM pages_shared / pages_sharing | {} / {} ({} full scans) |",
        r.ksm_pages_shared, r.ksm_pages_sharing, r.ksm_full_scans
    );
    println!(
        "| process PSS before -> after KSM | {} -> {} MiB |",
        r.process_pss_before_ksm_bytes >> 20,
        r.process_pss_after_ksm_bytes >> 20
    );
    println!(
        "| guest checksums after KSM | {} ({:?} checks, {} mismatches) |",
        if r.guest_checksums_ok { "ok" } else { "FAILED" },
        r.checksum_checks_after_ksm,
        r.checksum_mismatches
    );
    println!("| total run | {:.1} s |", r.total_ms / 1000.0);
}
