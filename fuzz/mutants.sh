#!/usr/bin/env bash
# How much of the protocol code does the race harness really check?
# Mutation testing (issue 16 §3) with cargo-mutants on the protocol files,
# the committed corpus replay (`cargo test -p mm-race --test replay
# replay_corpus_and_regressions`: fuzz/corpus + fuzz/regressions, every
# oracle) as the only test. Then, with --fuzz SECS, each mutant the replay
# missed is applied to a scratch tree and hunted from nothing (mm-race's
# `hunt`: random inputs, SECS seconds on each target, seed 1).
#
# Usage: fuzz/mutants.sh [--fuzz SECS] [FILE...]
#   FILE: a path from the repository root (default: the protocol files
#   below). Installs cargo-mutants if missing. Writes cargo-mutants'
#   results under target/mutants/<file>/mutants.out and prints, per file:
#   mutants, caught by the replay (timeouts count as caught: a hang is a
#   finding), missed, unviable (did not build), score = caught / viable;
#   with --fuzz, how many of the missed ones the hunt caught (the input
#   it found is kept in target/mutants/<file>/found/<mutant>.<target>,
#   a candidate for fuzz/corpus/<target>/).
# Builds in a scratch worktree of HEAD with its own target directory
# (target/mutants-build, kept between runs), never in the checkout.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
fuzz=0
if [ "${1:-}" = "--fuzz" ]; then fuzz=$2; shift 2; fi
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
targets=$(sed -n 's/.*Target::[A-Za-z]* => "\([a-z_]*\)",/\1/p' "$root/mm-race/src/scenario.rs")

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
  rm -rf "$res"
  echo "== $file" >&2
  (cd "$scratch" && cargo mutants --in-place --no-shuffle -p "$pkg" -f "$file" \
      --test-package mm-race --cargo-test-arg=--test=replay \
      --baseline skip --timeout "${MUTANTS_TIMEOUT:-20}" --build-timeout 1200 \
      -o "$res" -- replay_corpus_and_regressions >&2) || true
  m=$res/mutants.out
  caught=$(cat "$m/caught.txt" "$m/timeout.txt" 2>/dev/null | grep -c . || true)
  missed=$(grep -c . "$m/missed.txt" 2>/dev/null || true)
  unviable=$(grep -c . "$m/unviable.txt" 2>/dev/null || true)
  viable=$((caught + missed))
  score=$(python3 -c "print('%.0f%%' % (100.0 * $caught / $viable) if $viable else '-')")
  line="$file: $((viable + unviable)) mutants, replay caught $caught, missed $missed, unviable $unviable, score $score"
  if [ "$fuzz" != 0 ] && [ "$missed" -gt 0 ]; then
    (cd "$scratch" && cargo build -q --release -p mm-race --example hunt)
    hunted=0
    mkdir -p "$res/found"
    # The mutants the replay missed: name, file and diff (outcomes.json).
    while IFS=$'\t' read -r desc mfile diff; do
      git -C "$scratch" checkout -q -- . ':!fuzz'
      # The diff's `+++` line names the mutation, not a file: patch that file.
      if ! (cd "$scratch" && patch -s -p0 "$mfile" < "$m/$diff"); then continue; fi
      (cd "$scratch" && cargo build -q --release -p mm-race --example hunt) || continue
      found=0
      for t in $targets; do
        save=$res/found/$(basename "$diff" .diff).$t
        if "$CARGO_TARGET_DIR/release/examples/hunt" "$t" "$fuzz" 1 "$save" 2>/dev/null | grep -q found=1; then
          found=1; break
        fi
      done
      echo "  hunt $([ $found = 1 ] && echo caught || echo MISSED): $desc" >&2
      hunted=$((hunted + found))
    done < <(python3 - "$m/outcomes.json" <<'PY'
import json, sys
for o in json.load(open(sys.argv[1]))["outcomes"]:
    if o.get("summary") == "MissedMutant":
        mu = o["scenario"]["Mutant"]
        print("\t".join((mu["name"], mu["file"], o["diff_path"])))
PY
    )
    git -C "$scratch" checkout -q -- . ':!fuzz'
    line="$line; hunt ${fuzz}s/target caught $hunted of the $missed missed"
  fi
  echo "$line"
done
