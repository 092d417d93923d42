//! # mm-vm-memory: guestmm as a `vm-memory` backend
//!
//! The rust-vmm world (virtio devices, `linux-loader`, Firecracker, Cloud
//! Hypervisor) reaches guest memory through [`vm_memory`]. This crate lets
//! it reach guestmm memory, in two forms:
//!
//! 1. [`MmRegion`]: a `GuestMemoryRegion` over (a page-aligned slice of)
//!    one guestmm VMA. It holds an [`MmUser`], so the host mapping
//!    outlives every region handle and every `VolatileSlice` borrowed from
//!    it, and it checks the guest is alive before each access: after an
//!    OOM kill or reap, `Bytes` calls fail with a `vm-memory` error
//!    ([`GuestMemoryError::IOError`] wrapping [`Error::Killed`] /
//!    [`Error::Reaped`]) instead of reading zeros or taking `SIGBUS` in a
//!    device thread. A guest's regions form a [`GuestMemoryMm`] (a
//!    `GuestRegionCollection`), and with the `backend-atomic` feature a
//!    [`GuestMemoryMmAtomic`] for hot-plug.
//! 2. [`guest_region_mmap`] / [`guest_region_mmap_unchecked`]: a plain
//!    `vm-memory` [`GuestRegionMmap`](vm_memory::GuestRegionMmap) over a
//!    guestmm VMA, for VMMs that hard-code that type. Its `MmapRegion` is
//!    built with `with_raw_mmap_pointer` (not owned: vm-memory never
//!    unmaps it). No kill check is possible there (see [`mmap`]).
//!
//! Dirty tracking: [`DirtyBitmap`] is a `vm-memory` `Bitmap` with
//! `AtomicBitmap` semantics, fed both by the writes `vm-memory` makes
//! (`mark_dirty`) and by the kernel (`PAGEMAP_SCAN` over a userfaultfd
//! registered in asynchronous write-protect mode), so direct writes through
//! the host pointer (vCPUs through KVM, a device thread, JIT code) count
//! too. See [`dirty`] for the mechanism and its limits.
//!
//! # Kill, reap, and what the kill hook must do
//!
//! The liveness check runs before memory is touched; a kill that lands
//! between the check and the copy is not seen by that copy. On a
//! **tracked** region the copy then faults on a reaped page and the
//! thread gets `SIGBUS` (contained per thread by
//! [`mm_core::contain::install`]); on an **untracked** one it reads zeros
//! or writes into memory that is about to be discarded. So the guest's
//! [`Kill`](mm_core::Kill) hook must stop its vCPUs and its device threads
//! (and wait for them, or at least make them stop issuing new accesses)
//! before the reaper runs; the check here closes the window for every
//! access that *starts* after the kill.
//!
//! # Budget
//!
//! Writes through `vm-memory` are direct touches of the host mapping, not
//! guestmm's copy API: only a **tracked** region
//! (`MapOptions::tracked(true)`) charges them to the host budget exactly
//! (its userfaultfd sees every first touch). On an untracked region they
//! are invisible to the budget until a sampler (mincore) finds them. The
//! adapter works with both kinds.
//!
//! # Example
//!
//! ```
//! use mm_core::{Host, MapOptions};
//! use mm_vm_memory::{GuestMemoryMm, MmRegion};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
//!
//! let host = Host::with_budget(64 << 20);
//! let guest = host.create_guest("vm0");
//! let mm = guest.mm()?;
//! let low = mm.mmap_blocking(MapOptions::anon(1 << 20))?;
//! let high = mm.mmap_blocking(MapOptions::anon(1 << 20))?;
//! let mem: GuestMemoryMm = GuestMemoryMm::from_regions(vec![
//!     MmRegion::new(&mm, low, 1 << 20, GuestAddress(0))?,
//!     MmRegion::new(&mm, high, 1 << 20, GuestAddress(1 << 20))?,
//! ])?;
//! // Across the boundary between the two guestmm VMAs.
//! mem.write_slice(b"hello", GuestAddress((1 << 20) - 2))?;
//! let mut buf = [0u8; 5];
//! mem.read_slice(&mut buf, GuestAddress((1 << 20) - 2))?;
//! assert_eq!(&buf, b"hello");
//! assert_eq!(mem.num_regions(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod dirty;
pub mod mmap;
mod region;
mod sys;

pub use dirty::DirtyBitmap;
pub use mmap::{guest_region_mmap, guest_region_mmap_unchecked, Leased, MappingLease};
#[cfg(feature = "backend-atomic")]
pub use region::GuestMemoryMmAtomic;
pub use region::{GuestMemoryMm, MmRegion};

