//! `exit_mmap`: the teardown of an address space, step by step as the
//! current kernel does it (PROTOCOL.md §5.3).
//!
//! ```text
//!  1  notifiers release            no lock
//!  2  read lock                    ── the reaper / mrelease / ksmd may be readers too
//!  4  empty tree? → write lock, 11
//!  5  zap every VMA (fullmm)       read
//!  6  read unlock
//!  7  set OOM_SKIP                 no lock; published before 8
//!  8  write lock                   ── waits for every reader still inside
//!  9  free_pgtables                write
//! 10  remove every VMA             write (host mappings unmapped here)
//! 11  tree empty                   write
//! 12  write unlock
//! ```
//!
//! Why each lock is where it is, against its counterparts:
//!
//! ```text
//!  exit_mmap                          | reaper (oom_reap_task_mm)
//!  read lock; zap all                 | try_read ok; OOM_SKIP? no; zap   (both zap: idempotent)
//!  read unlock                        |
//!  set OOM_SKIP                       |
//!  write lock (waits for the reaper)  | ... reaper finishes, read unlock
//!  free_pgtables; remove VMAs         |
//!  write unlock (tree empty)          | try_read ok; OOM_SKIP? yes -> skip
//! ```
//!
//! Without the write lock at 8 (the pre-seed-2 protocol), `process_mrelease`
//! holding only a count could walk a VMA that step 10 had just freed; without
//! leaving the tree empty at 11 a reader after 12 would still find the stale
//! VMAs (syzbot 2ccf63a4, Feb 2022).

use crate::flags::MmFlag;
use crate::mm::{Mm, ZapReason};
use crate::sched;

impl Mm {
    /// Runs the teardown. Called only from `__mmput` (the last user).
    pub(crate) async fn exit_mmap(&self) {
        debug_assert_eq!(self.users(), 0);
        self.mark_exit_started();

        // 1. mmu_notifier_release, no lock: every secondary MMU drops its
        //    translations before any page goes (I-EX-5), and is unhooked, so
        //    the reaper's nonblocking invalidate can no longer be refused.
        for n in self.take_notifiers() {
            n.release(self);
        }
        sched::point("exit_mmap:after_notifier_release").await;

        // 2. Read lock: the reaper and mrelease may zap at the same time
        //    (they are readers too); zapping is idempotent under the page locks.
        let state = self.lock().read().await;
        sched::point("exit_mmap:read_locked").await;

        // 4. Nothing mapped (never mapped, or a failed build): straight to
        //    the write-locked part. As in the kernel, OOM_SKIP is not set here.
        let mut state = if state.vmas().is_empty() {
            drop(state);
            sched::point("exit_mmap:empty_tree").await;
            self.lock().write().await
        } else {
            // 5a. Tracked regions leave the userfaultfd before the zap
            //     (tracked/ step 8): nobody may touch them any more
            //     (users == 0), and a zap must not wait for the handler to
            //     read its REMOVE message when this teardown runs on the
            //     handler thread itself (an OOM kill from its pressure path).
            self.tracker_forget_all();
            // 5. unmap_vmas: zap everything, one pass in address order.
            for vma in state.vmas().iter() {
                if let Err(e) = self.zap_range(&state, vma, vma.start(), vma.end(), ZapReason::Exit)
                {
                    tracing::error!(target: "mm_core::exit_mmap", mm_id = self.id(), error = %e, "zap failed");
                }
            }
            sched::point("exit_mmap:after_unmap").await;
            // 6.
            drop(state);
            sched::point("exit_mmap:read_unlocked").await;

            // 7. OOM_SKIP before asking for the write lock (I-EX-2): any
            //    reader that gets the lock after step 12 sees it and skips;
            //    the OOM killer may now pick another victim. Counterpart:
            //    the OOM_SKIP test under the read lock in the reaper.
            self.flags().set(MmFlag::OOM_SKIP);
            sched::point("exit_mmap:oom_skip_set").await;

            // 8. Write lock: waits for a reaper / mrelease / ksmd reader that
            //    is still inside, so none of them sees step 9 or 10 happen.
            self.lock().write().await
        };
        sched::point("exit_mmap:write_locked").await;

        // 9. free_pgtables: only under the write lock (I-EX-1); nodes go to
        //    the epoch collector, so even a lockless sampler is safe.
        let freed_nodes = self.page_table().free_pgtables(state.get_mut());
        sched::point("exit_mmap:after_free_pgtables").await;

        // 10 + 11. Remove every VMA and leave the tree empty, still under
        //    the write lock: a reader after step 12 sees zero VMAs
        //    (I-EX-1, the 2022 `mm->mmap = NULL` fix). Dropping the last VMA
        //    of a host region unmaps it.
        let vmas = Mm::state_take_all(state.get_mut());
        for v in &vmas {
            v.region.mark_removed();
        }
        let map_count = vmas.len();
        drop(vmas);
        debug_assert!(state.vmas().is_empty());
        sched::point("exit_mmap:after_remove_vmas").await;
        tracing::debug!(
            target: "mm_core::exit_mmap",
            mm_id = self.id(),
            map_count,
            freed_nodes,
            rss_pages = self.rss_pages(),
            "exit_mmap"
        );

        // 12. Write unlock.
        drop(state);
        // 13. Stop and join the userfaultfd handler, with no lock held: it
        //     may be inside the pressure path, whose reclaim plug-ins take
        //     mmap locks. Its ranges were unregistered at 5a and their
        //     regions unmapped at 10, so no fault can be waiting for it.
        self.tracker_stop();
        // Through: a lingering guest's exit may now clear its victim mark
        // (`Host::prune_exited`). Not OOM_SKIP, which step 4 never sets: a
        // victim that had unmapped everything before its last user exited
        // stayed counted for ever, and every later OOM selection aborted
        // on it (a victim without OOM_SKIP, I-RP-7).
        self.mark_exit_done();
        sched::point("exit_mmap:done").await;
    }
}
