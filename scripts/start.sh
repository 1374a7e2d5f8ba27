#!/usr/bin/env bash
# The project's one start command (`npm start`): set up, build, run the local cluster.
# Extra arguments are passed to the cluster launcher (scripts/cluster.mjs).
set -euo pipefail
LOG_TAG=start
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bash scripts/setup.sh

log "building the relay: cargo build --release -p concord-relay"
cargo build --release -p concord-relay

missing=()
if [ -f scripts/build.mjs ]; then
  log "building the npm package: npm run build"
  npm run build --silent
else
  missing+=("scripts/build.mjs (the npm package / wasm build): pkg/ not built")
fi

if [ -f scripts/cluster.mjs ]; then
  log "starting the cluster: node scripts/cluster.mjs $*"
  exec node scripts/cluster.mjs "$@"
fi
missing+=("scripts/cluster.mjs (the cluster launcher): nothing to start yet")

log "built: target/release/concord-relay"
log "not there yet:"
for m in "${missing[@]}"; do log "  - $m"; done
exit 0
