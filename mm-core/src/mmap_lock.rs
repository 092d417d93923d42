//! `MmapLock`: the per-mm rwsem (`mm->mmap_lock`).
//!
//! A writer-preferring async reader-writer lock (async-lock 3): once a writer
//! waits, new readers queue behind it and [`MmapLock::try_read`] is refused, as
//! `mmap_read_trylock` fails against a queued writer. The reaper depends on
//! that: it never waits for the victim's lock (I-EX-6).
//!
//! Every acquire and release goes through this file, which calls
//! [`sched::point`] before each acquire and
//! [`sched::note`] on each release, so the race harness
//! can switch actors at every lock step.
//!
//! Guards are `Send` but must not be held across an `.await` of anything
//! except another step of the same protocol: the race harness schedules
//! actors on one thread, and a guard held across an unrelated await would only
//! make the deadlock detector fire.

use std::ops::Deref;

use async_lock::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::sched;

/// The mmap lock, guarding `T` (the VMA tree).
#[derive(Debug)]
pub struct MmapLock<T> {
    inner: RwLock<T>,
}

/// Shared guard (`mmap_read_lock`).
#[derive(Debug)]
#[must_use = "the lock is released when the guard drops"]
pub struct MmapReadGuard<'a, T> {
    guard: RwLockReadGuard<'a, T>,
}

/// Exclusive guard (`mmap_write_lock`).
#[derive(Debug)]
#[must_use = "the lock is released when the guard drops"]
pub struct MmapWriteGuard<'a, T> {
    guard: RwLockWriteGuard<'a, T>,
}

impl<T> MmapLock<T> {
    /// A new unlocked lock around `value`.
    pub fn new(value: T) -> Self {
        MmapLock {
            inner: RwLock::new(value),
        }
    }

    /// `mmap_read_lock`.
    pub async fn read(&self) -> MmapReadGuard<'_, T> {
        sched::point("mmap_lock:read").await;
        MmapReadGuard {
            guard: self.inner.read().await,
        }
    }

    /// `mmap_write_lock`.
    pub async fn write(&self) -> MmapWriteGuard<'_, T> {
        sched::point("mmap_lock:write").await;
        MmapWriteGuard {
            guard: self.inner.write().await,
        }
    }

    /// `mmap_read_trylock`: refused while a writer holds the lock or waits for it.
    pub fn try_read(&self) -> Option<MmapReadGuard<'_, T>> {
        sched::note("mmap_lock:try_read");
        self.inner.try_read().map(|guard| MmapReadGuard { guard })
    }

    /// `mmap_write_trylock`.
    pub fn try_write(&self) -> Option<MmapWriteGuard<'_, T>> {
        sched::note("mmap_lock:try_write");
        self.inner.try_write().map(|guard| MmapWriteGuard { guard })
    }

    /// Blocking `mmap_read_lock` for synchronous callers (parks the thread).
    pub fn read_blocking(&self) -> MmapReadGuard<'_, T> {
        sched::note("mmap_lock:read_blocking");
        MmapReadGuard {
            guard: self.inner.read_blocking(),
        }
    }

    /// Blocking `mmap_write_lock` for synchronous callers.
    pub fn write_blocking(&self) -> MmapWriteGuard<'_, T> {
        sched::note("mmap_lock:write_blocking");
        MmapWriteGuard {
            guard: self.inner.write_blocking(),
        }
    }
}

impl<'a, T> MmapWriteGuard<'a, T> {
    /// `mmap_write_downgrade`: turn the write lock into a read lock without
    /// letting another writer in between.
    pub fn downgrade(this: Self) -> MmapReadGuard<'a, T> {
        sched::note("mmap_lock:downgrade");
        let this = std::mem::ManuallyDrop::new(this);
        // SAFETY: `this` is never dropped (ManuallyDrop), so the guard is
        // moved out exactly once and its release note is skipped on purpose:
        // the lock stays held, as a read lock.
        let guard = unsafe { std::ptr::read(&this.guard) };
        MmapReadGuard {
            guard: RwLockWriteGuard::downgrade(guard),
        }
    }
}

impl<T> Drop for MmapReadGuard<'_, T> {
    fn drop(&mut self) {
        sched::note("mmap_lock:read_unlock");
    }
}

impl<T> Drop for MmapWriteGuard<'_, T> {
    fn drop(&mut self) {
        sched::note("mmap_lock:write_unlock");
    }
}

impl<T> Deref for MmapReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> Deref for MmapWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> MmapWriteGuard<'_, T> {
    /// The guarded value, mutably: only mm-core changes what the lock
    /// guards (for an mm, its `MmState`). Not `DerefMut`: a caller outside
    /// mm-core holding two write guards could otherwise swap two mms'
    /// states, and the lock proof would no longer say which tree it guards.
    pub(crate) fn get_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn test_try_read_refused_while_writer_waits() {
        let lock = std::sync::Arc::new(MmapLock::new(0u32));
        let r = lock.read_blocking();
        let l2 = lock.clone();
        let writer = std::thread::spawn(move || {
            let mut w = l2.write_blocking();
            *w.get_mut() += 1;
        });
        // Wait until the writer is queued: try_read then fails although only
        // a reader holds the lock (writer preference).
        let mut refused = false;
        for _ in 0..2000 {
            match lock.try_read() {
                None => {
                    refused = true;
                    break;
                }
                Some(g) => drop(g),
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(refused, "a queued writer must refuse try_read");
        drop(r);
        writer.join().unwrap();
        assert_eq!(*block_on(lock.read()), 1);
    }

    #[test]
    fn test_downgrade_keeps_writers_out() {
        let lock = MmapLock::new(1u32);
        let mut w = block_on(lock.write());
        *w.get_mut() = 2;
        let r = MmapWriteGuard::downgrade(w);
        assert!(lock.try_write().is_none());
        assert!(lock.try_read().is_some());
        assert_eq!(*r, 2);
        drop(r);
        assert!(lock.try_write().is_some());
    }
}
