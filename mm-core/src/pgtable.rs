//! The per-mm page table: a 4-level radix tree, 512 entries per node, over
//! guest page numbers, like x86-64's PGD → PUD → PMD → PTE.
//!
//! ```text
//!  guest page number (36 bits used)
//!  ┌─────────┬─────────┬─────────┬─────────┐
//!  │ 35..27  │ 26..18  │ 17..9   │  8..0   │
//!  └────┬────┴────┬────┴────┬────┴────┬────┘
//!    root Dir → Dir      → Dir      → Leaf: [AtomicU64; 512] (the PTEs)
//! ```
//!
//! The invariant is: **nodes are allocated by anyone holding the mmap lock
//! (read or write), and freed only by [`PageTable::free_pgtables`], which
//! takes the write guard as proof**. Readers hold a crossbeam-epoch guard
//! while they hold a `&AtomicU64` into a node, and freed nodes are handed to
//! the epoch collector (`defer_destroy`), so even a lockless reader (stats
//! sampling) can never touch freed memory.
//!
//! A PTE is one `u64` state word ([`Pte`]); its `LOCK` bit is the per-page
//! lock (`ptl`) under which "still empty?" and `UNSTABLE` are re-checked.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_epoch::{Atomic, Guard, Owned, Shared};

const BITS: u32 = 9;
const FANOUT: usize = 1 << BITS;
/// Guest pages covered by one leaf node (2 MiB of guest memory).
pub const PAGES_PER_LEAF: u64 = FANOUT as u64;
/// Guest page numbers are below this (4 levels × 9 bits).
pub const MAX_GPN: u64 = 1 << (4 * BITS);

/// Bits of a PTE state word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pte(pub u64);

impl Pte {
    /// A host page backs this guest page and is charged to the budget.
    pub const PRESENT: u64 = 1 << 0;
    /// The per-page lock (the `ptl` analogue): held while populating, copying
    /// or zapping this page.
    pub const LOCK: u64 = 1 << 1;
    /// Written through the access API since population.
    pub const DIRTY: u64 = 1 << 2;
    /// KSM: the page maps stable page [`Pte::stable_id`] of the KSM memfd
    /// (shared, read-only until a write copies it). Not `PRESENT`: the guest
    /// is not charged for it; the stable page is charged once.
    pub const KSM: u64 = 1 << 3;
    /// KSM: the host range of this page is a private mapping of the KSM
    /// memfd (set by a merge, kept after a copy-on-write, cleared when a zap
    /// puts anonymous memory back).
    pub const FILEMAP: u64 = 1 << 4;
    /// KSM: discarded as an all-zero page (`use_zero_pages`); unpopulated,
    /// reads back as zeros. Left set by a later population until the
    /// scanner sees it.
    pub const KSM_ZERO: u64 = 1 << 5;
    /// First bit of the stable page id (`KSM` pages only).
    pub const STABLE_SHIFT: u32 = 16;
    /// Write-protected through `write_protect` (tracked regions): the host
    /// page is userfaultfd-WP, so a store to it blocks in the kernel until
    /// `write_unprotect`. The access path never writes such a page while
    /// holding locks; it drops them and waits. Set and cleared under the
    /// page lock; a zap (PTE back to 0) clears it.
    pub const WP: u64 = 1 << 6;

    /// Is the page present?
    pub fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }

    /// Does the page map a KSM stable page?
    pub fn ksm(self) -> bool {
        self.0 & Self::KSM != 0
    }

    /// Is it a discarded KSM zero page, not populated since (what
    /// `ksm_stat`'s `ksm_zero_pages` counts, and an unmerge drops)?
    pub fn ksm_zero(self) -> bool {
        self.0 & Self::KSM_ZERO != 0 && !self.present()
    }

    /// The stable page id of a `KSM` page.
    pub fn stable_id(self) -> u64 {
        self.0 >> Self::STABLE_SHIFT
    }

    /// The bits below the stable id (flags only).
    pub fn flags(self) -> u64 {
        self.0 & ((1 << Self::STABLE_SHIFT) - 1)
    }
}

