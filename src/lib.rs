#![doc = include_str!("../README.md")]

pub use mm_core as core;
pub use mm_core::*;
pub use mm_ksm as ksm;
pub use mm_reaper as reaper;
