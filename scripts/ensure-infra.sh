#!/usr/bin/env bash
# Make sure PostgreSQL, RabbitMQ and Redis answer on the addresses the Commerce
# services are configured with, or say exactly what to run.
#
# Addresses come from the same env vars the services read:
#   COMMERCE__POSTGRES__URL  (default postgres://postgres@127.0.0.1:5432)
#   COMMERCE__AMQP__URL      (default amqp://guest:guest@127.0.0.1:5672/%2f)
#   COMMERCE__REDIS__URL     (default redis://127.0.0.1:6379)
#
# For every service that does not answer on a local host (127.0.0.1, localhost,
# ::1), in this order:
#   1. installed but stopped      -> start it
#   2. not installed, root/sudo   -> apt-get install it, then start it
#   3. a Docker engine runs       -> docker compose -f compose/infra.yml up -d ...
#   4. otherwise                  -> print the commands to run and exit 1
# Remote hosts are only reported on. Idempotent: when everything answers it
# prints one "ok" line per service.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_FILE="$ROOT/compose/infra.yml"
SERVICES=(postgres rabbitmq redis)

PG_URL="${COMMERCE__POSTGRES__URL:-postgres://postgres@127.0.0.1:5432}"
AMQP_URL="${COMMERCE__AMQP__URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
REDIS_URL="${COMMERCE__REDIS__URL:-redis://127.0.0.1:6379}"

# Seconds to wait for a port to answer after starting something.
declare -A WAIT_SECS=([postgres]=20 [rabbitmq]=60 [redis]=20)
declare -A HOST=() PORT=()
declare -A LOGHINT=()     # where to look when a start does not come up
declare -A MANUAL=()     # per service: commands a human should run
declare -A INSTALLED_BY_US=()
DOCKER_NEEDED=()          # services to bring up with docker compose
FAILED=0
APT_UPDATED=0

say() { printf 'ensure-infra: %s\n' "$*"; }
warn() { printf 'ensure-infra: %s\n' "$*" >&2; }

# --- URL parsing -------------------------------------------------------------

