#!/usr/bin/env bash
# Rehearse the several-hosts setup on one machine (`make cluster`; `make cluster-down` undoes it):
#
#   - a second Docker engine beside the first (scripts/extra-engine.sh, name $ENGINE2),
#     with the example images loaded;
#   - Postgres (Debian's package, installed when missing by scripts/ensure-postgres.sh), a cluster in .algodock/cluster/pg
#     listening on 127.0.0.1:$PG_PORT only;
#   - a Prefect server on it (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...),
#     127.0.0.1:$PREFECT_PORT;
#   - moto's S3 server on 127.0.0.1:$S3_PORT with a bucket `lake`;
#   - a Dask scheduler on 127.0.0.1:$DASK_PORT and one `algodock worker` per engine.
#
# Everything binds 127.0.0.1. Pids and logs in .algodock/cluster/; the environment to use
# is written to .algodock/cluster/env. Needs root (the second engine, Postgres' user).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=$PWD/.algodock/cluster
VENV=${VENV:-$PWD/.venv}
ENGINE2=${ENGINE2:-e2}
PG_PORT=${PG_PORT:-55432}
PREFECT_PORT=${PREFECT_PORT:-4242}
S3_PORT=${S3_PORT:-5055}
DASK_PORT=${DASK_PORT:-8786}
WAIT=${WAIT:-120}
mkdir -p "$DIR"

say() { echo "cluster-up: $*" >&2; }
die() { say "$*"; exit 1; }

wait_for() {  # wait_for WHAT COMMAND...: poll with a deadline
    local what=$1; shift
    local deadline=$(( SECONDS + WAIT ))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "$what did not come up within ${WAIT}s (logs in $DIR)"
        sleep 0.5
    done
}

source scripts/pids.sh

background() {  # background NAME COMMAND...: start once, remember its pid (and start time)
    local name=$1 pid; shift
    if pid=$(recorded_pid "$DIR/$name.pid"); then say "$name already runs (pid $pid)"; return; fi
    setsid nohup "$@" >"$DIR/$name.log" 2>&1 </dev/null &
    record_pid "$DIR/$name.pid" $!
}

# ---- Postgres
PGBIN=$(bash scripts/ensure-postgres.sh | tail -n1)
PGDATA=$DIR/pg
if [ ! -f "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -U prefect -A trust >"$DIR/initdb.log" 2>&1 || die "initdb failed (see $DIR/initdb.log)"
fi
if ! postgres_runs "$PGDATA"; then
    rm -f "$PGDATA/postmaster.pid"
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t "$WAIT" \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$PGDATA -c max_connections=200" start >&2
fi
runuser -u postgres -- "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U prefect -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='prefect'" | grep -q 1 \
    || runuser -u postgres -- "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U prefect prefect
DB_URL="postgresql+asyncpg://prefect@127.0.0.1:$PG_PORT/prefect"

# ---- Prefect server on Postgres
background prefect env PREFECT_API_DATABASE_CONNECTION_URL="$DB_URL" PREFECT_SERVER_ANALYTICS_ENABLED=false \
    "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"

# ---- S3 (moto)
background s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"

# ---- the second engine
images=()
for image in algodock/device-visits:1.0.0 algodock/dwell-stats:1.0.0; do
    docker image inspect "$image" >/dev/null 2>&1 && images+=("$image")
done
[ ${#images[@]} -gt 0 ] || say "warning: the example images are missing (make images)"
E2_HOST=$(bash scripts/extra-engine.sh start "$ENGINE2" ${images[@]:+--load "${images[@]}"} | tail -n1 | cut -d= -f2-)

# ---- Dask scheduler and one algodock worker per engine (each with the store's credentials,
# as each host has its own AWS environment in production)
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
background scheduler "$VENV/bin/dask" scheduler --host 127.0.0.1 --port "$DASK_PORT" --no-dashboard
wait_for "the Dask scheduler" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DASK_PORT"
SCHED=tcp://127.0.0.1:$DASK_PORT
background worker-main "$VENV/bin/algodock" worker --scheduler "$SCHED" --host 127.0.0.1 --name main \
    --docker-host "${DOCKER_HOST:-unix:///var/run/docker.sock}"
background "worker-$ENGINE2" "$VENV/bin/algodock" worker --scheduler "$SCHED" --host 127.0.0.1 --name "$ENGINE2" \
    --docker-host "$E2_HOST"

wait_for "both workers to join" "$VENV/bin/python" -c "
from distributed import Client
with Client('$SCHED', timeout='10s') as c:
    assert len(c.scheduler_info(n_workers=-1)['workers']) >= 2"
wait_for "the S3 server" bash -c "exec 3<>/dev/tcp/127.0.0.1/$S3_PORT"
"$VENV/bin/python" -c "import boto3; s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:$S3_PORT'); s3.create_bucket(Bucket='lake')" 2>/dev/null || true
wait_for "the Prefect server" "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PREFECT_PORT/api/health', timeout=5)"

cat >"$DIR/env" <<EOF
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export ALGODOCK_CLUSTER=$SCHED
EOF
cat <<EOF
The cluster is up (everything on 127.0.0.1; pids and logs in $DIR):
  Docker engines   main: ${DOCKER_HOST:-unix:///var/run/docker.sock}   $ENGINE2: $E2_HOST
  Dask scheduler   $SCHED   (workers: main, $ENGINE2)
  Prefect server   http://127.0.0.1:$PREFECT_PORT   on Postgres $DB_URL
  S3 (moto)        http://127.0.0.1:$S3_PORT   bucket lake

Run a pipeline across both engines:
  source $DIR/env
  .venv/bin/python examples/generate_pings.py --out .algodock/demo/pings --devices 50 --hours 24 --parts 4 --seed 7
  .venv/bin/algodock run deployments/device-visits-daily.yaml --cluster \$ALGODOCK_CLUSTER --store s3://lake/algodock --json
Tear it down: make cluster-down
EOF
