#![doc = include_str!("../README.md")]
//!
//! # The pieces
//!
//! - [`configure`]: the `wasmtime::Config` the adapter needs
//!   (`memory_init_cow(false)`: wasmtime panics on a CoW image over a
//!   custom memory; `memory_may_move(false)`; the reservation and guard of
//!   a [`MemoryLayout`]; no guard before the memory, which a
//!   `MemoryCreator` cannot provide; epoch interruption) and installs
//!   [`GuestMemoryCreator`]. `Config::with_host_memory` only applies to
//!   wasmtime's on-demand instance allocator (not the pooling one).
//! - [`WasmHost`]: a guestmm [`Host`] (one byte budget over every instance,
//!   the OOM killer), an OOM reaper thread and the configured `Engine`.
//! - [`WasmGuest`]: one guestmm guest per instance (or per group of
//!   instances sharing a store): its stores ([`WasmGuest::store`]) carry a
//!   [`GuestLimiter`] and an epoch-deadline callback, and its linear
//!   memories are tracked guestmm mappings (`memory.rs`).
//!
//! # Kill and reap
//!
//! 1. A charge does not fit (a `memory.grow` through [`GuestLimiter`], or
//!    a JIT first touch served by the guest's userfaultfd handler): the
//!    host runs its reclaim plug-ins, then the OOM killer, which picks the
//!    largest guest.
//! 2. The kill hook of that guest (`WasmKill`, called under the OOM
//!    killer's lock, before the victim is queued to the reaper) sets the
//!    guest's `killed` flag, then `mprotect(PROT_NONE)`s the whole host
//!    range of each of its linear memories (raw, not through guestmm: the
//!    hook must not wait for the guest's mmap lock), then bumps the engine's
//!    epoch.
//! 3. The victim's thread traps wherever it is: JIT code touching its
//!    memory takes `SIGSEGV` at a trapping load/store, which wasmtime's
//!    handler turns into a `MemoryOutOfBounds` trap; a loop that does not
//!    touch memory hits its epoch deadline, whose callback sees `killed`
//!    and interrupts (every other store's callback just extends its
//!    deadline); a `memory.grow` traps in the limiter; a grow racing the
//!    hook closes what it opened itself (`memory.rs`).
//! 4. The OOM reaper zaps the victim's pages (`MADV_DONTNEED`, which works
//!    on `PROT_NONE` pages), uncharging them, while wasmtime still holds
//!    the base pointer; the mapping itself goes only at teardown.
//!
//! Why `PROT_NONE` and not guestmm's own poisoning: after `UNSTABLE`,
//! guestmm answers a fault on a reaped tracked page with `UFFDIO_POISON`,
//! that is `SIGBUS`. wasmtime's trap handler covers `SIGSEGV`, `SIGILL` and
//! `SIGFPE` only, so a `SIGBUS` in JIT code would kill the process, and
//! `mm_core::contain` would only park the thread (the instance's call
//! would never return). `PROT_NONE` is checked by the kernel before any
//! userfaultfd handling, so every later access of the victim (even one
//! that was blocked in the userfaultfd handler during the kill and
//! retries) is a `SIGSEGV` in a wasm-accessible range: a trap in that
//! instance, never a host crash.
//!
//! Host code must not read a killed instance's memory through
//! `Memory::data` (a `SIGSEGV` outside wasm code is a crash): check
//! [`WasmGuest::is_killed`] first, or read through wasm.

mod limiter;
mod memory;
mod sys;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

pub use limiter::GuestLimiter;
pub use memory::GuestMemoryCreator;
use mm_core::{lock, Guest, Host, HostConfig, Kill, MmConfig, MmUser};
use mm_reaper::{Reaper, ReaperConfig, ReaperThread};
use wasmtime::{Config, Engine, Extern, Instance, Module, Store, UpdateDeadline};

