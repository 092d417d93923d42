//! Swarm testing (issue 16 §3): each run enables a random subset of its
//! target's actors and setup features, so that a bug needing "few
//! bystanders" or "no mlock at all" is not drowned by the same mix of
//! everything in every run (Groce et al., "Swarm Testing", ISSTA 2012).
//!
//! # Input layout
//!
//! A swarm input is a plain input with a 12-byte header:
//!
//! ```text
//! b"mm-swarm" | mask: u32 little-endian | the plain input (setup, schedule)
//! ```
//!
//! Every bit set in `mask` turns one actor or feature OFF ([`Swarm`]'s
//! constants). [`split`] is called by the decoders of every target
//! (`scenario::run_mode`, `ksm_scenario::run_mode_reaper`), so a swarm
//! finding replays as it was found with plain `mm_race::run(target, &data)`
//! (and through the fuzz targets and the `replay` example). An input that
//! does not start with the header has mask 0 (everything on) and decodes
//! exactly as before: the committed corpus keeps its meaning (checked by
//! the test `no_committed_input_starts_with_the_swarm_header`).
//!
//! # What a mask can turn off
//!
//! * **Actors.** A target's core actors (its namesake race: the guest's
//!   exit, the OOM killer and the reaper, mrelease and its kill, the vCPU of
//!   `fault_vs_reap`, KSM's guest exits and the vCPU's final read-back
//!   audit) always run. Each optional actor ([`Swarm::optional_actors`] per
//!   target) is off when its bit is set, but never all of them: a mask that
//!   turns off every optional actor of a target is read as turning off none
//!   (so a target with one optional actor always runs it).
//! * **vCPU op kinds.** Ops of a disabled kind are dropped from the decoded
//!   op list (also from the default list used when none was decoded).
//! * **Setup features.** A disabled boolean feature is forced `false`
//!   (shared or mlocked VMAs, the refusing notifier, the second/third
//!   guest, a reaper delay, failure injection, the stuck holder, pre-merge
//!   passes, the tight budget, ...); when enabled it is what the input
//!   decoded, as without swarm.
//!
//! `hunt --swarm` draws the mask per run from its generator, each bit with
//! probability 1/2 ([`Swarm::draw`]), and prepends the header ([`encode`]).

use crate::Target;

/// The header that marks a swarm input.
pub const MAGIC: &[u8; 8] = b"mm-swarm";

/// The actors and features a run leaves out: a set bit = off. The default
/// (0) turns nothing off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swarm(pub u32);

impl Swarm {
    /// Actor: guest 0's vCPU runs no ops (it still exits; on the KSM
    /// targets it still reads every page back before exiting).
    pub const NO_OPS: u32 = 1 << 0;
    /// Actor: the victim does not call the OOM killer a second time while
    /// dying (`teardown_vs_reaper`, `kill_anywhere`, `full_system`,
    /// `oom_disable_vs_exit`).
    pub const NO_OOM_AGAIN: u32 = 1 << 1;
    /// Actor: no process_mrelease beside the reaper (`kill_anywhere`,
    /// `full_system`).
    pub const NO_MRELEASE: u32 = 1 << 2;
    /// Actor: no ksmd batches during the race (KSM targets).
    pub const NO_KSMD: u32 = 1 << 3;
    /// Actor: no admin unmerge-all, `run = 2` (KSM targets).
    pub const NO_UNMERGE: u32 = 1 << 4;
    /// Op kind: no `Read` ops.
    pub const NO_READ: u32 = 1 << 5;
    /// Op kind: no `Write` ops.
    pub const NO_WRITE: u32 = 1 << 6;
    /// Op kind: no `DontNeed` ops.
    pub const NO_DONTNEED: u32 = 1 << 7;
    /// Op kind: no `Mlock`/`Munlock` ops.
    pub const NO_MLOCK_OPS: u32 = 1 << 8;
    /// Op kind: no `Munmap` ops.
    pub const NO_MUNMAP: u32 = 1 << 9;
    /// Op kind: no `Unmergeable` ops (KSM targets).
    pub const NO_UNMERGEABLE: u32 = 1 << 10;
    /// Feature: no shared VMAs.
    pub const NO_SHARED: u32 = 1 << 11;
    /// Feature: no VMA mlocked at setup.
    pub const NO_LOCKED: u32 = 1 << 12;
    /// Feature: no notifier refusing nonblocking invalidation.
    pub const NO_NOTIFIER: u32 = 1 << 13;
    /// Feature: no extra guest (the second guest of `full_system` and
    /// `oom_disable_vs_exit`, the third of the KSM targets).
    pub const NO_EXTRA_GUEST: u32 = 1 << 14;
    /// Feature: reaper delay 0.
    pub const NO_REAPER_DELAY: u32 = 1 << 15;
    /// Feature: no Nth-failure injection (`kill_anywhere`).
    pub const NO_FAIL: u32 = 1 << 16;
    /// Feature: no stuck holder (`oom_disable_vs_exit`).
    pub const NO_HOLDER: u32 = 1 << 17;
    /// Feature: no ksmd passes before the race (KSM targets).
    pub const NO_PRE_SCANS: u32 = 1 << 18;
    /// Feature: no tight budget (KSM targets).
    pub const NO_TIGHT_BUDGET: u32 = 1 << 19;
    /// Feature: KSM's zero pages off (KSM targets).
    pub const NO_ZERO_PAGES: u32 = 1 << 20;
    /// Feature: no untouched mergeable region (KSM targets).
    pub const NO_EMPTY_REGION: u32 = 1 << 21;
    /// Feature: guest 1 never stays alive (KSM targets).
    pub const NO_G1_STAYS: u32 = 1 << 22;
    /// Feature: the duplicated pages are never zero-filled (KSM targets).
    pub const NO_ZERO_DUPS: u32 = 1 << 23;
    /// Every defined bit.
    pub const ALL: u32 = (1 << 24) - 1;
    /// The actor bits.
    const ACTORS: u32 = Swarm::NO_OPS
        | Swarm::NO_OOM_AGAIN
        | Swarm::NO_MRELEASE
        | Swarm::NO_KSMD
        | Swarm::NO_UNMERGE;

