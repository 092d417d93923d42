//! Tracked regions on a user-mode-only userfaultfd: what an ordinary user
//! gets where `vm.unprivileged_userfaultfd = 0` and `/dev/userfaultfd` is
//! root's (this machine kind). The hosts here ask for it with
//! `MmConfig::user_mode_only_uffd`, so the tests mean the same as root and
//! as a user; `.ci/unprivileged-tests` runs the whole suite as a user too.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use guestmm::{Error, Host, HostConfig, MapOptions, MmConfig, MmUser, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

fn user_mode_only_host(budget: u64) -> Host {
    Host::new(HostConfig {
        mm: MmConfig {
            user_mode_only_uffd: true,
            ..MmConfig::default()
        },
        ..HostConfig::with_budget(budget)
    })
}

fn host_ptr(mm: &MmUser, addr: u64) -> *mut u8 {
    let v = mm.find_vma_blocking(addr).unwrap();
    v.host_ptr().wrapping_add((addr - v.start()) as usize)
}

/// A kernel-mode read of `len` bytes at `p` (write(2) into a pipe):
/// `Err(errno)` or the bytes written.
fn kernel_read(p: *const u8, len: usize) -> Result<usize, i32> {
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let r = unsafe { libc::write(fds[1], p.cast(), len) };
    let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    for fd in fds {
        unsafe { libc::close(fd) };
    }
    if r < 0 {
        Err(err)
    } else {
        Ok(r as usize)
    }
}

#[test]
fn user_mode_only_region_charges_direct_touches_once() {
    let host = user_mode_only_host(64 << 20);
    let mm = host.new_mm("wasm");
    let pages = 512;
    let addr = mm
        .mmap_blocking(MapOptions::anon(pages * PAGE).tracked(true))
        .unwrap();
    let s = mm.tracked_stats().unwrap();
    assert!(s.user_mode_only, "{s:?}");
    assert!(mm.find_vma_blocking(addr).unwrap().user_mode_only());
    // Two threads write every page from user mode (JIT code, a WASM
    // instance): each page is charged exactly once.
    let p = host_ptr(&mm, addr) as usize;
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                for i in (t..pages).step_by(2) {
                    unsafe { ((p + (i * PAGE) as usize) as *mut u8).write_volatile(0x5a) };
                }
            });
        }
    });
    assert_eq!(host.stats().charged_bytes, pages * PAGE);
    let mut b = [0u8];
    mm.read_blocking(addr + 7 * PAGE, &mut b).unwrap();
    assert_eq!(b[0], 0x5a);
    assert!(mm.tracked_stats().unwrap().pages_faulted >= pages);
}

#[test]
fn user_mode_only_kernel_fault_is_efault_not_a_hang() {
    let host = user_mode_only_host(64 << 20);
    let mm = host.new_mm("t");
    let addr = mm
        .mmap_blocking(MapOptions::anon(4 * PAGE).tracked(true).fault_around(PAGE))
        .unwrap();
    let p = host_ptr(&mm, addr);
    // A missing page read by the kernel on our behalf: no handler can see
    // it, so the kernel fails it at once (EFAULT) instead of blocking.
    assert_eq!(kernel_read(p, 16), Err(libc::EFAULT));
    assert_eq!(host.stats().charged_bytes, 0);
    // Once present (a user-mode touch), the kernel reads it like any page.
    unsafe { p.write_volatile(1) };
    assert_eq!(kernel_read(p, 16), Ok(16));
    assert_eq!(host.stats().charged_bytes, PAGE);
}

#[test]
fn kvm_memslot_on_user_mode_only_region_is_refused() {
    let host = user_mode_only_host(64 << 20);
    let mm = host.new_mm("vm");
    let ram = mm
        .mmap_blocking(MapOptions::anon(16 * PAGE).tracked(true))
        .unwrap();
    let plain = mm.mmap_blocking(MapOptions::anon(16 * PAGE)).unwrap();
    assert!(mm.check_kernel_access_blocking(plain, 16 * PAGE).is_ok());
    match mm.check_kernel_access_blocking(ram + PAGE, 4 * PAGE) {
        Err(Error::UserModeOnly { addr }) => assert_eq!(addr, ram + PAGE),
        other => panic!("expected UserModeOnly, got {other:?}"),
    }
    let msg = mm
        .check_kernel_access_blocking(ram, PAGE)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("CAP_SYS_PTRACE"), "{msg}");
    assert!(matches!(
        mm.check_kernel_access_blocking(plain + 64 * PAGE, PAGE),
        Err(Error::Unmapped { .. })
    ));
}

#[test]
fn default_host_says_which_descriptor_it_got() {
    // Root (or a user with /dev/userfaultfd) gets a full descriptor, an
    // ordinary user here a user-mode-only one; either way the region works
    // and says which, and the memslot check agrees with it.
    let host = Host::with_budget(64 << 20);
    let mm = host.new_mm("t");
    let addr = mm
        .mmap_blocking(MapOptions::anon(4 * PAGE).tracked(true))
        .unwrap();
    let umo = mm.tracked_stats().unwrap().user_mode_only;
    assert_eq!(
        mm.check_kernel_access_blocking(addr, 4 * PAGE).is_err(),
        umo
    );
    mm.write_blocking(addr, b"x").unwrap();
    assert_eq!(host.stats().charged_bytes, PAGE);
}