/// The adapter's errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A linear memory was created outside [`WasmGuest::enter`] /
    /// [`WasmGuest::instantiate`]: no guest to put it in.
    #[error("no current guestmm guest on this thread: instantiate through WasmGuest::instantiate or WasmGuest::enter")]
    NoCurrentGuest,
    /// Shared (threads) linear memories are not backed by guestmm.
    #[error("shared linear memories are not supported by the guestmm memory creator")]
    SharedMemory,
    /// The guest was killed (by the OOM killer or `Guest::kill`).
    #[error("guest {guest} was killed")]
    Killed {
        /// The guest.
        guest: u64,
    },
    /// wasmtime asked for a layout that is not page aligned, or whose
    /// minimum exceeds the reservation.
    #[error("bad linear memory layout: minimum {minimum}, reservation {reserved}, guard {guard}")]
    BadLayout {
        /// Initial size in bytes.
        minimum: usize,
        /// Reservation in bytes.
        reserved: usize,
        /// Guard in bytes.
        guard: usize,
    },
    /// A [`MemoryLayout`] that is not page aligned, or has no room for one
    /// wasm page.
    #[error("bad memory layout: reservation {reservation}, guard {guard} (page multiples, reservation >= 64 KiB)")]
    BadMemoryLayout {
        /// Reservation in bytes.
        reservation: u64,
        /// Guard in bytes.
        guard: u64,
    },
    /// A size that overflows when rounded to pages.
    #[error("size {bytes} does not fit the address space")]
    TooLarge {
        /// The size.
        bytes: usize,
    },
    /// Growth past the reservation (the memory never moves).
    #[error("grow to {requested} bytes exceeds the capacity of {capacity} bytes")]
    Capacity {
        /// Requested size.
        requested: usize,
        /// The reservation.
        capacity: usize,
    },
    /// Growth the limiter did not approve and the budget has no room for.
    #[error("grow needs {requested} bytes, the host budget has {room} free")]
    OverBudget {
        /// Bytes the growth would open.
        requested: u64,
        /// Free budget.
        room: u64,
    },
    /// A guestmm call failed.
    #[error(transparent)]
    Mm(#[from] mm_core::Error),
    /// The OOM reaper thread did not start.
    #[error(transparent)]
    Reaper(#[from] mm_reaper::SpawnError),
    /// wasmtime refused the configuration.
    #[error("wasmtime engine: {message}")]
    Engine {
        /// wasmtime's message.
        message: String,
    },
}

/// `Result` with the adapter's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where each linear memory lives: `reservation` bytes of address space
/// (the most it can grow to, in place) followed by `guard` bytes that stay
/// `PROT_NONE` (compiled code elides bounds checks against them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Reservation in bytes (page multiple, at least one wasm page).
    pub reservation: u64,
    /// Guard after the reservation in bytes (page multiple).
    pub guard: u64,
}

impl Default for MemoryLayout {
    /// wasmtime's 64-bit defaults: a 4 GiB reservation and a 32 MiB guard
    /// (a 32-bit memory needs no bounds checks).
    fn default() -> Self {
        MemoryLayout {
            reservation: 4 << 30,
            guard: 32 << 20,
        }
    }
}

impl MemoryLayout {
    fn check(&self) -> Result<()> {
        let page = mm_core::PAGE_SIZE as u64;
        if self.reservation < (64 << 10)
            || !self.reservation.is_multiple_of(page)
            || !self.guard.is_multiple_of(page)
        {
            return Err(Error::BadMemoryLayout {
                reservation: self.reservation,
                guard: self.guard,
            });
        }
        Ok(())
    }
}

/// Applies the memory settings the adapter needs, without the creator:
/// `memory_init_cow(false)`, `memory_may_move(false)`, the reservation and
/// guard of `layout`, no reservation for growth and no guard before the
/// memory. The baseline of a fair comparison with wasmtime's own allocator.
pub fn configure_layout(config: &mut Config, layout: MemoryLayout) -> Result<()> {
    layout.check()?;
    config
        .memory_init_cow(false)
        .memory_may_move(false)
        .memory_reservation(layout.reservation)
        .memory_guard_size(layout.guard)
        .memory_reservation_for_growth(0)
        .guard_before_linear_memory(false);
    Ok(())
}

/// [`configure_layout`], epoch interruption (the kill hook's interrupt),
/// and [`GuestMemoryCreator`] as the host memory creator.
pub fn configure(config: &mut Config, layout: MemoryLayout) -> Result<()> {
    configure_layout(config, layout)?;
    config
        .epoch_interruption(true)
        .with_host_memory(Arc::new(GuestMemoryCreator::new()));
    Ok(())
}

/// What [`WasmHost::new`] builds.
#[derive(Debug, Clone)]
pub struct WasmHostConfig {
    /// The guestmm host (budget, OOM wait). [`WasmHostConfig::with_budget`]
    /// asks for user-mode-only userfaultfds (JIT code touches memory from
    /// user mode; no privilege needed).
    pub host: HostConfig,
    /// The OOM reaper. [`WasmHostConfig::with_budget`] sets no delay: the
    /// kill hook stops the victim at once, there is no exit to wait for.
    pub reaper: ReaperConfig,
    /// The layout of every linear memory.
    pub layout: MemoryLayout,
}

