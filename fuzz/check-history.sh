#!/usr/bin/env bash
# Does the committed corpus still catch every protocol-history patch?
# For each fuzz/history/*.patch: apply it in a scratch worktree and run the
# corpus replay test (`cargo test --release -p mm-race --test replay
# replay_corpus`), which must FAIL on the patched tree. Yield points that
# move change what a schedule byte means, so committed inputs can drift
# off a bug; with --refresh, a patch the corpus no longer catches is
# hunted again on each of its targets (mm-race's `hunt`, 60 s, seeds 3
# and 5) and the inputs found are written to fuzz/corpus/<target>/.
#
# Usage: fuzz/check-history.sh [--refresh] [PATCH_NAME...]
# Prints one line per patch: `caught NAME` or `MISSED NAME` (+ refreshed
# inputs). Exit status 1 if any patch is missed (after a refresh: missed
# and not found again).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
refresh=0
if [ "${1:-}" = "--refresh" ]; then refresh=1; shift; fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/check-history}
patches=("$@")
if [ ${#patches[@]} -eq 0 ]; then
  for p in "$root"/fuzz/history/*.patch; do patches+=("$(basename "$p" .patch)"); done
fi
scratch=$(mktemp -d)
git -C "$root" worktree add -q --detach "$scratch" HEAD
trap 'git -C "$root" worktree remove --force "$scratch"' EXIT
# The corpus under test is the checkout's (committed or not).
rm -rf "$scratch/fuzz/corpus" && cp -r "$root/fuzz/corpus" "$scratch/fuzz/corpus"
bad=0
for name in "${patches[@]}"; do
  patch="$root/fuzz/history/$name.patch"
  git -C "$scratch" checkout -q -- . ':!fuzz/corpus'
  git -C "$scratch" apply "$patch"
  if ! (cd "$scratch" && cargo test -q --release -p mm-race --test replay replay_corpus >/dev/null 2>&1); then
    echo "caught $name"
    continue
  fi
  echo "MISSED $name"
  if [ $refresh -eq 0 ]; then bad=1; continue; fi
  (cd "$scratch" && cargo build -q --release -p mm-race --example hunt)
  found=0
  for t in $(sed -n 's/^Targets: //p' "$patch" | tr -d ',.'); do
    for s in 3 5; do
      out="$root/fuzz/corpus/$t/$name-$s"
      if "$CARGO_TARGET_DIR/release/examples/hunt" "$t" 60 "$s" "$out" 2>/dev/null | grep -q found=1; then
        echo "  refreshed $t/$name-$s"
        found=1
      fi
    done
  done
  [ $found -eq 1 ] || bad=1
done
exit $bad
