#!/usr/bin/env bash
# Tear down what scripts/cluster-up.sh started: the workers, the scheduler, the Prefect and S3
# servers (by the pids it recorded), Postgres (pg_ctl stop; its data stays in
# .algodock/cluster/pg) and the second Docker engine. The main engine is never touched.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=$PWD/.algodock/cluster
ENGINE2=${ENGINE2:-e2}

say() { echo "cluster-down: $*" >&2; }

source scripts/pids.sh

stop_pid() {  # only the very process cluster-up.sh started: a recorded pid may name another one now
    local f=$DIR/$1.pid
    [ -f "$f" ] || return 0
    local pid
    if pid=$(recorded_pid "$f"); then
        say "stopping $1 (pid $pid)"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        local deadline=$(( SECONDS + 30 ))
        while recorded_pid "$f" >/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        recorded_pid "$f" >/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    fi
    rm -f "$f"
}

for name in "worker-main" "worker-$ENGINE2" scheduler prefect s3; do stop_pid "$name"; done
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n1)" 2>/dev/null || true)
if [ -n "$PGBIN" ] && postgres_runs "$DIR/pg"; then
    say "stopping Postgres"
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >&2 || true
fi
bash scripts/extra-engine.sh stop "$ENGINE2"
say "done"
