//! The kinds of `u64` the scanner handles, kept apart by type: an mm id, a
//! guest address, a page count and a stable-page id are all `u64` in
//! mm-core's API, and mixing them up (a stable id used as an address, a
//! page count as a byte length) type-checks there. Crate-private: the
//! public API keeps mm-core's plain `u64` mm ids. Each converts back with
//! `.0` right at the mm-core call.

use mm_core::{Mm, PAGE_SIZE};

pub(crate) const PAGE: u64 = PAGE_SIZE as u64;

/// An mm's id (`Mm::id`): the key of its slot and of its rmap items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct MmId(pub(crate) u64);

impl MmId {
    pub(crate) fn of(mm: &Mm) -> MmId {
        MmId(mm.id())
    }
}

/// A guest (page-aligned) address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GuestAddr(pub(crate) u64);

impl GuestAddr {
    /// The address `pages` pages further on.
    pub(crate) fn add_pages(self, pages: u64) -> GuestAddr {
        GuestAddr(self.0 + pages * PAGE)
    }
}

/// A number of pages (not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PageCount(pub(crate) u64);

/// A stable page: its page offset in the [`StableStore`](mm_core::StableStore)
/// memfd. Runs merge onto consecutive ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StableId(pub(crate) u64);

impl StableId {
    /// The id `k` pages further on (the `k`-th page of a run).
    pub(crate) fn nth(self, k: u64) -> StableId {
        StableId(self.0 + k)
    }
}
