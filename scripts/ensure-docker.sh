#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`, installing and starting one if needed.
#
#   bash scripts/ensure-docker.sh
#
# - exits 0 at once when `docker info` already answers (idempotent; never restarts a
#   running engine);
# - otherwise installs docker.io (Debian) when `dockerd` is missing, removes a stale
#   /var/run/docker.pid left by a killed dockerd ("pid file found ... Is docker already
#   running?") and a stale pidfile of its containerd (both may name another process after a
#   machine restart), starts dockerd in the background (setsid + nohup, log in
#   $ALGODOCK_DOCKERD_LOG) and waits up to $ALGODOCK_DOCKERD_WAIT seconds for it; a second
#   engine's dockerd (scripts/extra-engine.sh: a pidfile of its own) is not taken for it;
# - also installs busybox-static (/bin/busybox, used by tests to build tiny FROM scratch
#   images) and debootstrap (offline base image, see ensure-base-image.sh) when missing.
#
# Progress goes to stderr. Needs root for the install/start part.
set -euo pipefail

LOG=${ALGODOCK_DOCKERD_LOG:-/var/log/algodock-dockerd.log}
WAIT=${ALGODOCK_DOCKERD_WAIT:-60}
PIDFILE=${ALGODOCK_DOCKERD_PIDFILE:-/var/run/docker.pid}
EXEC_ROOT=${ALGODOCK_DOCKERD_EXEC_ROOT:-/var/run/docker}  # dockerd's default; its containerd's pidfile is below it
DOCKERD=${ALGODOCK_DOCKERD:-dockerd}

source "$(dirname "$0")/pids.sh"  # pid_runs: is a pidfile's pid still that daemon

say() { echo "ensure-docker: $*" >&2; }

engine_answers() {
    command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        say "need root to run: $*"; return 1
    fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update -qq >&2
        apt_updated=1
    fi
    say "apt-get install -y $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

ensure_helpers() {
    local missing=()
    # the static busybox: `busybox` may exist as a dynamic build, so check the package
    if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
        missing+=(busybox-static)
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        missing+=(debootstrap)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        if command -v apt-get >/dev/null 2>&1; then
            apt_install "${missing[@]}"
        else
            say "warning: cannot install ${missing[*]} (no apt-get)"
        fi
    fi
}

# Fast path: the engine answers. Still make sure the helper packages are there (cheap
# dpkg/command checks, nothing is installed when they already are).
if engine_answers; then
    ensure_helpers
    exit 0
fi

ensure_helpers

if ! command -v "$DOCKERD" >/dev/null 2>&1; then
    apt_install docker.io
fi
if ! command -v docker >/dev/null 2>&1; then
    say "error: docker CLI still missing after installing docker.io"
    exit 1
fi

# pidfile_of PID: the pidfile the dockerd PID was started with (--pidfile/-p, else dockerd's
# default), so the main engine's daemon is told from a second engine's (scripts/extra-engine.sh).
pidfile_of() {
    local arg next="" file=/var/run/docker.pid
    while IFS= read -r -d '' arg; do
        if [ -n "$next" ]; then file=$arg; next=""; continue; fi
        case $arg in
            --pidfile|-p) next=1 ;;
            --pidfile=*) file=${arg#--pidfile=} ;;
        esac
    done <"/proc/$1/cmdline"
    echo "$file"
}
# main_daemon PID: PID is a live (not zombie) dockerd that writes $PIDFILE. After a machine
# restart, the pid a killed dockerd's pidfile names may belong to any other process.
main_daemon() {
    pid_runs "$1" \
        && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$(basename "$DOCKERD")" ] \
        && [ "$(pidfile_of "$1" 2>/dev/null)" = "$PIDFILE" ]
}

# A live main daemon (named by the pidfile, or one starting that has not written it yet) means
# dockerd is already starting (another script, a previous run): then just wait for it. A pidfile
# naming anything else is stale: a killed dockerd leaves it behind, and the next one refuses to
# start over it ("pid file found"). So is the pidfile of the daemon's own containerd: dockerd
# takes a live pid in it for its containerd and gives up waiting for it to answer.
oldpid=""
if [ -f "$PIDFILE" ]; then
    oldpid=$(tr -dc '0-9' <"$PIDFILE" || true)
    if ! main_daemon "$oldpid"; then
        say "removing stale $PIDFILE (pid '${oldpid}' is not a live $(basename "$DOCKERD") of this pidfile)"
        as_root rm -f "$PIDFILE"
        oldpid=""
    fi
fi
if [ -z "$oldpid" ]; then
    for pid in $(pgrep -x "$(basename "$DOCKERD")" 2>/dev/null || true); do
        if main_daemon "$pid"; then oldpid=$pid; break; fi
    done
fi
if [ -n "$oldpid" ]; then
    say "dockerd (pid $oldpid) is running but does not answer yet; waiting up to ${WAIT}s"
else
    cpidfile=$EXEC_ROOT/containerd/containerd.pid
    if [ -f "$cpidfile" ]; then
        cpid=$(tr -dc '0-9' <"$cpidfile" || true)
        if ! pid_runs "$cpid" "$EXEC_ROOT/containerd/containerd.toml"; then
            say "removing stale $cpidfile (pid '${cpid}' is not this engine's containerd)"
            as_root rm -f "$cpidfile"
        fi
    fi
    as_root mkdir -p "$(dirname "$LOG")"
    say "starting $DOCKERD (log: $LOG)"
    # setsid + nohup: the daemon must outlive this shell, make, and CI's process group.
    as_root setsid nohup "$DOCKERD" >>"$LOG" 2>&1 </dev/null &
    disown || true
fi

deadline=$((SECONDS + WAIT))
while [ "$SECONDS" -lt "$deadline" ]; do
    if engine_answers; then
        say "engine is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
        exit 0
    fi
    sleep 1
done

say "error: the Docker engine did not answer 'docker info' within ${WAIT}s"
if [ -f "$LOG" ]; then
    say "last lines of $LOG:"
    tail -n 30 "$LOG" >&2 || true
fi
exit 1
