#!/usr/bin/env bash
# A real MLflow tracking + registry server for development and tests, from the project's virtual environment.
#
#   hack/mlflow.sh start  [--backend sqlite|postgres]   start (or reuse) the server; prints its URI on stdout
#   hack/mlflow.sh stop   [--backend sqlite|postgres]   stop exactly what `start` started (PID files)
#   hack/mlflow.sh status [--backend sqlite|postgres]   print the URI and exit 0 when the server answers
#   hack/mlflow.sh clean  [--backend sqlite|postgres]   stop, then remove the state (database, artifacts)
#
# sqlite (default): the database is a file in the state folder. postgres: a private PostgreSQL cluster (Debian's
# package, installed when missing) initialised in the state folder, listening on 127.0.0.1 and a free port, run
# as the postgres user when we are root, its schema created by `mlflow db upgrade`.
# Artifacts are proxied by the server (--serve-artifacts) into the state folder.
#
# State: .state/mlflow-<backend>/ (override with KUBEFORGE_MLFLOW_STATE_DIR). Port: a free one, remembered
# (override with KUBEFORGE_MLFLOW_PORT). Workers: KUBEFORGE_MLFLOW_WORKERS (default 1).
# Everything binds to 127.0.0.1. Log lines go to stderr, the URI alone to stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
VENV=${KUBEFORGE_VENV:-$ROOT/.venv}

cmd=${1:-start}; shift || true
BACKEND=sqlite
while (($#)); do
  case $1 in
    --backend) BACKEND=${2:?--backend needs sqlite or postgres}; shift 2 ;;
    --backend=*) BACKEND=${1#*=}; shift ;;
    *) echo "usage: $0 start|stop|status|clean [--backend sqlite|postgres]" >&2; exit 2 ;;
  esac
done
case $BACKEND in sqlite|postgres) ;; *) echo "unknown backend '$BACKEND' (sqlite or postgres)" >&2; exit 2 ;; esac

S=${KUBEFORGE_MLFLOW_STATE_DIR:-$ROOT/.state/mlflow-$BACKEND}
PG=$S/pg
log() { printf '[mlflow %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "$*"; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_free() { python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
uri() { echo "http://127.0.0.1:$(cat "$S/port")"; }
answers() { [[ -f $S/port ]] && curl -sf --max-time 2 "$(uri)/health" >/dev/null 2>&1; }

# --- PostgreSQL (private cluster) ---------------------------------------------------------------------------
pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [[ -n $d && -x $d/initdb ]] && echo "$d"
}

