//! Linear memories on guestmm mappings: [`GuestMemoryCreator`] (wasmtime's
//! `MemoryCreator`) and the `LinearMemory` it returns.
//!
//! One linear memory is one guestmm mapping of its guest (one contiguous
//! host range, tracked by the guest's userfaultfd):
//!
//! ```text
//!  base                     base+size            base+reserved    +guard
//!  |  read-write (opened)   |  PROT_NONE (not yet grown)  |  PROT_NONE guard |
//!  '------ byte_size -------'                             '-- never opened --'
//!  '------------------ byte_capacity = reserved ----------'
//! ```
//!
//! The invariant is: `[base, base + round_up(size))` is read-write and
//! everything after it, up to `base + reserved + guard`, is `PROT_NONE`;
//! the base never moves. `grow_to` opens pages in place with guestmm's
//! `mprotect`; pages are charged to the host budget when they are first
//! touched (JIT code, data-segment initialisation, host copies), in
//! mm-core's fault-around windows, which stop at the read-write part,
//! through the tracked region's userfaultfd, exactly once.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mm_core::{MapOptions, MmUser, Prot, PAGE_SIZE};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use crate::{sys, Error, GuestShared};

thread_local! {
    /// The guest whose instance this thread is instantiating (set by
    /// [`WasmGuest::enter`](crate::WasmGuest::enter)). wasmtime's
    /// `MemoryCreator` gets no store context, and instantiation is
    /// synchronous, so this is how a new memory finds its guest.
    static CURRENT: RefCell<Option<Arc<GuestShared>>> = const { RefCell::new(None) };
}

/// Runs `f` with `shared` as this thread's current guest (nested calls
/// restore the outer one).
pub(crate) fn with_current<R>(shared: &Arc<GuestShared>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<GuestShared>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CURRENT.with(|c| c.borrow_mut().replace(shared.clone()));
    let _restore = Restore(prev);
    f()
}

fn page_round_up(n: usize) -> Option<usize> {
    n.checked_add(PAGE_SIZE - 1).map(|x| x & !(PAGE_SIZE - 1))
}

/// wasmtime's `MemoryCreator` backed by guestmm: every linear memory is a
/// tracked mapping of the guest being instantiated
/// ([`WasmGuest::enter`](crate::WasmGuest::enter)). Installed by
/// [`configure`](crate::configure).
#[derive(Debug, Default)]
pub struct GuestMemoryCreator {
    _private: (),
}

impl GuestMemoryCreator {
    /// A creator (stateless: the guest comes from the instantiating thread).
    pub fn new() -> Self {
        Self::default()
    }

    fn create(
        &self,
        ty: &MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved: Option<usize>,
        guard: usize,
    ) -> Result<GuestLinearMemory, Error> {
        if ty.is_shared() {
            return Err(Error::SharedMemory);
        }
        let shared = CURRENT
            .with(|c| c.borrow().clone())
            .ok_or(Error::NoCurrentGuest)?;
        if shared.killed.load(Ordering::SeqCst) {
            return Err(Error::Killed {
                guest: shared.guest_id,
            });
        }
        // With a reservation (always, under `configure`: memory_may_move is
        // false) the memory grows in place up to it; without one it is
        // sized to its maximum (or minimum: it cannot grow).
        let reserved = match reserved {
            Some(r) => r,
            None => page_round_up(maximum.unwrap_or(minimum)).ok_or(Error::TooLarge {
                bytes: maximum.unwrap_or(minimum),
            })?,
        };
        let bad_layout = Error::BadLayout {
            minimum,
            reserved,
            guard,
        };
        if !reserved.is_multiple_of(PAGE_SIZE)
            || !guard.is_multiple_of(PAGE_SIZE)
            || minimum > reserved
        {
            return Err(bad_layout);
        }
        let total = reserved.checked_add(guard).ok_or(bad_layout)?;
        if total == 0 {
            return Err(Error::BadLayout {
                minimum,
                reserved,
                guard,
            });
        }
        let opened = page_round_up(minimum).ok_or(Error::TooLarge { bytes: minimum })?;
        let mm = shared.mm.clone();
        // Reservation + guard, all PROT_NONE, registered with the guest's
        // userfaultfd before anyone can touch it.
        let addr = mm.mmap_blocking(
            MapOptions::anon(total as u64)
                .prot(Prot::NONE)
                // mm-core's default fault-around (2 MiB windows, which
                // stop at the read-write VMA: the PROT_NONE part above
                // `size` is never populated).
                .tracked(true),
        )?;
        let base = match mm.find_vma_blocking(addr) {
            Ok(v) => v.host_ptr() as usize,
            Err(e) => {
                let _ = mm.munmap_blocking(addr, total as u64);
                return Err(e.into());
            }
        };
        let mut mem = GuestLinearMemory {
            mm,
            shared: shared.clone(),
            addr,
            base,
            total,
            reserved,
            size: minimum,
            opened: 0,
        };
        {
            // Registered for the kill hook before it is opened: a kill from
            // here on closes it again.
            let mut list = crate::lock(&shared.memories);
            list.push((base, total));
        }
        mem.open_to(opened)?;
        Ok(mem)
    }
}

