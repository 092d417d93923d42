//! A small safe layer over userfaultfd(2): every `unsafe` block that talks to
//! the kernel about a userfaultfd lives here, next to `sys.rs`.
//!
//! Definitions come from `linux-raw-sys` (pre-generated, no bindgen at build
//! time); the two ioctl numbers it lacks (`UFFDIO_POISON`,
//! `USERFAULTFD_IOC_NEW`) are computed with the kernel's `_IOC` encoding,
//! which a const assertion checks against the numbers it does have.
//!
//! The protocol of one descriptor:
//!
//! 1. [`Uffd::open`] gets a descriptor from `userfaultfd(2)` **without**
//!    `UFFD_USER_MODE_ONLY` (faults taken by the kernel on behalf of the
//!    process, such as KVM's guest page walks, must reach us too), falling
//!    back to `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW` when the syscall is
//!    refused (`vm.unprivileged_userfaultfd = 0` without `CAP_SYS_PTRACE`),
//!    and when that is refused too (an ordinary user without access to the
//!    device), to `userfaultfd(UFFD_USER_MODE_ONLY)`, which any user may
//!    open since Linux 5.11: only faults taken in user mode reach it, and
//!    a kernel-mode fault on a registered range (KVM, `O_DIRECT`, a
//!    syscall's copy) fails with `EFAULT` instead of waiting for us.
//! 2. `UFFDIO_API` once, asking for the features we want among those the
//!    kernel offers (probed on a throwaway descriptor first, because the
//!    handshake can only be done once per descriptor).
//! 3. [`Uffd::register`] a range (MISSING, plus WP when offered; MISSING |
//!    MINOR for a shared memfd range); faults in it now block the faulting
//!    thread and queue a message.
//! 4. The handler [`Uffd::read_events`] and resolves each fault with
//!    [`Uffd::copy`] / [`Uffd::zeropage`] / [`Uffd::continue_`] (which
//!    wake the faulter; [`Uffd::fill_shmem`] combines the last two for
//!    shmem), or
//!    [`Uffd::poison`] (the faulter gets SIGBUS), or leaves a write-protect
//!    fault blocked until [`Uffd::writeprotect`] lifts the protection.
//! 5. [`Uffd::unregister`] before the range is unmapped; closing the
//!    descriptor unregisters everything and wakes every blocked thread.
//!
//! All ioctls that resolve faults write only into ranges registered with this
//! descriptor, and only guest memory (ranges inside a `HostRegion`) is ever
//! registered, so none of them can change memory a Rust reference points to.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as nr;

use crate::sys::HostRange;

/// `_IOC(dir, type, nr, size)` of the generic (x86-64, arm64) encoding.
const fn ioc(dir: u32, ty: u32, num: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | num
}
const IOC_READ_WRITE: u32 = 3;
const IOC_NONE: u32 = 0;

/// `_IOWR(UFFDIO, num, T)`: the userfaultfd ioctls.
const fn uffdio_iowr<T>(num: u32) -> u32 {
    ioc(IOC_READ_WRITE, uapi::UFFDIO, num, std::mem::size_of::<T>())
}

/// `UFFDIO_POISON` = `_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)`.
const UFFDIO_POISON: u32 = uffdio_iowr::<uapi::uffdio_poison>(uapi::_UFFDIO_POISON);
/// `UFFDIO_WRITEPROTECT_MODE_WP` (`(__u64)1 << 0` in the uapi header).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE` (`(__u64)1 << 0` in the uapi header).
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1;
/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, 0xAA, 0, 0);

// The encoding above reproduces the numbers linux-raw-sys does carry.
const _: () = assert!(uffdio_iowr::<uapi::uffdio_copy>(uapi::_UFFDIO_COPY) == nr::UFFDIO_COPY);
const _: () =
    assert!(uffdio_iowr::<uapi::uffdio_zeropage>(uapi::_UFFDIO_ZEROPAGE) == nr::UFFDIO_ZEROPAGE);
const _: () =
    assert!(uffdio_iowr::<uapi::uffdio_continue>(uapi::_UFFDIO_CONTINUE) == nr::UFFDIO_CONTINUE);
const _: () = assert!(std::mem::size_of::<uapi::uffd_msg>() == 32);

