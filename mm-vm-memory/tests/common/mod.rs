//! Helpers shared by the adapter's tests.
#![allow(dead_code)]

use mm_core::{Guest, Host, MapOptions, MmUser};
use mm_vm_memory::{GuestMemoryMm, MmRegion};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const PAGE: u64 = 0x1000;

/// The guest-physical layout the tests use, the same for the adapter and
/// for vm-memory's own `GuestMemoryMmap`: a hole between the first two
/// regions, the last two adjacent (a boundary with no hole).
pub const LAYOUT: [(u64, u64); 3] = [(0, 4 * PAGE), (0x8000, 4 * PAGE), (0xc000, 4 * PAGE)];

/// A host, a guest and its address space; dropped in a safe order.
pub struct Fixture {
    pub user: MmUser,
    pub guest: Guest,
    pub host: Host,
}

impl Fixture {
    pub fn new(budget: u64) -> Fixture {
        let host = Host::with_budget(budget);
        let guest = host.create_guest("vmmem-test");
        let user = guest.mm().expect("a fresh guest has its mm");
        Fixture { user, guest, host }
    }

    /// Maps one guestmm VMA of `len` bytes (tracked or not).
    pub fn map(&self, len: u64, tracked: bool) -> Result<u64, mm_core::Error> {
        self.user
            .mmap_blocking(MapOptions::anon(len).tracked(tracked))
    }

    /// The adapter over `LAYOUT`, each region its own VMA; `tracked[i]`
    /// says whether region `i`'s VMA is tracked.
    pub fn layout(&self, tracked: [bool; 3]) -> Result<GuestMemoryMm, mm_core::Error> {
        let mut regions = Vec::new();
        for (&(base, len), t) in LAYOUT.iter().zip(tracked) {
            let addr = self.map(len, t)?;
            regions.push(MmRegion::new(&self.user, addr, len, GuestAddress(base)).unwrap());
        }
        Ok(GuestMemoryMm::from_regions(regions).unwrap())
    }
}

/// vm-memory's own `GuestMemoryMmap` over `LAYOUT`: the reference.
pub fn reference() -> GuestMemoryMmap {
    let ranges: Vec<_> = LAYOUT
        .iter()
        .map(|&(b, l)| (GuestAddress(b), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// Does this process have a userfaultfd for tracked regions? Prints the
/// one `skipped:` line when not.
pub fn tracked_available(f: &Fixture, test: &str) -> bool {
    match f.map(PAGE, true) {
        Ok(addr) => {
            f.user.munmap_blocking(addr, PAGE).unwrap();
            true
        }
        Err(e) => {
            eprintln!("skipped: {test}: no tracked region ({e})");
            false
        }
    }
}
