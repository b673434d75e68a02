#!/usr/bin/env bash
# A second Docker engine beside the main one (fault tests, a two-engine cluster).
#
#   scripts/extra-engine.sh start NAME [--load IMAGE...]   start it (idempotent); optionally copy images into it
#   scripts/extra-engine.sh stop NAME [--kill]             stop it and remove its bridge; --kill: SIGKILL the
#                                                          daemon only (a crash: data, bridge and containerd stay,
#                                                          `start NAME` brings it back)
#   scripts/extra-engine.sh env NAME                       print DOCKER_HOST=unix://... for it
#
# The engine has its own socket, data-root, exec-root, pidfile, an empty config file (so
# /etc/docker/daemon.json is not read) and its own bridge adk-NAME with 172.30.N.1/24 (N from
# the name, or ALGODOCK_ENGINE_NET=N), and runs with --iptables=false. It never uses
# --bridge=none: that makes dockerd delete the main engine's docker0.
# Needs root (dockerd, ip link). NAME: 1-11 of [a-z0-9] (the bridge name has at most 15 characters).
set -euo pipefail

ROOT=${ALGODOCK_ENGINES_ROOT:-/var/lib/algodock-engines}
RUN=${ALGODOCK_ENGINES_RUN:-/run/algodock-engines}
START_SECONDS=${ALGODOCK_ENGINE_START_SECONDS:-90}

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "extra-engine: $*" >&2; exit 1; }

cmd=${1:-}; name=${2:-}
[[ -n $cmd && -n $name ]] || usage
[[ $name =~ ^[a-z0-9]{1,11}$ ]] || die "NAME must be 1-11 characters of [a-z0-9], got '$name'"
shift 2

dir=$ROOT/$name
exec_root=$RUN/$name
sock=$exec_root/docker.sock
pidfile=$exec_root/docker.pid
bridge=adk-$name
net=${ALGODOCK_ENGINE_NET:-$(( $(printf '%s' "$name" | cksum | cut -d' ' -f1) % 250 + 2 ))}

# Running, and not a zombie: a killed daemon whose parent is gone may never be reaped here, and
# dockerd refuses to start while the pid in its pidfile still has a /proc entry.
running() { [[ -r /proc/$1/stat ]] && [[ $(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1) != Z ]]; }
alive() { [[ -f $pidfile ]] && running "$(cat "$pidfile")"; }
answers() { DOCKER_HOST=unix://$sock docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
  mkdir -p "$dir/data" "$exec_root"
  [[ -f $dir/daemon.json ]] || echo '{}' > "$dir/daemon.json"
  if alive && answers; then
    echo "extra-engine: $name already runs" >&2
  else
    if [[ -f $pidfile ]] && ! alive; then rm -f "$pidfile"; fi  # stale: dockerd refuses to start over it
    # The managed containerd dies with a killed dockerd (parent-death signal); a pidfile naming
    # its dead (or zombie) pid makes the next dockerd wait for it until it gives up.
    cpid=$exec_root/containerd/containerd.pid
    if [[ -f $cpid ]] && ! running "$(cat "$cpid")"; then rm -f "$cpid"; fi
    if ! ip link show "$bridge" >/dev/null 2>&1; then
      ip link add "$bridge" type bridge
      ip addr add "172.30.$net.1/24" dev "$bridge"
    fi
    ip link set "$bridge" up
    setsid dockerd \
      --host "unix://$sock" \
      --data-root "$dir/data" \
      --exec-root "$exec_root" \
      --pidfile "$pidfile" \
      --config-file "$dir/daemon.json" \
      --bridge "$bridge" \
      --iptables=false \
      --ip-masq=false \
      --log-level warn \
      </dev/null >>"$dir/dockerd.log" 2>&1 &
    deadline=$(( $(date +%s) + START_SECONDS ))
    until answers; do
      if (( $(date +%s) > deadline )); then
        tail -n 20 "$dir/dockerd.log" >&2 || true
        die "$name did not answer on $sock within ${START_SECONDS}s (log: $dir/dockerd.log)"
      fi
      if ! kill -0 $! 2>/dev/null && ! alive; then
        tail -n 20 "$dir/dockerd.log" >&2 || true
        die "dockerd for $name exited (log: $dir/dockerd.log)"
      fi
      sleep 0.2
    done
    echo "extra-engine: $name answers on unix://$sock" >&2
  fi
  if [[ ${1:-} == --load ]]; then
    shift
    (( $# )) || die "--load needs at least one image"
    docker save "$@" | DOCKER_HOST=unix://$sock docker load -q >&2
  elif (( $# )); then
    die "unknown arguments: $*"
  fi
}

stop() {
  if [[ ${1:-} == --kill ]]; then
    if alive; then
      pid=$(cat "$pidfile")
      kill -KILL "$pid"
      deadline=$(( $(date +%s) + 30 ))
      while running "$pid"; do
        (( $(date +%s) <= deadline )) || die "dockerd $pid for $name did not die"
        sleep 0.05
      done
    fi
    # The pidfile stays behind, as after a crash; `start` removes it.
    return 0
  fi
  if alive; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    deadline=$(( $(date +%s) + 40 ))
    while running "$pid"; do
      if (( $(date +%s) > deadline )); then kill -KILL "$pid" 2>/dev/null || true; break; fi
      sleep 0.2
    done
  fi
  rm -f "$pidfile"
  # A managed containerd outlives a killed dockerd: stop it with its engine.
  cpid=$exec_root/containerd/containerd.pid
  if [[ -f $cpid ]] && running "$(cat "$cpid")"; then
    kill -TERM "$(cat "$cpid")" 2>/dev/null || true
  fi
  if ip link show "$bridge" >/dev/null 2>&1; then ip link del "$bridge"; fi
  # dockerd mounts its data-root on itself, and a crashed engine leaves container layers and
  # network namespaces mounted: unmount what is left under this engine's folders, deepest first.
  awk -v a="$dir/" -v b="$exec_root/" '{ p = $2 "/"; if (index(p, a) == 1 || index(p, b) == 1) print $2 }' /proc/mounts \
    | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  echo "extra-engine: $name stopped" >&2
}

case $cmd in
  start) start "$@" ;;
  stop) stop "$@" ;;
  env) echo "DOCKER_HOST=unix://$sock" ;;
  *) usage ;;
esac