/// One level of the tree.
trait Level: Send + Sync + Sized + 'static {
    /// log2 of the guest pages one node of this level covers.
    const SHIFT: u32;
    fn new() -> Self;
    fn pte<'g>(&'g self, gpn: u64, guard: &'g Guard) -> Option<&'g AtomicU64>;
    fn leaf<'g>(
        &'g self,
        gpn: u64,
        alloc: Option<&AtomicUsize>,
        guard: &'g Guard,
    ) -> Option<&'g Leaf>;
    /// Unlinks and defers the destruction of every node below `self`.
    /// Returns how many nodes were freed.
    fn free_children(&self, guard: &Guard) -> usize;
    /// Calls `f` on every existing leaf below `self`.
    fn each_leaf<'g>(&'g self, guard: &'g Guard, f: &mut dyn FnMut(&'g Leaf));
}

/// The bottom level: 512 PTE words.
pub struct Leaf {
    ptes: [AtomicU64; FANOUT],
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Leaf")
    }
}

struct Dir<C> {
    slots: [Atomic<C>; FANOUT],
}

impl Leaf {
    /// The PTE of `gpn` (only its low 9 bits are used).
    pub fn pte(&self, gpn: u64) -> &AtomicU64 {
        &self.ptes[(gpn as usize) & (FANOUT - 1)]
    }
}

impl Level for Leaf {
    const SHIFT: u32 = BITS;
    fn new() -> Self {
        Leaf {
            ptes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
    fn pte<'g>(&'g self, gpn: u64, _guard: &'g Guard) -> Option<&'g AtomicU64> {
        Some(Leaf::pte(self, gpn))
    }
    fn leaf<'g>(
        &'g self,
        _gpn: u64,
        _alloc: Option<&AtomicUsize>,
        _guard: &'g Guard,
    ) -> Option<&'g Leaf> {
        Some(self)
    }
    fn free_children(&self, _guard: &Guard) -> usize {
        0
    }
    fn each_leaf<'g>(&'g self, _guard: &'g Guard, f: &mut dyn FnMut(&'g Leaf)) {
        f(self)
    }
}

impl<C: Level> Dir<C> {
    fn index(gpn: u64) -> usize {
        ((gpn >> C::SHIFT) as usize) & (FANOUT - 1)
    }

    fn child<'g>(&self, gpn: u64, alloc: Option<&AtomicUsize>, guard: &'g Guard) -> Option<&'g C> {
        let slot = &self.slots[Self::index(gpn)];
        // Acquire: pairs with the AcqRel compare_exchange that published the
        // child, so its initialised contents are visible.
        let mut cur = slot.load(Ordering::Acquire, guard);
        if cur.is_null() {
            let nodes = alloc?;
            match slot.compare_exchange(
                Shared::null(),
                Owned::new(C::new()),
                Ordering::AcqRel,
                Ordering::Acquire,
                guard,
            ) {
                Ok(new) => {
                    nodes.fetch_add(1, Ordering::Relaxed);
                    cur = new;
                }
                // Another populater won the race (pte_alloc's "someone else
                // populated it meanwhile"); ours is dropped unpublished.
                Err(e) => cur = e.current,
            }
        }
        // SAFETY: `cur` is non-null, was published with Release ordering,
        // and is only freed through `defer_destroy` after being unlinked
        // (free_children), which cannot complete while `guard` is pinned.
        Some(unsafe { cur.deref() })
    }
}