    /// The actors of `target` a mask may turn off (the others are its
    /// core and always run).
    pub fn optional_actors(target: Target) -> u32 {
        match target {
            Target::TeardownVsReaper | Target::OomDisableVsExit | Target::OomChoice => {
                Swarm::NO_OPS | Swarm::NO_OOM_AGAIN
            }
            Target::KillAnywhere | Target::FullSystem => {
                Swarm::NO_OPS | Swarm::NO_OOM_AGAIN | Swarm::NO_MRELEASE
            }
            Target::MreleaseVsExit => Swarm::NO_OPS,
            // The vCPU's faults are the race.
            Target::FaultVsReap | Target::TouchVsReap => 0,
            Target::TeardownVsKsm | Target::KsmVsReaper => {
                Swarm::NO_OPS | Swarm::NO_KSMD | Swarm::NO_UNMERGE
            }
        }
    }

    /// The mask as `target` applies it: undefined bits and actor bits that
    /// are not optional for `target` cleared, and no actor bit at all if
    /// every optional actor was turned off (never all of them).
    pub fn for_target(self, target: Target) -> Swarm {
        let optional = Swarm::optional_actors(target);
        let mut actors = self.0 & optional;
        if actors == optional {
            actors = 0;
        }
        Swarm((self.0 & Swarm::ALL & !Swarm::ACTORS) | actors)
    }

    /// Whether the actor or feature `bit` is turned off.
    pub fn off(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// A random mask, each defined bit set with probability 1/2, drawn from
    /// the `hunt` generator state `x` (one step).
    pub fn draw(x: &mut u64) -> Swarm {
        Swarm((crate::cli::xorshift(x) >> 16) as u32 & Swarm::ALL)
    }
}

/// The swarm input that runs `body` (a plain input) with `mask`.
pub fn encode(mask: Swarm, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(MAGIC.len() + 4 + body.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&mask.0.to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Splits an input into its mask (as `target` applies it) and the plain
/// input after the header; an input without the full header is all plain
/// input with mask 0.
pub fn split(target: Target, data: &[u8]) -> (Swarm, &[u8]) {
    match data.strip_prefix(MAGIC.as_slice()) {
        Some(rest) if rest.len() >= 4 => {
            let mask = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            (Swarm(mask).for_target(target), &rest[4..])
        }
        _ => (Swarm::default(), data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_plain_inputs_have_mask_zero() {
        let t = Target::TeardownVsReaper;
        assert_eq!(split(t, b"abc"), (Swarm(0), &b"abc"[..]));
        // A header cut short is plain input.
        assert_eq!(split(t, b"mm-swarm\x01"), (Swarm(0), &b"mm-swarm\x01"[..]));
        let data = encode(Swarm(Swarm::NO_LOCKED), b"xyz");
        assert_eq!(split(t, &data), (Swarm(Swarm::NO_LOCKED), &b"xyz"[..]));
    }

    #[test]
    fn test_never_every_optional_actor_off() {
        for t in Target::ALL {
            let m = Swarm(u32::MAX).for_target(t);
            assert_eq!(m.0 & Swarm::ACTORS, 0, "{}", t.name());
            assert_eq!(m.0, Swarm::ALL & !Swarm::ACTORS);
        }
        // Core actors are never off: the vCPU ops of fault_vs_reap.
        let m = Swarm(Swarm::NO_OPS).for_target(Target::FaultVsReap);
        assert!(!m.off(Swarm::NO_OPS));
        // One of two optional actors may be off.
        let m = Swarm(Swarm::NO_OPS).for_target(Target::TeardownVsReaper);
        assert!(m.off(Swarm::NO_OPS));
    }
}