/// Feature bits (`UFFD_FEATURE_*`) used by guestmm.
pub(crate) mod feature {
    use super::uapi;
    /// Write-protect faults are reported (anonymous memory).
    pub(crate) const PAGEFAULT_FLAG_WP: u64 = uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
    /// `madvise(DONTNEED/REMOVE)` of a registered range is reported.
    pub(crate) const EVENT_REMOVE: u64 = uapi::UFFD_FEATURE_EVENT_REMOVE as u64;
    /// `munmap` of a registered range is reported.
    pub(crate) const EVENT_UNMAP: u64 = uapi::UFFD_FEATURE_EVENT_UNMAP as u64;
    /// Write-protect on shmem/hugetlbfs mappings (KSM's merged pages are
    /// private mappings of a memfd).
    pub(crate) const WP_HUGETLBFS_SHMEM: u64 = uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
    /// `UFFDIO_POISON` (Linux 6.6).
    pub(crate) const POISON: u64 = uapi::UFFD_FEATURE_POISON as u64;
    /// Write faults on protected pages are resolved by the kernel itself
    /// (the protection goes, the write goes on, no message): the dirty log.
    pub(crate) const WP_ASYNC: u64 = uapi::UFFD_FEATURE_WP_ASYNC as u64;
    /// `MINOR` faults on shmem (Linux 5.14): a page already in a memfd's
    /// page cache but not mapped in the faulting mapping is reported, and
    /// `UFFDIO_CONTINUE` maps it (tracked shared regions).
    pub(crate) const MINOR_SHMEM: u64 = uapi::UFFD_FEATURE_MINOR_SHMEM as u64;
}

/// Register modes.
pub(crate) mod mode {
    use super::uapi;
    /// Faults on missing pages.
    pub(crate) const MISSING: u64 = uapi::UFFDIO_REGISTER_MODE_MISSING as u64;
    /// Write faults on write-protected pages.
    pub(crate) const WP: u64 = uapi::UFFDIO_REGISTER_MODE_WP as u64;
    /// Faults on pages in the page cache but not mapped (shmem, with
    /// `feature::MINOR_SHMEM`).
    pub(crate) const MINOR: u64 = uapi::UFFDIO_REGISTER_MODE_MINOR as u64;
}

/// One message read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A thread faulted at `addr` (page aligned) and is blocked.
    PageFault {
        /// Faulting address, rounded down to the page.
        addr: usize,
        /// A write fault.
        write: bool,
        /// A write to a write-protected page (not a missing page).
        wp: bool,
        /// A minor fault: the page is in the shmem page cache, only this
        /// mapping lacks it (`UFFDIO_CONTINUE` resolves it).
        minor: bool,
    },
    /// `madvise(DONTNEED)` (or REMOVE) of `[start, end)`; the caller waits
    /// until this message has been read, then zaps.
    Remove {
        /// First byte.
        start: usize,
        /// First byte past the range.
        end: usize,
    },
    /// `munmap` of `[start, end)`; the range is no longer registered.
    Unmap {
        /// First byte.
        start: usize,
        /// First byte past the range.
        end: usize,
    },
    /// An event we did not ask for (fork, remap).
    Other(u8),
}

/// A userfaultfd descriptor after the API handshake.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
    /// Features granted by `UFFDIO_API`.
    features: u64,
    /// Opened with `UFFD_USER_MODE_ONLY`: kernel-mode faults are not ours.
    user_mode_only: bool,
}

/// What the kernel says about a resolve ioctl.
#[derive(Debug)]
pub(crate) enum Fill {
    /// Every byte was resolved.
    Done,
    /// `EEXIST`: a page of the range is already present; `done` bytes before
    /// it were resolved.
    Exists {
        /// Bytes resolved before the present page.
        done: usize,
    },
    /// `EAGAIN`: the address space is changing (a REMOVE/UNMAP event not yet
    /// read); `done` bytes were resolved. Drain events and retry.
    Again {
        /// Bytes resolved before the kernel gave up.
        done: usize,
    },
}

