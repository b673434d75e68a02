#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`, installing and starting one if needed.
#
#   bash scripts/ensure-docker.sh
#
# - exits 0 at once when `docker info` already answers (idempotent; never restarts a
#   running engine);
# - otherwise installs docker.io (Debian) when `dockerd` is missing, removes a stale
#   /var/run/docker.pid left by a killed dockerd ("pid file found ... Is docker already
#   running?"), starts dockerd in the background (setsid + nohup, log in
#   $ALGODOCK_DOCKERD_LOG) and waits up to $ALGODOCK_DOCKERD_WAIT seconds for it;
# - also installs busybox-static (/bin/busybox, used by tests to build tiny FROM scratch
#   images) and debootstrap (offline base image, see ensure-base-image.sh) when missing.
#
# Progress goes to stderr. Needs root for the install/start part.
set -euo pipefail

LOG=${ALGODOCK_DOCKERD_LOG:-/var/log/algodock-dockerd.log}
WAIT=${ALGODOCK_DOCKERD_WAIT:-60}
PIDFILE=${ALGODOCK_DOCKERD_PIDFILE:-/var/run/docker.pid}
DOCKERD=${ALGODOCK_DOCKERD:-dockerd}

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

# A live pid file or process means dockerd is already starting (another script, a
# previous run): then just wait for it. A pid file whose pid is dead is stale: a killed
# dockerd leaves it behind and the next one refuses to start ("pid file found").
oldpid=""
if [ -f "$PIDFILE" ]; then
    oldpid=$(tr -dc '0-9' <"$PIDFILE" || true)
    if [ -z "$oldpid" ] || ! kill -0 "$oldpid" 2>/dev/null \
        || [ "$(cat "/proc/$oldpid/comm" 2>/dev/null)" != "$(basename "$DOCKERD")" ]; then
        say "removing stale $PIDFILE (pid '${oldpid}' is not a live $(basename "$DOCKERD"))"
        as_root rm -f "$PIDFILE"
        oldpid=""
    fi
fi
if [ -n "$oldpid" ] || pgrep -x "$(basename "$DOCKERD")" >/dev/null 2>&1; then
    say "dockerd is running but does not answer yet; waiting up to ${WAIT}s"
else
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
