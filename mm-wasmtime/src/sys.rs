//! The adapter's only raw-memory operation: making a killed instance's
//! linear memory inaccessible behind guestmm's back (see the kill protocol
//! in `lib.rs`). All of this crate's `unsafe` is here.

use std::io;

/// `mprotect(PROT_NONE)` on `[base, base + len)`.
///
/// Used by the kill hook, which must not take the guest's mmap lock (it runs
/// under the OOM killer's lock), so guestmm's own `mprotect` is not an
/// option there. The guestmm VMAs keep their recorded protection; the mm is
/// `KILLED`, so no guestmm call opens the range again (each checks the flag
/// first), and teardown unmaps it whatever its protection.
pub(crate) fn protect_none(base: usize, len: usize) -> io::Result<()> {
    // SAFETY: `[base, base + len)` is a linear memory's whole host mapping
    // (reservation + guard), which the caller proves is still mapped: it
    // holds the guest's range-list mutex, and a linear memory takes its range
    // out of that list (under the same mutex) before it unmaps. Changing the
    // protection cannot invalidate a Rust reference: none points into guest
    // memory (wasmtime hands JIT code the raw base pointer; a later JIT
    // access faults with SIGSEGV, which wasmtime's handler turns into a
    // trap). `mprotect` has no other precondition.
    let rc = unsafe { libc::mprotect(base as *mut libc::c_void, len, libc::PROT_NONE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
