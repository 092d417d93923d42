//! # mm-core: guest address spaces on real host memory
//!
//! An [`Mm`] is one guest address space: VMAs in a tree guarded by an async
//! [`MmapLock`], a 4-level page table, per-mm flags, and the kernel's two
//! reference counts ([`MmUser`] = `mm_users`, [`MmGrab`] = `mm_count`).
//! Every VMA is a slice of one real host mapping (anonymous private, or a
//! memfd mapped shared) whose host pointer an embedder may hand to KVM or
//! JIT code. Pages are populated on first touch through the access API
//! (charging the [`Host`] budget), zapped with `madvise(DONTNEED)` /
//! `fallocate(PUNCH_HOLE)`, and the whole space is torn down by `exit_mmap`
//! exactly as the current Linux kernel does it (see `exit.rs`).
//!
//! # Layers
//!
//! Three layers; a module imports only modules of its own layer or below,
//! and the graph of top-level modules is acyclic (a folder's own files are
//! one module). The unit tests in `layers.rs` read the sources and enforce
//! both, with the table and the middle-layer edges below. Lower layers
//! reach higher ones only through hooks injected at creation:
//!
//! - the pressure path: `types::Pressure` (`Arc<dyn Pressure>` in every
//!   [`Mm`], given by [`Host::new_mm`]); the middle layer never names the
//!   host;
//! - `madvise(UNMERGEABLE)`: `mm::VmaHooks` (`&'static dyn VmaHooks` in
//!   every [`Mm`], [`Host::new_mm`] gives KSM's, `ksm::KsmHooks`, which
//!   unshares the range under the same write lock before `VM_MERGEABLE`
//!   goes); mm never names the KSM seam;
//! - the userfaultfd handler: `tracked::FaultTarget` (the handler holds a
//!   `Weak<dyn FaultTarget>`, the [`Mm`] that started it); tracked never
//!   names the mm.
//!
//! The mmap lock guard is the capability: functions that need the lock
//! take `&MmState`, which only a guard of that mm's [`MmapLock`] derefs to
//! ([`Error::ForeignLock`] for another mm's).
//!
//! ```text
//! top     host/        Host, Guest, reclaim plug-ins, the pressure path
//!                      (implements types::Pressure for every mm it creates,
//!                      hands it ksm::KsmHooks); oom.rs: the OOM killer
//!                      (select, kill, queue the reaper)
//! ------------------------------------------------------------------------
//! middle  snapshot.rs  snapshot files, full and diff (format, writer,
//!                      validating opener, chains) and the lazy restore of
//!                      a guest layout from one or a chain
//!         exit.rs      exit_mmap, step by step
//!         ksm/         the KSM seam (break_ksm): KsmMm, StableStore,
//!                      merge/snapshot/zero, batch (one write-protect
//!                      window per scanner chunk), unshare, KsmHooks
//!         mm/          Mm + config + VmaHooks (mod), refs (MmUser/MmGrab/
//!                      MmWatch), fault, tracked_fault (the handler's side,
//!                      impl FaultTarget), ksm_wp (ksm_add_vma: WP
//!                      registration of mergeable VMAs), zap, syscalls,
//!                      blocking, notifier, dirty (the dirty log,
//!                      GuestSnapshot, reset, the base of diff files)
//!         vma.rs       VMAs, the tree, host regions
//!         tracked/     userfaultfd regions (private anonymous: MISSING +
//!                      WP; shared memfd: MISSING + MINOR, step 10):
//!                      registry + FaultTarget (mod), pool (the process's
//!                      handler threads, shared descriptors, routing map),
//!                      handler, wp, source (a lazy restore's pages: file
//!                      or zeros), tests
//! ------------------------------------------------------------------------
//! bottom  types.rs     BoxFuture, the Pressure hook trait
//!         budget.rs    Budget, OverBudget
//!         mmap_lock.rs the async mmap lock (guards deref to MmState)
//!         pgtable.rs   4-level page table, PTE locks
//!         sys.rs       host syscalls (all the raw-memory unsafe)
//!         uffd.rs      userfaultfd backend
//!         contain.rs   the opt-in SIGBUS containment handler and its
//!                      lock-free table of poisoned ranges
//!         counters.rs  counters!: AtomicU64 counters + their snapshot
//!         loop_thread.rs LoopThread: a service loop's thread, joined on drop
//!         clock.rs flags.rs error.rs sched.rs procfs.rs
//! ```
//!
//! The edges inside the middle layer (all of them go down this list:
//! snapshot, exit, ksm, mm, vma, tracked):
//!
//! ```text
//! snapshot → mm, vma, tracked the writer walks VMAs and pages; a restore
//!                             maps tracked regions with a source
//! exit → mm                   exit_mmap runs on the mm
//! ksm  → mm, vma, tracked     the seam works on an mm's VMAs and pages
//! mm   → vma, tracked         an mm owns its VMAs and its tracker
//! vma  → tracked              a region holds the tracker it is registered with
//! ```
//!
//! and the top: host → mm, ksm (and the bottom layer). Every module may
//! use the bottom layer, whose own edges are clock → types,
//! budget → error, sched, mmap_lock → sched, uffd → sys, procfs → sys.
//!
//! # Lock order
//!
//! Outer to inner; each line names who takes the lock.
//!
//! ```text
//! ksm scanner mutex            mm-ksm: ksmd per batch, run=unmerge (a `sched::Mutex`, like
//!                              oom_lock: no real-time fairness under the harness). Never by ksm_exit
//!                              (seed 3), never by exit_mmap, never by the reaper.
//!                              run=unmerge runs the pressure path (OOM kill + wait) under
//!                              it, holding no mmap lock (`Mm::reserve`): safe only
//!                              because no exit path takes this mutex (I-KSM-1).
//!   Mm::mmap_lock (read)       access/fault path, madvise(DONTNEED), exit_mmap steps 2-6,
//!                              reaper + mrelease (try_read / killable read), ksmd.
//!   Mm::mmap_lock (write)      mmap, munmap, mprotect, mlock, munlock, madvise(flags),
//!                              exit_mmap steps 8-12, ksm_exit barrier (lock + unlock at once).
//!     ksm slot-list lock       mm-ksm: ksm_enter, ksm_exit, ksmd cursor moves.
//!                              ksmd releases the mmap lock BEFORE this one when the slot
//!                              stays listed (after the unlock ksm_exit may free the mm).
//!     PTE page locks           fault path (populate + copy), zap_range, ksmd's merge
//!                              (ksm/merge.rs; ksm/batch.rs holds a chunk's runs at once,
//!                              still ascending). Taken in ascending page order, never held
//!                              across an await or a syscall other than the madvise /
//!                              mprotect / mmap(MAP_FIXED) / mlock2(ONFAULT) and munlock of a
//!                              merge in an mlocked VMA / uffd COPY+ZEROPAGE+CONTINUE fills,
//!                              WP+WAKE+REGISTER / pwrite /
//!                              pread of the pages they cover (the mmap of a merge in a
//!                              tracked region waits for the uffd handler to read its UNMAP
//!                              message; the handler never waits for a PTE lock; untracked
//!                              mergeable regions are on a quiet descriptor: no message). A lazy restore's COPY reads the
//!                              snapshot file under them (disk I/O on a cold cache; waiters
//!                              yield) and drops the file pages it read with a madvise of
//!                              its own read-only file mapping (no uffd message).
//!       Host budget (atomic)   try_charge under page locks; reclaim runs with NO lock held.
//!       StableStore views      std mutex, a leaf: the merge's compare maps or finds a window
//!                              of the store under it (ksm/mod.rs); no other lock inside.
//!       notifier / hook lists  std mutexes held only to push, take or clone.
//!       Mm::diff (DiffState)   std mutex, a leaf: read or replaced whole by snapshot file
//!                              writers (under the write lock) and by the dirty log's other
//!                              harvesters (take_dirty, snapshot, reset: under the read lock).
//!       tracked self-zap list  std mutex: pushed/popped by a zap of a tracked region.
//!     tracked-range registry   std mutex: insert/remove under the write lock, lookup by
//!                              the uffd handler; never held across a syscall that can block.
//!                              A leaf: lazy restores (snapshot.rs, tracked/source.rs) also
//!                              take it under PTE locks (populate_locked, a zap marking its
//!                              range served); its holders never take a PTE lock.
//!     uffd routing map         lock-free skip list per pool shard (tracked/pool.rs): no lock
//!                              at all; entries inserted before UFFDIO_REGISTER, removed
//!                              after UFFDIO_UNREGISTER (under the mm's write lock). The
//!                              remover then waits (bounded) until the shard thread has
//!                              routed every message it already read (route barrier, pool
//!                              point 9), holding no PTE lock, registry or self-zap lock:
//!                              the routing step takes only those leaves, never an mmap lock.
//!     uffd shard descriptors   std mutexes: locked only to open or clone a shard's
//!                              descriptor (a tracker's first mmap; the shard thread per round;
//!                              the quiet one at a tracker's first KSM registration).
//! uffd handler (pool shard)    one thread serves every mm of its shard. Takes NO mmap lock,
//!                              routes messages through the lock-free map (no guest thread can
//!                              hold a lock it needs while blocked in a fault), only TRY-locks
//!                              PTEs (a zapper holding PTE locks waits in madvise for the
//!                              handler to read its REMOVE message); runs each mm's pressure
//!                              path as a polled future; never joins or waits for a guest.
//! uffd pool config lock        std mutex: set_uffd_handler_threads and the pool's creation.
//! reaper queue lock            mm-reaper: push on kill, pop in the reaper; never held with
//!                              an mm lock.
//! host guest registry          insert/remove/clone only; never held with an mm lock.
//! ```
//!
//! The mmap lock is async and every acquire/release is a named
//! [`sched`] point, so the race harness can run each protocol path as a
//! future and choose the interleaving. No std or dashmap guard is ever held
//! across an `.await`.
//!
//! # Example
//!
//! ```
//! use mm_core::{Host, MapOptions, ProcessMemory};
//!
//! let host = Host::with_budget(64 << 20);
//! let guest = host.create_guest("vm0");
//! let mm = guest.mm()?;
//! let addr = mm.mmap_blocking(MapOptions::anon(4 << 20))?;
//! mm.write_blocking(addr + 100, b"hello")?;
//! let mut buf = [0u8; 5];
//! mm.read_blocking(addr + 100, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! assert_eq!(host.stats().charged_bytes, 4096); // one page populated
//! drop(mm);
//! guest.exit_blocking(); // last user: exit_mmap runs, the host mapping is gone
//! assert_eq!(host.stats().charged_bytes, 0);
//! # let _ = ProcessMemory::current()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod budget;
mod clock;
pub mod contain;
mod counters;
mod error;
mod exit;
mod flags;
mod host;
pub mod ksm;
mod loop_thread;
mod mm;
pub mod mmap_lock;
pub mod pgtable;
pub mod procfs;
pub mod sched;
pub mod snapshot;
mod sys;
mod tracked;
mod types;
mod uffd;
mod vma;

