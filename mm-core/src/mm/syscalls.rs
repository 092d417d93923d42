//! The syscalls on an address space: `mmap`, `munmap`, `mprotect`,
//! `mlock`, `munlock`, `madvise`, write-protect, and the access API.

use std::sync::Arc;

use super::*;
use crate::error::{Access, Error, Result};
use crate::flags::MmFlag;
use crate::pgtable::{pte_lock, pte_unlock, Pte, PAGES_PER_LEAF};
use crate::sched;
use crate::sys::{self, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::tracked::Tracker;
use crate::vma::{HostRegion, Prot, VmFlags, Vma};

const PAGE: u64 = PAGE_SIZE as u64;

impl MmUser {
    /// Maps memory (`mmap`); returns the guest address.
    ///
    /// The host mapping is created before the lock is taken; a fixed address
    /// that overlaps an existing VMA fails with `Overlap` (`MAP_FIXED_NOREPLACE`).
    pub async fn mmap(&self, opts: MapOptions) -> Result<u64> {
        self.check_not_killed()?;
        let limit = self.config.va_limit;
        let align = if opts.hugepage {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        let len = check_map_options(&opts, limit)?;
        let mut region = match opts.kind {
            MapKind::AnonPrivate => HostRegion::new_anon(len, align, opts.prot)?,
            MapKind::SharedMemfd => HostRegion::new_shared(&self.name, len, align, opts.prot)?,
        };
        if opts.hugepage {
            sys::set_hugepage(region.range(0, len), true)
                .map_err(Error::host("madvise(HUGEPAGE)"))?;
        }
        let mut flags = VmFlags::EMPTY;
        flags = flags.with(VmFlags::SHARED, opts.kind == MapKind::SharedMemfd);
        flags = flags.with(VmFlags::HUGEPAGE, opts.hugepage);
        flags = flags.with(VmFlags::PINNED, opts.pinned);
        flags = flags.with(VmFlags::TRACKED, opts.tracked);
        let mut state = self.lock.write().await;
        sched::point("mmap:locked").await;
        if self.flags.test(MmFlag::UNSTABLE) {
            return Err(Error::Unstable { mm_id: self.id });
        }
        if opts.tracked && opts.kind == MapKind::SharedMemfd && self.config.dirty_log {
            // The dirty log is WP_ASYNC on private anonymous memory; a
            // shared region is registered MISSING | MINOR, without WP.
            return Err(Error::NotAllowed {
                addr: opts.addr.unwrap_or(0),
                reason: "a tracked shared region on a guest with a dirty log (MmConfig::dirty_log)",
            });
        }
        if opts.tracked {
            // Registered before the VMA is published (tracked/ step 2): no
            // one can touch the host range unregistered. The tracker is
            // created under the write lock, so two tracked mmaps agree on it.
            let t = self.tracker_or_start()?;
            if opts.kind == MapKind::SharedMemfd {
                t.register_shared(region.range(0, len))?;
            } else {
                t.register(region.range(0, len))?;
            }
            region.set_tracked(t);
        }
        let region = Arc::new(region);
        let addr = match opts.addr {
            Some(a) => {
                if let Some(v) = state.vmas.overlapping(a, a + opts.len).next() {
                    return Err(Error::Overlap {
                        addr: a,
                        len: opts.len,
                        vma_start: v.start,
                        vma_end: v.end,
                    });
                }
                a
            }
            None => state
                .vmas
                .find_gap(opts.len, align as u64, self.config.mmap_floor, limit)
                .ok_or(Error::NoSpace { len: opts.len })?,
        };
        if let Some(t) = region.tracker() {
            let restore = opts.source.as_ref().map(|s| s.restore());
            t.add_range(
                region.base() as usize,
                len,
                addr,
                opts.fault_around,
                restore,
                opts.kind == MapKind::SharedMemfd,
            );
        }
        let vma = Vma {
            start: addr,
            end: addr + opts.len,
            prot: opts.prot,
            flags,
            region,
            region_off: 0,
        };
        // `ksm_add_vma`: a KSM candidate from the start under VM_MERGE_ANY.
        super::ksm_wp::on_new_vma(self, &vma);
        state.get_mut().vmas.insert(vma);
        Ok(addr)
    }

    /// Write-protects the pages of `[addr, addr+len)`, all inside tracked
    /// regions, after populating them (charging the budget): a direct write
    /// blocks until [`write_unprotect`](Self::write_unprotect). Pages zapped
    /// and refaulted meanwhile come back writable.
    pub async fn write_protect(&self, addr: u64, len: u64) -> Result<()> {
        self.write_protect_inner(addr, len, true).await
    }

    /// Lifts the write protection of `[addr, addr+len)` and wakes the
    /// writers blocked on it.
    pub async fn write_unprotect(&self, addr: u64, len: u64) -> Result<()> {
        self.write_protect_inner(addr, len, false).await
    }

    async fn write_protect_inner(&self, addr: u64, len: u64, wp: bool) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        let t = self.tracker().ok_or(Error::NotTracked { addr })?;
        if t.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.id });
        }
        if t.wp_async() {
            return Err(Error::NotAllowed {
                addr,
                reason: "write_protect on a guest with a dirty log (MmConfig::dirty_log)",
            });
        }
        if !t.wp() {
            return Err(Error::Unsupported {
                what: "userfaultfd write-protect (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
            });
        }
        {
            let state = self.lock.read().await;
            state.vmas.check_mapped(addr, end)?;
            let untracked = state
                .vmas
                .overlapping(addr, end)
                .find(|v| !v.flags.contains(VmFlags::TRACKED))
                .map(|v| v.start.max(addr));
            if let Some(addr) = untracked {
                return Err(Error::NotTracked { addr });
            }
            let shared = state
                .vmas
                .overlapping(addr, end)
                .find(|v| v.is_shared())
                .map(|v| v.start.max(addr));
            if let Some(addr) = shared {
                // Registered MISSING | MINOR without WP (tracked/ step 10).
                return Err(Error::NotAllowed {
                    addr,
                    reason: "write_protect of a shared region",
                });
            }
        }
        if wp {
            // WP only protects present pages: populate first.
            self.access(addr, len, Access::Read, &mut |_, _, _| {})
                .await?;
        }
        let state = self.lock.read().await;
        state.vmas.check_mapped(addr, end)?;
        let mut res = Ok(());
        for v in state.vmas.overlapping(addr, end) {
            if !v.flags.contains(VmFlags::TRACKED) {
                res = Err(Error::NotTracked {
                    addr: v.start.max(addr),
                });
                break;
            }
            let (s, e) = (v.start.max(addr), v.end.min(end));
            res = self.writeprotect_locked(&t, v, s, e, wp);
            if res.is_err() {
                break;
            }
        }
        drop(state);
        if !wp {
            // After the bits are cleared: wake API writers waiting for them.
            t.wp_changed();
        }
        res
    }

    /// (Un)protects `[s, e)` of tracked `v` one leaf at a time, with the
    /// PTE locks of the leaf held across the ioctl and the `Pte::WP` bits.
    /// Holding them closes the race where a page is zapped and refaulted
    /// between setting its bit and the ioctl (the kernel would protect the
    /// new page while our bit says writable, and an API write under its
    /// locks would block in the kernel). The ioctl never waits for a PTE
    /// lock or for us: its only wait is `EAGAIN` while the handler (which
    /// takes no PTE lock to read messages) has a REMOVE unread.
    fn writeprotect_locked(&self, t: &Tracker, v: &Vma, s: u64, e: u64, wp: bool) -> Result<()> {
        let guard = crossbeam_epoch::pin();
        let mut gpn = s / PAGE;
        let last = e / PAGE;
        let mut olds = Vec::with_capacity(PAGES_PER_LEAF as usize);
        while gpn < last {
            let stop = ((gpn / PAGES_PER_LEAF + 1) * PAGES_PER_LEAF).min(last);
            let leaf = self.pgtable.leaf_alloc(gpn, &guard);
            olds.clear();
            for p in gpn..stop {
                olds.push(pte_lock(leaf.pte(p)));
            }
            // Merged (KSM) pages are refused: the ioctl would protect the
            // memfd mapping under them, and a later unshare or API write
            // would then block in the kernel while holding these page locks,
            // which `write_unprotect` needs (a deadlock). Undo what this call
            // already protected and say why.
            if wp && olds.iter().any(|o| Pte(*o).ksm()) {
                for (i, p) in (gpn..stop).enumerate() {
                    pte_unlock(leaf.pte(p), olds[i]);
                }
                if gpn * PAGE > s {
                    self.writeprotect_locked(t, v, s, gpn * PAGE, false)?;
                }
                return Err(Error::NotAllowed {
                    addr: gpn * PAGE,
                    reason: "write-protect of KSM-merged pages (unmerge them first)",
                });
            }
            let res = t.writeprotect(v.host_range(gpn * PAGE, stop * PAGE), wp);
            for (i, p) in (gpn..stop).enumerate() {
                let old = olds[i];
                // WP only protects present pages (no WP_UNPOPULATED).
                let new = if res.is_ok() && wp && Pte(old).present() {
                    old | Pte::WP
                } else if res.is_ok() && !wp {
                    old & !Pte::WP
                } else {
                    old
                };
                pte_unlock(leaf.pte(p), new);
            }
            res?;
            gpn = stop;
        }
        Ok(())
    }

    /// Unmaps `[addr, addr+len)` (`munmap`): holes inside are fine, as in the
    /// kernel. Zaps the pages (uncharging them); the host range is made
    /// `PROT_NONE` so direct touches fault, and a host mapping is unmapped
    /// when its last VMA goes. Page-table nodes stay until teardown.
    pub async fn munmap(&self, addr: u64, len: u64) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        // Exclusive: VMAs are removed and host mappings freed only under the
        // write lock (I-EX-1), so no reaper/ksmd reader walks a freed VMA.
        let mut state = self.lock.write().await;
        sched::point("munmap:locked").await;
        let removed = state.get_mut().vmas.remove_range(addr, end);
        for vma in &removed {
            if let Some(t) = vma.region.wp_tracker() {
                // Before the zap (tracked/ step 2): a handler COPY racing
                // us lands before the zap, which uncharges it, or fails with
                // ENOENT once the range is unregistered.
                let r = vma.host_range(vma.start, vma.end);
                t.forget(r.ptr() as usize, r.ptr() as usize + r.len());
            }
            let _ = self.notify_invalidate_start(vma.start..vma.end, true);
            let res = self.zap_vma(vma, vma.start, vma.end, ZapReason::Munmap);
            self.notify_invalidate_end(vma.start..vma.end);
            res?;
            if Arc::strong_count(&vma.region) > 1 {
                sys::protect(vma.host_range(vma.start, vma.end), Prot::NONE.bits())
                    .map_err(Error::host("mprotect"))?;
            }
        }
        drop(removed);
        Ok(())
    }

    /// Changes protection (`mprotect`); splits and merges VMAs.
    pub async fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<()> {
        self.check_not_killed()?;
        let end = check_range(addr, len, self.config.va_limit)?;
        let mut state = self.lock.write().await;
        sched::point("mprotect:locked").await;
        state.vmas.check_mapped(addr, end)?;
        each_host_range(&state, addr, end, "mprotect", |r| {
            sys::protect(r, prot.bits())
        })?;
        state.get_mut().vmas.modify(addr, end, |v| v.prot = prot);
        Ok(())
    }

    /// `mlock`: populates (charging the budget), pins the host pages and sets
    /// `VM_LOCKED`.
    pub async fn mlock(&self, addr: u64, len: u64) -> Result<()> {
        self.check_not_killed()?;
        let end = check_range(addr, len, self.config.va_limit)?;
        // Populate under the read lock first (it may need to wait for room),
        // then flip the flag under the write lock.
        self.populate(addr, end).await?;
        let mut state = self.lock.write().await;
        sched::point("mlock:locked").await;
        // VM_LOCKED changes only under the exclusive lock: the reaper (a
        // reader) must never see it change mid-walk (CVE-2018-1000200).
        state.vmas.check_mapped(addr, end)?;
        // The kernel's mlock fails (ENOMEM) on PROT_NONE ranges it cannot
        // populate; refuse before pinning anything, so nothing is half-locked.
        if let Some(v) = state
            .vmas
            .overlapping(addr, end)
            .find(|v| v.prot == Prot::NONE)
        {
            return Err(Error::Protection {
                addr: v.start.max(addr),
                access: Access::Read,
            });
        }
        each_host_range(&state, addr, end, "mlock", |r| sys::lock(r, true))?;
        state
            .get_mut()
            .vmas
            .modify(addr, end, |v| v.flags = v.flags.with(VmFlags::LOCKED, true));
        Ok(())
    }

    /// `munlock`: clears `VM_LOCKED` under the exclusive lock.
    pub async fn munlock(&self, addr: u64, len: u64) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        let mut state = self.lock.write().await;
        sched::point("munlock:locked").await;
        // Exclusive, for the same reason as mlock (CVE-2018-1000200).
        state.vmas.check_mapped(addr, end)?;
        each_host_range(&state, addr, end, "munlock", |r| sys::lock(r, false))?;
        state.get_mut().vmas.modify(addr, end, |v| {
            v.flags = v.flags.with(VmFlags::LOCKED, false)
        });
        Ok(())
    }

    /// `madvise`.
    pub async fn madvise(&self, addr: u64, len: u64, advice: Advice) -> Result<()> {
        if advice != Advice::DontNeed {
            self.check_not_killed()?;
        }
        let end = check_range(addr, len, self.config.va_limit)?;
        if advice == Advice::Mergeable && self.config.dirty_log {
            // A merge blocks writers with synchronous write-protect, which
            // the dirty log's WP_ASYNC descriptor cannot give.
            return Err(Error::NotAllowed {
                addr,
                reason: "madvise(MERGEABLE) on a guest with a dirty log (MmConfig::dirty_log)",
            });
        }
        match advice {
            Advice::DontNeed => {
                // Read lock, like the kernel: DONTNEED only zaps pages and
                // races with faults under the page locks.
                let state = self.lock.read().await;
                sched::point("madvise:locked").await;
                state.vmas.check_mapped(addr, end)?;
                for v in state.vmas.overlapping(addr, end) {
                    if v.flags.contains(VmFlags::LOCKED) || v.flags.contains(VmFlags::PINNED) {
                        return Err(Error::NotAllowed {
                            addr: v.start.max(addr),
                            reason: "madvise(DONTNEED) on a locked or pinned mapping",
                        });
                    }
                }
                for v in state.vmas.overlapping(addr, end) {
                    let (s, e) = (v.start.max(addr), v.end.min(end));
                    if v.is_shared() {
                        // Shared contents stay in the memfd; only this
                        // mapping's host PTEs go (`discard_shared`).
                        self.discard_shared(v, s, e)?;
                    } else {
                        self.zap_range(&state, v, s, e, ZapReason::DontNeed)?;
                    }
                }
                Ok(())
            }
            Advice::Mergeable | Advice::Unmergeable | Advice::HugePage | Advice::NoHugePage => {
                let mut state = self.lock.write().await;
                sched::point("madvise:locked").await;
                state.vmas.check_mapped(addr, end)?;
                let (flag, on) = match advice {
                    Advice::Mergeable => (VmFlags::MERGEABLE, true),
                    Advice::Unmergeable => (VmFlags::MERGEABLE, false),
                    Advice::HugePage => (VmFlags::HUGEPAGE, true),
                    _ => (VmFlags::HUGEPAGE, false),
                };
                if advice == Advice::Unmergeable {
                    // `unmerge_ksm_pages` before the flag goes, under the same
                    // write lock (the kernel's ksm_madvise order): a scanner
                    // that finds the range no longer mergeable drops its rmap
                    // items, and with them the stable pages' mappers; a page
                    // still mapping one then would read zeros once the
                    // other mappers left (issue 16's data-loss input had the
                    // unshare in a later, separate lock section).
                    self.vma_hooks.unmergeable(self, &state, addr, end - addr)?;
                }
                if advice == Advice::HugePage {
                    // mmap refuses huge pages on a tracked region (its
                    // userfaultfd serves 4 KiB pages); so does madvise.
                    if let Some(v) = state
                        .vmas
                        .overlapping(addr, end)
                        .find(|v| v.region.tracker().is_some())
                    {
                        return Err(Error::NotAllowed {
                            addr: v.start.max(addr),
                            reason: "madvise(HUGEPAGE) on a tracked region",
                        });
                    }
                }
                if advice == Advice::Mergeable {
                    if let Some(v) = state
                        .vmas
                        .overlapping(addr, end)
                        .find(|v| v.is_shared() && v.region.tracker().is_some())
                    {
                        // KSM merges private anonymous pages only; a
                        // tracked shared region asked for it explicitly.
                        return Err(Error::NotAllowed {
                            addr: v.start.max(addr),
                            reason: "madvise(MERGEABLE) on a tracked shared region",
                        });
                    }
                    // Before the flag: advice KSM cannot honour is an error.
                    super::ksm_wp::on_madvise_mergeable(self, &state, addr, end)?;
                }
                if flag == VmFlags::HUGEPAGE {
                    for v in state.vmas.overlapping(addr, end) {
                        let (s, e) = (v.start.max(addr), v.end.min(end));
                        sys::set_hugepage(v.host_range(s, e), on)
                            .map_err(Error::host("madvise(HUGEPAGE)"))?;
                    }
                }
                state
                    .get_mut()
                    .vmas
                    .modify(addr, end, |v| v.flags = v.flags.with(flag, on));
                Ok(())
            }
        }
    }

    /// Reads guest memory into `buf`, populating untouched pages.
    pub async fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.access(addr, buf.len() as u64, Access::Read, &mut |host, off, n| {
            let dst = &mut buf[off as usize..(off + n) as usize];
            // SAFETY: the fault path holds the page locks of this window and
            // the mmap read lock, so the host range is mapped, readable and
            // not being discarded, for `n` bytes from `host`.
            unsafe { sys::copy_from_host(host, dst) }
        })
        .await
    }

    /// Writes `data` into guest memory.
    pub async fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.access(
            addr,
            data.len() as u64,
            Access::Write,
            &mut |host, off, n| {
                let src = &data[off as usize..(off + n) as usize];
                // SAFETY: as in `read`, for a writable range (checked by
                // the access path).
                unsafe { sys::copy_to_host(src, host) }
            },
        )
        .await
    }

    /// Fills `[addr, addr+len)` with `byte`.
    pub async fn fill(&self, addr: u64, len: u64, byte: u8) -> Result<()> {
        self.access(addr, len, Access::Write, &mut |host, _off, n| {
            // SAFETY: as in `write`.
            unsafe { sys::fill_host(host, n as usize, byte) }
        })
        .await
    }

    /// Does guest memory at `addr` equal `data`?
    pub async fn compare(&self, addr: u64, data: &[u8]) -> Result<bool> {
        let mut equal = true;
        let mut page = Vec::new();
        self.access(
            addr,
            data.len() as u64,
            Access::Read,
            &mut |host, off, n| {
                page.resize(n as usize, 0);
                // SAFETY: as in `read`.
                unsafe { sys::copy_from_host(host, &mut page) };
                equal &= page[..] == data[off as usize..(off + n) as usize];
            },
        )
        .await?;
        Ok(equal)
    }

    /// The VMA containing `addr` (a copy of its descriptor). Its
    /// [`host_ptr`](Vma::host_ptr) is usable while this user is held.
    pub async fn find_vma(&self, addr: u64) -> Result<Vma> {
        let state = self.lock.read().await;
        state
            .vmas
            .find(addr)
            .cloned()
            .ok_or(Error::Unmapped { addr })
    }

    /// Checks that the kernel may fault on `[addr, addr + len)` on the
    /// guest's behalf: every page mapped, and no userfaultfd registration
    /// of it user-mode-only ([`Error::UserModeOnly`] names the first such
    /// page). Call it before handing the range to KVM as a memslot or to
    /// `O_DIRECT` I/O.
    pub async fn check_kernel_access(&self, addr: u64, len: u64) -> Result<()> {
        let end = check_range(addr, len, self.config.va_limit)?;
        let state = self.lock.read().await;
        state.vmas.check_mapped(addr, end)?;
        let user_mode_only = state
            .vmas
            .overlapping(addr, end)
            .find(|v| v.user_mode_only())
            .map(|v| v.start.max(addr));
        match user_mode_only {
            Some(addr) => Err(Error::UserModeOnly { addr }),
            None => Ok(()),
        }
    }

    /// All VMAs (copies).
    pub async fn vmas(&self) -> Vec<Vma> {
        self.lock.read().await.vmas.iter().cloned().collect()
    }

    /// Host bytes resident under this mm's VMAs, by `mincore`.
    pub async fn resident_bytes(&self) -> Result<u64> {
        let state = self.lock.read().await;
        (**self).resident_bytes(&state)
    }
}

