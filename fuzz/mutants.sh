#!/usr/bin/env bash
# How much of the protocol code does the race harness really check?
# Mutation testing (issue 16 §3) with cargo-mutants on the protocol files,
# the committed corpus replay (`cargo test -p mm-race --test replay
# replay_corpus_and_regressions`: fuzz/corpus + fuzz/regressions, every
# oracle) as the only test. Then, with --fuzz SECS, the fuzzers' score: a
# second cargo-mutants pass whose test hunts from nothing (`cargo test -p
# mm-race --test hunt -- --ignored`: random inputs, plain and swarm in
# turn, SECS seconds in all over the file's targets, seed 1), on every
# mutant of the file or, with --shard K/N, on cargo-mutants' shard K of N
# (round-robin: every Nth mutant; a sample, as every mutant costs a build,
# and a missed one SECS).
#
# Usage: fuzz/mutants.sh [--fuzz SECS] [--shard K/N] [FILE...]
#   FILE: a path from the repository root (default: the protocol files
#   below). Installs cargo-mutants if missing. Writes cargo-mutants'
#   results under target/mutants/<file>/mutants.out (the hunt's under
#   target/mutants/<file>/fuzz.out) and prints, per file: mutants, caught
#   by the replay (timeouts count as caught: a hang is a finding), missed,
#   unviable (did not build), score = caught / viable; with --fuzz, the
#   same for the hunt (a finding's input, in hex, is in its log).
#   Targets hunted per file: the KSM targets for mm-ksm and
#   mm-core/src/ksm, the reaper and OOM targets for mm-reaper and
#   mm-core/src/host, every target otherwise (MUTANTS_TARGETS overrides);
#   the hunt runs once on the unmutated tree first, per set of targets (a
#   finding there would make every mutant "caught"). MUTANTS_SKIP_REPLAY=1
#   keeps a file's last replay results instead of running the replay again;
#   MUTANTS_FILTER (a regex) keeps only the mutants whose names match it
#   (cargo-mutants' -F), e.g. the functions of a file that matter.
# Builds in a scratch worktree of HEAD with its own target directory
# (target/mutants-build, kept between runs), never in the checkout.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
fuzz=0
shard=()
filter=()
if [ -n "${MUTANTS_FILTER:-}" ]; then filter=(-F "$MUTANTS_FILTER"); fi
while [ $# -gt 0 ]; do
  case "$1" in
    --fuzz) fuzz=$2; shift 2 ;;
    --shard) shard=(--shard "$2" --sharding round-robin); shift 2 ;;
    *) break ;;
  esac
done
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=(mm-reaper/src/lib.rs mm-ksm/src/slots.rs mm-ksm/src/scan/walk.rs
         mm-ksm/src/scan/unmerge.rs mm-core/src/exit.rs mm-core/src/host/oom.rs
         mm-core/src/ksm/unshare.rs mm-core/src/mm/zap.rs)
fi
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/mutants-build}
# No debug info in the per-mutant test builds: linking is most of a rebuild.
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-0}
out=$root/target/mutants
mkdir -p "$out"
scratch=$(mktemp -d)
git -C "$root" worktree add -q --detach "$scratch" HEAD
trap 'git -C "$root" worktree remove --force "$scratch"' EXIT
# The corpus under test is the checkout's (committed or not).
for d in corpus regressions; do
  rm -rf "${scratch:?}/fuzz/$d" && cp -r "$root/fuzz/$d" "$scratch/fuzz/$d"
