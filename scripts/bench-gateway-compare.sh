#!/usr/bin/env bash
# Two gateway builds and nginx in front of one user-svc, compared in one run: for each
# round, in the order old, new, nginx, wrk's maximum throughput, then oha at one fixed
# rate for all three with the CPU time the proxy spent per request at that rate (from
# /proc/<pid>/stat, user and system apart), and user-svc's behind it. CPU per request
# moves much less with the machine's noise than requests/s or p99, so it shows changes
# of a few percent.
#
#   scripts/bench-gateway-compare.sh OLD_GATEWAY NEW_GATEWAY [ROUNDS]
#
# BENCH_SECONDS=10 per run, BENCH_RATE=6400 requests/s for the fixed-rate runs (open
# loop, 32 connections). Release builds; user-svc is this tree's. Needs wrk, nginx,
# python3; oha is built once if missing (needs cmake).
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,12p "$0"; exit 2; }
OLD=$(realpath "$1"); NEW=$(realpath "$2"); ROUNDS=${3:-3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
RATE=${BENCH_RATE:-6400}
NS=benchgwcmp
BENCH_DBS=user
source scripts/lib/bench.sh
require wrk nginx python3 psql curl cargo
need_oha

build_release user-svc

USER_PORT=$(free_port); OLD_PORT=$(free_port); NEW_PORT=$(free_port); NGINX_PORT=$(free_port)

export COMMERCE__USER__PORT=$USER_PORT
"$TARGET/release/user-svc" >"$WORK/user.log" 2>&1 & PIDS+=($!)
USER_PID=$!
COMMERCE__GATEWAY__PORT=$OLD_PORT "$OLD" >"$WORK/old.log" 2>&1 & PIDS+=($!)
OLD_PID=$!
COMMERCE__GATEWAY__PORT=$NEW_PORT "$NEW" >"$WORK/new.log" 2>&1 & PIDS+=($!)
NEW_PID=$!
nginx_proxy_conf "$NGINX_PORT" "$USER_PORT" "worker_processes auto;" >"$WORK/nginx.conf"
nginx -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!)
NGINX_PID=$!

wait_for "http://127.0.0.1:$USER_PORT/ready"
for port in "$OLD_PORT" "$NEW_PORT" "$NGINX_PORT"; do wait_for "http://127.0.0.1:$port/health"; done
TOKEN=$(register_token "http://127.0.0.1:$NEW_PORT/api/v1")
AUTH=(-H "Authorization: Bearer $TOKEN")

# User and system clock ticks of a process and its children (nginx's workers).
ticks() {
  local user=0 system=0 pid u s
  for pid in "$1" $(pgrep -P "$1" || true); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat")
    user=$((user + u)); system=$((system + s))
  done
  echo "$user $system"
}

echo "| round | proxy | max requests/s | p99 ms | at $RATE requests/s: p50 ms | p99 ms | proxy CPU µs per request: user | system | total | user-svc CPU µs per request | non-2xx |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
  for proxy in old new nginx; do
    case $proxy in
      old) port=$OLD_PORT pid=$OLD_PID ;;
      new) port=$NEW_PORT pid=$NEW_PID ;;
      nginx) port=$NGINX_PORT pid=$NGINX_PID ;;
    esac
    url="http://127.0.0.1:$port/api/v1/users/me"
    read -r max _ max99 bad _ < <(wrk -t2 -c32 -d"${SECONDS_PER_RUN}s" --latency "${AUTH[@]}" "$url" | python3 scripts/lib/wrk_summary.py)
    fixed_rate "$RATE" 32 2 "$url" "${AUTH[@]}" >/dev/null
    before=$(ticks "$pid"); user_before=$(ticks "$USER_PID")
    read -r done_rps p50 p99 fixed_bad < <(fixed_rate "$RATE" 32 "$SECONDS_PER_RUN" "$url" "${AUTH[@]}")
    after=$(ticks "$pid"); user_after=$(ticks "$USER_PID")
    python3 - "$round" "$proxy" "$max" "$max99" "$p50" "$p99" "$before" "$after" "$done_rps" "$SECONDS_PER_RUN" "$((bad + fixed_bad))" "$(getconf CLK_TCK)" "$user_before" "$user_after" <<'EOF'
import sys
rnd, proxy, rps, max99, p50, p99, before, after, done, secs, bad, hz, svc_before, svc_after = sys.argv[1:]
requests = float(done) * float(secs)
def per_request(a, b):
    return [(y - x) / int(hz) / requests * 1e6 for x, y in zip(map(int, a.split()), map(int, b.split()))]
user, system = per_request(before, after)
service = sum(per_request(svc_before, svc_after))
print(f"| {rnd} | {proxy} | {float(rps):.0f} | {float(max99):.2f} | {float(p50):.2f} | {float(p99):.2f} | {user:.1f} | {system:.1f} | {user + system:.1f} | {service:.1f} | {bad} |")
EOF
  done
done
