//! Property test: random VMA operations against a simple model (a BTreeMap
//! of pages), on real host memory.

use std::collections::BTreeMap;

use guestmm::{Advice, Error, Host, MapOptions, MmUser, Prot, VmFlags, PAGE_SIZE};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE as u64;
const BASE: u64 = 0x40_0000;
const PAGES: u64 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Page {
    prot: Prot,
    locked: bool,
    mergeable: bool,
    shared: bool,
    byte: u8,
}

#[derive(Debug, Clone)]
enum Op {
    Mmap { page: u64, n: u64, shared: bool },
    Munmap { page: u64, n: u64 },
    Mprotect { page: u64, n: u64, prot: u8 },
    Mlock { page: u64, n: u64 },
    Munlock { page: u64, n: u64 },
    DontNeed { page: u64, n: u64 },
    Mergeable { page: u64, n: u64, on: bool },
    Write { page: u64, byte: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    let r = || (0..PAGES, 1..6u64);
    prop_oneof![
        (r(), any::<bool>()).prop_map(|((page, n), shared)| Op::Mmap { page, n, shared }),
        r().prop_map(|(page, n)| Op::Munmap { page, n }),
        (r(), 0..4u8).prop_map(|((page, n), prot)| Op::Mprotect { page, n, prot }),
        r().prop_map(|(page, n)| Op::Mlock { page, n }),
        r().prop_map(|(page, n)| Op::Munlock { page, n }),
        r().prop_map(|(page, n)| Op::DontNeed { page, n }),
        (r(), any::<bool>()).prop_map(|((page, n), on)| Op::Mergeable { page, n, on }),
        (0..PAGES + 4, 1..=255u8).prop_map(|(page, byte)| Op::Write { page, byte }),
    ]
}

const OFF: u64 = 17;

fn all_mapped(m: &BTreeMap<u64, Page>, page: u64, n: u64) -> bool {
    (page..page + n).all(|p| m.contains_key(&p))
}

/// Each page of `page..page + n` through `f`.
fn each_page(m: &mut BTreeMap<u64, Page>, page: u64, n: u64, f: impl Fn(&mut Page)) {
    for p in page..page + n {
        f(m.get_mut(&p).expect("a mapped page"));
    }
}

/// An operation that needs every page mapped: `Unmapped` when one is not,
/// else it succeeded and `f` updates each page of the model.
fn on_mapped<T: std::fmt::Debug>(
    m: &mut BTreeMap<u64, Page>,
    (page, n): (u64, u64),
    r: Result<T, Error>,
    f: impl Fn(&mut Page),
) {
    if all_mapped(m, page, n) {
        r.unwrap();
        each_page(m, page, n, f);
    } else {
        assert!(matches!(r, Err(Error::Unmapped { .. })), "{r:?}");
    }
}

fn apply(mm: &MmUser, m: &mut BTreeMap<u64, Page>, op: &Op) {
    let addr = |p: u64| BASE + p * P;
    match *op {
        Op::Mmap { page, n, shared } => {
            let opts = if shared {
                MapOptions::shared(n * P)
            } else {
                MapOptions::anon(n * P)
            };
            let r = mm.mmap_blocking(opts.at(addr(page)));
            if (page..page + n).any(|p| m.contains_key(&p)) {
                assert!(matches!(r, Err(Error::Overlap { .. })), "{r:?}");
            } else {
                assert_eq!(r.unwrap(), addr(page));
                for p in page..page + n {
                    m.insert(
                        p,
                        Page {
                            prot: Prot::READ_WRITE,
                            locked: false,
                            mergeable: false,
                            shared,
                            byte: 0,
                        },
                    );
                }
            }
        }
        Op::Munmap { page, n } => {
            mm.munmap_blocking(addr(page), n * P).unwrap();
            for p in page..page + n {
                m.remove(&p);
            }
        }
        Op::Mprotect { page, n, prot } => {
            let prot = [
                Prot::NONE,
                Prot::READ,
                Prot::READ_WRITE,
                Prot::READ_WRITE | Prot::EXEC,
            ][prot as usize];
            let r = mm.mprotect_blocking(addr(page), n * P, prot);
            on_mapped(m, (page, n), r, |pg| pg.prot = prot);
        }
        Op::Mlock { page, n } | Op::Munlock { page, n } => {
            let on = matches!(op, Op::Mlock { .. });
            let r = if on {
                mm.mlock_blocking(addr(page), n * P)
            } else {
                mm.munlock_blocking(addr(page), n * P)
            };
            if !all_mapped(m, page, n) {
                assert!(matches!(r, Err(Error::Unmapped { .. })), "{r:?}");
            } else if on && (page..page + n).any(|p| m[&p].prot == Prot::NONE) {
                assert!(matches!(r, Err(Error::Protection { .. })), "{r:?}");
            } else {
                r.unwrap();
                each_page(m, page, n, |pg| pg.locked = on);
            }
        }
        Op::DontNeed { page, n } => {
            let r = mm.madvise_blocking(addr(page), n * P, Advice::DontNeed);
            if !all_mapped(m, page, n) {
                assert!(matches!(r, Err(Error::Unmapped { .. })), "{r:?}");
            } else if (page..page + n).any(|p| m[&p].locked) {
                assert!(matches!(r, Err(Error::NotAllowed { .. })), "{r:?}");
            } else {
                r.unwrap();
                each_page(m, page, n, |pg| {
                    if !pg.shared {
                        pg.byte = 0;
                    }
                });
            }
        }
        Op::Mergeable { page, n, on } => {
            let adv = if on {
                Advice::Mergeable
            } else {
                Advice::Unmergeable
            };
            let r = mm.madvise_blocking(addr(page), n * P, adv);
            on_mapped(m, (page, n), r, |pg| pg.mergeable = on);
        }
        Op::Write { page, byte } => {
            let r = mm.write_blocking(addr(page) + OFF, &[byte]);
            match m.get_mut(&page) {
                None => assert!(matches!(r, Err(Error::Unmapped { .. })), "{r:?}"),
                Some(pg) if !pg.prot.contains(Prot::WRITE) => {
                    assert!(matches!(r, Err(Error::Protection { .. })), "{r:?}")
                }
                Some(pg) => {
                    r.unwrap();
                    pg.byte = byte;
                }
            }
        }
    }
}

fn check(mm: &MmUser, m: &BTreeMap<u64, Page>) {
    let vmas = mm.vmas_blocking();
    let state = mm.lock().read_blocking();
    state.vmas().check_invariants().unwrap();
    drop(state);
    for p in 0..PAGES + 12 {
        let a = BASE + p * P;
        let v = vmas.iter().find(|v| v.start() <= a && a < v.end());
        match (v, m.get(&p)) {
            (None, None) => {}
            (Some(v), Some(pg)) => {
                assert_eq!(v.prot(), pg.prot, "page {p}");
                assert_eq!(v.flags().contains(VmFlags::LOCKED), pg.locked, "page {p}");
                assert_eq!(
                    v.flags().contains(VmFlags::MERGEABLE),
                    pg.mergeable,
                    "page {p}"
                );
                assert_eq!(v.is_shared(), pg.shared, "page {p}");
                if pg.prot.contains(Prot::READ) {
                    let mut b = [0u8];
                    mm.read_blocking(a + OFF, &mut b).unwrap();
                    assert_eq!(b[0], pg.byte, "content of page {p}");
                }
            }
            (v, pg) => panic!("page {p}: vma {v:?} model {pg:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn vma_ops_match_model(ops in proptest::collection::vec(op(), 1..40)) {
        let host = Host::with_budget(1 << 30);
        let mm = host.new_mm("model");
        let mut model = BTreeMap::new();
        // Start mostly mapped (two private regions around a shared one) so
        // that the random ops land on VMAs more often than on holes.
        let setup = [
            Op::Mmap { page: 0, n: 10, shared: false },
            Op::Mmap { page: 10, n: 8, shared: true },
            Op::Mmap { page: 18, n: 12, shared: false },
        ];
        for op in setup.iter().chain(&ops) {
            apply(&mm, &mut model, op);
            check(&mm, &model);
        }
        // The library's charge matches its page table, and teardown returns it all.
        prop_assert_eq!(host.stats().charged_bytes, mm.rss_pages() * P);
        drop(mm);
        prop_assert_eq!(host.stats().charged_bytes, 0);
    }
}