impl<C: Level> Level for Dir<C> {
    const SHIFT: u32 = C::SHIFT + BITS;
    fn new() -> Self {
        Dir {
            slots: std::array::from_fn(|_| Atomic::null()),
        }
    }
    fn pte<'g>(&'g self, gpn: u64, guard: &'g Guard) -> Option<&'g AtomicU64> {
        self.child(gpn, None, guard)?.pte(gpn, guard)
    }
    fn leaf<'g>(
        &'g self,
        gpn: u64,
        alloc: Option<&AtomicUsize>,
        guard: &'g Guard,
    ) -> Option<&'g Leaf> {
        self.child(gpn, alloc, guard)?.leaf(gpn, alloc, guard)
    }
    fn free_children(&self, guard: &Guard) -> usize {
        let mut freed = 0;
        for slot in &self.slots {
            let old = slot.swap(Shared::null(), Ordering::AcqRel, guard);
            if old.is_null() {
                continue;
            }
            // SAFETY: `old` was just unlinked, so no new reader can reach it;
            // readers pinned before the swap keep it alive until they unpin.
            freed += unsafe { old.deref() }.free_children(guard) + 1;
            // SAFETY: unlinked above and never published again; destruction
            // is deferred until every guard pinned before now is dropped.
            unsafe { guard.defer_destroy(old) };
        }
        freed
    }
    fn each_leaf<'g>(&'g self, guard: &'g Guard, f: &mut dyn FnMut(&'g Leaf)) {
        for slot in &self.slots {
            let cur = slot.load(Ordering::Acquire, guard);
            if cur.is_null() {
                continue;
            }
            // SAFETY: as in `child`: non-null, published with Release, and
            // freed only through `defer_destroy`, which waits for `guard`.
            unsafe { cur.deref() }.each_leaf(guard, f);
        }
    }
}

type Root = Dir<Dir<Dir<Leaf>>>;

/// The page table of one mm.
pub struct PageTable {
    root: Box<Root>,
    nodes: AtomicUsize,
    /// Freed marker: set by `free_pgtables`. Nothing may use the table
    /// afterwards (I-EX-4); protocol code checks it with `sched::check`.
    freed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable")
            .field("nodes", &self.nodes())
            .finish()
    }
}

impl Default for PageTable {
    fn default() -> Self {
        PageTable::new()
    }
}

