//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use guestmm::ProcessMemory;

pub const MIB: u64 = 1 << 20;

/// A fresh path in the temp dir, unique to this process and thread,
/// removed on drop.
pub struct TmpFile(pub std::path::PathBuf);

impl TmpFile {
    pub fn new(name: &str) -> TmpFile {
        TmpFile(std::env::temp_dir().join(format!(
            "guestmm-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )))
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A host whose guests keep a dirty log (`MmConfig::dirty_log`).
pub fn dirty_host(budget: u64) -> guestmm::Host {
    guestmm::Host::new(guestmm::HostConfig {
        mm: guestmm::MmConfig {
            dirty_log: true,
            ..guestmm::MmConfig::default()
        },
        ..guestmm::HostConfig::with_budget(budget)
    })
}

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

/// Runs test `name` of this test binary in a child process, with `env`
/// set to `name` (the child's body runs only there). A child still running
/// after `hang` is killed and the test fails, so a hang (a fault nobody
/// answers) cannot hang `cargo test`.
pub fn run_child(env: &str, name: &str, hang: std::time::Duration) -> std::process::ExitStatus {
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, name)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn child");
    let deadline = std::time::Instant::now() + hang;
    loop {
        if let Some(st) = child.try_wait().expect("wait child") {
            return st;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {name} still running after {hang:?}: killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
