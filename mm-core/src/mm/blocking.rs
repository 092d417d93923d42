//! Blocking wrappers for synchronous embedders: thin shells over the
//! async protocol code (they park the thread while waiting for the lock).

use futures_lite::future::block_on;

use super::*;
use crate::error::Result;
use crate::vma::{Prot, Vma};

impl MmUser {
    /// Blocking [`mmap`](Self::mmap).
    pub fn mmap_blocking(&self, opts: MapOptions) -> Result<u64> {
        block_on(self.mmap(opts))
    }
    /// Blocking [`munmap`](Self::munmap).
    pub fn munmap_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.munmap(addr, len))
    }
    /// Blocking [`mprotect`](Self::mprotect).
    pub fn mprotect_blocking(&self, addr: u64, len: u64, prot: Prot) -> Result<()> {
        block_on(self.mprotect(addr, len, prot))
    }
    /// Blocking [`mlock`](Self::mlock).
    pub fn mlock_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.mlock(addr, len))
    }
    /// Blocking [`munlock`](Self::munlock).
    pub fn munlock_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.munlock(addr, len))
    }
    /// Blocking [`madvise`](Self::madvise).
    pub fn madvise_blocking(&self, addr: u64, len: u64, advice: Advice) -> Result<()> {
        block_on(self.madvise(addr, len, advice))
    }
    /// Blocking [`read`](Self::read).
    pub fn read_blocking(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        block_on(self.read(addr, buf))
    }
    /// Blocking [`write`](Self::write).
    pub fn write_blocking(&self, addr: u64, data: &[u8]) -> Result<()> {
        block_on(self.write(addr, data))
    }
    /// Blocking [`fill`](Self::fill).
    pub fn fill_blocking(&self, addr: u64, len: u64, byte: u8) -> Result<()> {
        block_on(self.fill(addr, len, byte))
    }
    /// Blocking [`compare`](Self::compare).
    pub fn compare_blocking(&self, addr: u64, data: &[u8]) -> Result<bool> {
        block_on(self.compare(addr, data))
    }
    /// Blocking [`find_vma`](Self::find_vma).
    pub fn find_vma_blocking(&self, addr: u64) -> Result<Vma> {
        block_on(self.find_vma(addr))
    }
    /// Blocking [`check_kernel_access`](Self::check_kernel_access).
    pub fn check_kernel_access_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.check_kernel_access(addr, len))
    }
    /// Blocking [`vmas`](Self::vmas).
    pub fn vmas_blocking(&self) -> Vec<Vma> {
        block_on(self.vmas())
    }
    /// Blocking [`resident_bytes`](Self::resident_bytes).
    pub fn resident_bytes_blocking(&self) -> Result<u64> {
        block_on(self.resident_bytes())
    }
    /// Blocking [`write_protect`](Self::write_protect).
    pub fn write_protect_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.write_protect(addr, len))
    }
    /// Blocking [`write_unprotect`](Self::write_unprotect).
    pub fn write_unprotect_blocking(&self, addr: u64, len: u64) -> Result<()> {
        block_on(self.write_unprotect(addr, len))
    }
    /// Blocking [`take_dirty`](Self::take_dirty).
    pub fn take_dirty_blocking(&self, addr: u64, len: u64) -> Result<Vec<std::ops::Range<u64>>> {
        block_on(self.take_dirty(addr, len))
    }
    /// Blocking [`peek_dirty`](Self::peek_dirty).
    pub fn peek_dirty_blocking(&self, addr: u64, len: u64) -> Result<Vec<std::ops::Range<u64>>> {
        block_on(self.peek_dirty(addr, len))
    }
    /// Blocking [`snapshot`](Self::snapshot).
    pub fn snapshot_blocking(&self) -> Result<super::GuestSnapshot> {
        block_on(self.snapshot())
    }
    /// Blocking [`reset`](Self::reset).
    pub fn reset_blocking(&self, snap: &super::GuestSnapshot) -> Result<super::ResetStats> {
        block_on(self.reset(snap))
    }
}
