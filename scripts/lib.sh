# shellcheck shell=bash
# Shared helpers for scripts/setup.sh, scripts/test.sh and scripts/start.sh.
# Source it; it defines ROOT (the repository root) and cds there.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# cargo installs its binaries here; make sure they are found even from a bare shell.
case ":$PATH:" in
  *":$HOME/.cargo/bin:"*) ;;
  *) [ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH" ;;
esac
export PATH

log()  { printf '[%s] %s\n' "${LOG_TAG:-concord}" "$*"; }
warn() { printf '[%s] NOTE: %s\n' "${LOG_TAG:-concord}" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "${LOG_TAG:-concord}" "$*" >&2; exit 1; }

# fmt_secs N -> "1m 23s"
fmt_secs() {
  local s=$1
  if [ "$s" -ge 60 ]; then printf '%dm %02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi
}

# The exact wasm-bindgen crate version the workspace uses: from Cargo.lock, else from an
# exact pin (`wasm-bindgen = "=X"`) in the root Cargo.toml. Prints nothing if neither.
wasm_bindgen_version() {
  local v=""
  if [ -f Cargo.lock ]; then
    v="$(awk '
      $0 == "name = \"wasm-bindgen\"" { want = 1; next }
      want && /^version = / { gsub(/"/, "", $3); print $3; exit }
      /^\[\[package\]\]/ { want = 0 }
    ' Cargo.lock)"
  fi
  if [ -z "$v" ] && [ -f Cargo.toml ]; then
    v="$(sed -nE 's/^wasm-bindgen[[:space:]]*=[[:space:]]*(\{[^}]*version[[:space:]]*=[[:space:]]*)?"=([0-9][0-9A-Za-z.+-]*)".*/\2/p' Cargo.toml | head -n1)"
  fi
  printf '%s' "$v"
}

is_root() { [ "$(id -u)" -eq 0 ]; }

have_browser() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
