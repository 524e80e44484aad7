# Sourced by the benchmark scripts after they set NS (the namespace) and BENCH_DBS (the
# services whose databases they create, e.g. "user product"): a scratch directory WORK,
# a list PIDS of the processes they start, and all of it (databases included) removed on
# exit; the services' settings exported; require, build_release, wait_for and
# register_token. On exit the namespace's queues and exchanges go too (testkit's
# drop-namespace, built with the services): every relay declares all subscribers'
# queues, and those of services a script does not run would keep its events; its Redis
# keys go as well.

require() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$(basename "$0" .sh): $tool is required" >&2; exit 1; }
  done
}
# Builds the named packages' release binaries and sets TARGET, cargo's target directory.
build_release() {
  local package args=()
  for package in "$@"; do args+=(-p "$package"); done
  # Two calls: a `--bin` would restrict the other packages to that name too.
  cargo build --release -q "${args[@]}"
  cargo build --release -q -p testkit --bin drop-namespace
  TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
}
# The gateway as it is shipped (Cargo.toml's release-lto profile); call after
# build_release. Sets GATEWAY_BIN.
build_gateway() {
  cargo build --profile release-lto -q -p gateway
  GATEWAY_BIN=$TARGET/release-lto/gateway
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
psql_ns() { psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
drop_dbs() {
  for db in $BENCH_DBS; do
    psql_ns -d postgres -c "DROP DATABASE IF EXISTS ${NS}_$db WITH (FORCE)" >/dev/null 2>&1 || true
  done
}
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${TARGET:-}" ] && [ -x "$TARGET/release/drop-namespace" ]; then
    "$TARGET/release/drop-namespace" || echo "$(basename "$0" .sh): could not remove namespace $NS" >&2
  fi
  drop_dbs
  rm -rf "$WORK"
}

WORK=$(mktemp -d)
PIDS=()
trap cleanup EXIT
drop_dbs

# The namespace, keys in WORK, quiet logs, a token that outlives the longest run (one
# of 9 rounds takes 17 minutes; a token of the default 15 turns the rest into 401s), and
# rate limits so high that every request is counted (leased from Redis) but none is
# refused.
export COMMERCE__NAMESPACE=$NS COMMERCE__AUTH__KEYS_DIR="$WORK/keys" COMMERCE__LOG__FILTER=warn
export COMMERCE__AUTH__ACCESS_TOKEN_TTL_SECS=86400
for scope in USER AUTH ANONYMOUS; do
  export "COMMERCE__GATEWAY__RATE_LIMIT__${scope}__PER_MINUTE=1000000000"
  export "COMMERCE__GATEWAY__RATE_LIMIT__${scope}__BURST=100000000"
done

# Waits for URL to answer 2xx, for TENTHS tenths of a second (default 300); otherwise shows
# the logs and exits.
wait_for() {
  local url=$1 tenths=${2:-300}
  for _ in $(seq 1 "$tenths"); do
    curl -fs "$url" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$(basename "$0" .sh): $url did not answer" >&2; tail -n 20 "$WORK"/*.log >&2; exit 1
}

BENCH_PASSWORD="correct horse battery staple"
# Registers EMAIL (default: a new one) as ROLE (default customer) through the API at
# API_URL (…/api/v1) and prints the access token.
register_token() {
  local api=$1 email=${2:-bench-$RANDOM$RANDOM@example.com} role=${3:-customer}
  curl -fs "$api/auth/register" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"$BENCH_PASSWORD\",\"name\":\"Bench\",\"role\":\"$role\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}

# nginx in front of 127.0.0.1:$2, listening on 127.0.0.1:$1, with an upstream keep-alive
# pool; further arguments are top-level directives such as "worker_processes auto;".
nginx_proxy_conf() {
  local listen=$1 upstream=$2
  shift 2
  printf '%s\n' "$@"
  cat <<CONF
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream service { server 127.0.0.1:$upstream; keepalive 256; }
  server {
    listen 127.0.0.1:$listen;
    location / {
      proxy_pass http://service;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
}

# oha, the open-loop load generator for the fixed-rate runs: from PATH, else from
# ~/.cache/commerce/tools, built there from crates.io the first time (about 10 min on 2
# cores; its TLS library needs cmake, and oha does not build without TLS). Sets OHA.
OHA_VERSION=1.16.0
need_oha() {
  local root=$HOME/.cache/commerce/tools
  OHA=$(command -v oha || true)
  [ -n "$OHA" ] || OHA=$root/bin/oha
  if [ ! -x "$OHA" ]; then
    require cmake
    echo "$(basename "$0" .sh): building oha $OHA_VERSION into $root (once)" >&2
    CARGO_TARGET_DIR=$root/target cargo install --quiet --locked oha --version "$OHA_VERSION" --root "$root"
    rm -rf "$root/target"
  fi
}

# One fixed-rate run: oha sends RATE requests/s in total over CONNECTIONS connections for
# SECONDS, on a schedule (open loop), and counts each request's latency from the moment
# the schedule meant to send it (--latency-correction), so a stall is not hidden by the
# requests it delayed; requests still out at the end are waited for (-w). Prints
# requests/s, p50 ms, p99 ms, and non-2xx answers plus failed requests.
#   fixed_rate RATE CONNECTIONS SECONDS URL [oha options…]
fixed_rate() {
  local rate=$1 connections=$2 seconds=$3 url=$4
  shift 4
  "$OHA" --no-tui --latency-correction -w -q "$rate" -c "$connections" -z "${seconds}s" \
    --output-format json "$@" "$url" | python3 "$(dirname "${BASH_SOURCE[0]}")/oha_summary.py"
}