as_pg() { # run a PostgreSQL tool as the postgres user when we are root (PostgreSQL refuses to run as root)
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_install() {
  [[ -n $(pg_bin) ]] && return 0
  [[ $(id -u) == 0 ]] || die "PostgreSQL is not installed; run: sudo apt-get install -y postgresql"
  log "installing PostgreSQL (Debian's package)"
  # no default cluster on port 5432: we start our own
  if [[ ! -f /etc/postgresql-common/createcluster.conf ]]; then
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Options::=--force-confold postgresql >&2
  [[ -n $(pg_bin) ]] || die "PostgreSQL installation failed"
}

pg_start() {
  pg_install
  local bin; bin=$(pg_bin)
  mkdir -p "$PG"
  [[ $(id -u) == 0 ]] && chown postgres: "$PG"
  if [[ ! -f $PG/data/PG_VERSION ]]; then
    log "initialising a PostgreSQL cluster in $PG/data"
    as_pg "$bin/initdb" -D "$PG/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$S/initdb.log" 2>&1 \
      || { cat "$S/initdb.log" >&2; die "initdb failed"; }
    # local, disposable: TCP on 127.0.0.1 only, no Unix socket, durability traded for speed
    cat >>"$PG/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  fi
  if as_pg "$bin/pg_ctl" -D "$PG/data" status >/dev/null 2>&1; then
    log "reusing the running PostgreSQL on port $(cat "$S/pg-port")"
  else
    local port=${KUBEFORGE_POSTGRES_PORT:-}
    [[ -z $port && -f $S/pg-port ]] && port_free "$(cat "$S/pg-port")" && port=$(cat "$S/pg-port")
    [[ -n $port ]] || port=$(free_port)
    echo "$port" >"$S/pg-port"
    as_pg "$bin/pg_ctl" -D "$PG/data" -o "-p $port" -l "$PG/postgres.log" -w -t 60 start >/dev/null \
      || { tail -20 "$PG/postgres.log" >&2; die "PostgreSQL did not start"; }
    log "PostgreSQL listening on 127.0.0.1:$port"
  fi
  local port; port=$(cat "$S/pg-port")
  if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "select 1 from pg_database where datname='mlflow'" \
      | grep -q 1; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres mlflow
  fi
  "$VENV/bin/python" -c 'import psycopg2' 2>/dev/null || {
    log "installing psycopg2-binary into the virtual environment"
    "$VENV/bin/pip" install -q 'psycopg2-binary>=2.9' >&2
  }
  local db="postgresql+psycopg2://postgres@127.0.0.1:$port/mlflow"
  log "mlflow db upgrade"
  "$VENV/bin/mlflow" db upgrade "$db" >"$S/db-upgrade.log" 2>&1 || { tail -20 "$S/db-upgrade.log" >&2; die "mlflow db upgrade failed"; }
  BACKEND_URI=$db
}

pg_stop() {
  local bin; bin=$(pg_bin) || return 0
  [[ -f $PG/data/PG_VERSION ]] || return 0
  if as_pg "$bin/pg_ctl" -D "$PG/data" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$PG/data" -m fast -w stop >/dev/null
    log "stopped PostgreSQL"
  fi
}

# --- MLflow -------------------------------------------------------------------------------------------------
start() {
  [[ -x $VENV/bin/mlflow ]] || die "no $VENV/bin/mlflow: run 'make install' first"
  mkdir -p "$S/artifacts"
  if alive "$S/mlflow.pid" && answers; then
    log "reusing the running MLflow server ($BACKEND)"; uri; return
  fi
  alive "$S/mlflow.pid" && stop_mlflow
  local t0=$SECONDS
  if [[ $BACKEND == postgres ]]; then pg_start; else BACKEND_URI="sqlite:///$S/mlflow.db"; fi
  local port=${KUBEFORGE_MLFLOW_PORT:-}
  [[ -z $port && -f $S/port ]] && port_free "$(cat "$S/port")" && port=$(cat "$S/port")
  [[ -n $port ]] || port=$(free_port)
  echo "$port" >"$S/port"
  # its own session (process group), so `stop` ends the server and its workers and nothing else
  # no background job runner (huey consumers: gateway/trace jobs the registry does not use; 8 processes on 2 cores)
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
  setsid nohup "$VENV/bin/mlflow" server \
    --backend-store-uri "$BACKEND_URI" \
    --serve-artifacts --artifacts-destination "$S/artifacts" \
    --host 127.0.0.1 --port "$port" --workers "${KUBEFORGE_MLFLOW_WORKERS:-1}" \
    >"$S/mlflow.log" 2>&1 </dev/null &
  echo $! >"$S/mlflow.pid"
  local deadline=$((SECONDS + ${KUBEFORGE_MLFLOW_START_TIMEOUT:-120}))
  until answers; do
    alive "$S/mlflow.pid" || { tail -30 "$S/mlflow.log" >&2; die "MLflow server exited; log: $S/mlflow.log"; }
    ((SECONDS < deadline)) || { tail -30 "$S/mlflow.log" >&2; stop_mlflow; die "MLflow server not ready in time"; }
    sleep 0.2
  done
  log "MLflow ($BACKEND) ready in $((SECONDS - t0)) s at $(uri); state in $S"
  uri
}

stop_mlflow() {
  [[ -f $S/mlflow.pid ]] || return 0
  local pid; pid=$(cat "$S/mlflow.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "stopped MLflow ($BACKEND, pid $pid)"
  fi
  rm -f "$S/mlflow.pid"
}

stop() {
  stop_mlflow
  [[ $BACKEND == postgres ]] && pg_stop
  return 0
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) if alive "$S/mlflow.pid" && answers; then uri; else exit 1; fi ;;
  clean) stop; rm -rf "$S"; log "removed $S" ;;
  *) echo "usage: $0 start|stop|status|clean [--backend sqlite|postgres]" >&2; exit 2 ;;
esac
