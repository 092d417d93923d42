//! Write-protect (step 7): registration for WP, the protect/unprotect
//! ioctl, and the generation API writers wait on with no lock held.

use super::*;

impl Tracker {
    /// Can merged pages (private memfd mappings) be write-protected?
    pub(crate) fn wp_shmem(&self) -> bool {
        self.wp_shmem
    }

    /// Registers a KSM merged range (a private memfd mapping) for
    /// write-protect only, so that its pages can be merged again.
    pub(crate) fn register_wp_only(&self, r: HostRange) -> Result<()> {
        if self.is_dead() || !self.wp_shmem {
            return Ok(());
        }
        self.register_routed(r, uffd::mode::WP, "UFFDIO_REGISTER(WP)")
    }

    /// Registers an untracked private anonymous mapping for write-protect
    /// only (KSM on an untracked region): no MISSING mode, so first touches
    /// stay the kernel's and the handler only ever sees write-protect
    /// faults (left blocked until the merge's window closes) and the
    /// REMOVE/UNMAP messages of the range. `Unsupported` without WP.
    pub(crate) fn register_wp_anon(&self, r: HostRange) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        if !self.wp {
            return Err(Error::Unsupported {
                what: "userfaultfd write-protect (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
            });
        }
        match self.quiet() {
            Some(q) => self.register_routed_on(q, r, uffd::mode::WP, "UFFDIO_REGISTER(WP)"),
            None => self.register_routed(r, uffd::mode::WP, "UFFDIO_REGISTER(WP)"),
        }
    }

    /// The current generation of `Pte::WP` clearings (step 7). Read under
    /// the PTE lock that showed the bit set.
    pub(crate) fn wp_gen(&self) -> u64 {
        self.wp_gen.load(Ordering::SeqCst)
    }

    /// Some `Pte::WP` bits were cleared (unprotect, a zap, death): wake the
    /// API writers waiting for them. Called after the bits are cleared.
    pub(crate) fn wp_changed(&self) {
        self.wp_gen.fetch_add(1, Ordering::SeqCst);
        self.wp_event.notify(usize::MAX);
    }

    /// Waits (async, no lock held) until the `Pte::WP` generation moves
    /// past `gen` or the tracker dies.
    pub(crate) async fn wait_wp(&self, gen: u64) {
        self.counters.api_wp_waits.fetch_add(1, Ordering::Relaxed);
        loop {
            // Listen first, then re-check: a clearing between our unlock and
            // `listen` bumped the generation, so it is never missed.
            let l = self.wp_event.listen();
            if self.wp_gen() != gen || self.is_dead() {
                return;
            }
            l.await;
        }
    }

    /// `UFFDIO_WRITEPROTECT` over a host range. The caller holds the PTE
    /// locks of the range; `EAGAIN` (a REMOVE/UNMAP not yet read) is retried
    /// with backoff, as in `populate_locked`: the handler reads messages
    /// without any page lock.
    pub(crate) fn writeprotect(&self, r: HostRange, wp: bool) -> Result<()> {
        if self.is_dead() {
            return Err(Error::TrackerDead { mm_id: self.mm_id });
        }
        let mut tries = 0u32;
        loop {
            match self.with_uffd_at(r.ptr() as usize, |u| {
                u.writeprotect(r.ptr() as usize, r.len(), wp)
            }) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < API_EAGAIN_TRIES => {
                    tries += 1;
                    self.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
                    if tries < 64 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                Err(_) if self.is_dead() => return Err(Error::TrackerDead { mm_id: self.mm_id }),
                res => return res.map_err(Error::host("UFFDIO_WRITEPROTECT")),
            }
        }
    }
}
