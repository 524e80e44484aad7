# Sourced by the benchmark scripts after they set NS (the namespace) and BENCH_DBS (the
# services whose databases they create, e.g. "user product"): a scratch directory WORK,
# a list PIDS of the processes they start, and all of it (databases included) removed on
# exit. The namespace's queues stay (same names next run); its Redis keys expire by TTL.

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
  drop_dbs
  rm -rf "$WORK"
}

WORK=$(mktemp -d)
PIDS=()
trap cleanup EXIT
drop_dbs
