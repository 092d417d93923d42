//! The VMM: one KVM VM with one vCPU per guest, its RAM one host mapping
//! (a tracked guestmm region or a plain `mmap`), a Linux bzImage loaded by
//! linux-loader (64-bit boot protocol: zero page, e820, command line,
//! initramfs), the in-kernel irqchip and PIT, and a vm-superio 8250 UART on
//! COM1 whose interrupt reaches the guest through an irqfd on GSI 4.
//!
//! All the example's `unsafe` is here: the memslot over the host mapping,
//! vm-memory's region over the same mapping, the kick signal and the
//! `immediate_exit` byte of the vCPU's `kvm_run`.
//!
//! ```text
//! guest physical memory (one memslot, one host mapping)
//! 0x0000_0500  GDT (null, code64, data, tss)      0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)                        0x0000_a000  PDPT
//! 0x0000_7000  zero page (boot_params, e820)      0x0000_b000  PD: 1 GiB identity, 2 MiB pages
//! 0x0000_8ff0  boot stack (grows down)            0x0002_0000  command line
//! 0x0010_0000  bzImage protected-mode kernel      top of RAM   initramfs (page aligned)
//! ```
//!
//! The invariant is: the memslot and vm-memory's region over a mapping
//! never outlive it: each [`Vm`] holds what keeps its mapping alive (an
//! `MmUser`, or the plain `AnonMap`) and drops its VM file first.

use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

const GDT: u64 = 0x500;
const IDT: u64 = 0x520;
const ZERO_PAGE: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CMDLINE: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
const HIMEM: u64 = 0x10_0000;
const COM1: u16 = 0x3f8;
const COM1_GSI: u32 = 4;

/// Lines the guest's init script prints (the protocol between the init
/// script in `initramfs.rs` and this file).
pub const MARK_BOOTED: &str = "@@BOOTED";
/// One heartbeat line: `@@HB <n>`.
pub const MARK_HEARTBEAT: &str = "@@HB ";
/// The checksum of the check file, written before any merge.
pub const MARK_CK0: &str = "@@CK0 ";
/// The checksum recomputed and equal to the first.
pub const MARK_CK_OK: &str = "@@CKOK";
/// The checksum recomputed and different.
pub const MARK_CK_BAD: &str = "@@CKBAD";
/// One fill step done.
pub const MARK_FILL: &str = "@@FILL ";
/// Every fill step done.
pub const MARK_FILLED: &str = "@@FILLED";

/// What every guest boots.
#[derive(Debug)]
pub enum BootImage {
    /// A Linux kernel and its initramfs.
    Linux {
        /// The bzImage (or an uncompressed vmlinux ELF).
        kernel: Vec<u8>,
        /// The initramfs (cpio newc, uncompressed).
        initramfs: Vec<u8>,
    },
    /// The tiny guest (`tiny.rs`); the parameters are per guest.
    Tiny,
}

/// What one guest gets on top of the image: the kernel command line, or
/// the tiny guest's parameters.
#[derive(Debug, Clone)]
pub enum GuestArgs {
    /// The Linux command line.
    Cmdline(String),
    /// The tiny guest's parameter block.
    Tiny(crate::tiny::TinyParams),
}

/// What the guest printed, parsed line by line by the serial's writer
/// (the vCPU thread) and read by the monitor.
#[derive(Debug, Default)]
pub struct Console {
    /// Time from the vCPU's first `KVM_RUN` to the boot marker, µs
    /// (0 = not booted yet).
    pub boot_us: AtomicU64,
    /// Heartbeat lines seen.
    pub heartbeats: AtomicU64,
    /// Fill steps reported.
    pub fill_steps: AtomicU64,
    /// Every fill step done.
    pub filled: AtomicBool,
    /// `@@CKOK` lines.
    pub ck_ok: AtomicU64,
    /// `@@CKBAD` lines.
    pub ck_bad: AtomicU64,
    /// The first checksum (`@@CK0`), once printed.
    pub ck0: Mutex<Option<String>>,
    /// The last lines that were not markers (kernel messages), for errors.
    pub tail: Mutex<Vec<String>>,
}

