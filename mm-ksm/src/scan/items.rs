//! The rmap items (`ksm_rmap_item`): one per scanned page, 16 bytes, kept
//! in dense blocks of [`BLOCK`] pages. They are most of the scanner's
//! memory, and on the host that memory is the guests' own: the bytes KSM
//! spends on bookkeeping come straight out of what it saves (PSS). A
//! `BTreeMap<addr, item>` of 40-byte items cost ~90 bytes per page
//! (8.7 MiB of heap for 4 x 64 MiB of guests, 7 % of the savings on
//! scattered data, issue 12); a block of 64 items costs 1 KiB for 64
//! pages, and one map entry.

use std::collections::BTreeMap;

use crate::types::{GuestAddr, StableId, PAGE};

/// Pages per block: one scanner chunk, so a chunk touches one block.
const BLOCK: u64 = 64;

/// One scanned page (`ksm_rmap_item`), packed in 16 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RmapItem {
    /// The stable page this page maps, plus one (0: not merged).
    stable: u64,
    /// The low 32 bits of the checksum at the last look (`oldchecksum`,
    /// 32 bits as in the kernel): only compared with the next look's, to
    /// tell a volatile page; the trees key on the full 64 bits.
    checksum: u32,
    flags: u8,
    /// Passes without a merge (smart scan).
    pub(super) age: u8,
    /// Passes left to skip (smart scan).
    pub(super) skips: u8,
}

/// `RmapItem::flags`: the slot holds an item.
const LIVE: u8 = 1;
/// `RmapItem::flags`: `checksum` was set.
const SUMMED: u8 = 2;
/// `RmapItem::flags`: discarded as a zero page and not touched since.
const ZERO: u8 = 4;

impl RmapItem {
    /// The stable page this page maps (when merged).
    pub(super) fn stable(&self) -> Option<StableId> {
        self.stable.checked_sub(1).map(StableId)
    }

    /// Sets (or clears) the stable page; returns the old one.
    pub(super) fn set_stable(&mut self, id: Option<StableId>) -> Option<StableId> {
        let old = self.stable();
        // Ids are page offsets below 2^36: `+ 1` cannot overflow.
        self.stable = id.map_or(0, |s| s.0 + 1);
        old
    }

    /// Does the checksum of the last look equal `sum`'s? `None` before
    /// the first look.
    pub(super) fn same_checksum(&self, sum: u64) -> Option<bool> {
        (self.flags & SUMMED != 0).then_some(self.checksum == sum as u32)
    }

    /// Remembers `sum` as the checksum of this look.
    pub(super) fn set_checksum(&mut self, sum: u64) {
        self.checksum = sum as u32;
        self.flags |= SUMMED;
    }

    /// Discarded as a zero page and not touched since?
    pub(super) fn zero(&self) -> bool {
        self.flags & ZERO != 0
    }

    pub(super) fn set_zero(&mut self, on: bool) {
        if on {
            self.flags |= ZERO;
        } else {
            self.flags &= !ZERO;
        }
    }
}

/// The items of one block, by page index in the block.
struct Block {
    items: [RmapItem; BLOCK as usize],
    live: u32,
}

/// The rmap items of one mm, by page address.
#[derive(Default)]
pub(crate) struct ItemMap {
    blocks: BTreeMap<u64, Box<Block>>,
    len: usize,
}

/// Block number and index in it of `addr`.
fn split(addr: GuestAddr) -> (u64, usize) {
    let page = addr.0 / PAGE;
    (page / BLOCK, (page % BLOCK) as usize)
}

