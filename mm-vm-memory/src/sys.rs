//! The kernel calls of the dirty bitmap: a userfaultfd in asynchronous
//! write-protect mode and `PAGEMAP_SCAN` on `/proc/self/pagemap`. Every
//! `unsafe` block that talks to the kernel for [`crate::dirty`] is here.
//!
//! Definitions come from `linux-raw-sys` (pre-generated, as in mm-core);
//! the `PAGEMAP_SCAN` ioctl number it lacks is computed with the kernel's
//! `_IOC` encoding, which a const assertion checks against a number it has.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as nr;

/// `_IOC(dir, type, nr, size)` of the generic (x86-64, arm64) encoding.
const fn ioc(dir: u32, ty: u32, num: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | num
}
const IOC_READ_WRITE: u32 = 3;

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u32 = ioc(
    IOC_READ_WRITE,
    b'f' as u32,
    16,
    std::mem::size_of::<uapi::pm_scan_arg>(),
);
// The encoding reproduces a number linux-raw-sys carries.
const _: () = assert!(
    ioc(
        IOC_READ_WRITE,
        uapi::UFFDIO,
        uapi::_UFFDIO_API,
        std::mem::size_of::<uapi::uffdio_api>()
    ) == nr::UFFDIO_API
);
const _: () = assert!(std::mem::size_of::<uapi::pm_scan_arg>() == 96);

/// `UFFD_FEATURE_WP_ASYNC`: write faults on protected pages are resolved by
/// the kernel (the bit is cleared, the write goes on) with no message.
pub(crate) const FEATURE_WP_ASYNC: u64 = uapi::UFFD_FEATURE_WP_ASYNC as u64;
/// `UFFD_FEATURE_WP_UNPOPULATED`: protecting also marks pages that are not
/// populated yet, so their first write counts as a write.
pub(crate) const FEATURE_WP_UNPOPULATED: u64 = uapi::UFFD_FEATURE_WP_UNPOPULATED as u64;
/// `PAGE_IS_WRITTEN`: written since last protected.
pub(crate) const PAGE_IS_WRITTEN: u64 = uapi::PAGE_IS_WRITTEN as u64;

/// An `ioctl` whose argument is `arg`.
///
/// # Safety
///
/// `req` must be an ioctl that reads and writes exactly one `T` (its
/// number encodes `size_of::<T>()`), and any pointers inside `arg` must
/// be valid for what the kernel does with them.
unsafe fn ioctl<T>(fd: i32, req: u32, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller's contract; `arg` is a valid exclusive reference.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes one integer argument and returns a new
    // descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A userfaultfd: a full one if allowed, else `UFFD_USER_MODE_ONLY` (the
/// asynchronous write-protect mode resolves faults in the kernel, so
/// kernel-mode writes, e.g. KVM's, are recorded either way).
fn open_uffd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    userfaultfd(flags)
        .or_else(|full| userfaultfd(flags | uapi::UFFD_USER_MODE_ONLY as i32).map_err(|_| full))
}

fn api(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut a = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: a uffdio_api with UFFDIO_API, the pair its number encodes.
    unsafe { ioctl(fd.as_raw_fd(), nr::UFFDIO_API, &mut a) }?;
    Ok(a.features)
}

/// A userfaultfd whose only job is asynchronous write-protect of one range.
#[derive(Debug)]
pub(crate) struct WpAsyncUffd {
    fd: OwnedFd,
    features: u64,
}

impl WpAsyncUffd {
    /// Opens a descriptor with `FEATURE_WP_ASYNC` (and
    /// `FEATURE_WP_UNPOPULATED` when offered). `Ok(None)` when the kernel
    /// does not offer `WP_ASYNC` (before Linux 6.7).
    pub(crate) fn open() -> io::Result<Option<WpAsyncUffd>> {
        // The handshake can be done once per descriptor: ask a throwaway
        // one what the kernel offers.
        let offered = api(&open_uffd()?, 0)?;
        if offered & FEATURE_WP_ASYNC == 0 {
            return Ok(None);
        }
        let fd = open_uffd()?;
        let features = api(&fd, offered & (FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED))?;
        Ok(Some(WpAsyncUffd { fd, features }))
    }

    /// Does the descriptor have all of `f`?
    pub(crate) fn has(&self, f: u64) -> bool {
        self.features & f == f
    }

    /// Registers `[start, start+len)` for write-protect (`EBUSY` when it is
    /// registered with another userfaultfd already).
    pub(crate) fn register_wp(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: uapi::UFFDIO_REGISTER_MODE_WP as u64,
            ioctls: 0,
        };
        // SAFETY: a uffdio_register with UFFDIO_REGISTER, the pair its number
        // encodes; registration changes no memory contents.
        unsafe { ioctl(self.fd.as_raw_fd(), nr::UFFDIO_REGISTER, &mut reg) }?;
        Ok(())
    }

    /// Write-protects `[start, start+len)` (a registered range). Contents
    /// do not change; later writes clear the protection page by page.
    pub(crate) fn protect(&self, start: usize, len: usize) -> io::Result<()> {
        let mut wp = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            // UFFDIO_WRITEPROTECT_MODE_WP (`(__u64)1 << 0`).
            mode: 1,
        };
        // SAFETY: a uffdio_writeprotect with UFFDIO_WRITEPROTECT, the pair
        // its number encodes; it changes page protections, never contents.
        unsafe { ioctl(self.fd.as_raw_fd(), nr::UFFDIO_WRITEPROTECT, &mut wp) }?;
        Ok(())
    }
}

/// One `page_region` of a `PAGEMAP_SCAN` answer.
pub(crate) type PageRegion = uapi::page_region;

/// `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub(crate) struct Pagemap(File);

impl Pagemap {
    pub(crate) fn open() -> io::Result<Pagemap> {
        File::open("/proc/self/pagemap").map(Pagemap)
    }

    /// One `PAGEMAP_SCAN` call over `[start, end)` for pages in category
    /// `PAGE_IS_WRITTEN` (pages of a range registered with a `WP_ASYNC`
    /// userfaultfd, checked by `PM_SCAN_CHECK_WPASYNC`); with `reprotect`,
    /// the matching pages are write-protected again in the same walk
    /// (`PM_SCAN_WP_MATCHING`, atomic per page against writers). Fills
    /// `out` and returns how many regions it filled and where the walk
    /// ended (continue from there when `out` filled up).
    pub(crate) fn scan_written(
        &self,
        start: usize,
        end: usize,
        reprotect: bool,
        out: &mut [PageRegion],
    ) -> io::Result<(usize, usize)> {
        let mut flags = uapi::PM_SCAN_CHECK_WPASYNC as u64;
        if reprotect {
            flags |= uapi::PM_SCAN_WP_MATCHING as u64;
        }
        let mut arg = uapi::pm_scan_arg {
            size: std::mem::size_of::<uapi::pm_scan_arg>() as u64,
            flags,
            start: start as u64,
            end: end as u64,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_WRITTEN,
        };
        // SAFETY: a pm_scan_arg with PAGEMAP_SCAN, the pair its number
        // encodes; `vec` points to `out`, `vec_len` page_regions long, which
        // the kernel fills (plain integers, any bit pattern is valid); the
        // scan reads page tables and, with WP_MATCHING, changes page
        // protections, never contents.
        let n = unsafe { ioctl(self.0.as_raw_fd(), PAGEMAP_SCAN, &mut arg) }?;
        Ok((n as usize, arg.walk_end as usize))
    }
}
