#!/usr/bin/env bash
# For each protocol-history patch: build the patched tree in a scratch
# worktree, fuzz its targets from an EMPTY corpus with several seeds on one
# core, and print one line per (patch, target):
#
#   NAME target=T median_s=X found=K/N random_median_s=Y random_found=K/N
#        threads_median_s=Z threads_found=K/N
#
# "random" runs the same actors with uniformly random inputs (mm-race's
# `hunt` example) for the same time budget, so the value of coverage
# guidance is a measured number. "threads" runs the same random setups with
# the same actors each on its own plain OS thread (mm-race's `threads`
# example: no yield hook, real time, the real blocking mmap lock, a 2 s
# wall-clock limit per run reported as deadlock/hang), for the same budget,
# so the value of the deterministic executor is a measured number too.
# A median of a column where nothing was found is the budget itself.
#
# libFuzzer runs without a sanitizer (`-s none`: ASan looks for UB in
# unsafe code, not for protocol races, and costs ~5x in executions) and
# with `-len_control=0` (full-length inputs from the start: the setup is
# decoded first and the schedule needs the bytes after it). The CI smoke
# run keeps ASan.
#
# Usage: fuzz/time-to-bug.sh [SEEDS=5] [MAX_SECONDS=60] [PATCH_NAME...]
# (TTB_VERBOSE=1: each threads run's line, with the invariant, on stderr)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
seeds=${1:-5}
max=${2:-60}
shift $(( $# > 2 ? 2 : $# )) || true
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/time-to-bug}
median() { sort -g | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "nan")}'; }

patches=("$@")
if [ ${#patches[@]} -eq 0 ]; then
  for p in "$root"/fuzz/history/*.patch; do patches+=("$(basename "$p" .patch)"); done
fi

for name in "${patches[@]}"; do
  patch="$root/fuzz/history/$name.patch"
  targets=$(sed -n 's/^Targets: //p' "$patch" | tr -d ',.')
  scratch=$(mktemp -d)
  git -C "$root" worktree add -q --detach "$scratch" HEAD
  git -C "$scratch" apply "$patch"
  (cd "$scratch" && cargo build -q --release -p mm-race --example hunt --example threads 2>/dev/null)
  for t in $targets; do (cd "$scratch" && cargo +nightly fuzz build -s none "$t" >/dev/null 2>&1); done
  for t in $targets; do
    times=(); found=0; rtimes=(); rfound=0; ttimes=(); tfound=0
    for s in $(seq 1 "$seeds"); do
      corpus=$(mktemp -d)
      start=$(date +%s.%N)
      if (cd "$scratch" && timeout $((max + 30)) cargo +nightly fuzz run -s none "$t" "$corpus" -- -len_control=0 \
            -seed="$s" -max_total_time="$max" -rss_limit_mb=4096 -artifact_prefix="$corpus/" >/dev/null 2>&1); then
        times+=("$max")
      else
        found=$((found + 1))
        times+=("$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')")
      fi
      rm -rf "$corpus"
      line=$("$CARGO_TARGET_DIR/release/examples/hunt" "$t" "$max" "$s" 2>/dev/null || true)
      rtimes+=("$(echo "$line" | sed -n 's/.*after_s=\([0-9.]*\).*/\1/p')")
      case "$line" in found=1*) rfound=$((rfound + 1));; esac
      line=$("$CARGO_TARGET_DIR/release/examples/threads" "$t" "$max" "$s" 2>/dev/null || true)
      ttimes+=("$(echo "$line" | sed -n 's/.*after_s=\([0-9.]*\).*/\1/p')")
      case "$line" in found=1*) tfound=$((tfound + 1));; esac
      [ -z "${TTB_VERBOSE:-}" ] || echo "  $name $t seed=$s threads: $line" >&2
    done
    printf '%s target=%s median_s=%s found=%d/%d random_median_s=%s random_found=%d/%d threads_median_s=%s threads_found=%d/%d\n' \
      "$name" "$t" "$(printf '%s\n' "${times[@]}" | median)" "$found" "$seeds" \
      "$(printf '%s\n' "${rtimes[@]}" | median)" "$rfound" "$seeds" \
      "$(printf '%s\n' "${ttimes[@]}" | median)" "$tfound" "$seeds"
  done
  git -C "$root" worktree remove --force "$scratch"
done