done
# Every race target (their names in mm-race's Target::name).
all_targets=$(sed -n 's/.*Target::[A-Za-z]* => "\([a-z_]*\)",/\1/p' "$root/mm-race/src/scenario.rs" | paste -sd,)
targets_for() {
  if [ -n "${MUTANTS_TARGETS:-}" ]; then echo "$MUTANTS_TARGETS"; return; fi
  case "$1" in
    mm-ksm/*|mm-core/src/ksm/*) echo teardown_vs_ksm,ksm_vs_reaper ;;
    mm-reaper/*|mm-core/src/host/*)
      echo "$all_targets" | tr , '\n' | grep -v teardown_vs_ksm | paste -sd, ;;
    *) echo "$all_targets" ;;
  esac
}
score() { # caught viable -> "NN%" or "-"
  python3 -c "print('%.0f%%' % (100.0 * $1 / $2) if $2 else '-')"
}
count() { # file... -> non-empty lines
  cat "$@" 2>/dev/null | grep -c . || true
}

# The baseline, run here: cargo-mutants would build and run its baseline
# on the mutated package instead of the test package (27.1), so it is
# skipped there (`--baseline skip`) and checked once here, which also warms
# the build directory for the first mutant. Without a baseline the timeout
# is ours: MUTANTS_TIMEOUT (20 s), where the replay takes well under a
# second (a mutant that spins without a yield point hangs the executor: a
# timeout, counted as caught; they made most of the run time at 600 s).
(cd "$scratch" && cargo test -q -p mm-race --test replay replay_corpus_and_regressions >&2) || {
  echo "the corpus replay fails on the unmutated tree: nothing to measure" >&2
  exit 1
}

for file in "${files[@]}"; do
  pkg=${file%%/*}
  name=$(echo "$file" | tr '/' '_')
  res=$out/$name
  mkdir -p "$res"
  echo "== $file" >&2
  # MUTANTS_SKIP_REPLAY=1: keep the replay's last results (a --fuzz run
  # after a replay run of the same tree).
  if [ "${MUTANTS_SKIP_REPLAY:-0}" != 1 ] || [ ! -d "$res/mutants.out" ]; then
    rm -rf "$res/mutants.out"
    (cd "$scratch" && cargo mutants --in-place --no-shuffle -p "$pkg" -f "$file" "${filter[@]}" \
        --test-package mm-race --cargo-test-arg=--test=replay \
        --baseline skip --timeout "${MUTANTS_TIMEOUT:-20}" --build-timeout 1200 \
        -o "$res" -- replay_corpus_and_regressions >&2) || true
  fi
  m=$res/mutants.out
  caught=$(count "$m/caught.txt" "$m/timeout.txt")
  missed=$(count "$m/missed.txt")
  unviable=$(count "$m/unviable.txt")
  viable=$((caught + missed))
  line="$file: $((viable + unviable)) mutants, replay caught $caught, missed $missed, unviable $unviable, score $(score "$caught" "$viable")"
  if [ "$fuzz" != 0 ]; then
    f=$res/fuzz.out
    ts=$(targets_for "$file")
    if [[ " ${clean_hunts:-} " != *" $ts "* ]]; then
      (cd "$scratch" && MM_RACE_HUNT_SECS=$fuzz MM_RACE_HUNT_TARGETS=$ts \
        cargo test -q -p mm-race --test hunt -- --ignored hunt_from_nothing >&2) || {
        echo "the hunt finds something on the unmutated tree ($ts): no fuzz score" >&2
        exit 1
      }
      clean_hunts="${clean_hunts:-} $ts"
    fi
    (cd "$scratch" && MM_RACE_HUNT_SECS=$fuzz MM_RACE_HUNT_TARGETS=$(targets_for "$file") \
      cargo mutants --in-place --no-shuffle -p "$pkg" -f "$file" "${filter[@]}" "${shard[@]}" \
        --test-package mm-race --cargo-test-arg=--test=hunt \
        --baseline skip --timeout $((fuzz + 60)) --build-timeout 1200 \
        -o "$f.tmp" -- hunt_from_nothing -- --ignored >&2) || true
    rm -rf "$f" && mv "$f.tmp/mutants.out" "$f" && rm -rf "$f.tmp"
    fc=$(count "$f/caught.txt" "$f/timeout.txt")
    fm=$(count "$f/missed.txt")
    fu=$(count "$f/unviable.txt")
    line="$line; hunt ${fuzz}s ($(targets_for "$file")${shard[1]:+, shard ${shard[1]}}): $((fc + fm + fu)) mutants, caught $fc, missed $fm, unviable $fu, score $(score "$fc" $((fc + fm)))"
  fi
  echo "$line"
done
