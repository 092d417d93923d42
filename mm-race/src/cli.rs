//! What the `hunt` and `threads` examples share: their command line
//! (`TARGET SECONDS SEED [..]`) and the xorshift generator of their random
//! inputs.

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
    /// The arguments after SEED.
    pub rest: Vec<String>,
}

impl HuntArgs {
    /// Parses the process arguments; an unknown or missing target prints
    /// `usage: USAGE (targets: ..)` and exits with status 2.
    pub fn from_env(usage: &str) -> HuntArgs {
        let args: Vec<String> = std::env::args().collect();
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