use mm_core::MmUser;
use vm_memory::GuestMemoryError;

/// What can go wrong building or using the adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// guestmm refused (no VMA at the address, the mm exited, ...).
    #[error("guestmm: {0}")]
    Mm(#[from] mm_core::Error),
    /// A region of zero bytes.
    #[error("empty region at guestmm address {addr:#x}")]
    ZeroLength {
        /// The guestmm address.
        addr: u64,
    },
    /// The guestmm address or the length is not page-aligned.
    #[error("guestmm range {addr:#x}+{len:#x} is not page-aligned")]
    Unaligned {
        /// The guestmm address.
        addr: u64,
        /// The length.
        len: u64,
    },
    /// `addr + len` overflows (guestmm side) or `guest_base + len` does
    /// (guest-physical side).
    #[error("range {addr:#x}+{len:#x} overflows")]
    Overflow {
        /// The start that overflows.
        addr: u64,
        /// The length.
        len: u64,
    },
    /// The range is not inside one VMA (a region is one host mapping).
    #[error(
        "guestmm range {addr:#x}+{len:#x} is not inside one VMA ({vma_start:#x}..{vma_end:#x})"
    )]
    NotOneVma {
        /// The guestmm address.
        addr: u64,
        /// The length.
        len: u64,
        /// Start of the VMA holding `addr`.
        vma_start: u64,
        /// End of that VMA.
        vma_end: u64,
    },
    /// The VMA is not mapped read-write.
    #[error("guestmm VMA at {addr:#x} is not mapped read-write")]
    NotReadWrite {
        /// The guestmm address.
        addr: u64,
    },
    /// The guest was killed: its memory must not be used any more.
    #[error("guest mm {mm_id} was killed")]
    Killed {
        /// The mm's id.
        mm_id: u64,
    },
    /// The guest was reaped (`UNSTABLE`): its memory is gone.
    #[error("guest mm {mm_id} was reaped")]
    Reaped {
        /// The mm's id.
        mm_id: u64,
    },
    /// vm-memory refused to build the region.
    #[error("vm-memory: {0}")]
    MmapRegion(#[from] vm_memory::mmap::MmapRegionError),
    /// Dirty tracking needs a userfaultfd registration of the range, but
    /// the range is already registered with another userfaultfd (a
    /// tracked region, or one write-protected for KSM merging).
    #[error("guestmm range {addr:#x}+{len:#x} is already registered with a userfaultfd (tracked or mergeable): no dirty tracking")]
    DirtyTrackingBusy {
        /// The guestmm address.
        addr: u64,
        /// The length.
        len: u64,
    },
    /// The kernel lacks something (asynchronous userfaultfd write-protect,
    /// `PAGEMAP_SCAN`: Linux 6.7).
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
    /// A host call failed.
    #[error("{op}: {source}")]
    Host {
        /// The call.
        op: &'static str,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn host(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Host { op, source }
    }

    /// This error as the `vm-memory` error a `Bytes` call returns:
    /// [`GuestMemoryError::IOError`] whose inner error is this one (get it
    /// back with [`Error::from_guest_memory`]).
    pub fn into_guest_memory(self) -> GuestMemoryError {
        GuestMemoryError::IOError(std::io::Error::other(self))
    }

    /// The adapter's error inside a `vm-memory` error, if it carries one
    /// (a `Bytes` call on a killed or reaped guest).
    pub fn from_guest_memory(e: &GuestMemoryError) -> Option<&Error> {
        match e {
            GuestMemoryError::IOError(io) => io.get_ref()?.downcast_ref::<Error>(),
            _ => None,
        }
    }
}

/// `Ok` while the guest may be used; [`Error::Reaped`] once it was reaped
/// (`UNSTABLE`), [`Error::Killed`] once it was killed. Two atomic loads.
pub fn check_alive(mm: &MmUser) -> Result<()> {
    use mm_core::MmFlag;
    // SeqCst loads (`MmFlags::test`): they pair with the kill's and the
    // reaper's SeqCst sets, so an access that starts after `Guest::kill`
    // returned sees KILLED.
    if mm.flags().test(MmFlag::UNSTABLE) {
        return Err(Error::Reaped { mm_id: mm.id() });
    }
    if mm.flags().test(MmFlag::KILLED) {
        return Err(Error::Killed { mm_id: mm.id() });
    }
    Ok(())
}
