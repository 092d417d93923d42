//! The host syscall layer: every `unsafe` block that talks to the kernel
//! about memory lives here, behind small safe functions.
//!
//! Each function takes a [`HostRange`] (a page-aligned range inside a mapping
//! this crate created and still owns), so the only unchecked obligation left
//! is the one [`HostRange::new`] documents.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Host page size this crate works in (x86-64 and arm64 4K kernels).
pub const PAGE_SIZE: usize = 4096;
/// Size of a PMD-mapped transparent huge page.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// A page-aligned range of host virtual memory inside a live mapping owned by
/// this crate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostRange {
    ptr: NonNull<u8>,
    len: usize,
}

impl HostRange {
    /// # Safety
    ///
    /// * `ptr..ptr+len` lies inside one mapping created by [`map_anon`] or
    ///   [`map_memfd`] that is not unmapped while the range is in use;
    /// * `ptr` and `len` are multiples of [`PAGE_SIZE`].
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        debug_assert_eq!(ptr.as_ptr() as usize % PAGE_SIZE, 0);
        debug_assert_eq!(len % PAGE_SIZE, 0);
        HostRange { ptr, len }
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mmap` flags for a region, computed once.
fn prot_bits(read: bool, write: bool, exec: bool) -> libc::c_int {
    let mut p = libc::PROT_NONE;
    if read {
        p |= libc::PROT_READ;
    }
    if write {
        p |= libc::PROT_WRITE;
    }
    if exec {
        p |= libc::PROT_EXEC;
    }
    p
}

/// Maps `len + align` bytes of `PROT_NONE` reserve and returns an address in it
/// aligned to `align`, trimming the slack on both sides.
fn reserve_aligned(len: usize, align: usize) -> io::Result<NonNull<u8>> {
    let total = len
        .checked_add(align)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous PROT_NONE mapping at an address the kernel
    // picks; it cannot alias any Rust object.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = total - head - len;
    if head > 0 {
        // SAFETY: `[start, start+head)` is the unused head of the reserve we
        // just created; nothing references it.
        check(unsafe { libc::munmap(raw, head) })?;
    }
    if tail > 0 {
        // SAFETY: `[aligned+len, aligned+len+tail)` is the unused tail of the
        // same reserve.
        check(unsafe { libc::munmap((aligned + len) as *mut libc::c_void, tail) })?;
    }
    NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
}

/// Creates a private anonymous mapping of `len` bytes (a multiple of the page
/// size), aligned to `align` (a power of two ≥ the page size).
pub(crate) fn map_anon(
    len: usize,
    align: usize,
    prot: (bool, bool, bool),
) -> io::Result<NonNull<u8>> {
    let base = reserve_aligned(len, align)?;
    // SAFETY: MAP_FIXED over the reserve we own exclusively (created above,
    // not yet published), so nothing else can be replaced.
    let raw = unsafe {
        libc::mmap(
            base.as_ptr().cast(),
            len,
            prot_bits(prot.0, prot.1, prot.2),
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        let err = io::Error::last_os_error();
        // SAFETY: the reserve is still ours; release it on the error path.
        unsafe { libc::munmap(base.as_ptr().cast(), len) };
        return Err(err);
    }
    Ok(base)
}

/// Creates a memfd of `len` bytes and maps it shared, aligned to `align`.
pub(crate) fn map_memfd(
    name: &str,
    len: usize,
    align: usize,
    prot: (bool, bool, bool),
) -> io::Result<(NonNull<u8>, OwnedFd)> {
    let cname = std::ffi::CString::new(name.replace('\0', "_"))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the whole call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let off_len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), off_len) })?;
    let base = reserve_aligned(len, align)?;
    // SAFETY: MAP_FIXED over our own unpublished reserve; `fd` is valid.
    let raw = unsafe {
        libc::mmap(
            base.as_ptr().cast(),
            len,
            prot_bits(prot.0, prot.1, prot.2),
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        let err = io::Error::last_os_error();
        // SAFETY: the reserve is still ours; release it on the error path.
        unsafe { libc::munmap(base.as_ptr().cast(), len) };
        return Err(err);
    }
    Ok((base, fd))
}

/// Unmaps a whole mapping.
///
/// # Safety
///
/// `ptr..ptr+len` is a mapping this crate created, and no reference into it
/// outlives this call.
pub(crate) unsafe fn unmap(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    check(unsafe { libc::munmap(ptr.as_ptr().cast(), len) })
}

fn madvise(r: HostRange, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: `r` lies inside a live mapping we own (HostRange invariant);
    // madvise never touches Rust objects, and the advices used here only
    // drop or populate anonymous/shmem page contents, which no Rust reference
    // points into (guest memory is accessed through raw pointers only).
    check(unsafe { libc::madvise(r.ptr().cast(), r.len(), advice) })
}

/// `MADV_DONTNEED`: drop the pages; a later touch sees zeros (private) or the
/// file contents (shared).
pub(crate) fn discard(r: HostRange) -> io::Result<()> {
    madvise(r, libc::MADV_DONTNEED)
}

/// `MADV_POPULATE_WRITE`: allocate and map writable pages now (Linux 5.14+).
pub(crate) fn populate_write(r: HostRange) -> io::Result<()> {
    madvise(r, libc::MADV_POPULATE_WRITE)
}

/// `MADV_POPULATE_READ`: map pages readable now (the zero page for untouched
/// anonymous memory).
pub(crate) fn populate_read(r: HostRange) -> io::Result<()> {
    madvise(r, libc::MADV_POPULATE_READ)
}

/// `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE`.
pub(crate) fn set_hugepage(r: HostRange, on: bool) -> io::Result<()> {
    madvise(
        r,
        if on {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        },
    )
}

/// `mprotect` of a range.
pub(crate) fn protect(r: HostRange, prot: (bool, bool, bool)) -> io::Result<()> {
    // SAFETY: see `madvise`; changing protections of guest memory cannot
    // invalidate a Rust reference because none point into it.
    check(unsafe { libc::mprotect(r.ptr().cast(), r.len(), prot_bits(prot.0, prot.1, prot.2)) })
}

/// `mlock` / `munlock` of a range.
pub(crate) fn lock(r: HostRange, on: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a range we own.
    check(unsafe {
        if on {
            libc::mlock(r.ptr().cast(), r.len())
        } else {
            libc::munlock(r.ptr().cast(), r.len())
        }
    })
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: free the memfd pages of `[off, off+len)`.
pub(crate) fn punch_hole(fd: &OwnedFd, off: usize, len: usize) -> io::Result<()> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    })
}

/// Copies `dst.len()` bytes out of guest memory at `src`.
///
/// # Safety
///
/// `src..src+dst.len()` lies inside a live, readable mapping we own, and the
/// caller holds the page locks that keep it from being discarded meanwhile.
pub(crate) unsafe fn copy_from_host(src: *const u8, dst: &mut [u8]) {
    // SAFETY: guaranteed by the caller; guest memory never overlaps a Rust
    // buffer, and plain byte copies of racy memory are what every VMM does
    // (the guest may change bytes concurrently; we only promise bytes).
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) }
}

/// Copies `src` into guest memory at `dst`.
///
/// # Safety
///
/// As [`copy_from_host`], for a writable mapping.
pub(crate) unsafe fn copy_to_host(src: &[u8], dst: *mut u8) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
}

/// Fills guest memory at `dst` with `byte`.
///
/// # Safety
///
/// As [`copy_to_host`].
pub(crate) unsafe fn fill_host(dst: *mut u8, len: usize, byte: u8) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::write_bytes(dst, byte, len) }
}

/// Is the host page at `addr` (page aligned) resident? `mincore` only
/// writes the one-byte vector; an unmapped address gives `ENOMEM`.
pub(crate) fn page_resident(addr: usize) -> io::Result<bool> {
    let mut v = 0u8;
    // SAFETY: mincore reads no user memory at `addr` (it walks page tables
    // and fails with ENOMEM on an unmapped range); it writes one byte, the
    // live `v`, for the one page asked about.
    check(unsafe { libc::mincore(addr as *mut libc::c_void, PAGE_SIZE, &mut v) })?;
    Ok(v & 1 != 0)
}

/// `mincore` over a range: how many of its pages are resident in host RAM.
pub(crate) fn resident_pages(r: HostRange) -> io::Result<usize> {
    let pages = r.len() / PAGE_SIZE;
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range, as mincore requires;
    // the range is a live mapping we own.
    check(unsafe { libc::mincore(r.ptr().cast(), r.len(), vec.as_mut_ptr()) })?;
    Ok(vec.iter().filter(|b| **b & 1 != 0).count())
}