impl Console {
    /// Whether the boot marker was seen.
    pub fn booted(&self) -> bool {
        self.boot_us.load(Ordering::SeqCst) > 0
    }

    fn line(&self, line: &str, started: Instant) {
        if line.starts_with(MARK_BOOTED) {
            let us = started.elapsed().as_micros().max(1) as u64;
            let _ = self
                .boot_us
                .compare_exchange(0, us, Ordering::SeqCst, Ordering::SeqCst);
        } else if line.starts_with(MARK_HEARTBEAT) {
            self.heartbeats.fetch_add(1, Ordering::SeqCst);
        } else if let Some(ck) = line.strip_prefix(MARK_CK0) {
            *lock(&self.ck0) = Some(ck.trim().to_owned());
        } else if line.starts_with(MARK_CK_OK) {
            self.ck_ok.fetch_add(1, Ordering::SeqCst);
        } else if line.starts_with(MARK_CK_BAD) {
            self.ck_bad.fetch_add(1, Ordering::SeqCst);
        } else if line.starts_with(MARK_FILLED) {
            self.filled.store(true, Ordering::SeqCst);
        } else if line.starts_with(MARK_FILL) {
            self.fill_steps.fetch_add(1, Ordering::SeqCst);
        } else {
            let mut t = lock(&self.tail);
            if t.len() == 40 {
                t.remove(0);
            }
            t.push(line.to_owned());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The UART's output: split into lines for [`Console`], and echoed to
/// stderr with a prefix when asked.
struct LineWriter {
    console: Arc<Console>,
    buf: Vec<u8>,
    started: Instant,
    echo: Option<String>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for &b in data {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.buf).trim_end().to_owned();
                if let Some(p) = &self.echo {
                    eprintln!("[{p}] {line}");
                }
                self.console.line(&line, self.started);
                self.buf.clear();
            } else if self.buf.len() < 4096 {
                self.buf.push(b);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART's interrupt line: an eventfd KVM turns into GSI 4 (irqfd).
struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// How the kill hook reaches a vCPU thread: its `kvm_run` page's
/// `immediate_exit` byte and its pthread, published while the vCPU is
/// alive (the vCPU thread clears it, under the same mutex, before its
/// `VcpuFd` and so its `kvm_run` mapping go).
#[derive(Debug, Default)]
pub struct VcpuKick {
    stop: AtomicBool,
    target: Mutex<Option<(usize, libc::pthread_t)>>,
}

impl VcpuKick {
    /// Stops the vCPU: the flag its loop checks, `immediate_exit = 1` so a
    /// `KVM_RUN` about to start returns at once, and a signal so one in
    /// progress returns `EINTR`. Never blocks on the guest (the mutex is
    /// held only by these few lines and the vCPU's publish/unpublish).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let t = lock(&self.target);
        if let Some((run, thread)) = *t {
            // SAFETY: `run` points to the `immediate_exit` byte of the
            // vCPU's live `kvm_run` mapping: the vCPU thread unpublishes it
            // (under this mutex, held here) before it drops the `VcpuFd`.
            // KVM documents this byte as written asynchronously (from a
            // signal handler); all our accesses to it are atomic.
            unsafe { AtomicU8::from_ptr(run as *mut u8) }.store(1, Ordering::SeqCst);
            // SAFETY: `thread` is the vCPU thread, alive while published
            // (it unpublishes before it returns); the kick signal has a
            // handler (`install_kick_handler`) that does nothing, so the
            // only effect is to interrupt `KVM_RUN` with EINTR.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the (empty) handler of the kick signal, without `SA_RESTART`
/// so that a `KVM_RUN` it interrupts returns `EINTR`.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
    // the handler is an `extern "C"` function that touches nothing (async-
    // signal-safe), and the signal is one no other part of the process
    // uses (a real-time signal above the ones libc reserves).
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// vm-memory's view of one plain host mapping (the baseline's) as guest
/// RAM at guest address 0: a `GuestRegionMmap` over the raw pointer, not
/// owned (vm-memory never unmaps it). The tracked guests' memory comes
/// from the adapter crate (`mm-vm-memory`) instead.
///
/// # Safety
///
/// `host..host+len` is a live read-write mapping that stays mapped for as
/// long as the returned memory (and anything cloned from it) is used.
pub unsafe fn plain_guest_memory(host: *mut u8, len: u64) -> Result<GuestMemoryMmap, String> {
    // SAFETY: the caller keeps the mapping alive and read-write for the
    // region's life; `with_raw_mmap_pointer` makes the region not owned.
    let region = unsafe {
        vm_memory::mmap::MmapRegionBuilder::new(len as usize)
            .with_raw_mmap_pointer(host)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .build()
    }
    .map_err(|e| format!("vm-memory region: {e}"))?;
    let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or("vm-memory region: guest range overflows")?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| format!("vm-memory: {e}"))
}

/// How a guest's vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// Stopped by [`VcpuKick::stop`] (the kill hook, or the end of the run).
    Stopped,
    /// The guest reset or triple-faulted (a panic with `panic=-1`).
    Shutdown,
    /// A `KVM_RUN` error that was not a stop.
    Failed(String),
}

/// One guest VM: the VM file (memslot over the RAM), its vCPU thread, its
/// console.
pub struct Vm {
    // Field order is drop order: the VM file (and its memslot) goes before
    // `_keep`, which keeps the mapping alive.
    vm: Option<VmFd>,
    vcpu: Option<JoinHandle<VcpuEnd>>,
    /// The kill switch of the vCPU thread.
    pub kick: Arc<VcpuKick>,
    /// What the guest printed.
    pub console: Arc<Console>,
    /// The vCPU's state when it was stopped (`--snapshot`), or why it
    /// could not be read.
    pub saved: Arc<Mutex<Option<Result<VcpuState, String>>>>,
    _keep: Box<dyn std::any::Any>,
}

/// A stopped vCPU's state, as much as the tiny guest needs to go on in a
/// new VM: its registers, segments and control registers, and its TSC
/// (its timers are TSC deadlines). It takes no interrupts and touches no
/// FPU, APIC or clock state; a Linux guest would need all of those
/// (Firecracker saves about a dozen KVM state structures per vCPU).
#[derive(Debug, Clone)]
pub struct VcpuState {
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    tsc: u64,
}

/// `IA32_TIME_STAMP_COUNTER`.
const MSR_TSC: u32 = 0x10;

impl VcpuState {
    fn read(vcpu: &VcpuFd) -> Result<VcpuState, String> {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_TSC,
            ..Default::default()
        }])
        .map_err(|e| format!("MSRs: {e:?}"))?;
        if vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| format!("KVM_GET_MSRS: {e}"))?
            != 1
        {
            return Err("KVM_GET_MSRS: no TSC".into());
        }
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(|e| format!("KVM_GET_SREGS: {e}"))?,
            tsc: msrs.as_slice()[0].data,
        })
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("console", &self.console)
            .finish()
    }
}