/// Validates `mmap` options against the address-space limit; returns the
/// length as a host size.
fn check_map_options(opts: &MapOptions, limit: u64) -> Result<usize> {
    let probe = opts.addr.unwrap_or(0);
    check_range(probe, opts.len, limit)?;
    let len = usize::try_from(opts.len).map_err(|_| Error::Overflow {
        addr: probe,
        len: opts.len,
    })?;
    if opts.tracked {
        if opts.hugepage {
            return Err(Error::NotAllowed {
                addr: probe,
                reason: "tracked regions are 4 KiB mappings (no MADV_HUGEPAGE)",
            });
        }
        let fa = opts.fault_around;
        if !fa.is_power_of_two() || !(PAGE..=HUGE_PAGE_SIZE as u64).contains(&fa) {
            return Err(Error::BadFaultAround { bytes: fa });
        }
    }
    if let Some(src) = &opts.source {
        if !opts.tracked || src.len() != opts.len {
            return Err(Error::InvalidArgument {
                what: "a restored region is tracked and exactly as long as its snapshot source",
            });
        }
    }
    Ok(len)
}

/// `f` on the host range of each VMA's part of `[addr, end)`, in address
/// order; stops at the first failure (`Error::Host { op }`).
fn each_host_range(
    state: &MmState,
    addr: u64,
    end: u64,
    op: &'static str,
    mut f: impl FnMut(sys::HostRange) -> std::io::Result<()>,
) -> Result<()> {
    for v in state.vmas.overlapping(addr, end) {
        let (s, e) = (v.start.max(addr), v.end.min(end));
        f(v.host_range(s, e)).map_err(Error::host(op))?;
    }
    Ok(())
}
