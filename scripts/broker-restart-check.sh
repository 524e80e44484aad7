#!/usr/bin/env bash
# Restarts the real RabbitMQ in the middle of a one-hop benchmark run and checks that
# every event written before, during and after the outage reached the consumer: B's rows
# match the events A committed.
#
# DISRUPTIVE: it stops the broker that everything on this machine uses (tests, make up).
# Not part of `make test`. Needs rabbitmqctl and the right to run it (root here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo bench -p shared --bench one_hop --no-run
BENCH_FLOOR=0 BENCH_CONCURRENCY=4 BENCH_SECONDS=30 BENCH_WARMUP_SECONDS=1 \
  cargo bench -q -p shared --bench one_hop >"$log" 2>&1 &
bench=$!

sleep 10
echo "broker-restart-check: stopping RabbitMQ at $(date +%T)"
rabbitmqctl stop_app >/dev/null
sleep 3
rabbitmqctl start_app >/dev/null
echo "broker-restart-check: RabbitMQ back at $(date +%T)"

wait "$bench"
grep '^|' "$log"
if grep -Eq '^\| 4 \|.*\| yes \(' "$log"; then
  echo "broker-restart-check: every event written before, during and after the outage reached B (rows match events sent)"
else
  echo "broker-restart-check: FAILED" >&2
  cat "$log" >&2
  exit 1
fi