impl Vm {
    /// Creates a VM whose RAM is `mem` (one region at guest address 0 of
    /// `ram` bytes, host address `host`), loads the guest through `mem`,
    /// and starts its vCPU thread (which runs at once). The VM keeps `mem`
    /// and then `keep` until it drops, after its VM file.
    ///
    /// # Safety
    ///
    /// `host..host+ram` is the live read-write mapping behind `mem`, which
    /// `mem` or `keep` keeps mapped until they are dropped, and nothing
    /// else unmaps it meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn boot<M: GuestMemoryBackend + 'static>(
        kvm: &Kvm,
        host: *mut u8,
        ram: u64,
        mem: M,
        image: &BootImage,
        guest_args: &GuestArgs,
        echo: Option<String>,
        keep: Box<dyn std::any::Any>,
    ) -> Result<Vm, String> {
        let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
        // SAFETY: the caller's contract, passed on.
        let vm = unsafe { create_vm(kvm, host, ram) }?;
        let entry = match (image, guest_args) {
            (BootImage::Linux { kernel, initramfs }, GuestArgs::Cmdline(c)) => {
                load_linux(&mem, ram, kernel, initramfs, c)?
            }
            (BootImage::Tiny, GuestArgs::Tiny(p)) => {
                mem.write_slice(&crate::tiny::TINY_CODE, GuestAddress(HIMEM))
                    .and_then(|()| {
                        mem.write_slice(&p.to_bytes(), GuestAddress(crate::tiny::PARAMS))
                    })
                    .map_err(|e| format!("loading the tiny guest: {e}"))?;
                HIMEM
            }
            _ => return Err("guest arguments do not fit the image".into()),
        };
        write_boot_tables(&mem)?;
        let vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
        setup_vcpu(kvm, &vcpu, entry)?;
        start(vm, vcpu, mem, echo, keep)
    }

    /// Creates a VM over `mem` as [`boot`](Self::boot) does, but loads
    /// nothing: the RAM already holds a stopped guest (restored from a
    /// snapshot), and its vCPU starts from `state`.
    ///
    /// # Safety
    ///
    /// As for [`boot`](Self::boot).
    pub unsafe fn restore<M: GuestMemoryBackend + 'static>(
        kvm: &Kvm,
        host: *mut u8,
        ram: u64,
        mem: M,
        state: &VcpuState,
        echo: Option<String>,
        keep: Box<dyn std::any::Any>,
    ) -> Result<Vm, String> {
        // SAFETY: the caller's contract, passed on.
        let vm = unsafe { create_vm(kvm, host, ram) }?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        setup_vcpu(kvm, &vcpu, 0)?;
        vcpu.set_sregs(&state.sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        vcpu.set_regs(&state.regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        let tsc = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_TSC,
            data: state.tsc,
            ..Default::default()
        }])
        .map_err(|e| format!("MSRs: {e:?}"))?;
        if vcpu
            .set_msrs(&tsc)
            .map_err(|e| format!("KVM_SET_MSRS: {e}"))?
            != 1
        {
            return Err("KVM_SET_MSRS: TSC not set".into());
        }
        start(vm, vcpu, mem, echo, keep)
    }
}