impl WasmHostConfig {
    /// A host with `budget_bytes` shared by every instance.
    pub fn with_budget(budget_bytes: u64) -> Self {
        let mut host = HostConfig::with_budget(budget_bytes);
        host.mm = MmConfig {
            user_mode_only_uffd: true,
            ..MmConfig::default()
        };
        WasmHostConfig {
            host,
            reaper: ReaperConfig {
                delay: std::time::Duration::ZERO,
                ..ReaperConfig::default()
            },
            layout: MemoryLayout::default(),
        }
    }
}

type OnKill = Arc<dyn Fn(&KillReport) + Send + Sync>;

/// What the kill hook saw, for [`WasmHost::set_on_kill`].
#[derive(Debug, Clone)]
pub struct KillReport {
    /// The guest killed.
    pub guest: u64,
    /// Its name.
    pub name: String,
    /// Host bytes resident in its memories at the kill, by `mincore`
    /// (`None` if its mmap lock was busy: the hook never waits for it).
    pub resident_bytes: Option<u64>,
}

/// A guestmm host for wasm instances: the budget, the OOM killer, an OOM
/// reaper thread (when built by [`WasmHost::new`]) and the `Engine` whose
/// linear memories are guestmm mappings.
pub struct WasmHost {
    host: Host,
    engine: Engine,
    reaper: Option<Reaper>,
    reaper_thread: Option<ReaperThread>,
    on_kill: Arc<Mutex<Option<OnKill>>>,
}

impl std::fmt::Debug for WasmHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmHost")
            .field("host", &self.host)
            .field("reaper", &self.reaper.as_ref().map(|r| r.stats()))
            .finish_non_exhaustive()
    }
}

impl WasmHost {
    /// A new host, its reaper thread, and an engine from `engine_config`
    /// after [`configure`].
    pub fn new(config: WasmHostConfig, engine_config: Config) -> Result<WasmHost> {
        let host = Host::new(config.host);
        let mut me = Self::with_host(host, engine_config, config.layout)?;
        let reaper = Reaper::new(config.reaper);
        reaper.install(&me.host);
        me.reaper_thread = Some(reaper.spawn()?);
        me.reaper = Some(reaper);
        Ok(me)
    }

    /// Wasm guests on an existing host (shared with VMs, say), whose OOM
    /// reaper the embedder runs.
    pub fn with_host(host: Host, mut engine_config: Config, layout: MemoryLayout) -> Result<Self> {
        configure(&mut engine_config, layout)?;
        let engine = Engine::new(&engine_config).map_err(|e| Error::Engine {
            message: format!("{e:#}"),
        })?;
        Ok(WasmHost {
            host,
            engine,
            reaper: None,
            reaper_thread: None,
            on_kill: Arc::new(Mutex::new(None)),
        })
    }

    /// The guestmm host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The engine (compile modules with it).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The reaper [`WasmHost::new`] started.
    pub fn reaper(&self) -> Option<&Reaper> {
        self.reaper.as_ref()
    }

    /// A callback run by every guest's kill hook after the instance was
    /// stopped (under the OOM killer's lock, before the reap: it must not
    /// block on a guest).
    pub fn set_on_kill(&self, f: impl Fn(&KillReport) + Send + Sync + 'static) {
        *lock(&self.on_kill) = Some(Arc::new(f));
    }

    /// A new guest (its own guestmm address space) for one instance.
    pub fn new_guest(&self, name: &str) -> Result<WasmGuest> {
        let guest = self.host.create_guest(name);
        let mm = guest.mm()?;
        let shared = Arc::new(GuestShared {
            guest_id: guest.id(),
            mm,
            killed: AtomicBool::new(false),
            approved: AtomicU64::new(0),
            memories: Mutex::new(Vec::new()),
        });
        guest.set_kill_hook(Arc::new(WasmKill {
            shared: Arc::downgrade(&shared),
            engine: self.engine.clone(),
            on_kill: self.on_kill.clone(),
        }));
        Ok(WasmGuest {
            guest,
            shared,
            engine: self.engine.clone(),
        })
    }
}

impl Drop for WasmHost {
    fn drop(&mut self) {
        if let Some(t) = self.reaper_thread.take() {
            t.stop();
        }
    }
}

