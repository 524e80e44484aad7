#!/usr/bin/env bash
# Make sure the console's browser test (e2e/tests/console.rs) can run: Node.js and npm,
# Chromium, and the npm packages of e2e/browser (playwright-core, pinned by its
# package-lock.json).
#
#   node, npm   missing -> apt-get install nodejs (and npm if node came without it)
#   chromium    $CHROMIUM, else /usr/bin/chromium; missing -> apt-get install chromium
#   packages    e2e/browser/node_modules missing or older than package-lock.json -> npm ci
#
# apt-get runs as root, or through passwordless sudo; otherwise the script prints the
# commands to run and exits 1. Idempotent: when all is there it prints one "ok" line each.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BROWSER_DIR="$ROOT/e2e/browser"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

say() { printf 'ensure-browser: %s\n' "$*"; }
warn() { printf 'ensure-browser: %s\n' "$*" >&2; }

# shellcheck source=lib/privilege.sh
. "$ROOT/scripts/lib/privilege.sh"

APT_UPDATED=0
MISSING=()   # Debian packages a human has to install

# apt_install PACKAGE: 0 when installed, 1 when it could not be.
apt_install() {
  local pkg=$1
  if [[ $PRIV == none ]] || ! command -v apt-get >/dev/null 2>&1; then
    MISSING+=("$pkg")
    return 1
  fi
  if ((APT_UPDATED == 0)); then
    say "apt-get update"
    as_root apt-get update -qq >/dev/null || { MISSING+=("$pkg"); return 1; }
    APT_UPDATED=1
  fi
  say "installing $pkg with apt-get"
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; then
    warn "apt-get failed installing $pkg (run it by hand to see why)"
    MISSING+=("$pkg")
    return 1
  fi
}

# --- Node.js -----------------------------------------------------------------

if ! command -v node >/dev/null 2>&1; then
  apt_install nodejs || true
fi
# NodeSource's nodejs brings npm; Debian's does not.
if command -v node >/dev/null 2>&1 && ! command -v npm >/dev/null 2>&1; then
  apt_install npm || true
fi
if command -v node >/dev/null 2>&1; then
  major=$(node -p 'process.versions.node.split(".")[0]')
  if ((major < 18)); then
    warn "node $(node --version) is too old: playwright-core needs 18 or later"
    exit 1
  fi
  say "node $(node --version) ok"
fi

# --- Chromium ----------------------------------------------------------------

if [[ ! -x $CHROMIUM ]]; then
  if [[ $CHROMIUM == /usr/bin/chromium ]]; then
    apt_install chromium || true
  else
    warn "CHROMIUM=$CHROMIUM is not an executable file"
    exit 1
  fi
fi
if [[ -x $CHROMIUM ]]; then
  say "chromium $CHROMIUM ok"
fi

if ((${#MISSING[@]} > 0)); then
  if [[ $PRIV == none ]]; then
    warn "installing needs root or passwordless sudo; run these, then run $0 again:"
  else
    warn "run these, then run $0 again:"
  fi
  warn "  ${SUDO_HINT}apt-get update"
  warn "  ${SUDO_HINT}env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${MISSING[*]}"
  exit 1
fi

# --- npm packages ------------------------------------------------------------

# npm writes node_modules/.package-lock.json on every install: older than the lock file
# means the lock changed since (a pull, a version bump).
stamp="$BROWSER_DIR/node_modules/.package-lock.json"
if [[ ! -f $stamp || $BROWSER_DIR/package-lock.json -nt $stamp ]]; then
  say "npm ci in e2e/browser"
  (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund --loglevel=error)
fi
say "e2e/browser packages ok (playwright-core $(cd "$BROWSER_DIR" && node -p 'require("playwright-core/package.json").version'))"
