#!/usr/bin/env bash
# Gateway overhead, measured in one run on this machine:
#   - GET /api/v1/users/me through the gateway (token verified, rate limit checked in
#     Redis, proxied to user-svc, which verifies the token again and reads the user);
#   - the same GET straight to user-svc;
#   - the same GET through nginx (proxy_pass with keep-alive) in front of user-svc;
#   - POST /api/v1/auth/login through the gateway (argon2id, OWASP parameters).
# Throughput: wrk, closed loop, the three targets interleaved for BENCH_ROUNDS rounds,
# medians reported. Latency at equal load: oha at one fixed rate for all three (60% of
# nginx's median throughput), open loop, latency counted from each request's scheduled
# start, interleaved the same way, medians reported. Release builds (the gateway's with
# whole-program optimisation, as shipped); rate limits raised so every request is
# counted (leased from Redis) but none is refused.
# Needs wrk, nginx and python3 (apt install wrk nginx-light); oha is built once if
# missing (apt install cmake for that).
#
#   scripts/bench-gateway.sh     # BENCH_SECONDS=15 BENCH_ROUNDS=3 BENCH_CONNECTIONS=32
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-32}
NS=benchgw
BENCH_DBS=user
source scripts/lib/bench.sh
require wrk nginx python3 psql curl cargo
need_oha

build_release user-svc
build_gateway
BIN="$TARGET/release"

USER_PORT=$(free_port); GATEWAY_PORT=$(free_port); NGINX_PORT=$(free_port)

export COMMERCE__USER__PORT=$USER_PORT COMMERCE__GATEWAY__PORT=$GATEWAY_PORT
"$BIN/user-svc" >"$WORK/user.log" 2>&1 & PIDS+=($!)
"$GATEWAY_BIN" >"$WORK/gateway.log" 2>&1 & PIDS+=($!)

nginx_proxy_conf "$NGINX_PORT" "$USER_PORT" "worker_processes auto;" >"$WORK/nginx.conf"
nginx -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!)

wait_for "http://127.0.0.1:$USER_PORT/ready"
wait_for "http://127.0.0.1:$GATEWAY_PORT/health"
wait_for "http://127.0.0.1:$NGINX_PORT/health"

EMAIL="bench-$RANDOM@example.com"
TOKEN=$(register_token "http://127.0.0.1:$GATEWAY_PORT/api/v1" "$EMAIL")

cat >"$WORK/login.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"email":"$EMAIL","password":"$BENCH_PASSWORD"}'
wrk.headers["Content-Type"] = "application/json"
EOF

# wrk's report as: requests/s, p50 ms, p99 ms, non-2xx responses, socket errors.
run() {
  local url=$1; shift
  wrk -t2 -c"$CONNECTIONS" -d3s "$@" "$url" >/dev/null   # warm-up
  wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" --latency "$@" "$url" | python3 scripts/lib/wrk_summary.py
}

AUTH=(-H "Authorization: Bearer $TOKEN")
GATEWAY_URL="http://127.0.0.1:$GATEWAY_PORT/api/v1/users/me"
DIRECT_URL="http://127.0.0.1:$USER_PORT/api/v1/users/me"
NGINX_URL="http://127.0.0.1:$NGINX_PORT/api/v1/users/me"
echo "bench-gateway: $CONNECTIONS connections, $ROUNDS rounds of ${SECONDS_PER_RUN} s, $(nproc) cores" >&2
: >"$WORK/max.txt"
for round in $(seq 1 "$ROUNDS"); do
  for target in gateway direct nginx; do
    url_var="${target^^}_URL"
    echo "$target $(run "${!url_var}" "${AUTH[@]}")" >>"$WORK/max.txt"
  done
  echo "bench-gateway: round $round done" >&2
done
read -r login_rps login_p50 login_p99 login_bad login_err < <(run "http://127.0.0.1:$GATEWAY_PORT/api/v1/auth/login" -s "$WORK/login.lua")

# Latency at one fixed rate for all three: 60% of nginx's median throughput.
RATE=$(python3 - "$WORK/max.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print(int(statistics.median(float(r[1]) for r in rows if r[0] == "nginx") * 0.6))
EOF
)
: >"$WORK/fixed.txt"
# Interleaved rounds as above: one run's tail is at the mercy of whatever else the
# machine did in those seconds.
for round in $(seq 1 "$ROUNDS"); do
  for target in gateway direct nginx; do
    url_var="${target^^}_URL"
    fixed_rate "$RATE" "$CONNECTIONS" 3 "${!url_var}" "${AUTH[@]}" >/dev/null
    echo "$target $(fixed_rate "$RATE" "$CONNECTIONS" "$SECONDS_PER_RUN" "${!url_var}" "${AUTH[@]}")" >>"$WORK/fixed.txt"
  done
  echo "bench-gateway: equal-load round $round done" >&2
done

python3 - "$WORK/max.txt" "$WORK/fixed.txt" "$CONNECTIONS" "$SECONDS_PER_RUN" "$ROUNDS" "$RATE" \
  "$login_rps" "$login_p50" "$login_p99" "$login_bad" <<'EOF'
import statistics, sys
max_file, fixed_file, conns, secs, rounds, rate = sys.argv[1:7]
login = sys.argv[7:11]
rows = [l.split() for l in open(max_file)]
fixed_rows = [l.split() for l in open(fixed_file)]
fixed = {}
for target in ("gateway", "direct", "nginx"):
    mine = [r for r in fixed_rows if r[0] == target]
    fixed[target] = [statistics.median(float(r[i]) for r in mine) for i in (1, 2, 3)]
    fixed[target].append(sum(int(r[4]) for r in mine))
    print(f"{target} at equal load, p99 of each round: " + ", ".join(r[3] for r in mine)
          + "; requests/s: " + ", ".join(r[1] for r in mine), file=sys.stderr)
names = {
    "gateway": "through the gateway (token, rate limit, proxy)",
    "direct": "straight to user-svc",
    "nginx": "through nginx 1.22 (proxy_pass, keep-alive)",
}
med = {}
for target in names:
    mine = [r for r in rows if r[0] == target]
    med[target] = [statistics.median(float(r[i]) for r in mine) for i in (1, 2, 3)]
    med[target].append(sum(int(r[4]) for r in mine))
total_rate = int(rate)
print(f"| GET /api/v1/users/me | max requests/s (median of {rounds}) | p50 ms | p99 ms | at {total_rate} requests/s (median of {rounds}): p50 ms | p99 ms | non-2xx |")
print("|---|---:|---:|---:|---:|---:|---:|")
for target, label in names.items():
    rps, p50, p99, bad = med[target]
    f_rps, f50, f99, fbad = fixed[target]
    print(f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {f50:.2f} | {f99:.2f} | {bad + fbad} |")
print()
print(f"| POST /api/v1/auth/login through the gateway (argon2id m=19 MiB, t=2, p=1), {conns} connections | {float(login[0]):.0f} requests/s | p50 {login[1]} ms | p99 {login[2]} ms | non-2xx {login[3]} |")
print("|---|---:|---:|---:|---:|")
print()
ratio = med["gateway"][0] / med["nginx"][0] * 100
if any(m[3] for m in med.values()) or any(f[3] for f in fixed.values()):
    print("bench-gateway: WARNING: some answers were not 2xx; those runs did not measure the GET", file=sys.stderr)
print(f"gateway max throughput = {ratio:.0f}% of nginx's; p99 at equal load: gateway {float(fixed['gateway'][2]):.2f} ms, nginx {float(fixed['nginx'][2]):.2f} ms")
EOF