/// A VM with the in-kernel irqchip and PIT and one memslot: guest
/// physical `0..ram` at `host`.
///
/// # Safety
///
/// As for [`Vm::boot`]: `host..host+ram` stays mapped until the VM file
/// is dropped.
unsafe fn create_vm(kvm: &Kvm, host: *mut u8, ram: u64) -> Result<VmFd, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let vm = kvm.create_vm().map_err(e("KVM_CREATE_VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(e("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(e("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(e("KVM_CREATE_PIT2"))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: ram,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the caller keeps `host..host+ram` mapped until `keep`
    // drops; the `Vm` made of this file drops it (and so the memslot)
    // before `keep` (field order), and on an error return the VM file goes
    // first too (a local, dropped before the caller's `keep`).
    unsafe { vm.set_user_memory_region(slot) }.map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
    Ok(vm)
}

/// The UART's irqfd, the console and the vCPU thread (which runs at once).
fn start<M: GuestMemoryBackend + 'static>(
    vm: VmFd,
    vcpu: VcpuFd,
    mem: M,
    echo: Option<String>,
    keep: Box<dyn std::any::Any>,
) -> Result<Vm, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|err| format!("eventfd: {err}"))?;
    vm.register_irqfd(&irq, COM1_GSI).map_err(e("KVM_IRQFD"))?;
    let console = Arc::new(Console::default());
    let kick = Arc::new(VcpuKick::default());
    let saved = Arc::new(Mutex::new(None));
    let (c, k, sv) = (console.clone(), kick.clone(), saved.clone());
    let thread = std::thread::Builder::new()
        .name("vcpu".into())
        .spawn(move || {
            let started = Instant::now();
            let writer = LineWriter {
                console: c,
                buf: Vec::new(),
                started,
                echo,
            };
            run_vcpu(vcpu, Serial::new(IrqLine(irq), writer), &k, &sv)
        })
        .map_err(|err| format!("vCPU thread: {err}"))?;
    Ok(Vm {
        vm: Some(vm),
        vcpu: Some(thread),
        kick,
        console,
        saved,
        _keep: Box::new((mem, keep)),
    })
}

