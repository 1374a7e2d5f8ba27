#!/usr/bin/env bash
# The project's one test command (`npm test`, and CI's .ci/run). Runs from any cwd.
# Stages run in order and the first failure stops the run. Optional stages run only
# once the files they need exist.
set -euo pipefail
LOG_TAG=test
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0=$SECONDS
STAGE_N=0
SUMMARY=()

banner() { printf '\n==================== %s ====================\n' "$*"; }

finish() {
  local rc=$?
  banner "summary"
  local line
  for line in "${SUMMARY[@]+"${SUMMARY[@]}"}"; do printf '  %s\n' "$line"; done
  if [ "$rc" -eq 0 ]; then
    printf 'ALL STAGES PASSED in %s\n' "$(fmt_secs $((SECONDS - T0)))"
  else
    printf 'FAILED (exit %d) after %s\n' "$rc" "$(fmt_secs $((SECONDS - T0)))"
  fi
}
trap finish EXIT

# stage NAME CMD...  — run one stage with a banner; stop everything if it fails.
stage() {
  local name=$1; shift
  STAGE_N=$((STAGE_N + 1))
  banner "[$STAGE_N] $name"
  printf '$ %s\n' "$*"
  local t=$SECONDS rc=0
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    SUMMARY+=("FAIL  $name ($(fmt_secs $((SECONDS - t))))")
    banner "FAILED: $name (exit $rc)"
    exit "$rc"
  fi
  SUMMARY+=("ok    $name ($(fmt_secs $((SECONDS - t))))")
}

skip() {
  SUMMARY+=("skip  $1: $2")
  log "skipping $1: $2"
}

# Build for wasm32 and fail on any warning (cargo replays cached warnings for
# workspace crates, so this holds on incremental runs too). RUSTFLAGS is left alone so
# the wasm artifacts are shared with the other wasm stages instead of rebuilt.
wasm_build_no_warnings() {
  local out rc=0
  out="$(mktemp)"
  cargo build "$@" --target wasm32-unknown-unknown --color never 2>&1 | tee "$out" || rc=$?
  [ "$rc" -eq 0 ] || { rm -f "$out"; return "$rc"; }
  if grep -qE '^warning' "$out"; then
    echo "--- the wasm build printed warnings (treated as errors):" >&2
    grep -E '^warning' "$out" >&2
    rm -f "$out"
    return 1
  fi
  rm -f "$out"
}

# wasm-bindgen tests in headless Chromium through ChromeDriver.
wasm_bindgen_tests() {
  local caps="$ROOT/target/concord-webdriver.json"
  mkdir -p "$ROOT/target"
  # Extra Chromium flags: this machine has no network, so keep Chromium from phoning home.
  cat >"$caps" <<'JSON'
{
  "goog:chromeOptions": {
    "binary": "/usr/bin/chromium",
    "args": ["disable-gpu", "disable-background-networking", "disable-component-update",
             "disable-sync", "disable-quic", "no-first-run"]
  }
}
JSON
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  CHROMEDRIVER=/usr/bin/chromedriver \
  WASM_BINDGEN_TEST_WEBDRIVER_JSON="$caps" \
  WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-120}" \
  WASM_BINDGEN_TEST_DRIVER_TIMEOUT="${WASM_BINDGEN_TEST_DRIVER_TIMEOUT:-30}" \
    cargo test -p concord-wasm --target wasm32-unknown-unknown
}

has_files() { compgen -G "$1" >/dev/null; }

# node_tests DIR [node flags...] — node's test runner over DIR. Files named like tests
# (*.test.mjs, ...) are discovered; if there are none, every DIR/*.mjs is run. A run
# that executes no test at all fails: that means the files were not picked up.
node_tests() {
  local dir=$1; shift
  local out rc=0 files
  if has_files "$dir/*.test.mjs"; then files=("$dir/"); else files=("$dir"/*.mjs); fi
  out="$(mktemp)"
  node --test "$@" "${files[@]}" 2>&1 | tee "$out" || rc=$?
  if [ "$rc" -eq 0 ] && grep -qE '^# tests 0$' "$out"; then
    echo "--- node --test ran no test in $dir" >&2
    rc=1
  fi
  rm -f "$out"
  return "$rc"
}

export PROPTEST_CASES="${PROPTEST_CASES:-1000}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
log "repo: $ROOT   PROPTEST_CASES=$PROPTEST_CASES"

stage "setup"                      bash scripts/setup.sh
stage "cargo fmt --check"          cargo fmt --all -- --check
stage "cargo clippy -D warnings"   cargo clippy --workspace --all-targets -- -D warnings
stage "cargo doc -D warnings"      env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet
stage "cargo test --workspace"     cargo test --workspace
stage "wasm32 build, no warnings"  wasm_build_no_warnings -p concord-core -p concord-wasm

if ! has_files 'wasm/tests/*.rs'; then
  skip "wasm-bindgen tests" "no wasm/tests/*.rs yet"
elif ! have_browser; then
  skip "wasm-bindgen tests" "no /usr/bin/chromium or /usr/bin/chromedriver"
elif ! command -v wasm-bindgen-test-runner >/dev/null; then
  skip "wasm-bindgen tests" "wasm-bindgen-test-runner not installed"
else
  stage "wasm-bindgen tests (headless Chromium)" wasm_bindgen_tests
fi

if [ -f scripts/build.mjs ]; then
  stage "npm run build" npm run build --silent
else
  skip "npm run build" "no scripts/build.mjs yet"
fi

if has_files 'test/node/*.test.mjs'; then
  stage "node package tests" node_tests test/node
else
  skip "node package tests" "no test/node/*.test.mjs yet"
fi

if has_files 'test/e2e/*.mjs'; then
  if have_browser; then
    stage "e2e browser tests" node_tests test/e2e --test-concurrency=1
  else
    skip "e2e browser tests" "no /usr/bin/chromium or /usr/bin/chromedriver"
  fi
else
  skip "e2e browser tests" "no test/e2e/*.mjs yet"
fi
