#!/usr/bin/env bash
# Swarm testing vs today's single configuration (issue 16 §3): for each
# PATCH:TARGET pair, apply fuzz/history/PATCH.patch in a scratch worktree,
# build mm-race's `hunt` example (release), then run it from each seed with
# plain random inputs and with `--swarm` (each run turns a random subset of
# the target's actors and features off, see mm-race/src/swarm.rs), and
# print one line per pair:
#
#   PATCH target=T random_median_s=X random_found=K/N random_finds_per_cpu_h=F
#        random_runs_per_find=R swarm_median_s=Y swarm_found=K/N
#        swarm_finds_per_cpu_h=G swarm_runs_per_find=S
#
# A miss counts as MAX_SECONDS in the median and in the CPU time. Finds
# per CPU-hour = finds / (sum of the seeds' times, each `hunt` being one
# single-threaded process; `hunt` prints ms, so finds under 1 ms each give
# `inf`). Runs per find = inputs run over all seeds / finds (`-` if none),
# which load on the machine does not change. Plain and swarm alternate
# per seed, so background load hits both alike.
#
# Usage: fuzz/swarm-ttb.sh [SEEDS=5] [MAX_SECONDS=60] [PATCH:TARGET...]
# (default pairs: the four history patches random schedules do not find
# at once, FUZZING.md's time-to-bug table). SWARM_LANES=2 measures two
# pairs at a time; SWARM_SCRATCH=DIR reuses an existing worktree (checked
# out at HEAD, reset between patches, kept) instead of a temporary one.
# Builds use CARGO_BUILD_JOBS as set (1 on the shared machine).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
seeds=${1:-5}
max=${2:-60}
shift $(($# > 2 ? 2 : $#)) || true
pairs=("$@")
if [ ${#pairs[@]} -eq 0 ]; then
  pairs=(exit_teardown_unlocked:teardown_vs_reaper munlock_vs_reaper:teardown_vs_reaper
    ksm_no_exit_barrier:teardown_vs_ksm ksm_list_unlock_first:teardown_vs_ksm)
fi
lanes=${SWARM_LANES:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/swarm-ttb}
median() { sort -g | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "nan")}'; }
bins=$(mktemp -d)
rev=$(git -C "$root" rev-parse HEAD)

# Build phase: one patched `hunt` per patch, serially in one worktree.
if [ -n "${SWARM_SCRATCH:-}" ]; then
  scratch=$SWARM_SCRATCH
else
  scratch=$(mktemp -d)
  git -C "$root" worktree add -q --detach "$scratch" "$rev"
  trap 'git -C "$root" worktree remove --force "$scratch"' EXIT
fi
for patch in $(printf '%s\n' "${pairs[@]}" | cut -d: -f1 | sort -u); do
  git -C "$scratch" checkout -q --force --detach "$rev"
  git -C "$scratch" apply "$root/fuzz/history/$patch.patch"
  (cd "$scratch" && cargo build -q --release -p mm-race --example hunt)
  cp "$CARGO_TARGET_DIR/release/examples/hunt" "$bins/$patch"
done
git -C "$scratch" checkout -q --force --detach "$rev"

# One pair: both modes, every seed; prints its line.
measure() {
  local patch=${1%%:*} t=${1#*:} s mode line
  local -A times found runs
  for s in $(seq 1 "$seeds"); do
    for mode in random swarm; do
      line=$("$bins/$patch" "$t" "$max" "$s" $([ $mode = swarm ] && echo --swarm) 2>/dev/null || true)
      times[$mode]+="$(echo "$line" | sed -n 's/.*after_s=\([0-9.]*\).*/\1/p') "
      runs[$mode]=$((${runs[$mode]:-0} + $(echo "$line" | sed -n 's/.*runs=\([0-9]*\).*/\1/p')))
      case "$line" in found=1*) found[$mode]=$((${found[$mode]:-0} + 1)) ;; esac
    done
  done
  local out="$patch target=$t"
  for mode in random swarm; do
    local k=${found[$mode]:-0}
    out+=" ${mode}_median_s=$(printf '%s\n' ${times[$mode]} | median) ${mode}_found=$k/$seeds"
    out+=" ${mode}_finds_per_cpu_h=$(printf '%s\n' ${times[$mode]} |
      awk -v k="$k" '{s+=$1} END {if (s > 0) printf "%.0f", k * 3600 / s; else print "inf"}')"
    out+=" ${mode}_runs_per_find=$(awk -v k="$k" -v r="${runs[$mode]}" 'BEGIN {if (k) printf "%.0f", r / k; else print "-"}')"
  done
  echo "$out"
}
for p in "${pairs[@]}"; do
  measure "$p" &
  while [ "$(jobs -rp | wc -l)" -ge "$lanes" ]; do wait -n; done
done
wait
rm -rf "$bins"