impl Vm {
    /// Stops the vCPU thread (if running) and waits for it.
    pub fn stop(&mut self) -> Option<VcpuEnd> {
        self.kick.stop();
        self.vcpu.take().map(|t| {
            t.join()
                .unwrap_or_else(|_| VcpuEnd::Failed("vCPU thread panicked".into()))
        })
    }

    /// Whether the vCPU thread has returned.
    pub fn vcpu_finished(&self) -> bool {
        self.vcpu.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Whether the VM file (and its memslot) still exists.
    pub fn vm_alive(&self) -> bool {
        self.vm.is_some()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        // The VM file (memslot) before the mapping's keeper (`_keep`).
        self.vm.take();
    }
}

/// Loads the kernel, initramfs, command line and zero page into `mem`;
/// returns the 64-bit entry point.
fn load_linux<M: GuestMemoryBackend>(
    mem: &M,
    ram: u64,
    kernel: &[u8],
    initramfs: &[u8],
    cmdline: &str,
) -> Result<u64, String> {
    let (loaded, mut hdr, entry) = if kernel.starts_with(b"\x7fELF") {
        // An uncompressed vmlinux: its segments at their physical
        // addresses, the 64-bit boot protocol at its entry (startup_64).
        let loaded = Elf::load(
            mem,
            None,
            &mut Cursor::new(kernel),
            Some(GuestAddress(HIMEM)),
        )
        .map_err(|e| format!("loading the vmlinux: {e}"))?;
        let hdr = setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            kernel_alignment: 0x100_0000,
            initrd_addr_max: 0x37ff_ffff,
            ..Default::default()
        };
        let entry = loaded.kernel_load.0;
        (loaded, hdr, entry)
    } else {
        let loaded = BzImage::load(
            mem,
            None,
            &mut Cursor::new(kernel),
            Some(GuestAddress(HIMEM)),
        )
        .map_err(|e| format!("loading the bzImage: {e}"))?;
        let hdr = loaded
            .setup_header
            .ok_or("the bzImage has no setup header")?;
        // The 64-bit entry of a bzImage is 0x200 past its protected-mode
        // start.
        let entry = loaded.kernel_load.0 + 0x200;
        (loaded, hdr, entry)
    };

    let initrd_max = u64::from(hdr.initrd_addr_max).min(ram - 1);
    let initrd_len = initramfs.len() as u64;
    let initrd_at = (initrd_max + 1 - initrd_len) & !0xfff;
    if initrd_at < loaded.kernel_end + (64 << 20) {
        return Err(format!(
            "guest RAM too small for the kernel and the initramfs ({} MiB)",
            ram >> 20
        ));
    }
    mem.write_slice(initramfs, GuestAddress(initrd_at))
        .map_err(|e| format!("writing the initramfs: {e}"))?;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| format!("command line: {e}"))?;
    cl.insert_str(cmdline)
        .map_err(|e| format!("command line: {e}"))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cl).map_err(|e| format!("command line: {e}"))?;

    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    hdr.ramdisk_image = initrd_at as u32;
    hdr.ramdisk_size = initrd_len as u32;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let e820 = [(0, 0x9_fc00), (HIMEM, ram - HIMEM)];
    for (i, (addr, size)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: 1, // E820_RAM
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| format!("zero page: {e}"))?;
    Ok(entry)
}

