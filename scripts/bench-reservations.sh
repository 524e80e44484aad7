#!/usr/bin/env bash
# Reservations/s for single-product orders (one hot product vs 1,000 products), next to
# the floor measured in the same run: pgbench committing the smallest transaction of the
# same shape, one UPDATE of a stock row (the same hot row, or one of 1,000 at random),
# at the same concurrency levels.
#
#   scripts/bench-reservations.sh    # BENCH_CONCURRENCY=1,8,32 BENCH_SECONDS=10
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v pgbench >/dev/null || { echo "bench-reservations: pgbench is required (apt install postgresql-contrib)" >&2; exit 1; }

LEVELS=${BENCH_CONCURRENCY:-1,8,32}
SECS=${BENCH_SECONDS:-10}
DB=benchres_floor
PG="-h 127.0.0.1 -U postgres"
WORK=$(mktemp -d)
drop_db() { psql $PG -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap 'drop_db; rm -rf "$WORK"' EXIT
drop_db
psql $PG -d postgres -qc "CREATE DATABASE $DB" >/dev/null
psql $PG -d "$DB" -qc "CREATE TABLE stock (id int PRIMARY KEY, on_hand bigint NOT NULL, reserved bigint NOT NULL);
  INSERT INTO stock SELECT n, 1000000000, 0 FROM generate_series(1, 1000) AS n;" >/dev/null
echo 'UPDATE stock SET reserved = reserved + 1 WHERE id = 1;' >"$WORK/hot.sql"
printf '\\set id random(1, 1000)\nUPDATE stock SET reserved = reserved + 1 WHERE id = :id;\n' >"$WORK/spread.sql"

echo "| floor: pgbench, one UPDATE per transaction | concurrency | commits/s | p50 ms | p99 ms |"
echo "|---|---:|---:|---:|---:|"
for shape in hot spread; do
  for c in ${LEVELS//,/ }; do
    rm -f "$WORK"/log.*
    out=$(cd "$WORK" && pgbench $PG -n -M prepared -c "$c" -j "$c" -T "$SECS" -l --log-prefix=log -f "$WORK/$shape.sql" "$DB" 2>/dev/null)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    # Per-transaction log: the third field is the latency in microseconds.
    read -r p50 p99 < <(cat "$WORK"/log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%.2f %.2f\n", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}')
    label=$([ "$shape" = hot ] && echo "one hot row" || echo "spread over 1000 rows")
    printf "| %s | %s | %.0f | %s | %s |\n" "$label" "$c" "$tps" "$p50" "$p99"
  done
done
echo
BENCH_CONCURRENCY=$LEVELS BENCH_SECONDS=$SECS cargo bench -q -p inventory-svc --bench reservations