# parse_url SVC URL DEFAULT_PORT -> sets HOST[SVC] and PORT[SVC]
# scheme://[user[:pass]@]host[:port][/path][?query]; host may be [v6].
parse_url() {
  local svc=$1 url=$2 default_port=$3 rest host port
  rest=${url#*://}
  rest=${rest%%\?*}
  rest=${rest%%/*}
  rest=${rest##*@}
  if [[ $rest == \[* ]]; then
    host=${rest#\[}
    host=${host%%\]*}
    port=${rest#*\]}
    port=${port#:}
  elif [[ $rest == *:* ]]; then
    host=${rest%%:*}
    port=${rest#*:}
  else
    host=$rest
    port=""
  fi
  [[ -n $host ]] || host=127.0.0.1
  [[ -n $port ]] || port=$default_port
  if ! [[ $port =~ ^[0-9]+$ ]]; then
    warn "$svc: cannot parse a port out of the configured URL (got '$port')"
    exit 2
  fi
  HOST[$svc]=$host
  PORT[$svc]=$port
}

# The URL with any path replaced by /postgres (query string kept).
pg_admin_url() {
  local url=$1 scheme rest query=""
  scheme=${url%%://*}
  rest=${url#*://}
  if [[ $rest == *\?* ]]; then
    query="?${rest#*\?}"
    rest=${rest%%\?*}
  fi
  printf '%s://%s/postgres%s\n' "$scheme" "${rest%%/*}" "$query"
}

is_local() {
  case $1 in
    127.0.0.1 | localhost | ::1) return 0 ;;
    *) return 1 ;;
  esac
}

addr() {
  if [[ ${HOST[$1]} == *:* ]]; then
    printf '[%s]:%s' "${HOST[$1]}" "${PORT[$1]}"
  else
    printf '%s:%s' "${HOST[$1]}" "${PORT[$1]}"
  fi
}

# --- probes ------------------------------------------------------------------

answers() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "${HOST[$1]}" "${PORT[$1]}" 2>/dev/null
}

wait_for() {
  local svc=$1 secs=${2:-${WAIT_SECS[$1]}} deadline
  deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    if answers "$svc"; then
      return 0
    fi
    sleep 0.5
  done
  answers "$svc"
}

# Runs psql against the admin database. Returns 0 when fine (or psql missing),
# 1 after printing what to do.
check_pg_login() {
  command -v psql >/dev/null 2>&1 || return 0
  local url out tries=0
  url=$(pg_admin_url "$PG_URL")
  while :; do
    if out=$(PGCONNECT_TIMEOUT=5 psql -X -w -q -A -t -v ON_ERROR_STOP=1 "$url" -c 'select 1' 2>&1); then
      return 0
    fi
    # Freshly started servers refuse connections for a moment.
    if [[ $out == *"starting up"* || $out == *"Connection refused"* ]] && ((tries < 20)); then
      tries=$((tries + 1))
      sleep 0.5
      continue
    fi
    break
  done
  local first=${out%%$'\n'*}
  if [[ $out == *"password authentication failed"* || $out == *"no password supplied"* ||
    $out == *"no pg_hba.conf entry"* || $out == *"authentication failed"* ]]; then
    local user v
    user=$(pg_url_user)
    warn "postgres $(addr postgres) answers, but logging in as '$user' failed: $first"
    if is_local "${HOST[postgres]}"; then
      v=$(pg_version 2>/dev/null || echo '<version>')
      warn "  fix it one of two ways (dev machine only):"
      warn "  a) trust loopback logins for '$user': add these two lines at the TOP of"
      warn "     /etc/postgresql/$v/main/pg_hba.conf, then reload:"
      warn "       host all $user 127.0.0.1/32 trust"
      warn "       host all $user ::1/128 trust"
      warn "     ${SUDO_HINT}pg_ctlcluster --skip-systemctl-redirect $v main reload"
      warn "  b) or give '$user' a password and put it in the URL:"
      local as_pg="sudo -u postgres"
      [[ $PRIV != root ]] || as_pg="runuser -u postgres --"
      warn "       $as_pg psql -p ${PORT[postgres]} -c \"ALTER USER \\\"$user\\\" PASSWORD 'postgres'\""
      warn "       export COMMERCE__POSTGRES__URL=postgres://$user:postgres@$(addr postgres)"
    else
      warn "  put the right password in COMMERCE__POSTGRES__URL (postgres://$user:PASSWORD@$(addr postgres))"
    fi
  else
    warn "postgres $(addr postgres) answers, but 'psql <url>/postgres -c \"select 1\"' failed: $first"
  fi
  return 1
}

# User name in COMMERCE__POSTGRES__URL (libpq falls back to the OS user).
pg_url_user() {
  local rest=${PG_URL#*://} user=""
  rest=${rest%%\?*}
  rest=${rest%%/*}
  if [[ $rest == *@* ]]; then
    user=${rest%@*}
    user=${user%%:*}
  fi
  [[ -n $user ]] || user=${PGUSER:-$(id -un)}
  printf '%s\n' "$user"
}

# --- privilege ---------------------------------------------------------------

# shellcheck source=lib/privilege.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/privilege.sh"

# Locate a binary even when sbin is not on PATH (non-root users on Debian).
find_bin() {
  local b=$1 d
  if command -v "$b" >/dev/null 2>&1; then
    command -v "$b"
    return 0
  fi
  for d in /usr/sbin /sbin /usr/local/sbin; do
    if [[ -x $d/$b ]]; then
      printf '%s\n' "$d/$b"
      return 0
    fi
  done
  return 1
}

# --- per-service knowledge ---------------------------------------------------

apt_pkg() {
  case $1 in
    postgres) echo postgresql ;;
    rabbitmq) echo rabbitmq-server ;;
    redis) echo redis-server ;;
  esac
}

# Highest PostgreSQL server version installed as Debian packages, preferring one
# that already has a "main" cluster under /etc/postgresql.
pg_version() {
  local v with_cluster="" any=""
  command -v pg_ctlcluster >/dev/null 2>&1 || return 1
  for v in $(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V); do
    [[ -x /usr/lib/postgresql/$v/bin/postgres ]] || continue
    any=$v
    [[ -f /etc/postgresql/$v/main/postgresql.conf ]] && with_cluster=$v
  done
  [[ -n $with_cluster ]] && { echo "$with_cluster"; return 0; }
  [[ -n $any ]] && { echo "$any"; return 0; }
  return 1
}

pg_cluster_port() {
  sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' \
    "/etc/postgresql/$1/main/postgresql.conf" 2>/dev/null | tail -n1
}

installed() {
  case $1 in
    postgres) pg_version >/dev/null ;;
    rabbitmq) find_bin rabbitmq-server >/dev/null ;;
    redis) command -v redis-server >/dev/null 2>&1 ;;
  esac
}

redis_log() { echo "${TMPDIR:-/tmp}/commerce-redis-${PORT[redis]}.log"; }

redis_bind() {
  case ${HOST[redis]} in
    ::1) echo ::1 ;;
    *) echo 127.0.0.1 ;;
  esac
}

# Human-readable start command(s) for an installed service.
start_cmd_text() {
  local v
  case $1 in
    postgres)
      v=$(pg_version || echo '<version>')
      if [[ ! -f /etc/postgresql/$v/main/postgresql.conf ]]; then
        echo "${SUDO_HINT}pg_createcluster --port ${PORT[postgres]} $v main"
      fi
      echo "${SUDO_HINT}pg_ctlcluster --skip-systemctl-redirect $v main start"
      ;;
    rabbitmq)
      if [[ ${PORT[rabbitmq]} != 5672 ]]; then
        echo "${SUDO_HINT}env RABBITMQ_NODE_PORT=${PORT[rabbitmq]} rabbitmq-server -detached"
      else
        echo "${SUDO_HINT}rabbitmq-server -detached"
      fi
      ;;
    redis)
      echo "redis-server --daemonize yes --bind $(redis_bind) --port ${PORT[redis]} --save \"\" --appendonly no --logfile $(redis_log)"
      ;;
  esac
}

# Start an installed service. 0 = start command issued (caller waits),
# 1 = failed (message printed), 99 = not privileged (MANUAL filled in).
start_service() {
  local svc=$1 v cport out
  case $svc in
    postgres)
      v=$(pg_version)
      LOGHINT[postgres]="/var/log/postgresql/postgresql-$v-main.log"
      if [[ $PRIV == none ]]; then
        MANUAL[postgres]=$(start_cmd_text postgres)
        return 99
      fi
      if [[ ! -f /etc/postgresql/$v/main/postgresql.conf ]]; then
        say "postgres: creating cluster $v/main on port ${PORT[postgres]}"
        if ! out=$(as_root pg_createcluster --port "${PORT[postgres]}" "$v" main 2>&1); then
          warn "postgres: pg_createcluster failed: $out"
          return 1
        fi
      fi
      cport=$(pg_cluster_port "$v")
      if [[ -n $cport && $cport != "${PORT[postgres]}" ]]; then
        warn "postgres: cluster $v/main is configured for port $cport, but COMMERCE__POSTGRES__URL says ${PORT[postgres]}."
        warn "  either point the URL at port $cport, or change 'port' in /etc/postgresql/$v/main/postgresql.conf"
        return 1
      fi
      if [[ ${INSTALLED_BY_US[postgres]:-0} == 1 ]]; then
        pg_trust_local "$v"
      fi
      say "postgres: starting cluster $v/main"
      if ! out=$(as_root pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>&1); then
        # "already running" is fine: wait_for decides.
        [[ $out == *"already running"* ]] || { warn "postgres: pg_ctlcluster failed: $out"; return 1; }
      fi
      ;;
    rabbitmq)
      LOGHINT[rabbitmq]="/var/log/rabbitmq/ (rabbit@*.log, startup_log, startup_err)"
      if [[ $PRIV == none ]]; then
        MANUAL[rabbitmq]=$(start_cmd_text rabbitmq)
        return 99
      fi
      say "rabbitmq: starting rabbitmq-server -detached (first start can take up to a minute)"
      local bin envs=()
      bin=$(find_bin rabbitmq-server)
      [[ ${PORT[rabbitmq]} == 5672 ]] || envs=("RABBITMQ_NODE_PORT=${PORT[rabbitmq]}")
      # The broker takes its socket limit from the soft file limit (often 1024, which
      # leaves about 800 connections); start it with the hard limit instead.
      if ! out=$(ulimit -n "$(ulimit -Hn)" 2>/dev/null; as_root env "${envs[@]}" "$bin" -detached 2>&1); then
        warn "rabbitmq: rabbitmq-server -detached failed: $out"
        warn "  look at ${LOGHINT[rabbitmq]}"
        return 1
      fi
      ;;
    redis)
      LOGHINT[redis]=$(redis_log)
      say "redis: starting redis-server on $(addr redis) (no persistence, log $(redis_log))"
      if ! out=$(redis-server --daemonize yes --bind "$(redis_bind)" --port "${PORT[redis]}" \
        --save "" --appendonly no --logfile "$(redis_log)" 2>&1); then
        warn "redis: redis-server failed: $out"
        return 1
      fi
      ;;
  esac
  return 0
}

# Our default URL has no password, Debian's pg_hba wants scram on 127.0.0.1:
# trust the postgres user on loopback. Only for clusters this script installed.
PG_HBA_MARKER='# added by commerce ensure-infra (dev only)'
pg_trust_local() {
  local v=$1 hba tmp
  hba=/etc/postgresql/$v/main/pg_hba.conf
  [[ -f $hba ]] || return 0
  if grep -qF "$PG_HBA_MARKER" "$hba"; then
    return 0
  fi
  tmp=$(mktemp)
  {
    echo "$PG_HBA_MARKER"
    echo "host all postgres 127.0.0.1/32 trust"
    echo "host all postgres ::1/128 trust"
    cat "$hba"
  } >"$tmp"
  # shellcheck disable=SC2016 # expanded by the inner sh
  as_root sh -c 'cat "$1" > "$2"' _ "$tmp" "$hba"
  rm -f "$tmp"
  say "postgres: this script installed PostgreSQL, so it added 'trust' for user postgres on"
  say "  127.0.0.1/::1 at the top of $hba (marked '$PG_HBA_MARKER')"
  # Reload in case apt already started the cluster; harmless if it is stopped.
  as_root pg_ctlcluster --skip-systemctl-redirect "$v" main reload >/dev/null 2>&1 || true
}

apt_install() {
  local svc=$1 pkg
  pkg=$(apt_pkg "$svc")
  if ((APT_UPDATED == 0)); then
    say "apt-get update"
    as_root apt-get update -qq >/dev/null || return 1
    APT_UPDATED=1
  fi
  say "$svc: installing $pkg with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null || return 1
  INSTALLED_BY_US[$svc]=1
}

have_docker() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  else
    docker-compose "$@"
  fi
}

# Ports the compose file publishes (see compose/infra.yml).
compose_env() {
  export COMMERCE_INFRA_POSTGRES_PORT="${PORT[postgres]}"
  export COMMERCE_INFRA_RABBITMQ_PORT="${PORT[rabbitmq]}"
  export COMMERCE_INFRA_REDIS_PORT="${PORT[redis]}"
}

compose_cmd_text() {
  local prefix="" svc
  for svc in "$@"; do
    case $svc in
      postgres) [[ ${PORT[postgres]} == 5432 ]] || prefix+="COMMERCE_INFRA_POSTGRES_PORT=${PORT[postgres]} " ;;
      rabbitmq) [[ ${PORT[rabbitmq]} == 5672 ]] || prefix+="COMMERCE_INFRA_RABBITMQ_PORT=${PORT[rabbitmq]} " ;;
      redis) [[ ${PORT[redis]} == 6379 ]] || prefix+="COMMERCE_INFRA_REDIS_PORT=${PORT[redis]} " ;;
    esac
  done
  echo "(cd '$ROOT' && ${prefix}docker compose -f compose/infra.yml up -d $*)"
}

# --- main --------------------------------------------------------------------

parse_url postgres "$PG_URL" 5432
case $AMQP_URL in
  amqps://*) parse_url rabbitmq "$AMQP_URL" 5671 ;;
  *) parse_url rabbitmq "$AMQP_URL" 5672 ;;
esac
parse_url redis "$REDIS_URL" 6379

# Final word on a service that answers: for postgres also try to log in.
confirm() {
  local svc=$1 suffix=${2:-}
  if [[ $svc == postgres ]] && ! check_pg_login; then
    FAILED=1
    return 0
  fi
  say "$svc $(addr "$svc") ok${suffix:+ ($suffix)}"
}

remedy() {
  local svc=$1 rc=0
  # 1. installed but stopped -> start
  if installed "$svc"; then
    start_service "$svc" || rc=$?
    case $rc in
      0)
        if wait_for "$svc"; then
          confirm "$svc" started
        else
          warn "$svc $(addr "$svc") still does not answer after ${WAIT_SECS[$svc]}s; look at ${LOGHINT[$svc]}"
          FAILED=1
        fi
        ;;
      99)
        warn "$svc is installed but not running, and starting it needs root (no passwordless sudo)"
        FAILED=1
        ;;
      *) FAILED=1 ;;
    esac
    return 0
  fi
  # 2. not installed, root or passwordless sudo, apt-get -> install and start
  if [[ $PRIV != none ]] && command -v apt-get >/dev/null 2>&1; then
    if ! apt_install "$svc"; then
      warn "$svc: apt-get failed installing $(apt_pkg "$svc") (run it by hand to see why)"
      FAILED=1
      return 0
    fi
    if ! installed "$svc"; then
      warn "$svc: $(apt_pkg "$svc") was installed but its server binary was not found"
      FAILED=1
      return 0
    fi
    if answers "$svc"; then
      # apt's postinst may have started it already.
      [[ $svc != postgres ]] || pg_trust_local "$(pg_version)"
      confirm "$svc" installed
      return 0
    fi
    remedy "$svc"
    return 0
  fi
  # 3./4. decided once all services were looked at
  DOCKER_NEEDED+=("$svc")
}

for svc in "${SERVICES[@]}"; do
  if answers "$svc"; then
    confirm "$svc"
    continue
  fi
  if ! is_local "${HOST[$svc]}"; then
    warn "$svc $(addr "$svc") does NOT answer (remote host: not managed by this script)"
    FAILED=1
    continue
  fi
  say "$svc $(addr "$svc") does not answer"
  remedy "$svc"
done

if ((${#DOCKER_NEEDED[@]} > 0)); then
  if have_docker; then
    say "no local install of ${DOCKER_NEEDED[*]}; starting with docker compose"
    compose_env
    if ! compose -f "$COMPOSE_FILE" up -d "${DOCKER_NEEDED[@]}"; then
      warn "docker compose up failed"
      FAILED=1
    else
      for svc in "${DOCKER_NEEDED[@]}"; do
        if wait_for "$svc" $((WAIT_SECS[$svc] + 30)); then
          confirm "$svc" docker
        else
          warn "$svc $(addr "$svc") does not answer; look at: docker compose -f $COMPOSE_FILE logs $svc"
          FAILED=1
        fi
      done
    fi
    DOCKER_NEEDED=()
  else
    if [[ $PRIV == none ]]; then
      why="installing needs root or passwordless sudo"
    else
      why="there is no apt-get to install with"
    fi
    warn "not installed: ${DOCKER_NEEDED[*]}; $why, and no Docker engine answers 'docker info'"
    FAILED=1
  fi
fi

# Step 4: what a human should run.
if ((${#MANUAL[@]} > 0 || ${#DOCKER_NEEDED[@]} > 0)); then
  warn "run these, then run $0 again:"
  pkgs=()
  for svc in "${DOCKER_NEEDED[@]}"; do pkgs+=("$(apt_pkg "$svc")"); done
  if ((${#pkgs[@]} > 0)); then
    if command -v apt-get >/dev/null 2>&1; then
      warn "  ${SUDO_HINT}apt-get update"
      warn "  ${SUDO_HINT}env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${pkgs[*]}"
    else
      warn "  (install ${pkgs[*]} with your package manager)"
    fi
  fi
  for svc in "${SERVICES[@]}"; do
    if [[ -n ${MANUAL[$svc]:-} ]]; then
      while IFS= read -r line; do warn "  $line"; done <<<"${MANUAL[$svc]}"
    elif [[ " ${DOCKER_NEEDED[*]} " == *" $svc "* ]]; then
      # After an install the service still has to be started.
      if [[ $svc == postgres ]]; then
        # shellcheck disable=SC2016 # printed for the user to run
        warn '  '"${SUDO_HINT}"'pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start'
      else
        while IFS= read -r line; do warn "  $line"; done <<<"$(start_cmd_text "$svc")"
      fi
    fi
  done
  if [[ $PRIV == none ]] && command -v sudo >/dev/null 2>&1; then
    warn "or let this script do all of it as root: sudo $0"
  fi
  if ((${#DOCKER_NEEDED[@]} > 0)); then
    warn "or, with a Docker engine running:"
    warn "  $(compose_cmd_text "${DOCKER_NEEDED[@]}")"
  fi
fi

if ((FAILED)); then
  exit 1
fi
