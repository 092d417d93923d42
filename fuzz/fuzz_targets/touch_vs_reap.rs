//! `touch_vs_reap`: a thin wrapper over `mm_race::run` (setup decoded first, then
//! the schedule bytes). A finding panics with the broken invariant and the
//! N-column trace of the schedule.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(finding) = mm_race::run(mm_race::Target::TouchVsReap, data) {
        panic!("{finding}");
    }
});