/// The GDT, an empty IDT and the identity page tables of the 64-bit entry.
fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), String> {
    // GDT: null, 64-bit code, data, TSS (the segment registers below are
    // loaded from the same values).
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64))
            .map_err(|e| format!("GDT: {e}"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))
        .map_err(|e| format!("IDT: {e}"))?;
    // Identity map of the first GiB with 2 MiB pages.
    mem.write_obj(PDPT | 3, GuestAddress(PML4))
        .map_err(|e| format!("page tables: {e}"))?;
    mem.write_obj(PD | 3, GuestAddress(PDPT))
        .map_err(|e| format!("page tables: {e}"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + 8 * i))
            .map_err(|e| format!("page tables: {e}"))?;
    }
    Ok(())
}

/// CPUID, long mode (page tables from `load`), registers for the 64-bit
/// boot protocol, and the local APIC's LINT0/LINT1 as ExtINT/NMI so the
/// in-kernel PIC reaches the vCPU before the guest programs its APIC.
fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: u64) -> Result<(), String> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;

    let mut sregs = vcpu.get_sregs().map_err(|e| format!("sregs: {e}"))?;
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_bindings::kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_bindings::kvm_segment {
        selector: 0x18,
        type_: 0xb,
        s: 0,
        db: 0,
        l: 0,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = tss;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4;
    sregs.cr4 |= 0x20; // PAE
                       // PG | ET | PE, and caches on: the reset value has CD and NW set,
                       // which a nested hypervisor may honour (an uncached guest).
    sregs.cr0 = 0x8000_0011;
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(|e| format!("sregs: {e}"))?;

    let regs = kvm_bindings::kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| format!("regs: {e}"))?;

    // MTRRs on, default type write-back: with them off (the reset state)
    // all memory is uncached wherever the guest's memory types are honoured
    // (a nested hypervisor), and the kernel decompresses at ~100 KiB/s.
    // IA32_MISC_ENABLE: fast strings.
    let msrs = kvm_bindings::Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: 0x2ff, // MSR_MTRRdefType
            data: (1 << 11) | 6,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: 0x1a0, // MSR_IA32_MISC_ENABLE
            data: 1,
            ..Default::default()
        },
    ])
    .map_err(|e| format!("MSRs: {e:?}"))?;
    let set = vcpu.set_msrs(&msrs).map_err(|e| format!("MSRs: {e}"))?;
    if set != 2 {
        return Err(format!("KVM_SET_MSRS set {set} of 2"));
    }

    let mut lapic = vcpu.get_lapic().map_err(|e| format!("lapic: {e}"))?;
    for (reg, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[reg + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|e| format!("lapic: {e}"))?;
    Ok(())
}

