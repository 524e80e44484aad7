#!/usr/bin/env bash
# The catalog's read path with and without its Redis cache, measured in one run:
#   - GET /api/v1/products/{id} through the gateway to a product-svc whose cache is on
#     (and warm), and through a second gateway to a product-svc with
#     COMMERCE__CACHE__ENABLED=false (PostgreSQL on every read);
#   - the same two straight to each product-svc, to show the gateway's share.
# Both product-svc instances share one database of 10,000 products; wrk asks for 1,000
# of them at random. Throughput: wrk, closed loop, the four targets interleaved for
# BENCH_ROUNDS rounds, medians reported. Latency at equal load: oha at one fixed total
# rate for both gateway targets (60% of the cache-off median throughput), one product,
# open loop with latency counted from the schedule (scripts/lib/bench.sh, fixed_rate).
# Release builds; rate limits raised so every request is counted but none refused.
# Needs wrk, python3, psql and curl (apt install wrk postgresql-client); builds oha once
# (needs cmake).
#
#   scripts/bench-catalog.sh     # BENCH_SECONDS=15 BENCH_ROUNDS=3 BENCH_CONNECTIONS=32
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-32}
PRODUCTS=10000
HOT=1000
NS=benchcat
BENCH_DBS="user product"
source scripts/lib/bench.sh
require wrk python3 psql curl
need_oha

build_release user-svc product-svc gateway
BIN="$TARGET/release"

USER_PORT=$(free_port); CACHED_PORT=$(free_port); UNCACHED_PORT=$(free_port)
GW_CACHED_PORT=$(free_port); GW_UNCACHED_PORT=$(free_port)

export COMMERCE__USER__PORT=$USER_PORT

"$BIN/user-svc" >"$WORK/user.log" 2>&1 & PIDS+=($!)
wait_for "http://127.0.0.1:$USER_PORT/ready"
COMMERCE__PRODUCT__PORT=$CACHED_PORT "$BIN/product-svc" >"$WORK/product-cached.log" 2>&1 & PIDS+=($!)
wait_for "http://127.0.0.1:$CACHED_PORT/ready"
COMMERCE__PRODUCT__PORT=$UNCACHED_PORT COMMERCE__CACHE__ENABLED=false \
  "$BIN/product-svc" >"$WORK/product-uncached.log" 2>&1 & PIDS+=($!)
wait_for "http://127.0.0.1:$UNCACHED_PORT/ready"
COMMERCE__GATEWAY__PORT=$GW_CACHED_PORT COMMERCE__PRODUCT__URL="http://127.0.0.1:$CACHED_PORT" \
  "$BIN/gateway" >"$WORK/gateway-cached.log" 2>&1 & PIDS+=($!)
COMMERCE__GATEWAY__PORT=$GW_UNCACHED_PORT COMMERCE__PRODUCT__URL="http://127.0.0.1:$UNCACHED_PORT" \
  "$BIN/gateway" >"$WORK/gateway-uncached.log" 2>&1 & PIDS+=($!)
wait_for "http://127.0.0.1:$GW_CACHED_PORT/health"
wait_for "http://127.0.0.1:$GW_UNCACHED_PORT/health"

# One product through the API (so the whole path works), the rest straight into the table.
GW="http://127.0.0.1:$GW_CACHED_PORT/api/v1"
TOKEN=$(register_token "$GW" "" seller)
FIRST=$(curl -fs "$GW/products" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"name":"Cast-iron teapot","description":"Holds 1.2 litres. Enamelled inside.","price_cents":4599,"currency":"EUR","initial_stock":10}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
psql_ns -d "${NS}_product" -c "
  INSERT INTO products (id, seller_id, name, description, price_cents, currency, initial_stock)
  SELECT gen_random_uuid(), gen_random_uuid(), 'Product ' || n,
         'A description of product ' || n || ', long enough to look like one. ' || repeat('Lorem ipsum dolor sit amet. ', 8),
         100 + n, 'EUR', 5
  FROM generate_series(2, $PRODUCTS) AS n" >/dev/null
psql_ns -d "${NS}_product" -c "ANALYZE products" >/dev/null
{
  echo "local ids = {"
  psql_ns -d "${NS}_product" -c "SELECT '\"' || id || '\",' FROM products ORDER BY random() LIMIT $HOT"
  echo "}"
  cat <<'EOF'
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/api/v1/products/" .. ids[math.random(#ids)])
end
EOF
} >"$WORK/ids.lua"

