#!/usr/bin/env bash
# The figures of issue 5 in one run on one machine: the whole system (release build,
# `commerce up`, rate limits off: the generator is one client) on fresh databases, then
#   1. the highest rate: a closed loop of BENCH_CONCURRENCY (16) sagas for 20 s;
#   2. an open loop at 100% of that rate, 30 s, with commits per order measured and
#      pgbench's floor after it, both workloads (single-row insert, TPC-B-like), at as
#      many clients as the closed loop had sagas;
#   3. open loops at 50% and 25%, 30 s each.
# Every run checks the saga's invariants; a broken one fails the script.
#
#   scripts/bench-saga.sh
#
# The namespace is `benchsaga` (its databases, queues, exchanges and Redis keys are removed
# on exit); the system's default ports must be free (stop `make up` first). Needs
# pgbench, curl and python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONCURRENCY=${BENCH_CONCURRENCY:-16}
export COMMERCE__NAMESPACE=benchsaga COMMERCE__GATEWAY__RATE_LIMIT__ENABLED=false
for tool in pgbench curl python3 cargo; do
  command -v "$tool" >/dev/null || { echo "bench-saga: $tool is required" >&2; exit 1; }
done

cargo build --release -q --bins
BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release

UP=
finish() {
  if [ -n "$UP" ]; then
    kill -TERM "$UP" 2>/dev/null || true
    wait "$UP" 2>/dev/null || true
  fi
  "$BIN/drop-namespace" || true
}
trap finish EXIT

# testkit's drop-namespace removes the namespace's databases, queues, exchanges and Redis
# keys: a fresh start here, a clean machine at exit.
"$BIN/drop-namespace"
"$BIN/commerce" up --bin-dir "$BIN" >/tmp/bench-saga-up.log 2>&1 &
UP=$!
for _ in $(seq 120); do curl -fs localhost:8080/ready >/dev/null 2>&1 && break; sleep 1; done
curl -fs localhost:8080/ready >/dev/null || { echo "bench-saga: the system did not get ready (/tmp/bench-saga-up.log)" >&2; exit 1; }

bench() { "$BIN/commerce" bench "$@"; }

echo "== highest rate: closed loop, $CONCURRENCY sagas in flight, 20 s"
bench --concurrency "$CONCURRENCY" --duration 20s --no-commits | tee /tmp/bench-saga-closed.txt
RATE=$(sed -nE 's/^ *rate +([0-9.]+) orders\/s sustained.*/\1/p' /tmp/bench-saga-closed.txt | python3 -c 'import sys; print(round(float(sys.stdin.read())))')

echo "== 100%: open loop at $RATE orders/s, 30 s, then the floor"
bench --rate "$RATE" --duration 30s --floor --floor-clients "$CONCURRENCY" --floor-workload insert,tpcb-like
for share in 50 25; do
  rate=$(python3 -c "print(round($RATE * $share / 100, 1))")
  echo "== $share%: open loop at $rate orders/s, 30 s"
  bench --rate "$rate" --duration 30s --no-commits
done