/// The vCPU loop: port I/O of COM1 to the UART, other ports read as
/// 0xff (no device), MMIO ignored; ends on a stop, a shutdown or an error.
fn run_vcpu<W: Write>(
    mut vcpu: VcpuFd,
    mut serial: Serial<IrqLine, vm_superio::serial::NoEvents, W>,
    kick: &VcpuKick,
    saved: &Mutex<Option<Result<VcpuState, String>>>,
) -> VcpuEnd {
    let run = std::ptr::addr_of_mut!(vcpu.get_kvm_run().immediate_exit) as usize;
    // SAFETY: `pthread_self` has no preconditions.
    let me = unsafe { libc::pthread_self() };
    *lock(&kick.target) = Some((run, me));
    let end = loop {
        if kick.stopped() {
            break VcpuEnd::Stopped;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if (COM1..COM1 + 8).contains(&port) {
                    let _ = serial.write((port - COM1) as u8, data[0]);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if (COM1..COM1 + 8).contains(&port) {
                    data[0] = serial.read((port - COM1) as u8);
                } else {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Hlt) => break VcpuEnd::Shutdown,
            Ok(other) => break VcpuEnd::Failed(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `run` is this thread's own live `kvm_run`
                // (`vcpu` is alive); atomic like the kill hook's store.
                unsafe { AtomicU8::from_ptr(run as *mut u8) }.store(0, Ordering::SeqCst);
            }
            Err(e) if kick.stopped() => {
                // A fault that the reap answered with SIGBUS (EFAULT) after
                // the kill: the stop is what ended it.
                let _ = e;
                break VcpuEnd::Stopped;
            }
            Err(e) => break VcpuEnd::Failed(format!("KVM_RUN: {e}")),
        }
    };
    if matches!(end, VcpuEnd::Stopped) {
        // KVM finishes a port I/O it exited for on the next KVM_RUN: enter
        // once more with `immediate_exit` set (it returns EINTR before
        // running guest code), so the state read next is consistent.
        // SAFETY: as in the loop: this thread's own live `kvm_run`.
        unsafe { AtomicU8::from_ptr(run as *mut u8) }.store(1, Ordering::SeqCst);
        let _ = vcpu.run();
        *lock(saved) = Some(VcpuState::read(&vcpu));
    }
    if std::env::var_os("LINUX_GUESTS_DEBUG").is_some() {
        if let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) {
            eprintln!("vCPU end {end:?}: rip {:#x} rsp {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} {:?}", r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer, r);
        }
    }
    // Unpublish before the `kvm_run` mapping goes with `vcpu`.
    *lock(&kick.target) = None;
    drop(vcpu);
    end
}

/// Iterations of the probe's loop.
const PROBE_LOOPS: u32 = 200_000;

/// How fast this KVM runs guest kernel code, in million instructions per
/// second: a real-mode loop of `PROBE_LOOPS` × 2 instructions in a fresh
/// VM (no irqchip: its `HLT` exits to us). Hardware virtualization (VMX,
/// SVM) runs it at ~1000; a software hypervisor that emulates guest
/// kernel code instruction by instruction (PVM without a PVM-enabled
/// guest kernel) at ~1, where one Linux boot takes many minutes.
/// Also returns the vCPU's TSC rate, kHz.
pub fn probe_mips(kvm: &Kvm) -> Result<(f64, u32), String> {
    // mov ecx, PROBE_LOOPS; 1: dec ecx; jnz 1b; hlt   (16-bit code)
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&PROBE_LOOPS.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc, 0xf4]);
    let mut map = crate::common::AnonMap::new(1 << 16, 0).map_err(|e| format!("mmap: {e}"))?;
    map.as_mut_slice()[0x1000..0x1000 + code.len()].copy_from_slice(&code);
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 1 << 16,
        userspace_addr: map.ptr() as u64,
        flags: 0,
    };
    // SAFETY: `map` is a live 64 KiB mapping that outlives `vm` (declared
    // after it, so dropped before it, and explicitly dropped below).
    unsafe { vm.set_user_memory_region(slot) }.map_err(|e| format!("memslot: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("vCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("sregs: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| format!("sregs: {e}"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| format!("regs: {e}"))?;
    let t = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(other) => return Err(format!("probe: unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("probe: KVM_RUN: {e}")),
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err("probe: no HLT in 30 s".into());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let tsc_khz = vcpu
        .get_tsc_khz()
        .map_err(|e| format!("KVM_GET_TSC_KHZ: {e}"))?;
    drop(vcpu);
    drop(vm);
    drop(map);
    Ok((2.0 * f64::from(PROBE_LOOPS) / secs / 1e6, tsc_khz))
}

/// Waits until `f` holds or `timeout` passes (polling every 10 ms).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
