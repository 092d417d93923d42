#!/usr/bin/env bash
# A campaign on the current tree (issue 16): mm-race's `hunt` on every
# target in turn, SECONDS each, with swarm testing (each input turns a
# random subset of the target's actors and features off), from SEED.
# Prints one line per target:
#
#   TARGET runs=N found=0|1 after_s=X
#
# A finding is saved as target/campaign/TARGET.bin (replay it with
# `cargo run --release -p mm-race --example replay -- TARGET FILE`, which
# prints the invariant and the full trace) and its text as TARGET.txt.
# The binary is built once and copied aside, so builds of the checkout
# during the campaign do not change what runs. NICE (default 10) keeps
# it behind interactive work on a shared machine.
#
# Usage: fuzz/campaign.sh [SECONDS=600] [SEED=1] [TARGET...]
set -euo pipefail
root=$(git rev-parse --show-toplevel)
secs=${1:-600}
seed=${2:-1}
shift $(($# > 2 ? 2 : $#)) || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  # Every target mm-race names (as fuzz/mutants.sh reads them).
  mapfile -t targets < <(sed -n 's/.*Target::[A-Za-z]* => "\([a-z_]*\)",/\1/p' "$root/mm-race/src/scenario.rs")
fi
out=$root/target/campaign
mkdir -p "$out"
(cd "$root" && cargo build -q --release -p mm-race --example hunt)
bin=$(mktemp -d)/hunt
cp "$root/target/release/examples/hunt" "$bin"
echo "# $(git -C "$root" rev-parse --short HEAD) ${secs}s per target, seed $seed, --swarm"
for t in "${targets[@]}"; do
  rm -f "$out/$t.bin"
  line=$(nice -n "${NICE:-10}" "$bin" "$t" "$secs" "$seed" "$out/$t.bin" --swarm 2>"$out/$t.txt" | tail -1)
  echo "$t $line" | awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "%s runs=%s found=%s after_s=%s\n", $1, v["runs"], v["found"], v["after_s"] }'
  [ -s "$out/$t.txt" ] || rm -f "$out/$t.txt"
done
