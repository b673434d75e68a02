#!/usr/bin/env bash
# Make sure a Python 3.11 base image for the example algorithms exists, and print its name.
#
#   bash scripts/ensure-base-image.sh [NAME]      # NAME defaults to $BASE_IMAGE or python:3.11-slim
#
# 1. NAME already present locally            -> print NAME.
# 2. `docker pull NAME` works (60 s bound)    -> print NAME.
# 3. otherwise build an equivalent offline:  debootstrap (minbase + python3) of Debian
#    bookworm into .build/rootfs-bookworm (a complete rootfs is reused), then `docker
#    import` it as algodock/python-base:3.11-bookworm (skipped when that image exists)
#    -> print algodock/python-base:3.11-bookworm.
#
# The image name to use is always the LAST line of stdout; all progress goes to stderr,
# so callers can do:  img=$(bash scripts/ensure-base-image.sh | tail -n1)
# The offline image has /usr/bin/python3 (3.11) and /usr/bin/python -> python3, like
# python:3.11-slim has both on its PATH.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${1:-${BASE_IMAGE:-python:3.11-slim}}
OFFLINE_IMAGE=${ALGODOCK_OFFLINE_BASE_IMAGE:-algodock/python-base:3.11-bookworm}
SUITE=${ALGODOCK_DEBIAN_SUITE:-bookworm}
MIRROR=${ALGODOCK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILD_DIR=${ALGODOCK_BUILD_DIR:-$ROOT/.build}
ROOTFS=$BUILD_DIR/rootfs-$SUITE
COMPLETE=$BUILD_DIR/rootfs-$SUITE.complete   # outside the rootfs: not part of the image
PULL_TIMEOUT=${ALGODOCK_PULL_TIMEOUT:-60}

say() { echo "ensure-base-image: $*" >&2; }

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! docker info >/dev/null 2>&1; then
    say "error: the Docker engine does not answer (run: bash scripts/ensure-docker.sh)"
    exit 1
fi

if have_image "$NAME"; then
    say "$NAME is present"
    echo "$NAME"
    exit 0
fi

say "pulling $NAME (up to ${PULL_TIMEOUT}s)"
if timeout "$PULL_TIMEOUT" docker pull "$NAME" >&2 2>&1 && have_image "$NAME"; then
    echo "$NAME"
    exit 0
fi
say "cannot pull $NAME; using the offline base $OFFLINE_IMAGE instead"

if have_image "$OFFLINE_IMAGE"; then
    say "$OFFLINE_IMAGE is present"
    echo "$OFFLINE_IMAGE"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    say "error: building the offline base image needs root (debootstrap)"
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    say "debootstrap is missing; installing it"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
fi

started=$SECONDS
mkdir -p "$BUILD_DIR"
if [ -f "$COMPLETE" ] && [ -x "$ROOTFS/usr/bin/python3" ]; then
    say "reusing the complete rootfs $ROOTFS"
else
    # A partial rootfs (interrupted run) cannot be resumed reliably: start over.
    rm -rf "$ROOTFS" "$COMPLETE"
    mkdir -p "$ROOTFS"
    say "debootstrap --variant=minbase --include=python3 $SUITE $ROOTFS $MIRROR"
    if ! debootstrap --variant=minbase --include=python3 "$SUITE" "$ROOTFS" "$MIRROR" >&2; then
        say "error: debootstrap failed; see $ROOTFS/debootstrap/debootstrap.log"
        tail -n 20 "$ROOTFS/debootstrap/debootstrap.log" >&2 2>/dev/null || true
        exit 1
    fi
    # `python` works too, as in python:3.11-slim.
    ln -sf python3 "$ROOTFS/usr/bin/python"
    # Slim it down: package caches and lists, docs, man pages, translations.
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
        "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* \
        "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/*.log \
        "$ROOTFS"/var/log/apt/* "$ROOTFS"/debootstrap
    chroot "$ROOTFS" python3 --version >&2
    touch "$COMPLETE"
fi
# also on a reused rootfs (e.g. one made by an older version of this script)
ln -sf python3 "$ROOTFS/usr/bin/python"

say "importing $ROOTFS as $OFFLINE_IMAGE"
# /dev, /proc and /sys are provided by the runtime: import them empty.
tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -C "$ROOTFS" -c . \
    | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["python3"]' \
        -c "LABEL io.algodock.base=offline io.algodock.base.suite=$SUITE" \
        -m "algodock offline python base: debootstrap $SUITE minbase + python3" \
        - "$OFFLINE_IMAGE" >&2

# smoke test: both interpreter names work
docker run --rm --network none "$OFFLINE_IMAGE" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' >&2
docker run --rm --network none "$OFFLINE_IMAGE" python -c 'import sqlite3, json, ssl' >&2
say "built $OFFLINE_IMAGE in $((SECONDS - started))s"
echo "$OFFLINE_IMAGE"
