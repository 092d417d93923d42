//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use guestmm::ProcessMemory;

pub const MIB: u64 = 1 << 20;

/// Tests that read process-wide numbers (RSS, PSS) take this lock so that
/// no other test of the same binary allocates meanwhile.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Process RSS in bytes, from /proc/self/smaps_rollup.
pub fn rss() -> u64 {
    ProcessMemory::current().expect("smaps_rollup").rss
}

/// `|a - b| <= tol`.
pub fn near(a: u64, b: u64, tol: u64) -> bool {
    a.abs_diff(b) <= tol
}

fn myself() -> procfs::process::Process {
    procfs::process::Process::myself().expect("/proc/self")
}

/// Open descriptors of this process (`/proc/self/fd`).
pub fn fd_count() -> usize {
    myself().fd_count().expect("/proc/self/fd")
}

/// Threads of this process (`/proc/self/task`).
pub fn task_count() -> usize {
    myself().tasks().expect("/proc/self/task").count()
}

/// The names (`comm`) of this process's threads.
pub fn thread_names() -> Vec<String> {
    myself()
        .tasks()
        .expect("/proc/self/task")
        .flatten()
        .filter_map(|t| t.stat().ok())
        .map(|s| s.comm)
        .collect()
}

/// Mappings of this process (lines of `/proc/self/maps`).
pub fn maps_count() -> usize {
    myself().maps().expect("/proc/self/maps").len()
}