/// `ioctl(fd, req, arg)`.
///
/// # Safety
///
/// `T` must be exactly the argument struct the request number `req` encodes
/// (the kernel reads and writes `size_of` that struct through the pointer),
/// and the request must not write memory other than `*arg` and, for the
/// resolve ioctls, ranges registered with this descriptor.
unsafe fn ioctl<T>(fd: &OwnedFd, req: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is a valid descriptor we own; `arg` is a live, exclusively
    // borrowed struct of the type `req` encodes (the caller's contract), so
    // the kernel reads and writes only inside it.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `userfaultfd(2)` with `flags`.
fn syscall_fd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or
    // -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const USER_MODE_ONLY_FLAGS: i32 =
    libc::O_CLOEXEC | libc::O_NONBLOCK | uapi::UFFD_USER_MODE_ONLY as i32;

/// A raw descriptor and whether it is user-mode-only: the full syscall,
/// else `/dev/userfaultfd`, else the syscall with `UFFD_USER_MODE_ONLY`
/// (at once when `user_mode_only` is asked for).
fn open_raw(user_mode_only: bool) -> io::Result<(OwnedFd, bool)> {
    if user_mode_only {
        return syscall_fd(USER_MODE_ONLY_FLAGS).map(|fd| (fd, true));
    }
    match open_full() {
        Ok(fd) => Ok((fd, false)),
        // An error here (a kernel before 5.11, a seccomp filter) says less
        // than the first refusal: report that one.
        Err(full) => syscall_fd(USER_MODE_ONLY_FLAGS)
            .map(|fd| (fd, true))
            .map_err(|_| full),
    }
}

/// A descriptor that also sees kernel-mode faults (KVM's faults count).
fn open_full() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let sys_err = match syscall_fd(flags) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(f) => OwnedFd::from(f),
        Err(_) => return Err(sys_err),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and
    // returns a new descriptor; `dev` is a valid open /dev/userfaultfd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut a = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: a uffdio_api with UFFDIO_API, the pair its number encodes.
    unsafe { ioctl(fd, nr::UFFDIO_API, &mut a) }?;
    Ok(a.features)
}

fn range(start: usize, len: usize) -> uapi::uffdio_range {
    uapi::uffdio_range {
        start: start as u64,
        len: len as u64,
    }
}

impl Uffd {
    /// Opens a descriptor with the wanted features that the kernel offers;
    /// `user_mode_only` asks for `UFFD_USER_MODE_ONLY` even where a full
    /// descriptor is allowed.
    pub(crate) fn open(wanted: u64, user_mode_only: bool) -> io::Result<Uffd> {
        // The handshake can be done only once per descriptor, so ask a
        // throwaway one what the kernel offers.
        let (probe, _) = open_raw(user_mode_only)?;
        let offered = api(&probe, 0)?;
        let (fd, user_mode_only) = open_raw(user_mode_only)?;
        let features = api(&fd, wanted & offered)?;
        Ok(Uffd {
            fd,
            features,
            user_mode_only,
        })
    }

    /// Opened with `UFFD_USER_MODE_ONLY` (no privilege for more): faults
    /// the kernel takes on the process's behalf (KVM, `O_DIRECT`) fail with
    /// `EFAULT` on registered ranges instead of reaching the handler.
    pub(crate) fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// Does the descriptor have all of `f`?
    pub(crate) fn has(&self, f: u64) -> bool {
        self.features & f == f
    }

    /// The raw descriptor (for `poll`).
    pub(crate) fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Registers `r` in `mode`; returns the ioctl bitmask the kernel allows
    /// on it.
    pub(crate) fn register(&self, r: HostRange, mode: u64) -> io::Result<u64> {
        let mut reg = uapi::uffdio_register {
            range: range(r.ptr() as usize, r.len()),
            mode,
            ioctls: 0,
        };
        // SAFETY: a uffdio_register with UFFDIO_REGISTER, the pair its number encodes.
        unsafe { ioctl(&self.fd, nr::UFFDIO_REGISTER, &mut reg) }?;
        Ok(reg.ioctls)
    }

