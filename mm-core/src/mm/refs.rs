//! The two reference counts of an [`Mm`].
//!
//! # The two counts
//!
//! | kernel | here | keeps alive |
//! |---|---|---|
//! | `mm_users` (`mmget`, `mmget_not_zero`, `mmput`) | [`MmUser`] | the contents: VMAs, page tables, host memory |
//! | `mm_count` (`mmgrab`, `mmdrop`) | [`MmGrab`] | only the struct: id, flags, lock, an empty tree |
//!
//! All users together hold one count, dropped by the teardown that the last
//! user runs. `users` is never raised from 0: [`MmGrab::upgrade`] is
//! `mmget_not_zero`. The struct is freed exactly when the count reaches 0
//! (every handle owns an `Arc<Mm>`, and `users > 0 ⇒ count ≥ 1`, so the last
//! `Arc` goes with the last count; [`MmWatch`] lets a test observe it).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use futures_lite::future::block_on;

use super::*;
use crate::sched;

/// A user reference (`mm_users`): keeps the address space's contents alive.
///
/// Cloning is `mmget`. Dropping the last one runs the teardown (`__mmput`:
/// scanner exit hooks, then `exit_mmap`) in the dropping thread; async owners
/// should call [`MmUser::exit`] instead.
pub struct MmUser {
    /// `None` only inside `exit`, which consumes `self`.
    pub(super) mm: Option<Arc<Mm>>,
}

impl std::fmt::Debug for MmUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MmUser").field(&**self).finish()
    }
}

impl std::ops::Deref for MmUser {
    type Target = Mm;
    fn deref(&self) -> &Mm {
        self.mm
            .as_deref()
            .expect("MmUser is only empty inside exit()")
    }
}

impl Clone for MmUser {
    /// `mmget`: we hold a user, so `users ≥ 1` and the increment can be relaxed.
    fn clone(&self) -> Self {
        self.users.fetch_add(1, Ordering::Relaxed);
        MmUser {
            mm: self.mm.clone(),
        }
    }
}

impl Drop for MmUser {
    fn drop(&mut self) {
        if let Some(mm) = self.mm.take() {
            if mm.users.fetch_sub(1, Ordering::AcqRel) == 1 {
                block_on(mm.mmput_last());
            }
        }
    }
}

impl MmUser {
    /// `mmput` for async owners: drop this user; if it was the last, run the
    /// teardown in this task.
    pub async fn exit(mut self) {
        let mm = self.mm.take().expect("present until exit");
        // AcqRel: pairs with the other users' decrements, so the teardown
        // sees everything they did to the mm.
        if mm.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            mm.mmput_last().await;
        }
    }

    /// `mmgrab`: a count reference to the struct.
    pub fn grab(&self) -> MmGrab {
        self.count.fetch_add(1, Ordering::Relaxed);
        MmGrab {
            mm: self.mm.clone().expect("present until exit"),
        }
    }

    /// An observer that tells when the struct has been freed.
    pub fn watch(&self) -> MmWatch {
        MmWatch(Arc::downgrade(
            self.mm.as_ref().expect("present until exit"),
        ))
    }
}

/// A count reference (`mm_count`): keeps the struct (id, flags, lock, an
/// empty tree) alive, never the contents. Check for exit (`users() == 0`,
/// `OOM_SKIP`, an empty tree) after taking the lock before using contents.
pub struct MmGrab {
    mm: Arc<Mm>,
}

impl std::fmt::Debug for MmGrab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MmGrab").field(&*self.mm).finish()
    }
}

impl std::ops::Deref for MmGrab {
    type Target = Mm;
    fn deref(&self) -> &Mm {
        &self.mm
    }
}

impl Clone for MmGrab {
    /// `mmgrab` from a held count.
    fn clone(&self) -> Self {
        self.mm.count.fetch_add(1, Ordering::Relaxed);
        MmGrab {
            mm: self.mm.clone(),
        }
    }
}

impl Drop for MmGrab {
    /// `mmdrop`. When this was the last count, the `Arc` released right
    /// after is the last one too, and the struct is freed here.
    fn drop(&mut self) {
        let prev = self.mm.count.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev >= 1, "mm_count underflow");
    }
}

impl MmGrab {
    /// `mmget_not_zero`: a user reference if the address space still has
    /// users; never raises `users` from 0 (I-RC-1).
    pub fn upgrade(&self) -> Option<MmUser> {
        let mut n = self.mm.users.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return None;
            }
            match self
                .mm
                .users
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(MmUser {
                        mm: Some(self.mm.clone()),
                    })
                }
                Err(cur) => n = cur,
            }
        }
    }

    /// An observer that tells when the struct has been freed.
    pub fn watch(&self) -> MmWatch {
        MmWatch(Arc::downgrade(&self.mm))
    }
}

/// Observes an mm struct without keeping it alive (tests and oracles).
#[derive(Debug, Clone)]
pub struct MmWatch(Weak<Mm>);

impl MmWatch {
    /// Has the struct been freed (count reached 0)?
    pub fn is_freed(&self) -> bool {
        self.0.strong_count() == 0
    }
}

impl Mm {
    /// `mmdrop` of the users' collective count, at the end of `__mmput`.
    fn mmdrop_users_count(&self) {
        let prev = self.count.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev >= 1, "mm_count underflow");
    }

    /// `__mmput`: the last user is gone (`users == 0`, never raised again).
    async fn mmput_last(&self) {
        debug_assert_eq!(self.users(), 0);
        sched::point("mmput:start").await;
        // ksm_exit / khugepaged_exit run before exit_mmap with users already
        // 0 (I-KSM-3): a scanner that takes the read lock after their barrier
        // sees users == 0 and leaves the mm alone.
        let hooks = lock_list(&self.exit_hooks).clone();
        for h in &hooks {
            h.exit(self).await;
        }
        sched::point("mmput:after_exit_hooks").await;
        self.exit_mmap().await;
        sched::point("mmput:before_mmdrop").await;
        self.mmdrop_users_count();
    }
}
