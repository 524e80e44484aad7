#!/usr/bin/env bash
# Two builds of the system, compared on one machine: each round starts each build with
# `commerce up` on freshly created databases and runs the same load, in the order A, B,
# A, B, … so that drift of the machine touches both alike.
#
#   [BENCH_SAGA_LOAD='--rate 25 --duration 30s'] scripts/bench-saga-compare.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS]
#
# A bin dir holds a release build's binaries (commerce, every service and testkit's
# drop-namespace), e.g. copied from target/release. The namespace is `benchcmp`, removed
# before each run and at exit; the system's default ports must be free (stop `make up`
# first).
# Needs curl; the bench itself is the NEW build's `commerce bench`.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd); ROUNDS=${3:-2}
# The load of each run, by default the closed loop that finds the highest rate. A fixed
# rate compares the CPU each build spends per order, which varies less between runs.
read -r -a LOAD <<<"${BENCH_SAGA_LOAD:---concurrency 16 --duration 20s}"
export COMMERCE__NAMESPACE=benchcmp COMMERCE__GATEWAY__RATE_LIMIT__ENABLED=false
for tool in curl pgrep; do
  command -v "$tool" >/dev/null || { echo "bench-saga-compare: $tool is required" >&2; exit 1; }
done
[ -x "$B/drop-namespace" ] || { echo "bench-saga-compare: $B has no drop-namespace (build it with --bins)" >&2; exit 1; }
if curl -fs localhost:8080/ready >/dev/null 2>&1; then
  echo "bench-saga-compare: something already answers on :8080 (a make up?); stop it first" >&2; exit 1
fi

stop() { pkill -TERM -f "^$1/" || true; for _ in $(seq 60); do pgrep -f "^$1/" >/dev/null || return 0; sleep 1; done; }
# testkit's drop-namespace removes the namespace's databases, queues, exchanges and Redis
# keys, so each run starts from nothing.
drop_namespace() { "$B/drop-namespace"; }
trap 'stop "$A"; stop "$B"; drop_namespace' EXIT

for round in $(seq 1 "$ROUNDS"); do
  for bin in "$A" "$B"; do
    drop_namespace
    "$bin/commerce" up --bin-dir "$bin" >"/tmp/bench-saga-compare-up.log" 2>&1 &
    for _ in $(seq 120); do curl -fs localhost:8080/ready >/dev/null 2>&1 && break; sleep 1; done
    curl -fs localhost:8080/ready >/dev/null || { echo "bench-saga-compare: $bin did not get ready (/tmp/bench-saga-compare-up.log)" >&2; exit 1; }
    echo "== round $round: $bin"
    "$B/commerce" bench "${LOAD[@]}" --no-commits 2>&1 |
      grep -E "machine|rate|202 → paid|invariants|violation"
    stop "$bin"
  done
done
