//! Containment of a reaped guest's `SIGBUS`: one guest's death never kills
//! the process its neighbours live in.
//!
//! After an OOM reap, a touch of the victim's *tracked* RAM through its
//! host pointer (a worker the kill hook did not stop in time, a device
//! thread) is answered with `UFFDIO_POISON` rather than zeros, and the
//! kernel sends `SIGBUS` to the thread. The kernel's victim is one process;
//! ours shares the host process with every other guest, and the default
//! action of `SIGBUS` kills them all.
//!
//! [`install`] (opt-in, once per process, by the embedder) puts a
//! `SIGBUS` handler in place that chains to the one it replaces (wasmtime's
//! trap handler, a sanitizer's). On a fault whose address lies in a range
//! the userfaultfd handler poisoned (registered here, lock-free, right
//! before it poisons, and removed before the range is unmapped), it
//! confines the fault to the faulting thread: it calls the embedder's
//! callback with the address if one was given (a vCPU loop can note that
//! its thread is gone), counts it ([`contained`]), and parks the thread for
//! good (`pause(2)` in a loop). Any other fault goes to the
//! previous handler untouched (or, if that was the default action, the
//! default action is restored and the fault repeats into it).
//!
//! # Async-signal safety
//!
//! The handler only loads and adds atomics (the range table, the counter,
//! the callback and the saved action are written before [`install`]
//! publishes them or with atomic stores), calls the embedder's callback,
//! and calls `pause(2)` / `sigaction(2)`, both async-signal-safe. The
//! callback runs in signal context: it must be async-signal-safe too (an
//! atomic store, a `write(2)` to an eventfd or pipe), and must not
//! allocate, lock or unwind.
//!
//! # What a parked thread keeps
//!
//! Whatever it held: its stack, and its `MmUser` if it had one (the reaped
//! address space's struct then stays until the process ends; its memory is
//! already gone). Threads that fault while holding guestmm's locks do not
//! exist: the access API checks `UNSTABLE` under its locks and never takes
//! a poisoned fault.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Poisoned host ranges at once (a tracked range per reaped guest; a full
/// table leaves a range uncontained and logs it).
const SLOTS: usize = 256;

struct Slot {
    /// First host byte; 0 = free, 1 = being filled.
    start: AtomicUsize,
    end: AtomicUsize,
}

static RANGES: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
    }
}; SLOTS];
static CONTAINED: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static CALLBACK: OnceLock<Option<fn(usize)>> = OnceLock::new();
/// The `SIGBUS` action replaced by [`install`] (leaked, never freed).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// Faults confined so far by the handler.
pub fn contained() -> u64 {
    CONTAINED.load(Ordering::SeqCst)
}

/// Is the handler installed?
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Installs the containment handler for `SIGBUS` (once per process; a
/// second call is `InvalidArgument`). `callback`, if given, runs in the
/// faulting thread, in signal context, with the faulting address, before
/// the thread is parked: it must be async-signal-safe (see the module
/// docs).
pub fn install(callback: Option<fn(usize)>) -> Result<()> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Err(Error::InvalidArgument {
            what: "the SIGBUS containment handler is already installed",
        });
    }
    let _ = CALLBACK.set(callback);
    // SAFETY: an all-zero sigaction is a valid value of the C struct
    // (empty mask, no flags, SIG_DFL).
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = handler as *const () as libc::sighandler_t;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    let old = Box::into_raw(Box::new(
        // SAFETY: as above.
        unsafe { std::mem::zeroed::<libc::sigaction>() },
    ));
    // Published before the handler can run: a SIGBUS between sigaction and
    // this store would find no previous action and restore the default.
    PREVIOUS.store(old, Ordering::Release);
    // SAFETY: `new` is a valid action whose handler has the SA_SIGINFO
    // signature; `old` points to a live sigaction the kernel fills.
    if unsafe { libc::sigaction(libc::SIGBUS, &new, old) } != 0 {
        let e = std::io::Error::last_os_error();
        INSTALLED.store(false, Ordering::Release);
        return Err(Error::Host {
            op: "sigaction(SIGBUS)",
            source: e,
        });
    }
    Ok(())
}

/// Registers `[start, end)` as poisoned (the userfaultfd handler, before it
/// poisons a fault there). Idempotent for the same start.
pub(crate) fn register(start: usize, end: usize) {
    if !is_installed() || start < 2 {
        return;
    }
    if RANGES
        .iter()
        .any(|s| s.start.load(Ordering::Acquire) == start)
    {
        return;
    }
    for s in &RANGES {
        if s.start
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.end.store(end, Ordering::Release);
            // Release: a handler that sees `start` sees `end`.
            s.start.store(start, Ordering::Release);
            return;
        }
    }
    tracing::warn!(target: "mm_core::contain", start, end, "containment table full: a SIGBUS in this range will not be contained");
}

/// Forgets every registered range overlapping `[start, end)` (before it is
/// unmapped: a later mapping there is not a reaped guest's).
pub(crate) fn unregister_overlapping(start: usize, end: usize) {
    for s in &RANGES {
        let st = s.start.load(Ordering::Acquire);
        if st > 1 && st < end && s.end.load(Ordering::Acquire) > start {
            s.end.store(0, Ordering::Release);
            s.start.store(0, Ordering::Release);
        }
    }
}

/// Is `addr` in a registered range? Atomic loads only (signal context).
fn poisoned(addr: usize) -> bool {
    RANGES.iter().any(|s| {
        let st = s.start.load(Ordering::Acquire);
        st > 1 && addr >= st && addr < s.end.load(Ordering::Acquire)
    })
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler;
    // si_addr is the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    if poisoned(addr) {
        if let Some(Some(cb)) = CALLBACK.get() {
            cb(addr);
        }
        // Counted after the callback: whoever sees the count sees what the
        // callback did.
        CONTAINED.fetch_add(1, Ordering::SeqCst);
        loop {
            // SAFETY: pause(2) takes no argument; async-signal-safe.
            unsafe { libc::pause() };
        }
    }
    chain(sig, info, ctx);
}

/// Hands a fault that is not ours to the action `install` replaced.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.load(Ordering::Acquire);
    // SAFETY: `prev` is null or the leaked sigaction filled by `install`
    // before the handler was published; never freed.
    let Some(prev) = (unsafe { prev.as_ref() }) else {
        restore_default(sig);
        return;
    };
    match prev.sa_sigaction {
        libc::SIG_DFL | libc::SIG_IGN => restore_default(sig),
        f if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous action was installed with SA_SIGINFO, so
            // `f` is a handler of this signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(f) };
            f(sig, info, ctx);
        }
        f => {
            // SAFETY: without SA_SIGINFO the previous handler takes the
            // signal number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(f) };
            f(sig);
        }
    }
}

/// The default action back: returning re-runs the faulting instruction,
/// which faults again into it (the process ends as it would have without
/// us). A synchronous SIGBUS cannot be ignored.
fn restore_default(sig: libc::c_int) {
    // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask; the
    // call only reads it.
    unsafe {
        let dfl: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
    }
}
