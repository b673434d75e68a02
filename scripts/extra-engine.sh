#!/usr/bin/env bash
# A second Docker engine beside the main one (fault tests, a two-engine cluster).
#
#   scripts/extra-engine.sh start NAME [--load IMAGE...]   start it (idempotent); optionally copy images into it;
#                                                          prints DOCKER_HOST=unix://... last
#   scripts/extra-engine.sh stop NAME [--kill]             stop it and remove its bridge; --kill: SIGKILL the
#                                                          daemon only (a crash: data, bridge and containerd stay,
#                                                          `start NAME` brings it back)
#   scripts/extra-engine.sh env NAME                       print DOCKER_HOST=unix://... for it
#
# The engine has its own socket, data-root, exec-root, pidfile, trust key (so its own engine ID),
# a config file of its own (so /etc/docker/daemon.json is not read) and its own bridge adk-NAME with 172.30.N.1/24 (N from
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

cpidfile=$exec_root/containerd/containerd.pid

# The pidfiles a crashed engine left may name other processes now (pid_runs: scripts/pids.sh);
# dockerd takes a live pid in containerd.pid for its containerd and times out waiting for it.
source "$(dirname "$0")/pids.sh"
daemon_pid() { cat "$pidfile" 2>/dev/null || true; }
containerd_pid() { cat "$cpidfile" 2>/dev/null || true; }
alive() { pid_runs "$(daemon_pid)" "$pidfile"; }  # this engine's dockerd: started with --pidfile $pidfile
containerd_alive() { pid_runs "$(containerd_pid)" "$exec_root/containerd/containerd.toml"; }
answers() { DOCKER_HOST=unix://$sock docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
  mkdir -p "$dir/data" "$exec_root"
  # Its own trust key, so `docker info` gives it an ID of its own (a two-engine cluster tells
  # the engines apart by Name and ID); nothing else: /etc/docker/daemon.json is not read.
  printf '{"deprecated-key-path": "%s"}\n' "$dir/key.json" > "$dir/daemon.json"
  if alive && answers; then
    echo "extra-engine: $name already runs" >&2
  else
    if [[ -f $pidfile ]] && ! alive; then rm -f "$pidfile"; fi  # stale: dockerd refuses to start over it
    # The managed containerd dies with a killed dockerd (parent-death signal); a pidfile naming
    # a pid that is not it makes the next dockerd wait for it until it gives up.
    if [[ -f $cpidfile ]] && ! containerd_alive; then rm -f "$cpidfile"; fi
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
  echo "DOCKER_HOST=unix://$sock"  # the last line on stdout, as `env NAME` prints it
}

stop() {
  if [[ ${1:-} == --kill ]]; then
    if alive; then
      pid=$(daemon_pid)
      kill -KILL "$pid"
      deadline=$(( $(date +%s) + 30 ))
      while pid_runs "$pid" "$pidfile"; do
        (( $(date +%s) <= deadline )) || die "dockerd $pid for $name did not die"
        sleep 0.05
      done
    fi
    # The pidfile stays behind, as after a crash; `start` removes it.
    return 0
  fi
  if alive; then
    pid=$(daemon_pid)
    kill -TERM "$pid"
    deadline=$(( $(date +%s) + 40 ))
    while pid_runs "$pid" "$pidfile"; do
      if (( $(date +%s) > deadline )); then kill -KILL "$pid" 2>/dev/null || true; break; fi
      sleep 0.2
    done
  fi
  rm -f "$pidfile"
  # A managed containerd outlives a killed dockerd: stop it with its engine.
  if containerd_alive; then kill -TERM "$(containerd_pid)" 2>/dev/null || true; fi
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
