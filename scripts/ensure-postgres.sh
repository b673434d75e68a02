#!/usr/bin/env bash
# Make sure Debian's PostgreSQL server binaries are installed; print their folder.
#
#   PGBIN=$(bash scripts/ensure-postgres.sh | tail -n1)     # e.g. /usr/lib/postgresql/15/bin
#
# - prints the newest /usr/lib/postgresql/*/bin holding initdb, at once when one exists;
# - otherwise installs the package postgresql (no recommends) first. The package's own
#   cluster (15/main, a system service on localhost:5432) is not created: algodock starts
#   its clusters itself (scripts/cluster-up.sh, tests/pg_server.py), each on 127.0.0.1 only.
#
# Progress goes to stderr. Needs root (or sudo) for the install.
set -euo pipefail

say() { echo "ensure-postgres: $*" >&2; }

pg_bin() {
    local initdb
    initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$initdb" ] && dirname "$initdb"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        say "need root to run: $*"; return 1
    fi
}

if ! pg_bin >/dev/null; then
    say "installing Debian's postgresql"
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.d/algodock.conf >/dev/null
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
fi
bin=$(pg_bin) || { say "no /usr/lib/postgresql/*/bin/initdb after the install"; exit 1; }
echo "$bin"