/// What a guest's stores, memories and kill hook share.
#[derive(Debug)]
pub(crate) struct GuestShared {
    pub(crate) guest_id: u64,
    /// A user reference for the creator and the limiter.
    pub(crate) mm: MmUser,
    /// Set first by the kill hook (before it closes the memories).
    pub(crate) killed: AtomicBool,
    /// The size the limiter last approved a grow to (0: none pending).
    pub(crate) approved: AtomicU64,
    /// Host ranges (base, reservation + guard) of the live linear memories.
    /// Held by the kill hook while it closes them, so a memory cannot be
    /// unmapped (it leaves the list first) under its `mprotect`.
    pub(crate) memories: Mutex<Vec<(usize, usize)>>,
}

/// The kill hook: stop the instance (see "Kill and reap" above).
struct WasmKill {
    /// Weak: the guest record (which holds this hook) must not keep the
    /// address space's user alive.
    shared: Weak<GuestShared>,
    engine: Engine,
    on_kill: Arc<Mutex<Option<OnKill>>>,
}

impl Kill for WasmKill {
    fn kill(&self, guest: &Guest) {
        let mut resident_bytes = None;
        if let Some(shared) = self.shared.upgrade() {
            shared.killed.store(true, Ordering::SeqCst);
            let list = lock(&shared.memories);
            for &(base, len) in list.iter() {
                if let Err(e) = sys::protect_none(base, len) {
                    tracing::error!(target: "mm_wasmtime", guest = guest.id(), error = %e, "cannot close a killed instance's memory");
                }
            }
            drop(list);
            // try_read only: the hook must not wait for the guest's lock.
            resident_bytes = shared
                .mm
                .lock()
                .try_read()
                .and_then(|st| mm_core::Mm::resident_bytes(&shared.mm, &st).ok());
        }
        // Every store's deadline passes; only the victim's callback
        // interrupts.
        self.engine.increment_epoch();
        tracing::info!(target: "mm_wasmtime", guest = guest.id(), name = guest.name(), "wasm instance killed");
        let cb = lock(&self.on_kill).clone();
        if let Some(cb) = cb {
            cb(&KillReport {
                guest: guest.id(),
                name: guest.name().to_owned(),
                resident_bytes,
            });
        }
    }
}

/// A store's data: the guest's limiter and the embedder's own data.
#[derive(Debug)]
pub struct GuestData<T> {
    limiter: GuestLimiter,
    /// The embedder's data.
    pub data: T,
}

/// One guestmm guest for wasm: its linear memories are tracked mappings
/// of its address space, charged to the host budget; the OOM killer can
/// pick it, and then its instance traps. Dropping it runs the guest's
/// exit (its address space goes when the last store using it is dropped
/// too).
#[derive(Debug)]
pub struct WasmGuest {
    guest: Guest,
    shared: Arc<GuestShared>,
    engine: Engine,
}

impl WasmGuest {
    /// A store for this guest: its [`GuestLimiter`] installed, and an epoch
    /// deadline whose callback interrupts once the guest is killed.
    pub fn store<T: Send + 'static>(&self, data: T) -> Store<GuestData<T>> {
        let mut store = Store::new(
            &self.engine,
            GuestData {
                limiter: GuestLimiter {
                    shared: self.shared.clone(),
                },
                data,
            },
        );
        store.limiter(|d| &mut d.limiter);
        let shared = self.shared.clone();
        store.epoch_deadline_callback(move |_| {
            if shared.killed.load(Ordering::SeqCst) {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        store.set_epoch_deadline(1);
        store
    }

    /// Runs `f` (which instantiates, e.g. through a `Linker`) with this
    /// guest as the owner of every linear memory created on this thread
    /// meanwhile.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        memory::with_current(&self.shared, f)
    }

    /// `Instance::new` inside [`enter`](Self::enter).
    pub fn instantiate<T: 'static>(
        &self,
        store: &mut Store<T>,
        module: &Module,
        imports: &[Extern],
    ) -> wasmtime::Result<Instance> {
        if self.is_killed() {
            return Err(wasmtime::Error::new(Error::Killed {
                guest: self.shared.guest_id,
            }));
        }
        self.enter(|| Instance::new(store, module, imports))
    }

    /// Was the guest killed (its instance traps from now on)?
    pub fn is_killed(&self) -> bool {
        self.shared.killed.load(Ordering::SeqCst)
    }

    /// The guestmm guest.
    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// Host bytes resident in the guest's memories, by `mincore` (the
    /// kernel's view, not guestmm's counters).
    pub fn resident_bytes(&self) -> Result<u64> {
        Ok(self.shared.mm.resident_bytes_blocking()?)
    }
}

impl Drop for WasmGuest {
    fn drop(&mut self) {
        self.guest.exit_blocking();
    }
}

#[cfg(test)]
mod tests;
