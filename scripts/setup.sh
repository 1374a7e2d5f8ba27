#!/usr/bin/env bash
# Installs whatever the project needs that is missing; idempotent, and quick when
# everything is already there. Run by scripts/test.sh and scripts/start.sh.
set -euo pipefail
LOG_TAG=setup
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup) first"
command -v node >/dev/null || die "node not found: install Node.js >= 20.19 first"
command -v npm >/dev/null || die "npm not found: install npm first"

# (a) the wasm32 target -------------------------------------------------------------
if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  log "rust target wasm32-unknown-unknown: ok"
else
  log "rust target wasm32-unknown-unknown: installing"
  rustup target add wasm32-unknown-unknown \
    || die "could not add the wasm32-unknown-unknown target (rustup target add wasm32-unknown-unknown)"
fi

# (b) wasm-bindgen-cli at exactly the version of the wasm-bindgen crate -------------------
WB_VERSION="$(wasm_bindgen_version)"
if [ -z "$WB_VERSION" ]; then
  warn "no wasm-bindgen version in Cargo.lock (nor an exact pin in Cargo.toml) yet: skipping wasm-bindgen-cli"
else
  wb_installed() {
    command -v wasm-bindgen >/dev/null \
      && command -v wasm-bindgen-test-runner >/dev/null \
      && [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" = "$WB_VERSION" ]
  }
  if ! wb_installed && pgrep -f "cargo install wasm-bindgen-cli" >/dev/null 2>&1; then
    log "wasm-bindgen-cli: another 'cargo install wasm-bindgen-cli' is running; waiting for it"
    while pgrep -f "cargo install wasm-bindgen-cli" >/dev/null 2>&1; do sleep 5; done
  fi
  if wb_installed; then
    log "wasm-bindgen-cli $WB_VERSION: ok"
  else
    have="$(wasm-bindgen --version 2>/dev/null || echo none)"
    log "wasm-bindgen-cli: have '$have', need $WB_VERSION: cargo install (takes a few minutes)"
    # No --locked: the crate's own lockfile does not resolve against this registry.
    cargo install wasm-bindgen-cli --version "$WB_VERSION" --force
    wb_installed || die "wasm-bindgen $WB_VERSION still not on PATH after cargo install"
  fi
fi

# (c) npm dependencies -------------------------------------------------------------------
STAMP=node_modules/.concord-npm-ci-stamp
if [ ! -d node_modules ] || [ ! -f "$STAMP" ] || [ package-lock.json -nt "$STAMP" ] || [ package.json -nt "$STAMP" ]; then
  log "npm dependencies: npm ci"
  npm ci --no-audit --no-fund
  touch "$STAMP"
else
  log "npm dependencies: ok"
fi

# (d) Chromium + ChromeDriver for browser tests ------------------------------------------
if have_browser; then
  log "chromium + chromedriver: ok"
elif is_root && command -v apt-get >/dev/null; then
  log "chromium + chromedriver: installing with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  have_browser || die "chromium/chromedriver still missing after apt-get install"
else
  warn "/usr/bin/chromium or /usr/bin/chromedriver is missing and this is not root:"
  warn "browser tests will be skipped (install the Debian packages chromium and chromium-driver)"
fi

log "done"