    /// Unregisters `[start, start+len)`; threads blocked in it are woken and
    /// refault without us.
    pub(crate) fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = range(start, len);
        // SAFETY: a uffdio_range with UFFDIO_UNREGISTER, the pair its number encodes.
        unsafe { ioctl(&self.fd, nr::UFFDIO_UNREGISTER, &mut r) }
    }

    /// Wakes threads blocked on `[start, start+len)`.
    pub(crate) fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = range(start, len);
        // SAFETY: a uffdio_range with UFFDIO_WAKE, the pair its number encodes.
        unsafe { ioctl(&self.fd, nr::UFFDIO_WAKE, &mut r) }
    }

    fn fill_result(ret: io::Result<()>, done: i64, len: usize) -> io::Result<Fill> {
        match ret {
            Ok(()) => Ok(Fill::Done),
            Err(e) => {
                let done = usize::try_from(done).unwrap_or(0).min(len);
                match e.raw_os_error() {
                    Some(libc::EEXIST) => Ok(Fill::Exists { done }),
                    Some(libc::EAGAIN) => Ok(Fill::Again { done }),
                    _ => Err(e),
                }
            }
        }
    }

    /// `UFFDIO_COPY` of `len` bytes from `src` to the missing pages at `dst`,
    /// waking the threads blocked there when `wake`.
    ///
    /// `src` must be readable for `len` bytes (the kernel checks it and
    /// fails with `EFAULT` otherwise; it never writes through it).
    pub(crate) fn copy(
        &self,
        dst: usize,
        src: *const u8,
        len: usize,
        wake: bool,
    ) -> io::Result<Fill> {
        self.copy_mode(dst, src, len, wake, false)
    }

    /// [`Uffd::copy`], the new pages write-protected when `wp`
    /// (`UFFDIO_COPY_MODE_WP`: a dirty log restoring a page it must not
    /// report as written).
    pub(crate) fn copy_mode(
        &self,
        dst: usize,
        src: *const u8,
        len: usize,
        wake: bool,
        wp: bool,
    ) -> io::Result<Fill> {
        let mut mode = 0u64;
        if !wake {
            mode |= u64::from(uapi::UFFDIO_COPY_MODE_DONTWAKE);
        }
        if wp {
            mode |= u64::from(uapi::UFFDIO_COPY_MODE_WP);
        }
        let mut c = uapi::uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            copy: 0,
        };
        // SAFETY: a uffdio_copy with UFFDIO_COPY (writes only the registered dst range), the pair its number encodes.
        let ret = unsafe { ioctl(&self.fd, nr::UFFDIO_COPY, &mut c) };
        Self::fill_result(ret, c.copy, len)
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page at the missing pages of
    /// `[dst, dst+len)` and wakes the threads blocked there.
    pub(crate) fn zeropage(&self, dst: usize, len: usize) -> io::Result<Fill> {
        self.zeropage_mode(dst, len, true)
    }

    /// [`Uffd::zeropage`], waking the threads blocked there only when
    /// `wake`. In a shmem mapping the kernel allocates a zeroed page and
    /// adds it to the page cache instead of mapping the zero page
    /// (`shmem_mfill_atomic_pte`); `EEXIST` when the page cache already
    /// holds the page (mapped here or not: see [`Uffd::continue_`]).
    pub(crate) fn zeropage_mode(&self, dst: usize, len: usize, wake: bool) -> io::Result<Fill> {
        let mut z = uapi::uffdio_zeropage {
            range: range(dst, len),
            mode: if wake {
                0
            } else {
                u64::from(uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE)
            },
            zeropage: 0,
        };
        // SAFETY: a uffdio_zeropage with UFFDIO_ZEROPAGE (registered range only), the pair its number encodes.
        let ret = unsafe { ioctl(&self.fd, nr::UFFDIO_ZEROPAGE, &mut z) };
        Self::fill_result(ret, z.zeropage, len)
    }

    /// `UFFDIO_CONTINUE`: maps the pages of `[dst, dst+len)` that the
    /// shmem page cache already holds (a `MINOR` fault's page) and, when
    /// `wake`, wakes the threads blocked there. `EEXIST` at a page already
    /// mapped here; `EFAULT` (an error) at a page the page cache lacks.
    pub(crate) fn continue_(&self, dst: usize, len: usize, wake: bool) -> io::Result<Fill> {
        let mut c = uapi::uffdio_continue {
            range: range(dst, len),
            mode: if wake {
                0
            } else {
                UFFDIO_CONTINUE_MODE_DONTWAKE
            },
            mapped: 0,
        };
        // SAFETY: a uffdio_continue with UFFDIO_CONTINUE (maps page-cache
        // pages into the registered range only), the pair its number encodes.
        let ret = unsafe { ioctl(&self.fd, nr::UFFDIO_CONTINUE, &mut c) };
        Self::fill_result(ret, c.mapped, len)
    }

    /// Fills `[dst, dst+len)` of a shmem mapping (a tracked shared region)
    /// so that every page is in the page cache **and** mapped here:
    /// `UFFDIO_ZEROPAGE` allocates zeroed pages for the holes; a page it
    /// finds in the page cache (`EEXIST`: mapped here, or left unmapped by
    /// an earlier fill) is mapped with `UFFDIO_CONTINUE` (`EEXIST` there:
    /// it was mapped already). Never returns [`Fill::Exists`]. Wakes the
    /// threads blocked in the range when `wake`. `filled` is set to the
    /// bytes from `dst` filled, also when an error ends the fill.
    pub(crate) fn fill_shmem(
        &self,
        dst: usize,
        len: usize,
        wake: bool,
        filled: &mut usize,
    ) -> io::Result<Fill> {
        let page = crate::sys::PAGE_SIZE;
        let off = filled;
        *off = 0;
        while *off < len {
            match self.zeropage_mode(dst + *off, len - *off, wake)? {
                Fill::Done => {
                    *off = len;
                    return Ok(Fill::Done);
                }
                // A fill that stops short after some pages says EAGAIN
                // (`mfill_atomic` returns what it did; the ioctl turns a
                // short count into EAGAIN): go on from there, and the
                // next call names the reason (EEXIST, or EAGAIN with
                // nothing done: an event is pending).
                Fill::Again { done } if done > 0 => *off += done,
                Fill::Again { .. } => return Ok(Fill::Again { done: *off }),
                // Nothing done: the first page is in the page cache.
                Fill::Exists { .. } => match self.continue_(dst + *off, page, wake)? {
                    Fill::Done | Fill::Exists { .. } => *off += page,
                    Fill::Again { .. } => return Ok(Fill::Again { done: *off }),
                },
            }
        }
        Ok(Fill::Done)
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`wp`) or unprotect `[start, start+len)`.
    /// Unprotecting wakes the writers blocked on the range.
    pub(crate) fn writeprotect(&self, start: usize, len: usize, wp: bool) -> io::Result<()> {
        let mut w = uapi::uffdio_writeprotect {
            range: range(start, len),
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: a uffdio_writeprotect with UFFDIO_WRITEPROTECT, the pair its number encodes.
        unsafe { ioctl(&self.fd, nr::UFFDIO_WRITEPROTECT, &mut w) }
    }

    /// `UFFDIO_POISON`: installs poison markers at the missing pages of
    /// `[start, start+len)` and wakes the threads blocked there; they (and
    /// every later access until a zap) get SIGBUS.
    pub(crate) fn poison(&self, start: usize, len: usize) -> io::Result<Fill> {
        let mut p = uapi::uffdio_poison {
            range: range(start, len),
            mode: 0,
            updated: 0,
        };
        // SAFETY: a uffdio_poison with UFFDIO_POISON (registered range only), the pair its number encodes.
        let ret = unsafe { ioctl(&self.fd, UFFDIO_POISON, &mut p) };
        Self::fill_result(ret, p.updated, len)
    }

    /// Reads every queued message (non-blocking) into `out`; returns how
    /// many were read (0 when none is queued).
    pub(crate) fn read_events(&self, out: &mut Vec<Event>) -> io::Result<usize> {
        const BATCH: usize = 64;
        let mut buf = [uapi::uffd_msg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: uapi::uffd_msg__bindgen_ty_1 {
                reserved: uapi::uffd_msg__bindgen_ty_1__bindgen_ty_5 {
                    reserved1: 0,
                    reserved2: 0,
                    reserved3: 0,
                },
            },
        }; BATCH];
        let mut total = 0;
        loop {
            // SAFETY: `buf` is a live array of BATCH uffd_msg structs and we
            // pass its exact byte size; the kernel writes whole messages.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(&buf),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(total),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            let count = n as usize / std::mem::size_of::<uapi::uffd_msg>();
            for m in &buf[..count] {
                out.push(decode(m));
            }
            total += count;
            if count < BATCH {
                return Ok(total);
            }
        }
    }
}

