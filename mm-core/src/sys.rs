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
    map_aligned(
        len,
        align,
        prot,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
    )
}

/// Creates a memfd of `len` bytes and maps it shared, aligned to `align`.
pub(crate) fn map_memfd(
    name: &str,
    len: usize,
    align: usize,
    prot: (bool, bool, bool),
) -> io::Result<(NonNull<u8>, OwnedFd)> {
    let fd = memfd_sized(name, len as u64)?;
    let base = map_aligned(len, align, prot, libc::MAP_SHARED, fd.as_raw_fd())?;
    Ok((base, fd))
}

/// `mmap` of `len` bytes with `flags | MAP_FIXED` (and `fd`, offset 0)
/// over a fresh reserve aligned to `align`; the reserve is released if
/// that fails.
fn map_aligned(
    len: usize,
    align: usize,
    prot: (bool, bool, bool),
    flags: libc::c_int,
    fd: libc::c_int,
) -> io::Result<NonNull<u8>> {
    let base = reserve_aligned(len, align)?;
    // SAFETY: MAP_FIXED over the reserve we own exclusively (created above,
    // not yet published), so nothing else can be replaced; `fd` is -1 or
    // a valid descriptor of the caller's.
    let raw = unsafe {
        libc::mmap(
            base.as_ptr().cast(),
            len,
            prot_bits(prot.0, prot.1, prot.2),
            flags | libc::MAP_FIXED,
            fd,
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

/// `mlock2(MLOCK_ONFAULT)`: locks `r` without populating it. A plain
/// `mlock` of a writable private mapping faults every page in for write,
/// which would copy-on-write a merged (KSM) page right away; this locks
/// the pages already mapped and each later fault's page.
pub(crate) fn lock_on_fault(r: HostRange) -> io::Result<()> {
    // SAFETY: a plain syscall on a range we own.
    check(unsafe { libc::mlock2(r.ptr().cast(), r.len(), libc::MLOCK_ONFAULT) })
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

/// Copies one or more guest pages at `src` into `dst` while a vCPU (or the
/// embedder's own code) may be writing them: KSM's checksum copy
/// (`ksm_snapshot`). The page locks exclude the access API and our zaps,
/// not direct writers, so the bytes may change under the copy.
///
/// Each 8-byte word is read with one volatile load: the compiler neither
/// assumes the memory is unchanging nor forms a Rust reference to it (a
/// `&[u8]` over memory someone else writes would be UB), and an aligned
/// word load cannot tear below 8 bytes on the hosts we support. The result
/// may mix old and new words; callers use it only as a hint (a checksum)
/// and compare the real contents again inside the merge's write-protect
/// window, where nobody can write them.
///
/// # Safety
///
/// `src` is page aligned, `dst.len()` is a multiple of the page size, and
/// `src..src+dst.len()` lies inside a live, readable host mapping we own
/// that stays mapped for the call (the caller holds the mmap lock, so no
/// munmap, and the page locks of API-populated pages). A page discarded
/// meanwhile by the embedder reads back as zeros or the stable page (a
/// read fault the kernel serves), never as unmapped memory.
///
/// On x86-64 the copy is one `rep movsb` in inline assembly: memory an
/// `asm!` block reads is opaque to the compiler (no Rust reference, no
/// assumption that it is unchanging), and the string copy runs at memcpy
/// speed, where the word-by-word volatile loop below cost 15 % of the
/// scanner's CPU on scattered data (issue 12).
pub(crate) unsafe fn copy_from_host_racy(src: *const u8, dst: &mut [u8]) {
    debug_assert!(src as usize % PAGE_SIZE == 0 && dst.len() % PAGE_SIZE == 0);
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        // SAFETY: `src..src+len` is readable for the call (caller's
        // guarantee) and `dst` is a writable buffer of `len` bytes we own
        // exclusively; `rep movsb` reads and writes only those bytes,
        // advancing rdi/rsi/rcx (declared clobbered) with the direction
        // flag clear (the ABI's state at any call); no stack is used.
        unsafe {
            std::arch::asm!(
                "rep movsb",
                inout("rcx") dst.len() => _,
                inout("rdi") dst.as_mut_ptr() => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    }
    // SAFETY: the caller's guarantee, passed on.
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    unsafe {
        copy_words_volatile(src, dst)
    };
}

/// The portable form of [`copy_from_host_racy`]: one volatile load per
/// aligned 8-byte word.
///
/// # Safety
///
/// As [`copy_from_host_racy`].
#[cfg(any(not(target_arch = "x86_64"), miri, test))]
unsafe fn copy_words_volatile(src: *const u8, dst: &mut [u8]) {
    let words = src.cast::<u64>();
    for (i, c) in dst.chunks_exact_mut(8).enumerate() {
        // SAFETY: `src + 8 * i` is 8-aligned (page-aligned base) and inside
        // the live mapping (caller's guarantee); a volatile load of a `u64`
        // (no invalid bit patterns) creates no reference to the racy memory.
        let w = unsafe { words.add(i).read_volatile() };
        c.copy_from_slice(&w.to_ne_bytes());
    }
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

// ---------------------------------------------------------------------------
// KSM merging (ksm/): the stable-page memfd, remapping guest pages onto
// it, and reading the kernel's view of a page (pagemap).

/// Creates a memfd of `len` bytes (sparse: no memory until written).
pub(crate) fn memfd_sized(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name.replace('\0', "_"))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the whole call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    Ok(fd)
}

/// `pwrite` of the host pages `src` into `fd` at byte offset `off`.
pub(crate) fn write_pages_to(fd: &OwnedFd, src: HostRange, off: u64) -> io::Result<()> {
    io_all(src.len(), off, |done, at| {
        // SAFETY: `src` lies inside a live mapping we own (HostRange
        // invariant) and is readable (the caller maps it readable); the
        // kernel only reads from it. `done < src.len()` keeps the pointer
        // and length in bounds.
        unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                src.ptr().add(done).cast(),
                src.len() - done,
                at,
            )
        }
    })
}

/// `pread` of `dst.len()` bytes of `fd` at byte offset `off` (a hole reads
/// as zeros).
pub(crate) fn read_from(fd: &OwnedFd, dst: &mut [u8], off: u64) -> io::Result<()> {
    io_all(dst.len(), off, |done, at| {
        let rest = &mut dst[done..];
        // SAFETY: `rest` is a live, writable Rust buffer of `rest.len()` bytes.
        unsafe { libc::pread(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), at) }
    })
}

/// The loop of a positioned read or write of `len` bytes at file offset
/// `off`: `op(done, at)` moves the bytes from `done` on at offset `at` and
/// returns the syscall's result; retried on `EINTR`, `EIO` if it moves
/// nothing, `EFBIG` past `off_t`.
/// The pages of `[off, off + len)` (page aligned) of a memfd that hold
/// data, as a bitmap (bit `i`: page `off / PAGE_SIZE + i`): `lseek`
/// `SEEK_DATA` / `SEEK_HOLE`, which for shmem count every page the file
/// has, in the page cache or swapped out, mapped anywhere or not; holes
/// were never written or were punched. Moves the descriptor's file
/// position (nothing of ours reads or writes through it).
pub(crate) fn data_pages(
    fd: std::os::fd::BorrowedFd<'_>,
    off: u64,
    len: u64,
) -> io::Result<Vec<u64>> {
    let page = PAGE_SIZE as u64;
    let pages = (len / page) as usize;
    let mut bitmap = vec![0u64; pages.div_ceil(64)];
    let end = off + len;
    let seek = |at: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let at =
            libc::off_t::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: plain syscall on a valid descriptor; no memory is passed.
        let r = unsafe { libc::lseek(fd.as_raw_fd(), at, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after `at` (SEEK_DATA).
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut at = off;
    while at < end {
        let Some(d) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if d >= end {
            break;
        }
        let h = seek(d, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        for p in (d - off) / page..(h - off).div_ceil(page) {
            bitmap[p as usize / 64] |= 1 << (p % 64);
        }
        at = h;
    }
    Ok(bitmap)
}

/// Copies `len` bytes of `src` at `src_off` to `dst` at `dst_off` through
/// a bounce buffer (`pread` + `pwrite`): file to file, never through a
/// mapping, so no page of ours faults (a user-mode-only userfaultfd would
/// refuse the kernel's fault on an unmapped shared page).
pub(crate) fn copy_file(
    src: std::os::fd::BorrowedFd<'_>,
    src_off: u64,
    dst: &OwnedFd,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    const BUF: usize = 1 << 20;
    let mut buf = vec![0u8; BUF.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        let chunk = &mut buf[..n];
        io_all(n, src_off + done, |d, at| {
            let rest = &mut chunk[d..];
            // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes.
            unsafe { libc::pread(src.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), at) }
        })?;
        let chunk = &buf[..n];
        io_all(n, dst_off + done, |d, at| {
            let rest = &chunk[d..];
            // SAFETY: `rest` is a live buffer of `rest.len()` bytes; the
            // kernel only reads it.
            unsafe { libc::pwrite(dst.as_raw_fd(), rest.as_ptr().cast(), rest.len(), at) }
        })?;
        done += n as u64;
    }
    Ok(())
}

fn io_all(len: usize, off: u64, mut op: impl FnMut(usize, libc::off_t) -> isize) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let at = libc::off_t::try_from(off + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let n = op(done, at);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        done += n as usize;
    }
    Ok(())
}

/// Maps `r.len()` bytes of `fd` at byte offset `off` over `r` with
/// `MAP_FIXED | MAP_PRIVATE`: the pages that backed `r` are freed by the
/// kernel, reads see the file's pages, and a write (by anyone) is
/// copy-on-write into a fresh private page. `ENOMEM` when the process is
/// at `vm.max_map_count`.
pub(crate) fn map_file_private_fixed(
    r: HostRange,
    fd: &OwnedFd,
    off: u64,
    prot: (bool, bool, bool),
) -> io::Result<()> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: `r` lies inside a live guest mapping we own (HostRange
    // invariant), so MAP_FIXED replaces only our own pages. No Rust
    // reference points into guest memory (it is accessed through raw
    // pointers only, under page locks the caller holds), and the caller
    // write-protected the range, so the contents do not change across the
    // replacement: the file pages hold the same bytes.
    let raw = unsafe {
        libc::mmap(
            r.ptr().cast(),
            r.len(),
            prot_bits(prot.0, prot.1, prot.2),
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd.as_raw_fd(),
            off,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    debug_assert_eq!(raw.cast::<u8>(), r.ptr());
    Ok(())
}

/// Maps fresh private anonymous memory over `r` (`MAP_FIXED`): every page
/// reads as zeros again. Used by zaps of merged pages, where `DONTNEED`
/// alone would expose the file page under a private copy.
pub(crate) fn map_anon_fixed(r: HostRange, prot: (bool, bool, bool)) -> io::Result<()> {
    // SAFETY: as in `map_file_private_fixed`: only our own guest pages are
    // replaced, and the caller holds the page locks of the whole range
    // (it is discarding their contents anyway).
    let raw = unsafe {
        libc::mmap(
            r.ptr().cast(),
            r.len(),
            prot_bits(prot.0, prot.1, prot.2),
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Compares host pages `r` with `expect` (same length).
///
/// # Safety
///
/// No one may write `r` during the call: the caller holds the page locks
/// of the range and has write-protected it (userfaultfd WP), so neither
/// the access API nor a direct writer can change it.
pub(crate) unsafe fn host_equals(r: HostRange, expect: &[u8]) -> bool {
    debug_assert_eq!(r.len(), expect.len());
    // SAFETY: `r` is a live readable mapping (HostRange invariant) and, by
    // the caller's guarantee, not written while this shared slice exists.
    let have = unsafe { std::slice::from_raw_parts(r.ptr().cast_const(), r.len()) };
    have == expect
}

/// A read-only shared view of `len` bytes of `fd` from `off` (the KSM
/// store's window, `ksm/mod.rs`), owned by memmap2 (unmapped on drop).
pub(crate) fn map_view(fd: &OwnedFd, off: u64, len: usize) -> io::Result<memmap2::Mmap> {
    // SAFETY: memmap2's contract is that the file is not changed while a
    // slice of the mapping is alive. No slice is ever formed: the view is
    // read only through raw pointers by `host_equals_view` (a C `memcmp`),
    // over stable pages that nobody writes or punches while they are live.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(off)
            .len(len)
            .map(fd.as_raw_fd())
    }
}

/// Do host pages `r` hold the same bytes as `r.len()` bytes of `view` from
/// byte `at`?
///
/// # Safety
///
/// `r` is not written during the call (the caller's page locks and
/// write-protect window), `at + r.len()` is inside `view`, and those bytes
/// of the file are pages that exist (live stable pages: a hole would be
/// filled with a new zero page by the read fault) and are not written or
/// punched during the call.
pub(crate) unsafe fn host_equals_view(r: HostRange, view: &memmap2::Mmap, at: usize) -> bool {
    debug_assert!(at + r.len() <= view.len());
    // SAFETY: both ranges are readable for `r.len()` bytes (HostRange
    // invariant; `view` is mapped and `at + len` inside it, the caller's
    // guarantee) and unchanged during the call; `memcmp` forms no Rust
    // reference to either.
    unsafe { libc::memcmp(r.ptr().cast(), view.as_ptr().add(at).cast(), r.len()) == 0 }
}

/// Is every byte of host pages `r` zero?
///
/// # Safety
///
/// As [`host_equals`].
pub(crate) unsafe fn host_is_zero(r: HostRange) -> bool {
    // SAFETY: as in `host_equals`.
    let have = unsafe { std::slice::from_raw_parts(r.ptr().cast_const(), r.len()) };
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; `align_to` only splits.
        unsafe { have.align_to::<u64>() }
    };
    pre.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && post.iter().all(|b| *b == 0)
}

/// `/proc/self/pagemap` bits (Documentation/admin-guide/mm/pagemap.rst).
pub(crate) mod pagemap {
    /// Bit 63: page present.
    pub(crate) const PRESENT: u64 = 1 << 63;
    /// Bit 61: page is a file page or shared anonymous.
    pub(crate) const FILE: u64 = 1 << 61;
    /// Bit 56: page exclusively mapped (never set for the shared zero
    /// page, which a read fault of untouched anonymous memory maps).
    pub(crate) const EXCLUSIVE: u64 = 1 << 56;
}

/// `/proc/self/pagemap`, opened once for the process.
fn pagemap_file() -> io::Result<&'static std::fs::File> {
    use std::sync::OnceLock;
    static FILE: OnceLock<std::fs::File> = OnceLock::new();
    Ok(match FILE.get() {
        Some(f) => f,
        None => {
            let f = std::fs::File::open("/proc/self/pagemap")?;
            FILE.get_or_init(|| f)
        }
    })
}

/// Reads the pagemap entries of `r` (one `u64` per page) into `out`.
pub(crate) fn pagemap(r: HostRange, out: &mut [u64]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = pagemap_file()?;
    let pages = r.len() / PAGE_SIZE;
    assert!(out.len() >= pages);
    let mut bytes = vec![0u8; pages * 8];
    f.read_exact_at(&mut bytes, (r.ptr() as u64 / PAGE_SIZE as u64) * 8)?;
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *o = u64::from_ne_bytes(c.try_into().expect("8-byte chunk"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Dirty log (mm/dirty.rs): `PAGEMAP_SCAN` over ranges registered with a
// `UFFD_FEATURE_WP_ASYNC` userfaultfd.

/// `_IOC(dir, type, nr, size)` of the generic (x86-64, arm64) encoding.
const fn ioc(dir: u32, ty: u32, num: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | num
}

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)` (linux-raw-sys
/// lacks the number; the encoding is checked against one it has).
const PAGEMAP_SCAN: u32 = ioc(
    3,
    b'f' as u32,
    16,
    std::mem::size_of::<linux_raw_sys::general::pm_scan_arg>(),
);
const _: () = assert!(
    ioc(
        3,
        linux_raw_sys::general::UFFDIO,
        linux_raw_sys::general::_UFFDIO_API,
        std::mem::size_of::<linux_raw_sys::general::uffdio_api>()
    ) == linux_raw_sys::ioctl::UFFDIO_API
);
const _: () = assert!(std::mem::size_of::<linux_raw_sys::general::pm_scan_arg>() == 96);

/// One run of pages a `PAGEMAP_SCAN` reported: `[start, end)` host addresses.
pub(crate) type PageRegion = linux_raw_sys::general::page_region;

/// One `PAGEMAP_SCAN` call over `[start, end)` for the pages written since
/// they were last write-protected (`PAGE_IS_WRITTEN`, of a range registered
/// with a `WP_ASYNC` userfaultfd: `PM_SCAN_CHECK_WPASYNC` fails with
/// `EPERM` otherwise); with `reprotect` the matching pages are protected
/// again in the same walk (`PM_SCAN_WP_MATCHING`, atomic per page against
/// writers). Fills `out`; returns how many regions it filled and where the
/// walk stopped (continue from there while it is below `end`).
pub(crate) fn pagemap_scan_written(
    start: usize,
    end: usize,
    reprotect: bool,
    out: &mut [PageRegion],
) -> io::Result<(usize, usize)> {
    use linux_raw_sys::general as uapi;
    let f = pagemap_file()?;
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
        category_mask: uapi::PAGE_IS_WRITTEN as u64,
        category_anyof_mask: 0,
        return_mask: uapi::PAGE_IS_WRITTEN as u64,
    };
    // SAFETY: a pm_scan_arg with PAGEMAP_SCAN, the pair its number encodes;
    // `vec` points to `out`, `vec_len` page_regions long, which the kernel
    // fills (plain integers, any bit pattern is valid); the scan reads page
    // tables and, with WP_MATCHING, changes page protections, never
    // contents.
    let n = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(f),
            PAGEMAP_SCAN as _,
            &mut arg as *mut uapi::pm_scan_arg,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n as usize, arg.walk_end as usize))
}

/// A read-only `MAP_PRIVATE` mapping of a whole file (a snapshot's data,
/// the source of lazy restores' `UFFDIO_COPY`). Unmapped on drop. Nothing
/// in this crate reads it from user mode: only the kernel does, on behalf
/// of `UFFDIO_COPY` (which fails with `EFAULT` past a truncated end where
/// a user-mode read would take `SIGBUS`).
#[derive(Debug)]
pub(crate) struct FileMapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned exclusively by this value, read-only, and
// only ever handed to the kernel as an address; no Rust reference points
// into it.
unsafe impl Send for FileMapping {}
// SAFETY: as for Send: shared use only passes addresses to syscalls.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    /// Maps the first `len` bytes of `file` (`len` > 0, page aligned).
    pub(crate) fn new(file: &std::fs::File, len: usize) -> io::Result<FileMapping> {
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), so no
        // existing memory is replaced; `file` is a valid open descriptor for
        // the duration of the call.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(FileMapping { base, len })
    }

    /// Length of the mapping.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Address of byte `off` (`off < len`), for the kernel to read from.
    pub(crate) fn at(&self, off: usize) -> *const u8 {
        assert!(off < self.len, "file mapping offset {off:#x} out of range");
        self.base.as_ptr().wrapping_add(off).cast_const()
    }

    /// `MADV_WILLNEED` of `[off, off + len)` (page aligned, in range):
    /// starts reading the file's pages into the page cache without waiting
    /// for them.
    pub(crate) fn will_need(&self, off: usize, len: usize) -> io::Result<()> {
        assert!(off % PAGE_SIZE == 0 && len % PAGE_SIZE == 0 && off + len <= self.len);
        // SAFETY: in bounds of our own live read-only mapping (asserted);
        // read-ahead changes no byte any Rust reference could see.
        check(unsafe {
            libc::madvise(self.base.as_ptr().add(off).cast(), len, libc::MADV_WILLNEED)
        })
    }

    /// `MADV_DONTNEED` of `[off, off + len)`: unmaps the file pages from
    /// this mapping (they stay in the page cache; the mapping is read-only
    /// and private and never written, so nothing is lost).
    pub(crate) fn unmap_pages(&self, off: usize, len: usize) -> io::Result<()> {
        assert!(off % PAGE_SIZE == 0 && len % PAGE_SIZE == 0 && off + len <= self.len);
        // SAFETY: as in `will_need`: our own read-only file mapping, never
        // written, so dropping its PTEs loses no data.
        check(unsafe {
            libc::madvise(self.base.as_ptr().add(off).cast(), len, libc::MADV_DONTNEED)
        })
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; it is dropped with the last source
        // that could hand its addresses to the kernel.
        let res = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        debug_assert!(res == 0 || std::thread::panicking(), "munmap failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Pages([u8; 2 * PAGE_SIZE]);

    #[test]
    fn racy_copy_equals_the_bytes() {
        let mut src = Box::new(Pages([0; 2 * PAGE_SIZE]));
        for (i, b) in src.0.iter_mut().enumerate() {
            *b = (i * 7 + i / 4096) as u8;
        }
        let (mut a, mut b) = (vec![0u8; 2 * PAGE_SIZE], vec![1u8; 2 * PAGE_SIZE]);
        // SAFETY: `src` is a page-aligned, readable buffer of two pages
        // nobody writes during the copies.
        unsafe {
            copy_from_host_racy(src.0.as_ptr(), &mut a);
            copy_words_volatile(src.0.as_ptr(), &mut b);
        }
        assert!(a == src.0 && b == src.0);
    }
}
