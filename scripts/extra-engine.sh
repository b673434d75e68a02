#!/usr/bin/env bash
# A second (third, ...) Docker engine beside the main one, on the same machine.
#
#   bash scripts/extra-engine.sh start NAME [--load IMAGE...]   # start it; copy images from the main engine
#   bash scripts/extra-engine.sh env NAME                      # prints DOCKER_HOST=unix://...
#   bash scripts/extra-engine.sh stop NAME                     # stop it, remove its bridge (keeps its data)
#
# Each engine has its own socket, data-root, exec-root (so its own managed containerd),
# pidfile, config file (nothing but its own trust key so its own engine ID in `docker info`), cgroup parent and bridge interface `adk-NAME`
# (172.30.N.1/24, N from the name, or ALGODOCK_ENGINE_NET=N), and runs with
# --iptables=false. Never --bridge=none: an engine started that way deletes the main
# engine's docker0. Algorithm containers run on network none anyway.
# State: $ALGODOCK_ENGINES (default /var/lib/algodock-engines)/NAME; log in NAME/dockerd.log.
# Needs root. Progress goes to stderr.
set -euo pipefail

ROOT=${ALGODOCK_ENGINES:-/var/lib/algodock-engines}
WAIT=${ALGODOCK_DOCKERD_WAIT:-60}

say() { echo "extra-engine: $*" >&2; }
die() { say "$*"; exit 1; }

[ $# -ge 2 ] || die "usage: $0 start NAME [--load IMAGE...] | stop NAME | env NAME"
cmd=$1; name=$2; shift 2
[[ "$name" =~ ^[a-z0-9][a-z0-9-]{0,10}$ ]] || die "NAME must be 1-11 of [a-z0-9-] (the bridge is adk-NAME, 15 chars at most)"

dir="$ROOT/$name"
sock="$dir/docker.sock"
pidfile="$dir/docker.pid"
bridge="adk-$name"
if [ -n "${ALGODOCK_ENGINE_NET:-}" ]; then net=$ALGODOCK_ENGINE_NET; else
    net=$(( $(printf '%s' "$name" | cksum | cut -d' ' -f1) % 200 + 20 ))
fi

running() {
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

answers() {
    DOCKER_HOST="unix://$sock" timeout 10 docker info >/dev/null 2>&1
}

start() {
    local load=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --load) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do load+=("$1"); shift; done ;;
            *) die "unknown option $1" ;;
        esac
    done
    mkdir -p "$dir/data" "$dir/exec"
    if running && answers; then
        say "$name already runs (pid $(cat "$pidfile"))"
    else
        if [ -f "$pidfile" ]; then say "removing stale pidfile $pidfile"; rm -f "$pidfile"; fi
        rm -f "$sock"
        # Nothing from /etc/docker/daemon.json; only its own trust key, whose fingerprint is the
        # engine ID `docker info` reports (shared with the main engine otherwise).
        printf '{"deprecated-key-path": "%s"}\n' "$dir/key.json" > "$dir/daemon.json"
        if ! ip link show "$bridge" >/dev/null 2>&1; then
            ip link add "$bridge" type bridge
            ip addr add "172.30.$net.1/24" dev "$bridge"
        fi
        ip link set "$bridge" up
        say "starting dockerd $name on unix://$sock (bridge $bridge 172.30.$net.1/24)"
        setsid nohup dockerd \
            --host "unix://$sock" \
            --data-root "$dir/data" \
            --exec-root "$dir/exec" \
            --pidfile "$pidfile" \
            --config-file "$dir/daemon.json" \
            --bridge "$bridge" \
            --iptables=false --ip-masq=false \
            --cgroup-parent "adk-$name" \
            >"$dir/dockerd.log" 2>&1 </dev/null &
        local pid=$! deadline=$(( SECONDS + WAIT ))
        until answers; do
            if ! kill -0 "$pid" 2>/dev/null; then
                tail -n 20 "$dir/dockerd.log" >&2 || true
                die "dockerd $name exited at start (log: $dir/dockerd.log)"
            fi
            if [ $SECONDS -ge $deadline ]; then
                tail -n 20 "$dir/dockerd.log" >&2 || true
                die "dockerd $name did not answer on $sock within ${WAIT}s (log: $dir/dockerd.log)"
            fi
            sleep 0.5
        done
    fi
    for image in "${load[@]}"; do
        docker image inspect "$image" >/dev/null 2>&1 || die "--load $image: no such image on the main engine (build it first)"
        if DOCKER_HOST="unix://$sock" docker image inspect "$image" >/dev/null 2>&1 \
            && [ "$(DOCKER_HOST="unix://$sock" docker image inspect -f '{{.Id}}' "$image")" = "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
            continue
        fi
        say "loading $image into $name"
        docker save "$image" | DOCKER_HOST="unix://$sock" docker load -q >&2
    done
    echo "DOCKER_HOST=unix://$sock"
}

stop() {
    if running; then
        local pid; pid=$(cat "$pidfile")
        say "stopping dockerd $name (pid $pid)"
        kill "$pid"
        local deadline=$(( SECONDS + WAIT ))
        while kill -0 "$pid" 2>/dev/null; do
            [ $SECONDS -lt $deadline ] || { say "dockerd $name ignored SIGTERM; killing it"; kill -9 "$pid"; break; }
            sleep 0.2
        done
    fi
    rm -f "$pidfile" "$sock"
    if ip link show "$bridge" >/dev/null 2>&1; then ip link del "$bridge"; fi
}

case "$cmd" in
    start) start "$@" ;;
    stop) stop ;;
    env) echo "DOCKER_HOST=unix://$sock" ;;
    *) die "unknown command $cmd (start, stop, env)" ;;
esac