fn decode(m: &uapi::uffd_msg) -> Event {
    match u32::from(m.event) {
        uapi::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: the kernel filled the `pagefault` member for this event
            // type; every bit pattern is a valid pair of u64s.
            let pf = unsafe { m.arg.pagefault };
            Event::PageFault {
                addr: (pf.address as usize) & !(crate::sys::PAGE_SIZE - 1),
                write: pf.flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                wp: pf.flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WP) != 0,
                minor: pf.flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_MINOR) != 0,
            }
        }
        uapi::UFFD_EVENT_REMOVE => {
            // SAFETY: the kernel filled the `remove` member for this type.
            let r = unsafe { m.arg.remove };
            Event::Remove {
                start: r.start as usize,
                end: r.end as usize,
            }
        }
        uapi::UFFD_EVENT_UNMAP => {
            // SAFETY: UNMAP messages use the `remove` layout (start, end).
            let r = unsafe { m.arg.remove };
            Event::Unmap {
                start: r.start as usize,
                end: r.end as usize,
            }
        }
        other => Event::Other(other as u8),
    }
}

/// A non-blocking eventfd used to wake the handler's `poll`.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall returning a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the descriptor readable.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64, as eventfd requires. A
        // failure (counter saturated) still leaves it readable.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears the readable state.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; non-blocking.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (-1 = no
