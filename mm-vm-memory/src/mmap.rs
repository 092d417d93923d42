//! A plain `vm-memory` [`GuestRegionMmap`] over a guestmm VMA, for VMMs
//! that hard-code that type (Firecracker, Cloud Hypervisor).
//!
//! The `MmapRegion` inside is built with
//! `MmapRegionBuilder::with_raw_mmap_pointer`: it is **not owned**, so
//! vm-memory never unmaps it. What must stay alive is a
//! [`MappingLease`]: an [`MmUser`] (no `exit_mmap`) and the VMA (the host
//! mapping stays mapped even across a `munmap` of the range).
//!
//! - [`guest_region_mmap`] (safe) puts the lease inside the region, in its
//!   bitmap slot ([`Leased<B>`] wraps the bitmap and delegates to it), so
//!   the region cannot outlive it; the price is the type
//!   `GuestRegionMmap<Leased<B>>`.
//! - [`guest_region_mmap_unchecked`] (`unsafe`) returns a
//!   `GuestRegionMmap<B>` of any bitmap type and the lease separately; the
//!   caller keeps the lease alive longer than the region, every clone of
//!   its `Arc<MmapRegion>`, and every slice or host pointer taken from it.
//!
//! Unlike [`MmRegion`](crate::MmRegion), a `GuestRegionMmap` cannot check
//! the guest is alive before an access: after a reap, an untracked region
//! reads zeros and a tracked one raises `SIGBUS` in the accessing thread.
//! The kill hook must stop every device thread first (crate docs).

use std::sync::Arc;

use mm_core::{MmUser, Vma};
use vm_memory::bitmap::{Bitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::region::find_range;
use crate::{Error, Result};

/// What a `GuestRegionMmap` over guestmm memory needs alive: a user
/// reference (the contents) and the VMA (the host mapping).
pub struct MappingLease {
    /// Dropped before `user` (see `MmRegion`'s field order).
    vma: Vma,
    user: MmUser,
}

impl std::fmt::Debug for MappingLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingLease")
            .field("mm_id", &self.user.id())
            .field("vma", &self.vma)
            .finish()
    }
}

impl MappingLease {
    /// The guest's address space.
    pub fn mm(&self) -> &MmUser {
        &self.user
    }
}

/// A bitmap `B` that also holds the [`MappingLease`] of the region it
/// tracks: every `Bitmap` call goes to `B`.
#[derive(Debug)]
pub struct Leased<B> {
    inner: B,
    lease: Arc<MappingLease>,
}

impl<B> Leased<B> {
    /// The wrapped bitmap.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The lease.
    pub fn lease(&self) -> &MappingLease {
        &self.lease
    }
}

impl<'a, B: WithBitmapSlice<'a>> WithBitmapSlice<'a> for Leased<B> {
    type S = B::S;
}

impl<B: Bitmap> Bitmap for Leased<B> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.inner.mark_dirty(offset, len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.inner.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        self.inner.slice_at(offset)
    }
}

fn prot_flags(vma: &Vma) -> (i32, i32) {
    let flags = if vma.is_shared() {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
    };
    (libc::PROT_READ | libc::PROT_WRITE, flags)
}

/// A `GuestRegionMmap<Leased<B>>` over `[addr, addr+len)` of `user`'s
/// address space (page-aligned, inside one read-write VMA), at
/// `guest_base`. The region holds its own [`MappingLease`].
pub fn guest_region_mmap<B: Bitmap>(
    user: &MmUser,
    addr: u64,
    len: u64,
    guest_base: GuestAddress,
    bitmap: B,
) -> Result<GuestRegionMmap<Leased<B>>> {
    let (vma, host) = find_range(user, addr, len, guest_base)?;
    let (prot, flags) = prot_flags(&vma);
    let lease = Arc::new(MappingLease {
        vma,
        user: user.clone(),
    });
    let bitmap = Leased {
        inner: bitmap,
        lease,
    };
    // SAFETY: `host..host+len` is inside one VMA's host mapping
    // (find_range), and the lease that keeps it mapped is owned by the
    // region's bitmap, so it lives as long as the MmapRegion and every
    // slice borrowed from it. Not owned: vm-memory never unmaps it.
    let region = unsafe {
        MmapRegionBuilder::new_with_bitmap(len as usize, bitmap).with_raw_mmap_pointer(host)
    }
    .with_mmap_prot(prot)
    .with_mmap_flags(flags)
    .build()?;
    GuestRegionMmap::new(region, guest_base).ok_or(Error::Overflow {
        addr: guest_base.0,
        len,
    })
}

/// A `GuestRegionMmap<B>` over `[addr, addr+len)` of `user`'s address
/// space at `guest_base`, and the [`MappingLease`] that keeps its memory
/// mapped.
///
/// # Safety
///
/// The caller keeps the returned lease alive longer than the returned
/// region, every clone of its `Arc<MmapRegion>` (`get_mmap`), every
/// `GuestMemoryMmap` holding it, and every slice or host pointer taken
/// from them: dropping the lease may run the guest's teardown, which
/// unmaps the memory they point to.
pub unsafe fn guest_region_mmap_unchecked<B: Bitmap>(
    user: &MmUser,
    addr: u64,
    len: u64,
    guest_base: GuestAddress,
    bitmap: B,
) -> Result<(GuestRegionMmap<B>, MappingLease)> {
    let (vma, host) = find_range(user, addr, len, guest_base)?;
    let (prot, flags) = prot_flags(&vma);
    // SAFETY: `host..host+len` is inside one VMA's host mapping
    // (find_range); the caller keeps the lease (which keeps it mapped)
    // alive longer than the region (this function's contract).
    let region = unsafe {
        MmapRegionBuilder::new_with_bitmap(len as usize, bitmap).with_raw_mmap_pointer(host)
    }
    .with_mmap_prot(prot)
    .with_mmap_flags(flags)
    .build()?;
    let region = GuestRegionMmap::new(region, guest_base).ok_or(Error::Overflow {
        addr: guest_base.0,
        len,
    })?;
    Ok((
        region,
        MappingLease {
            vma,
            user: user.clone(),
        },
    ))
}