impl ItemMap {
    /// Items in the map.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn get(&self, addr: &GuestAddr) -> Option<&RmapItem> {
        let (b, i) = split(*addr);
        let it = &self.blocks.get(&b)?.items[i];
        (it.flags & LIVE != 0).then_some(it)
    }

    pub(super) fn get_mut(&mut self, addr: &GuestAddr) -> Option<&mut RmapItem> {
        let (b, i) = split(*addr);
        let it = &mut self.blocks.get_mut(&b)?.items[i];
        (it.flags & LIVE != 0).then_some(it)
    }

    /// The item of `addr`, a new default one if there was none.
    pub(super) fn entry(&mut self, addr: GuestAddr) -> &mut RmapItem {
        let (b, i) = split(addr);
        let block = self.blocks.entry(b).or_insert_with(|| {
            Box::new(Block {
                items: [RmapItem::default(); BLOCK as usize],
                live: 0,
            })
        });
        let it = &mut block.items[i];
        if it.flags & LIVE == 0 {
            *it = RmapItem {
                flags: LIVE,
                ..RmapItem::default()
            };
            block.live += 1;
            self.len += 1;
        }
        it
    }

    /// Sets the item of `addr` (live from now on).
    pub(super) fn insert(&mut self, addr: GuestAddr, item: RmapItem) {
        *self.entry(addr) = RmapItem {
            flags: item.flags | LIVE,
            ..item
        };
    }

    /// Removes and returns the item of `addr`; a block left empty goes.
    pub(super) fn remove(&mut self, addr: &GuestAddr) -> Option<RmapItem> {
        let (b, i) = split(*addr);
        let block = self.blocks.get_mut(&b)?;
        let it = std::mem::take(&mut block.items[i]);
        if it.flags & LIVE == 0 {
            return None;
        }
        block.live -= 1;
        self.len -= 1;
        if block.live == 0 {
            self.blocks.remove(&b);
        }
        Some(it)
    }

    /// Addresses of the items in `[lo, hi)`, ascending.
    pub(super) fn keys_in(&self, lo: GuestAddr, hi: GuestAddr) -> Vec<GuestAddr> {
        let (first, last) = (lo.0 / PAGE / BLOCK, hi.0.saturating_sub(1) / PAGE / BLOCK);
        let mut keys = Vec::new();
        if lo >= hi {
            return keys;
        }
        for (b, block) in self.blocks.range(first..=last) {
            for (i, it) in block.items.iter().enumerate() {
                let a = GuestAddr((b * BLOCK + i as u64) * PAGE);
                if it.flags & LIVE != 0 && lo <= a && a < hi {
                    keys.push(a);
                }
            }
        }
        keys
    }

    /// Removes every item, returning them.
    pub(super) fn take_all(&mut self) -> Vec<RmapItem> {
        self.len = 0;
        std::mem::take(&mut self.blocks)
            .into_values()
            .flat_map(|b| b.items.into_iter().filter(|it| it.flags & LIVE != 0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(page: u64) -> GuestAddr {
        GuestAddr(page * PAGE)
    }

    #[test]
    fn test_item_is_16_bytes() {
        assert_eq!(std::mem::size_of::<RmapItem>(), 16);
    }

    #[test]
    fn test_fields_round_trip() {
        let mut it = RmapItem::default();
        assert_eq!(
            (it.stable(), it.same_checksum(7), it.zero()),
            (None, None, false)
        );
        assert_eq!(it.set_stable(Some(StableId(0))), None);
        assert_eq!(it.stable(), Some(StableId(0)));
        assert_eq!(it.set_stable(None), Some(StableId(0)));
        it.set_checksum(0x1234_5678_9abc_def0);
        assert_eq!(it.same_checksum(0x1234_5678_9abc_def0), Some(true));
        assert_eq!(it.same_checksum(0x9abc_def1), Some(false));
        it.set_zero(true);
        assert!(it.zero());
        it.set_zero(false);
        assert!(!it.zero() && it.same_checksum(0x9abc_def0) == Some(true));
    }

    /// The map behaves as a map of address to item: the same answers as a
    /// `BTreeMap` for a mixed sequence of operations across blocks.
    #[test]
    fn test_map_agrees_with_btreemap() {
        let mut ours = ItemMap::default();
        let mut model: BTreeMap<GuestAddr, RmapItem> = BTreeMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = at(x % 300);
            match x % 5 {
                0 | 1 => {
                    let it = ours.entry(a);
                    it.age = (step % 200) as u8;
                    let m = model.entry(a).or_default();
                    m.age = it.age;
                }
                2 => assert_eq!(
                    ours.remove(&a).map(|i| i.age),
                    model.remove(&a).map(|i| i.age)
                ),
                3 => assert_eq!(ours.get(&a).map(|i| i.age), model.get(&a).map(|i| i.age)),
                _ => {
                    let (lo, hi) = (at(x % 200), at(x % 200 + x % 150));
                    let want: Vec<GuestAddr> = model.range(lo..hi).map(|(k, _)| *k).collect();
                    assert_eq!(ours.keys_in(lo, hi), want);
                }
            }
            assert_eq!(ours.len(), model.len());
        }
        assert_eq!(ours.take_all().len(), model.len());
        assert!(ours.is_empty() && ours.get(&at(1)).is_none());
    }
}