/// limit); returns which are readable.
pub(crate) fn poll_readable(fds: &[i32], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a live array of `p.len()` pollfd structs.
    let ret = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_open_and_features() {
        let u = Uffd::open(feature::EVENT_REMOVE | feature::POISON, false).unwrap();
        assert!(u.has(feature::EVENT_REMOVE));
        assert!(u.raw() >= 0);
    }

    /// `fill_shmem` maps every page of a shared memfd range: zeroed pages
    /// for the holes (UFFDIO_ZEROPAGE), and a page already in the memfd
    /// (written through the fd, not mapped) is mapped as it is
    /// (UFFDIO_CONTINUE), never zeroed: the fill of a tracked shared region
    /// must not lose what another writer put in the memfd.
    #[test]
    fn test_fill_shmem_keeps_memfd_pages() {
        use crate::sys::{self, PAGE_SIZE};
        let u = Uffd::open(feature::MINOR_SHMEM, false).unwrap();
        if !u.has(feature::MINOR_SHMEM) {
            eprintln!("skipped: no UFFD_FEATURE_MINOR_SHMEM");
            return;
        }
        let len = 8 * PAGE_SIZE;
        let (p, fd) = sys::map_memfd("fill_shmem", len, PAGE_SIZE, (true, true, false)).unwrap();
        let data = vec![7u8; PAGE_SIZE];
        // SAFETY: pwrite reads `data.len()` bytes of a live Vec.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                3 * PAGE_SIZE as i64,
            )
        };
        assert_eq!(n, PAGE_SIZE as isize);
        // SAFETY: in bounds of our live mapping of `len` bytes.
        let r = unsafe { HostRange::new(p, len) };
        u.register(r, mode::MISSING | mode::MINOR).unwrap();
        let mut filled = 0;
        let res = u.fill_shmem(p.as_ptr() as usize, len, true, &mut filled);
        assert!(matches!(res, Ok(Fill::Done)), "{res:?}");
        assert_eq!(filled, len);
        // Every page is mapped here (pagemap) ...
        let mut pm = vec![0u64; 8];
        sys::pagemap(r, &mut pm).unwrap();
        assert!(pm.iter().all(|e| e & sys::pagemap::PRESENT != 0), "{pm:x?}");
        // ... and the memfd holds 7s at page 3, zeros elsewhere.
        let mut back = vec![0xffu8; len];
        sys::read_from(&fd, &mut back, 0).unwrap();
        for (i, page) in back.chunks(PAGE_SIZE).enumerate() {
            let want = if i == 3 { 7 } else { 0 };
            assert!(page.iter().all(|b| *b == want), "page {i}");
        }
        // A second fill finds everything mapped: done, nothing changed.
        let res = u.fill_shmem(p.as_ptr() as usize, len, true, &mut filled);
        assert!(matches!(res, Ok(Fill::Done)), "{res:?}");
        u.unregister(p.as_ptr() as usize, len).unwrap();
        // SAFETY: our own mapping, no reference into it.
        unsafe { sys::unmap(p, len) }.unwrap();
    }

    #[test]
    fn test_ioctl_numbers() {
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
        assert_eq!(UFFDIO_POISON, 0xC020_AA08);
    }
}
