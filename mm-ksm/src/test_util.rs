//! Setup shared by the unit tests.

use mm_core::Host;

use crate::{Ksm, KsmConfig};

/// A 64 MiB host and a scanner with the default knobs (not started).
pub(crate) fn host_and_ksm() -> (Host, Ksm) {
    let host = Host::with_budget(64 << 20);
    let k = Ksm::new(KsmConfig::default()).unwrap();
    (host, k)
}