impl PageTable {
    /// An empty table (just the root, like a fresh pgd).
    pub fn new() -> Self {
        PageTable {
            root: Box::new(Root::new()),
            nodes: AtomicUsize::new(0),
            freed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Has `free_pgtables` run?
    pub fn is_freed(&self) -> bool {
        self.freed.load(Ordering::SeqCst)
    }

    /// Page-table nodes allocated below the root (`pgtables_bytes / 4096`).
    pub fn nodes(&self) -> usize {
        self.nodes.load(Ordering::Relaxed)
    }

    /// The PTE of `gpn`, if its leaf exists.
    pub fn pte<'g>(&'g self, gpn: u64, guard: &'g Guard) -> Option<&'g AtomicU64> {
        debug_assert!(gpn < MAX_GPN);
        self.root.pte(gpn, guard)
    }

    /// The leaf covering `gpn`, if it exists.
    pub fn leaf<'g>(&'g self, gpn: u64, guard: &'g Guard) -> Option<&'g Leaf> {
        debug_assert!(gpn < MAX_GPN);
        self.root.leaf(gpn, None, guard)
    }

    /// The leaf covering `gpn`, allocating the path to it (`pte_alloc`).
    /// Callers hold the mmap lock (read or write).
    pub fn leaf_alloc<'g>(&'g self, gpn: u64, guard: &'g Guard) -> &'g Leaf {
        debug_assert!(gpn < MAX_GPN);
        self.root
            .leaf(gpn, Some(&self.nodes), guard)
            .expect("allocation path always yields a leaf")
    }

    /// `free_pgtables`: unlink every node below the root and hand it to the
    /// epoch collector. Takes `&mut` proof of the exclusive mmap lock: the
    /// caller passes its write guard's contents, so no populater (which needs
    /// the read lock) can be allocating meanwhile.
    pub fn free_pgtables<T>(&self, _write_locked: &mut T) -> usize {
        let guard = crossbeam_epoch::pin();
        self.freed.store(true, Ordering::SeqCst);
        let freed = self.root.free_children(&guard);
        self.nodes.fetch_sub(freed, Ordering::Relaxed);
        guard.flush();
        freed
    }

    /// Calls `f` on every PTE word of the existing leaves (its lock bit
    /// cleared), read without the locks: a moment's picture, like a walk
    /// of smaps.
    pub fn each_pte(&self, mut f: impl FnMut(Pte)) {
        let guard = crossbeam_epoch::pin();
        self.root.each_leaf(&guard, &mut |leaf| {
            for p in &leaf.ptes {
                f(Pte(p.load(Ordering::Acquire) & !Pte::LOCK));
            }
        });
    }

    /// Number of present PTEs in `[first, end)`, walking only existing leaves.
    pub fn count_present(&self, first: u64, end: u64) -> u64 {
        let guard = crossbeam_epoch::pin();
        let mut n = 0;
        let mut gpn = first;
        while gpn < end {
            let leaf_end = ((gpn / PAGES_PER_LEAF) + 1) * PAGES_PER_LEAF;
            let stop = leaf_end.min(end);
            if let Some(leaf) = self.leaf(gpn, &guard) {
                for p in gpn..stop {
                    if Pte(leaf.pte(p).load(Ordering::Acquire)).present() {
                        n += 1;
                    }
                }
            }
            gpn = stop;
        }
        n
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        // Normally free_pgtables already ran under the write lock; this only
        // catches an mm that never reached exit_mmap (a failed construction).
        let guard = crossbeam_epoch::pin();
        self.root.free_children(&guard);
    }
}

/// Spins for the per-page lock of `pte` and returns the state word seen at
/// acquisition (with `LOCK` set).
///
/// The holder never awaits and never takes another lock except further page
/// locks in ascending page order, so spinning is bounded by a memcpy or a
/// madvise of at most one leaf.
pub fn pte_lock(pte: &AtomicU64) -> u64 {
    let mut spins = 0u32;
    loop {
        // Acquire: pairs with the Release in `pte_unlock`, so the previous
        // holder's PTE and page-content changes are visible.
        let old = pte.fetch_or(Pte::LOCK, Ordering::Acquire);
        if old & Pte::LOCK == 0 {
            return old | Pte::LOCK;
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Stores `new` (without `LOCK`) and releases the per-page lock.
pub fn pte_unlock(pte: &AtomicU64, new: u64) {
    // Release: pairs with the Acquire in `pte_lock`.
    pte.store(new & !Pte::LOCK, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_alloc_lookup_free() {
        let pt = PageTable::new();
        let guard = crossbeam_epoch::pin();
        assert!(pt.pte(5, &guard).is_none());
        let leaf = pt.leaf_alloc(5, &guard);
        leaf.pte(5).store(Pte::PRESENT, Ordering::Release);
        assert_eq!(pt.nodes(), 3);
        let far = MAX_GPN - 1;
        pt.leaf_alloc(far, &guard)
            .pte(far)
            .store(Pte::PRESENT, Ordering::Release);
        assert_eq!(pt.nodes(), 6);
        assert_eq!(pt.count_present(0, MAX_GPN), 2);
        drop(guard);
        let mut proof = ();
        assert_eq!(pt.free_pgtables(&mut proof), 6);
        assert_eq!(pt.nodes(), 0);
        assert_eq!(pt.count_present(0, MAX_GPN), 0);
    }

    #[test]
    fn test_pte_lock_excludes() {
        let pt = std::sync::Arc::new(PageTable::new());
        // Smaller under Miri, which interprets every instruction.
        let (nthreads, iters) = if cfg!(miri) { (2, 20) } else { (4, 1000) };
        let threads: Vec<_> = (0..nthreads)
            .map(|_| {
                let pt = pt.clone();
                std::thread::spawn(move || {
                    for _ in 0..iters {
                        let guard = crossbeam_epoch::pin();
                        let pte = pt.leaf_alloc(7, &guard).pte(7);
                        let old = pte_lock(pte);
                        // Counter in the high bits, only changed under the lock.
                        pte_unlock(pte, old + (1 << 32));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let guard = crossbeam_epoch::pin();
        assert_eq!(
            pt.pte(7, &guard).unwrap().load(Ordering::Acquire) >> 32,
            4000
        );
    }
}
