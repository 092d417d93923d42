//! The one error type of mm-ksm.

/// Everything that can go wrong in mm-ksm. Contention and "nothing to do"
/// are outcomes, not errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A knob was given a value the kernel's sysfs would refuse (`EINVAL`).
    #[error("ksm knob {knob} = {value}: {reason}")]
    BadKnob {
        /// The sysfs name of the knob.
        knob: &'static str,
        /// Value given.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An operation on one guest address space failed (bad range, a host
    /// syscall, ...).
    #[error("ksm on mm {mm_id}: {source}")]
    Mm {
        /// Id of the address space.
        mm_id: u64,
        /// What mm-core said.
        #[source]
        source: mm_core::Error,
    },
    /// The mm belongs to another host than the mms this `Ksm` serves
    /// (stable pages are charged to one host's budget).
    #[error("mm {mm_id} belongs to another host than this ksm's")]
    OtherHost {
        /// Id of the address space.
        mm_id: u64,
    },
    /// Another `Ksm` instance already holds this mm (one scanner per mm:
    /// two would each take the other's merged pages for unrecorded ones).
    #[error("mm {mm_id} is already registered with another ksm")]
    OtherKsm {
        /// Id of the address space.
        mm_id: u64,
    },
    /// The mm already joined another KSM domain.
    #[error("mm {mm_id} is already in ksm domain {domain}")]
    OtherDomain {
        /// Id of the address space.
        mm_id: u64,
        /// The domain it is in.
        domain: u64,
    },
    /// The stable-page store (the KSM memfd) could not be created or used.
    #[error("ksm stable store: {source}")]
    Store {
        /// What mm-core said.
        #[source]
        source: mm_core::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn mm(mm_id: u64) -> impl FnOnce(mm_core::Error) -> Error {
        move |source| Error::Mm { mm_id, source }
    }
}
