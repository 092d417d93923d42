//! [`MmRegion`]: a `vm-memory` region over one guestmm VMA.
//!
//! ```text
//!  guestmm address space (Mm)            guest-physical (vm-memory)
//!  ┌────────────── one VMA ─────────────┐
//!  │      [addr, addr+len)              │ ──► [guest_base, guest_base+len)
//!  └────────────────────────────────────┘
//!         │ host_ptr (one contiguous host mapping)
//!         ▼
//!  host VA: the mapping the VMA slices; kept mapped by the Vma's Arc on the
//!  host region and kept populated (not torn down) by the MmUser.
//! ```
//!
//! The invariant is: while an [`MmRegion`] exists, `host..host+len` is
//! mapped in this process (the held [`MmUser`] keeps `exit_mmap` from
//! running, and the held [`Vma`] keeps the host mapping from being
//! unmapped even by a `munmap` of the range, which only zaps it and maps
//! it `PROT_NONE`).

use std::sync::Arc;

use mm_core::{MmUser, Prot, Vma, PAGE_SIZE};
use vm_memory::bitmap::{Bitmap, NewBitmap, BS};
use vm_memory::{
    GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::{check_alive, Error, Result};

/// A guest's memory as `vm-memory` sees it: sorted, non-overlapping
/// [`MmRegion`]s (`GuestRegionCollection::from_regions`).
pub type GuestMemoryMm<B = ()> = GuestRegionCollection<MmRegion<B>>;

/// [`GuestMemoryMm`] behind an `ArcSwap` for hot-plug
/// (`GuestMemoryAtomic::new(mem)`, then `lock()` + `replace()`).
#[cfg(feature = "backend-atomic")]
pub type GuestMemoryMmAtomic<B = ()> = vm_memory::GuestMemoryAtomic<GuestMemoryMm<B>>;

/// A `vm-memory` `GuestMemoryRegion` over a page-aligned range inside one
/// guestmm VMA.
///
/// Every access (`get_slice`, `get_host_address`, and so every `Bytes`
/// call) first checks that the guest was neither killed nor reaped and
/// fails with a [`GuestMemoryError::IOError`] carrying
/// [`Error::Killed`]/[`Error::Reaped`] otherwise (see the crate docs for
/// the window between that check and the copy).
pub struct MmRegion<B = ()> {
    /// Dropped first: a dirty bitmap's userfaultfd is closed (unregistering
    /// the range) while the mapping is certainly still there.
    bitmap: B,
    /// Keeps the host mapping (its `Arc<HostRegion>`) mapped. Dropped
    /// before `user`, so that when `user` is the last user, the teardown
    /// it runs finds no stray reference to its host regions.
    vma: Vma,
    /// Keeps the contents: no `exit_mmap` while a region exists.
    user: MmUser,
    /// The guestmm address of the first byte.
    addr: u64,
    /// Host address of the first byte.
    host: *mut u8,
    len: u64,
    guest_base: GuestAddress,
}

// SAFETY: `host` points into a host mapping kept alive by `vma` and `user`
// (both Send + Sync); the region only hands it out as raw addresses and
// `VolatileSlice`s, which vm-memory accesses with volatile copies from any
// thread, as its own `MmapRegion` (Send + Sync for the same reason).
unsafe impl<B: Send> Send for MmRegion<B> {}
// SAFETY: as for Send: shared access only creates volatile views.
unsafe impl<B: Sync> Sync for MmRegion<B> {}

impl<B> std::fmt::Debug for MmRegion<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmRegion")
            .field("mm_id", &self.user.id())
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &format_args!("{:#x}", self.len))
            .field("guest_base", &format_args!("{:#x}", self.guest_base.0))
            .field("host", &self.host)
            .finish()
    }
}

/// The VMA holding `[addr, addr+len)`, after checking the range is
/// page-aligned, non-empty, inside that one VMA and mapped read-write;
/// also checks that `guest_base + len` does not overflow.
pub(crate) fn find_range(
    user: &MmUser,
    addr: u64,
    len: u64,
    guest_base: GuestAddress,
) -> Result<(Vma, *mut u8)> {
    let page = PAGE_SIZE as u64;
    if len == 0 {
        return Err(Error::ZeroLength { addr });
    }
    if addr % page != 0 || len % page != 0 {
        return Err(Error::Unaligned { addr, len });
    }
    let end = addr.checked_add(len).ok_or(Error::Overflow { addr, len })?;
    guest_base.0.checked_add(len).ok_or(Error::Overflow {
        addr: guest_base.0,
        len,
    })?;
    // A region length must fit `usize` (vm-memory slices are `usize`).
    usize::try_from(len).map_err(|_| Error::Overflow { addr, len })?;
    check_alive(user)?;
    let vma = user.find_vma_blocking(addr)?;
    if end > vma.end() {
        return Err(Error::NotOneVma {
            addr,
            len,
            vma_start: vma.start(),
            vma_end: vma.end(),
        });
    }
    if !vma.prot().contains(Prot::READ_WRITE) {
        return Err(Error::NotReadWrite { addr });
    }
    // In bounds: addr - start < vma.len(), and the VMA's host range is one
    // mapping of vma.len() bytes.
    let host = vma.host_ptr().wrapping_add((addr - vma.start()) as usize);
    Ok((vma, host))
}

