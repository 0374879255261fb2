#!/usr/bin/env bash
# Time `make demo` from a fresh clone, install included, then a second run against the first's champion.
#
#   bash benchmarks/fresh_demo.sh [WORKDIR]
#
# Prints the wall time of each run and the lines of the gate table; the logs stay in WORKDIR.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=${1:-$(mktemp -d /tmp/tunegate-fresh.XXXXXX)}
git clone -q "$repo" "$work/tunegate"
cd "$work/tunegate"
for run in 1 2; do
  start=$(date +%s)
  make demo >"$work/demo$run.log" 2>&1
  echo "run $run: $(( $(date +%s) - start )) s wall (log: $work/demo$run.log)"
  sed -n '/^## Gate verdict/,/^=====/p' "$work/demo$run.log"
done
