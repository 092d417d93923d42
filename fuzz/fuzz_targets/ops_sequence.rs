//! Arbitrary sequences of VMA and access operations on one guest, on real
//! memory. Oracles: no panic, every error is a named `Error`, the VMA tree
//! keeps its invariants, the budget equals the page table's count, and a
//! teardown returns every byte.
#![no_main]

use arbitrary::Arbitrary;
use guestmm::{Advice, Host, MapOptions, Prot};
use libfuzzer_sys::fuzz_target;

const P: u64 = 4096;
const BASE: u64 = 0x40_0000;

#[derive(Arbitrary, Debug)]
enum Op {
    Mmap { page: u8, n: u8, shared: bool, huge: bool },
    Munmap { page: u8, n: u8 },
    Mprotect { page: u8, n: u8, prot: u8 },
    Mlock { page: u8, n: u8 },
    Munlock { page: u8, n: u8 },
    Madvise { page: u8, n: u8, advice: u8 },
    Write { page: u8, off: u16, len: u16, byte: u8 },
    Read { page: u8, off: u16, len: u16 },
    Raw { addr: u64, len: u64 },
}

fuzz_target!(|ops: Vec<Op>| {
    let host = Host::with_budget(64 << 20);
    let mm = host.new_mm("fuzz");
    let a = |p: u8| BASE + u64::from(p % 64) * P;
    let n = |n: u8| u64::from(n % 16) * P;
    for op in ops.iter().take(64) {
        let _ = match *op {
            Op::Mmap { page, n: k, shared, huge } => {
                let o = if shared { MapOptions::shared(n(k)) } else { MapOptions::anon(n(k)) };
                mm.mmap_blocking(o.at(a(page)).hugepage(huge && !shared)).map(|_| ())
            }
            Op::Munmap { page, n: k } => mm.munmap_blocking(a(page), n(k)),
            Op::Mprotect { page, n: k, prot } => {
                let prot = [Prot::NONE, Prot::READ, Prot::READ_WRITE, Prot::READ | Prot::EXEC][usize::from(prot % 4)];
                mm.mprotect_blocking(a(page), n(k), prot)
            }
            Op::Mlock { page, n: k } => mm.mlock_blocking(a(page), n(k)),
            Op::Munlock { page, n: k } => mm.munlock_blocking(a(page), n(k)),
            Op::Madvise { page, n: k, advice } => {
                let adv = [Advice::DontNeed, Advice::Mergeable, Advice::Unmergeable, Advice::HugePage, Advice::NoHugePage]
                    [usize::from(advice % 5)];
                mm.madvise_blocking(a(page), n(k), adv)
            }
            Op::Write { page, off, len, byte } => {
                let buf = vec![byte; usize::from(len % 9000)];
                mm.write_blocking(a(page) + u64::from(off), &buf)
            }
            Op::Read { page, off, len } => {
                let mut buf = vec![0; usize::from(len % 9000)];
                mm.read_blocking(a(page) + u64::from(off), &mut buf)
            }
            Op::Raw { addr, len } => mm.munmap_blocking(addr, len).and_then(|_| mm.mprotect_blocking(addr, len, Prot::READ)),
        };
        let state = mm.lock().read_blocking();
        state.vmas().check_invariants().expect("VMA tree invariants");
        drop(state);
        assert_eq!(host.stats().charged_bytes, mm.rss_pages() * P, "budget == page table");
    }
    drop(mm);
    assert_eq!(host.stats().charged_bytes, 0, "teardown returns every byte");
});