pub use budget::{Budget, OverBudget};
pub use clock::{Clock, SystemClock};
pub use error::{Access, Error, Result, SnapshotError};
pub use flags::{MmFlag, MmFlags};
pub use host::{
    Guest, Host, HostConfig, HostStats, Kill, OomOutcome, OomReaperQueue, OomStats, Reclaim,
};
pub use ksm::{BatchOp, BatchOutcome, BatchRun, KsmMerge, KsmMm, KsmPage, MergeRun, StableStore};
pub use loop_thread::{LoopThread, StopLoop};
pub use mm::{
    Advice, ExitHook, GuestSnapshot, MapKind, MapOptions, Mm, MmConfig, MmGrab, MmNotifier,
    MmState, MmUser, MmWatch, ResetStats, WouldBlock, ZapReason,
};
pub use mmap_lock::{MmapLock, MmapReadGuard, MmapWriteGuard};
pub use procfs::ProcessMemory;
pub use snapshot::{Snapshot, SnapshotKind, SnapshotStats, SnapshotVma};
pub use sys::{HUGE_PAGE_SIZE, PAGE_SIZE};
#[cfg(feature = "sched")]
pub use tracked::set_busy_timeout;
pub use tracked::{
    set_uffd_handler_threads, uffd_handler_threads, SnapshotSource, TrackedStats,
    DEFAULT_FAULT_AROUND, DEFAULT_UFFD_HANDLER_THREADS, PRESSURE_ROUNDS,
};
pub use types::{lock, BoxFuture};
pub use vma::{Prot, VmFlags, Vma, VmaTree};

#[cfg(test)]
mod layers;
#[cfg(test)]
mod tests;
