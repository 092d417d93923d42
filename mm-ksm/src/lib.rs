//! mm-ksm: KSM-style deduplication (not built yet; see the mm-ksm issue).
