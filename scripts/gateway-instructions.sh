#!/usr/bin/env bash
# Instructions the gateway executes per proxied request, counted by callgrind: unlike
# requests/s, the count does not move with whatever else the machine is doing, so two
# builds compare on a noisy machine. GET /api/v1/users/me with a bearer token, one event
# loop, 500 requests of warm-up, then REQUESTS counted. When nginx is installed, the same
# count for nginx (one worker, proxy_pass with keep-alive) in front of the same user-svc.
#
#   scripts/gateway-instructions.sh [GATEWAY_BIN]     # REQUESTS=5000; needs valgrind, hey
#
# KEEP_CALLGRIND=DIR keeps the callgrind output there, for a per-function breakdown.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REQUESTS=${REQUESTS:-5000}
NS=gwinstr
BENCH_DBS=user
source scripts/lib/bench.sh
require valgrind callgrind_control callgrind_annotate hey python3 psql curl

build_release user-svc
if [ $# -ge 1 ]; then GATEWAY_BIN=$1; else build_gateway; fi

USER_PORT=$(free_port); GATEWAY_PORT=$(free_port)

export COMMERCE__GATEWAY__EVENT_LOOPS=1
export COMMERCE__USER__PORT=$USER_PORT COMMERCE__GATEWAY__PORT=$GATEWAY_PORT
"$TARGET/release/user-svc" >"$WORK/user.log" 2>&1 & PIDS+=($!)
valgrind --tool=callgrind --callgrind-out-file="$WORK/gateway.callgrind" --dump-instr=no \
  "$GATEWAY_BIN" >"$WORK/gateway.log" 2>&1 & PIDS+=($!)
GATEWAY_PID=$!

# Under callgrind the gateway starts slowly.
wait_for "http://127.0.0.1:$USER_PORT/ready" 600
wait_for "http://127.0.0.1:$GATEWAY_PORT/health" 600
TOKEN=$(register_token "http://127.0.0.1:$GATEWAY_PORT/api/v1")

# Instructions per request of process PID (under callgrind, writing OUT.<n>) serving URL.
count() {
  local url=$1 pid=$2 out=$3 ok total
  hey -n 500 -c 4 -H "Authorization: Bearer $TOKEN" "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  hey -n "$REQUESTS" -c 8 -H "Authorization: Bearer $TOKEN" "$url" >"$out.hey"
  callgrind_control -d "$pid" >/dev/null 2>&1
  if [ -n "${KEEP_CALLGRIND:-}" ]; then mkdir -p "$KEEP_CALLGRIND" && cp "$out".[0-9]* "$KEEP_CALLGRIND/"; fi
  ok=$(awk '/\[200\]/ {n += $2} END {print n + 0}' "$out.hey")
  [ "$ok" = "$REQUESTS" ] || { echo "gateway-instructions: $ok of $REQUESTS requests to $url got 200:" >&2; cat "$out.hey" >&2; exit 1; }
  total=$(callgrind_annotate "$out".[0-9]* 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "$total instructions for $REQUESTS requests, $((total / REQUESTS)) per request"
}

echo "gateway ($GATEWAY_BIN): $(count "http://127.0.0.1:$GATEWAY_PORT/api/v1/users/me" "$GATEWAY_PID" "$WORK/gateway.callgrind")"

command -v nginx >/dev/null || exit 0
NGINX_PORT=$(free_port)
nginx_proxy_conf "$NGINX_PORT" "$USER_PORT" "daemon off;" "master_process off;" "worker_processes 1;" >"$WORK/nginx.conf"
valgrind --tool=callgrind --callgrind-out-file="$WORK/nginx.callgrind" --dump-instr=no \
  nginx -p "$WORK" -c "$WORK/nginx.conf" >"$WORK/nginx.log" 2>&1 & PIDS+=($!)
NGINX_PID=$!
wait_for "http://127.0.0.1:$NGINX_PORT/health" 600
echo "$(nginx -v 2>&1 | sed 's|.*: ||'): $(count "http://127.0.0.1:$NGINX_PORT/api/v1/users/me" "$NGINX_PID" "$WORK/nginx.callgrind")"
