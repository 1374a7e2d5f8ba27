#!/usr/bin/env bash
# The relay load benchmark suite: every concord-load scenario (fanout, mixed, acks,
# acks-batch, idle), each beside a baseline measured in the same run, written to
# bench/results/relay-load.md.
#
#   bench/relay-load.sh                      # all scenarios, 10 s windows
#   DURATION=20 bench/relay-load.sh          # longer windows
#   bench/relay-load.sh --scenario fanout    # extra flags go to concord-load
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p concord-relay --bins

# Snapshot the binaries: other builds may replace target/release while we measure.
bin="$(mktemp -d "${TMPDIR:-/tmp}/concord-load-bin.XXXXXX")"
trap 'rm -rf "$bin"' EXIT
cp target/release/concord-relay target/release/concord-load "$bin/"

# 10,000 idle connections need as many descriptors in the tool and in the relay.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Which tree was measured (read-only git queries).
rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty="$(git status --porcelain 2>/dev/null | wc -l | tr -d ' ')"

mkdir -p bench/results
CONCORD_LOAD_VIA="bench/relay-load.sh $*   # tree $rev + $dirty uncommitted paths" "$bin/concord-load" \
  --spawn "$bin/concord-relay" \
  --scenario all \
  --duration "${DURATION:-10}" \
  --warmup "${WARMUP:-2}" \
  --out bench/results/relay-load.md \
  "$@"