impl<B: NewBitmap> MmRegion<B> {
    /// The region `[addr, addr+len)` of `user`'s address space (page-aligned,
    /// inside one read-write VMA), seen by the guest at `guest_base`, with
    /// a fresh bitmap (`B::with_len(len)`; `()` for none).
    pub fn new(user: &MmUser, addr: u64, len: u64, guest_base: GuestAddress) -> Result<Self> {
        Self::with_bitmap(user, addr, len, guest_base, B::with_len(len as usize))
    }
}

impl<B: Bitmap> MmRegion<B> {
    /// As [`MmRegion::new`] with the given bitmap (its offsets are relative
    /// to the region's start).
    pub fn with_bitmap(
        user: &MmUser,
        addr: u64,
        len: u64,
        guest_base: GuestAddress,
        bitmap: B,
    ) -> Result<Self> {
        let (vma, host) = find_range(user, addr, len, guest_base)?;
        Ok(MmRegion {
            bitmap,
            vma,
            user: user.clone(),
            addr,
            host,
            len,
            guest_base,
        })
    }
}

impl<B> MmRegion<B> {
    /// The guest's address space (a user reference).
    pub fn mm(&self) -> &MmUser {
        &self.user
    }

    /// The guestmm address of the region's first byte.
    pub fn mm_addr(&self) -> u64 {
        self.addr
    }

    /// Host address of the region's first byte (for a KVM memslot's
    /// `userspace_addr`). Valid while this region exists.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    /// Is the region backed by a tracked (userfaultfd) VMA? Then direct
    /// touches are charged to the host budget exactly.
    pub fn is_tracked(&self) -> bool {
        self.vma.flags().contains(mm_core::VmFlags::TRACKED)
    }

    /// The bitmap.
    pub fn bitmap_ref(&self) -> &B {
        &self.bitmap
    }

    /// `Ok` while the guest may be used (see [`check_alive`]).
    pub fn check_alive(&self) -> Result<()> {
        check_alive(&self.user)
    }

    /// Wraps the region in an `Arc` (for `GuestRegionCollection::from_arc_regions`
    /// and `insert_region`).
    pub fn into_arc(self) -> Arc<Self> {
        Arc::new(self)
    }
}

impl<B: Bitmap> GuestMemoryRegion for MmRegion<B> {
    type B = B;

    fn len(&self) -> GuestUsize {
        self.len
    }

    fn start_addr(&self) -> GuestAddress {
        self.guest_base
    }

    fn bitmap(&self) -> BS<'_, B> {
        self.bitmap.slice_at(0)
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> vm_memory::GuestMemoryResult<*mut u8> {
        check_alive(&self.user).map_err(Error::into_guest_memory)?;
        self.check_address(addr)
            .ok_or(GuestMemoryError::InvalidBackendAddress)
            // In bounds: check_address says addr < len.
            .map(|a| self.host.wrapping_add(a.0 as usize))
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::GuestMemoryResult<VolatileSlice<'_, BS<'_, B>>> {
        // Before any byte is touched: a killed or reaped guest gets an
        // error, never zeros and never SIGBUS (for accesses starting now).
        check_alive(&self.user).map_err(Error::into_guest_memory)?;
        let start =
            usize::try_from(offset.0).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        let end = start
            .checked_add(count)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        if end as u64 > self.len {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        // SAFETY: `start + count <= len`, and `host..host+len` stays mapped
        // while `self` (borrowed for the slice's lifetime) exists: `user`
        // keeps exit_mmap from running and `vma` keeps the host mapping
        // from being unmapped (module invariant). Guest memory is only
        // ever accessed through volatile copies, as vm-memory requires.
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                self.host.add(start),
                count,
                self.bitmap.slice_at(start),
                None,
            )
        })
    }
}

impl<B: Bitmap> GuestMemoryRegionBytes for MmRegion<B> {}
