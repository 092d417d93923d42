//! What the `hunt` and `threads` examples share: their command line
//! (`TARGET SECONDS SEED [..] [--swarm]`) and the xorshift generator of
//! their random inputs.

use crate::swarm::{self, Swarm};
use crate::Target;

/// `TARGET SECONDS SEED [..]`, parsed.
#[derive(Debug)]
pub struct HuntArgs {
    /// The target named by the first argument.
    pub target: Target,
    /// The time limit (default 10 s).
    pub secs: f64,
    /// The generator state: the seed (default 1), made odd.
    pub state: u64,
    /// The arguments after SEED (without `--swarm`).
    pub rest: Vec<String>,
    /// `--swarm` (anywhere): each run draws a random subset of the
    /// target's actors and features ([`crate::swarm`]).
    pub swarm: bool,
}

impl HuntArgs {
    /// Parses the process arguments; an unknown or missing target prints
    /// `usage: USAGE (targets: ..)` and exits with status 2.
    pub fn from_env(usage: &str) -> HuntArgs {
        let mut args: Vec<String> = std::env::args().collect();
        let swarm = args.iter().any(|a| a == "--swarm");
        args.retain(|a| a != "--swarm");
        let target = args
            .get(1)
            .and_then(|n| Target::ALL.into_iter().find(|t| t.name() == n))
            .unwrap_or_else(|| {
                eprintln!(
                    "usage: {usage} (targets: {:?})",
                    Target::ALL.map(Target::name)
                );
                std::process::exit(2)
            });
        HuntArgs {
            target,
            secs: args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10.0),
            state: args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1) | 1,
            rest: args.iter().skip(4).cloned().collect(),
            swarm,
        }
    }

    /// `body` as this run's input: unchanged, or with `--swarm` behind a
    /// swarm header whose mask is drawn from `x` (one step), so the saved
    /// bytes replay through plain `mm_race::run`.
    pub fn input(&self, x: &mut u64, body: Vec<u8>) -> Vec<u8> {
        if self.swarm {
            swarm::encode(Swarm::draw(x), &body)
        } else {
            body
        }
    }
}

/// One xorshift64 step of `x`; returns the new state.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `len` bytes, the low byte of one [`xorshift`] step each.
pub fn random_bytes(x: &mut u64, len: usize) -> Vec<u8> {
    (0..len).map(|_| xorshift(x) as u8).collect()
}