// SAFETY: every memory returned is a fresh guestmm mapping of `reserved +
// guard` bytes whose first `minimum` bytes (page-rounded) are read-write and
// zero (a fresh anonymous mapping; tracked pages are served zeroed on first
// touch) and the rest `PROT_NONE`, page aligned, never moved
// (`byte_capacity` = the reservation) and unmapped only when wasmtime drops
// it. The guard after the reservation is never opened (grow_to refuses to
// go past `reserved`).
unsafe impl MemoryCreator for GuestMemoryCreator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        self.create(
            &ty,
            minimum,
            maximum,
            reserved_size_in_bytes,
            guard_size_in_bytes,
        )
        .map(|m| Box::new(m) as Box<dyn LinearMemory>)
        .map_err(|e| {
            tracing::warn!(target: "mm_wasmtime", error = %e, "new_memory failed");
            e.to_string()
        })
    }
}

/// One linear memory: a tracked guestmm mapping (see the module docs).
#[derive(Debug)]
pub(crate) struct GuestLinearMemory {
    /// Holds a user reference: the host mapping stays until this memory and
    /// the guest are both gone (never unmapped under wasmtime's pointer).
    mm: MmUser,
    shared: Arc<GuestShared>,
    /// Guest address of the mapping.
    addr: u64,
    /// Host address of the mapping (wasmtime's base pointer).
    base: usize,
    /// Reservation + guard.
    total: usize,
    /// The reservation: the capacity.
    reserved: usize,
    /// wasm-visible size in bytes.
    size: usize,
    /// Read-write prefix (page-rounded size).
    opened: usize,
}

impl GuestLinearMemory {
    /// Opens `[opened, new_opened)` read-write in place.
    fn open_to(&mut self, new_opened: usize) -> Result<(), Error> {
        if new_opened <= self.opened {
            return Ok(());
        }
        let start = self.opened;
        let len = new_opened - start;
        self.mm
            .mprotect_blocking(self.addr + start as u64, len as u64, Prot::READ_WRITE)?;
        // The kill hook may have run between our mm's KILLED check and the
        // host mprotect above (it sets `killed` first, then closes the
        // registered ranges): close what we just opened ourselves.
        //   kill hook                 | grow_to
        //   killed = true             |
        //   mprotect(NONE, all)       |
        //                             | mprotect(RW, new pages)  <- reopened
        //                             | killed? yes -> mprotect(NONE)
        if self.shared.killed.load(Ordering::SeqCst) {
            let _list = crate::lock(&self.shared.memories);
            let _ = sys::protect_none(self.base, self.total);
            return Err(Error::Killed {
                guest: self.shared.guest_id,
            });
        }
        self.opened = new_opened;
        Ok(())
    }

    fn grow(&mut self, new_size: usize) -> Result<(), Error> {
        if self.shared.killed.load(Ordering::SeqCst) {
            return Err(Error::Killed {
                guest: self.shared.guest_id,
            });
        }
        if new_size <= self.size {
            return Ok(());
        }
        if new_size > self.reserved {
            return Err(Error::Capacity {
                requested: new_size,
                capacity: self.reserved,
            });
        }
        let new_opened = page_round_up(new_size).ok_or(Error::TooLarge { bytes: new_size })?;
        let delta = new_opened.saturating_sub(self.opened) as u64;
        // The budget: growth the limiter approved (after running the
        // pressure path for it) goes through; any other growth (no limiter
        // in the store, `Memory::grow` from the host without one) needs the
        // room to be free now.
        let approved = self.shared.approved.swap(0, Ordering::SeqCst);
        if (approved as usize) < new_size {
            let b = self.mm.budget();
            let room = b.limit().saturating_sub(b.charged());
            if room < delta {
                return Err(Error::OverBudget {
                    requested: delta,
                    room,
                });
            }
        }
        self.open_to(new_opened)?;
        self.size = new_size;
        Ok(())
    }
}

// SAFETY: see `GuestMemoryCreator`'s impl: page-aligned base that never
// moves, `byte_size` bytes accessible, the guard after the reservation
// always `PROT_NONE`.
unsafe impl LinearMemory for GuestLinearMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.reserved
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.grow(new_size).map_err(wasmtime::Error::new)
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
}

impl Drop for GuestLinearMemory {
    fn drop(&mut self) {
        {
            // Out of the kill hook's list before the range can be unmapped.
            let mut list = crate::lock(&self.shared.memories);
            list.retain(|&(b, _)| b != self.base);
        }
        // A killed guest refuses munmap (KILLED); its teardown unmaps the
        // range when the last user (the guest's, ours) is gone.
        if let Err(e) = self.mm.munmap_blocking(self.addr, self.total as u64) {
            tracing::debug!(target: "mm_wasmtime", error = %e, "linear memory left to teardown");
        }
    }
}