# wrk's report as: requests/s, p50 ms, p99 ms, non-2xx responses, socket errors.
run() {
  local url=$1
  wrk -t2 -c"$CONNECTIONS" -d3s -s "$WORK/ids.lua" "$url" >/dev/null   # warm-up (fills the cache)
  wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" --latency -s "$WORK/ids.lua" "$url" | python3 scripts/lib/wrk_summary.py
}

CACHED_URL="http://127.0.0.1:$GW_CACHED_PORT"
UNCACHED_URL="http://127.0.0.1:$GW_UNCACHED_PORT"
DIRECT_CACHED_URL="http://127.0.0.1:$CACHED_PORT"
DIRECT_UNCACHED_URL="http://127.0.0.1:$UNCACHED_PORT"
echo "bench-catalog: $CONNECTIONS connections, $ROUNDS rounds of ${SECONDS_PER_RUN} s, $HOT of $PRODUCTS products, $(nproc) cores" >&2
: >"$WORK/max.txt"
for round in $(seq 1 "$ROUNDS"); do
  for target in cached uncached direct_cached direct_uncached; do
    url_var="${target^^}_URL"
    echo "$target $(run "${!url_var}")" >>"$WORK/max.txt"
  done
  echo "bench-catalog: round $round done" >&2
done

# Latency at one fixed rate through both gateways: 60% of the cache-off median.
RATE=$(python3 - "$WORK/max.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
uncached = statistics.median(float(r[1]) for r in rows if r[0] == "uncached")
print(max(1, int(uncached * 0.6)))
EOF
)
: >"$WORK/fixed.txt"
for target in cached uncached; do
  url_var="${target^^}_URL"
  url="${!url_var}/api/v1/products/$FIRST"
  fixed_rate "$RATE" "$CONNECTIONS" 3 "$url" >/dev/null
  echo "$target $(fixed_rate "$RATE" "$CONNECTIONS" "$SECONDS_PER_RUN" "$url")" >>"$WORK/fixed.txt"
done
echo "equal load, requests/s done (asked $RATE): $(awk '{printf "%s %s  ", $1, $2}' "$WORK/fixed.txt")" >&2

counter() {
  curl -fs "$DIRECT_CACHED_URL/metrics" | python3 -c '
import sys
name = sys.argv[1]
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in sys.stdin
              if l.startswith(name + "{") and "cache=\"product\"" in l)))' "$1"
}
HITS=$(counter cache_hits_total); MISSES=$(counter cache_misses_total)
peak_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
echo "peak RSS: product-svc cache on $(peak_mib "${PIDS[1]}") MiB, cache off $(peak_mib "${PIDS[2]}") MiB, gateway $(peak_mib "${PIDS[3]}") MiB" >&2

python3 - "$WORK/max.txt" "$WORK/fixed.txt" "$CONNECTIONS" "$ROUNDS" "$RATE" "$HITS" "$MISSES" <<'EOF'
import statistics, sys
max_file, fixed_file, conns, rounds, rate, hits, misses = sys.argv[1:8]
rows = [l.split() for l in open(max_file)]
fixed = {r[0]: r[1:] for r in (l.split() for l in open(fixed_file))}
names = {
    "cached": "through the gateway, cache on (warm)",
    "uncached": "through the gateway, cache off (PostgreSQL every read)",
    "direct_cached": "straight to product-svc, cache on (warm)",
    "direct_uncached": "straight to product-svc, cache off",
}
med = {}
for target in names:
    mine = [r for r in rows if r[0] == target]
    med[target] = [statistics.median(float(r[i]) for r in mine) for i in (1, 2, 3)]
    med[target].append(sum(int(r[4]) for r in mine))
total_rate = int(rate)
print(f"| GET /api/v1/products/{{id}}, {conns} connections | max requests/s (median of {rounds}) | p50 ms | p99 ms | at {total_rate} requests/s: p50 ms | p99 ms | non-2xx |")
print("|---|---:|---:|---:|---:|---:|---:|")
for target, label in names.items():
    rps, p50, p99, bad = med[target]
    if target in fixed:
        _, f50, f99, fbad = fixed[target]
        print(f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {float(f50):.2f} | {float(f99):.2f} | {bad + int(fbad)} |")
    else:
        print(f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} | | | {bad} |")
print()
hits, misses = int(hits), int(misses)
ratio = med["cached"][0] / med["uncached"][0]
print(f"through the gateway, cache on / cache off: {ratio:.2f}x the throughput; "
      f"product cache hit ratio over the run: {hits / max(1, hits + misses):.4f} ({hits} hits, {misses} misses)")
EOF
