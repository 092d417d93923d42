//! The one error type of mm-core.

use std::io;

/// Which kind of access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read of guest memory.
    Read,
    /// A write of guest memory.
    Write,
}

/// Everything that can go wrong in mm-core. Each variant carries the values
/// that caused it; none of them leaves memory leaked or half-mapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address or length is not a multiple of the page size.
    #[error("address {addr:#x} or length {len:#x} is not page aligned")]
    Unaligned {
        /// Guest address given.
        addr: u64,
        /// Length given.
        len: u64,
    },
    /// A zero-length range was given where memory is required.
    #[error("zero-length range at {addr:#x}")]
    ZeroLength {
        /// Guest address given.
        addr: u64,
    },
    /// `addr + len` overflows the 64-bit address space.
    #[error("range {addr:#x} + {len:#x} overflows")]
    Overflow {
        /// Guest address given.
        addr: u64,
        /// Length given.
        len: u64,
    },
    /// The range reaches past the guest address-space limit.
    #[error("range {addr:#x} + {len:#x} is outside the guest address space (limit {limit:#x})")]
    OutOfRange {
        /// Guest address given.
        addr: u64,
        /// Length given.
        len: u64,
        /// First address past the guest address space.
        limit: u64,
    },
    /// A fixed mapping would overlap an existing VMA.
    #[error("range {addr:#x} + {len:#x} overlaps the mapping {vma_start:#x}..{vma_end:#x}")]
    Overlap {
        /// Guest address given.
        addr: u64,
        /// Length given.
        len: u64,
        /// Start of the VMA in the way.
        vma_start: u64,
        /// End of the VMA in the way.
        vma_end: u64,
    },
    /// No free guest range of that size is left.
    #[error("no free guest range of {len:#x} bytes")]
    NoSpace {
        /// Length asked for.
        len: u64,
    },
    /// Some page of the range is not mapped.
    #[error("guest address {addr:#x} is not mapped")]
    Unmapped {
        /// First unmapped guest address met.
        addr: u64,
    },
    /// The VMA's protection does not allow this access.
    #[error("{access:?} access to {addr:#x} is not allowed by the mapping's protection")]
    Protection {
        /// Guest address.
        addr: u64,
        /// Access refused.
        access: Access,
    },
    /// The address space has been torn down (`mm_users` reached 0).
    #[error("address space {mm_id} has exited")]
    Exited {
        /// Id of the address space.
        mm_id: u64,
    },
    /// The address space was reaped (`MMF_UNSTABLE`): its contents may be
    /// gone, so no access is allowed; the SIGBUS analogue.
    #[error("address space {mm_id} is unstable (reaped); access refused")]
    Unstable {
        /// Id of the address space.
        mm_id: u64,
    },
    /// The guest that owns this address space was killed (OOM or
    /// [`Guest::kill`](crate::Guest::kill)): no new mappings or writes.
    #[error("address space {mm_id} belongs to a killed guest")]
    Killed {
        /// The mm.
        mm_id: u64,
    },
    /// The operation is not allowed on this mapping (the kernel's EINVAL).
    #[error("not allowed at {addr:#x}: {reason}")]
    NotAllowed {
        /// Guest address.
        addr: u64,
        /// What refused it.
        reason: &'static str,
    },
    /// The host budget cannot cover the pages this operation must populate.
    #[error("host budget exhausted: {requested} bytes requested, {charged} of {budget} charged")]
    OutOfMemory {
        /// Bytes this operation needed.
        requested: u64,
        /// Bytes charged when it failed.
        charged: u64,
        /// The host budget.
        budget: u64,
    },
    /// No guest with this id is registered.
    #[error("no guest with id {guest}")]
    NoSuchGuest {
        /// Id asked for.
        guest: u64,
    },
    /// The operation needs a tracked region (`MapOptions::tracked`).
    #[error("guest address {addr:#x} is not in a tracked region")]
    NotTracked {
        /// First guest address that is not tracked.
        addr: u64,
    },
    /// The userfaultfd handler of this mm died; its tracked regions were
    /// degraded to untracked (see `tracked/`, step 9).
    #[error("the userfaultfd handler of address space {mm_id} died")]
    TrackerDead {
        /// Id of the address space.
        mm_id: u64,
    },
    /// The fault-around size is not a power of two from 4 KiB to 2 MiB.
    #[error("fault-around of {bytes:#x} bytes is not a power of two in 4 KiB..=2 MiB")]
    BadFaultAround {
        /// Size given.
        bytes: u64,
    },
    /// An argument that no valid call passes (a buffer too short for the
    /// range, a run that crosses a page-table leaf).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What was wrong.
        what: &'static str,
    },
    /// [`set_uffd_handler_threads`](crate::set_uffd_handler_threads) asked
    /// for another size after the handler pool started.
    #[error("the userfaultfd handler pool already runs {running} threads (asked for {asked}); set its size before the first tracked mmap")]
    PoolRunning {
        /// Threads the pool runs.
        running: usize,
        /// Threads asked for.
        asked: usize,
    },
    /// A lock proof (`&MmState`) of one mm was passed to another mm.
    #[error("mm {mm_id}: the mmap lock passed belongs to mm {lock_mm_id}")]
    ForeignLock {
        /// The mm operated on.
        mm_id: u64,
        /// The mm whose lock guard the state came from.
        lock_mm_id: u64,
    },
    /// The range is registered with a user-mode-only userfaultfd, so faults
    /// the kernel takes on the guest's behalf (a KVM vCPU, `O_DIRECT` I/O)
    /// would fail with `EFAULT`: see [`Vma::user_mode_only`](crate::Vma::user_mode_only).
    #[error("guest address {addr:#x} is tracked by a user-mode-only userfaultfd: kernel-mode access (a KVM memslot, O_DIRECT) needs /dev/userfaultfd access or CAP_SYS_PTRACE")]
    UserModeOnly {
        /// First page of the range that is user-mode-only.
        addr: u64,
    },
    /// `madvise(MERGEABLE)` cannot be honoured: the VMA could be merged,
    /// but KSM's write-protect registration of it failed (no userfaultfd
    /// write-protect here, no descriptor left). The flag was not set.
    #[error("guest address {addr:#x} cannot be made mergeable: {source}")]
    MergeUnavailable {
        /// First page of the VMA that cannot be registered.
        addr: u64,
        /// Why the registration failed.
        #[source]
        source: Box<Error>,
    },
    /// [`Budget::try_uncharge`](crate::Budget::try_uncharge) of more than is
    /// charged.
    #[error("uncharge of {requested} bytes with only {charged} charged")]
    Uncharge {
        /// Bytes asked to return.
        requested: u64,
        /// Bytes charged at the time.
        charged: u64,
    },
    /// The running kernel does not offer a feature this call needs.
    #[error("not supported by this kernel: {what}")]
    Unsupported {
        /// The missing feature.
        what: &'static str,
    },
    /// A reset to a snapshot refused: the guest's layout is not the
    /// snapshot's any more, or a snapshot file was written since (its
    /// harvest of the dirty log hid the writes before it); nothing was
    /// changed.
    #[error("cannot reset to the snapshot: {why}")]
    SnapshotLayout {
        /// What changed.
        why: &'static str,
    },
    /// A diff snapshot file cannot be written now: there is no previous
    /// snapshot file of this guest to diff against (none was written, the
    /// last one failed, or the dirty log was harvested since by
    /// `take_dirty`, `snapshot` or `reset`). Write a full one
    /// (`snapshot_to_file`) first.
    #[error("no base for a diff snapshot: {why}")]
    NoDiffBase {
        /// Why there is none.
        why: &'static str,
    },
    /// A snapshot file could not be written, opened or restored from (see
    /// [`SnapshotError`] and the `snapshot` module's format).
    #[error("snapshot {path}: {source}")]
    Snapshot {
        /// The snapshot file.
        path: std::path::PathBuf,
        /// What was wrong with it.
        #[source]
        source: SnapshotError,
    },
    /// A host system call failed.
    #[error("host {op} failed: {source}")]
    Host {
        /// The system call (`mmap`, `madvise`, ...).
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// What is wrong with a snapshot file ([`Error::Snapshot`]). Each is
/// found before anything is mapped, except [`SnapshotError::DataLost`],
/// which a running lazy restore meets when the file shrank under it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file is shorter than its header, its index, or the length its
    /// header records.
    #[error("truncated: {len} bytes, at least {need} needed")]
    Truncated {
        /// The file's length.
        len: u64,
        /// The length the header or index needs.
        need: u64,
    },
    /// The first eight bytes are not the snapshot magic.
    #[error("not a guestmm snapshot (magic {found:02x?})")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A format version this build cannot read.
    #[error("format version {found} (this build reads {supported})")]
    BadVersion {
        /// Version in the header.
        found: u32,
        /// The version this build writes and reads.
        supported: u32,
    },
    /// Written with another page size.
    #[error("page size {found} (this host uses {expected})")]
    BadPageSize {
        /// Page size in the header.
        found: u32,
        /// This host's.
        expected: u32,
    },
    /// The checksum of the header and index does not match.
    #[error("header/index checksum {found:#018x}, computed {computed:#018x}")]
    BadChecksum {
        /// Checksum in the header.
        found: u64,
        /// Checksum of the bytes read.
        computed: u64,
    },
    /// An index entry points past the end of the file (or of the index).
    #[error("index entry {vma} points past the end: {what} ends at {end:#x}, limit {limit:#x}")]
    IndexPastEnd {
        /// Index of the VMA record.
        vma: usize,
        /// Which part (`"data"`, `"bitmap"`, `"records"`).
        what: &'static str,
        /// Where that part ends.
        end: u64,
        /// Where it must end by.
        limit: u64,
    },
    /// The recorded VMA layout is malformed or does not fit the guest it
    /// is restored into (unaligned, overlapping, outside its address space).
    #[error("layout does not fit: VMA {vma} at {addr:#x} + {len:#x}: {reason}")]
    BadLayout {
        /// Index of the VMA record.
        vma: usize,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u64,
        /// Why it does not fit.
        reason: &'static str,
    },
    /// The snapshot kind in the header is neither full (0) nor diff (1).
    #[error("unknown snapshot kind {found}")]
    BadKind {
        /// Kind in the header.
        found: u32,
    },
    /// A chain of snapshot files does not start with a full snapshot: the
    /// first file is a diff, and its full base (and any diffs between) are
    /// missing.
    #[error("the chain starts with a diff (of parent {parent:032x}): its full base is missing")]
    NoBase {
        /// The parent id the diff names.
        parent: u128,
    },
    /// A full snapshot where the chain needs a diff (every file after the
    /// first must be a diff of the one before it).
    #[error("file {link} of the chain is a full snapshot, not a diff of file {prev}", prev = link - 1)]
    NotADiff {
        /// Position of the file in the chain.
        link: usize,
    },
    /// A diff whose parent is not the file before it in the chain: a wrong
    /// parent, a missing link between them, or files out of order.
    #[error("file {link} of the chain is a diff of {parent:032x}, but file {prev} is {expected:032x} (wrong parent, missing link or wrong order)", prev = link - 1)]
    WrongParent {
        /// Position of the diff in the chain.
        link: usize,
        /// The parent id the diff names.
        parent: u128,
        /// The id of the file before it.
        expected: u128,
    },
    /// A running lazy restore could not read a page the index says the file
    /// holds (`UFFDIO_COPY` failed with `EFAULT`: the file was truncated
    /// under the restore). Direct touches of such a page get `SIGBUS`
    /// (poisoned), never zeros; the access API gets this error.
    #[error("page at guest {addr:#x} is gone from the file (truncated under a running restore)")]
    DataLost {
        /// Guest address of the page.
        addr: u64,
    },
}

impl Error {
    pub(crate) fn host(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Host { op, source }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
