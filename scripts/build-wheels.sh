#!/usr/bin/env bash
# Install the example algorithms' Python dependencies on the HOST into each example's
# build context (examples/<algo>/.wheels, gitignored), for the image's Python:
# CPython 3.11, manylinux_2_28 x86_64. The Dockerfiles then `COPY .wheels /opt/pylib` with
# PYTHONPATH=/opt/pylib. Nothing is installed from inside `docker build` (containers do
# not trust this machine's certificates and may have no network at all).
#
#   bash scripts/build-wheels.sh [ALGO_DIR...]     # default: every examples/*/Dockerfile dir
#
# Idempotent: a folder that already holds the wanted version is left alone.
# Env: PIP (default .venv/bin/pip, else python3 -m pip), PYARROW_VERSION (default: the
# pin in pyproject.toml), WHEEL_PLATFORM (manylinux_2_28_x86_64), WHEEL_PYTHON (3.11).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { echo "build-wheels: $*" >&2; }

if [ -z "${PIP:-}" ]; then
    if [ -x .venv/bin/pip ]; then PIP=".venv/bin/pip"; else PIP="python3 -m pip"; fi
fi
if [ -z "${PYARROW_VERSION:-}" ]; then
    PYARROW_VERSION=$(sed -n 's/.*"pyarrow==\([^"]*\)".*/\1/p' pyproject.toml | head -n1)
    PYARROW_VERSION=${PYARROW_VERSION:-26.0.1}
fi
PLATFORM=${WHEEL_PLATFORM:-manylinux_2_28_x86_64}
PYVER=${WHEEL_PYTHON:-3.11}

# Same requirement list for every example (they only need pyarrow).
REQS=("pyarrow==$PYARROW_VERSION")

if [ "$#" -gt 0 ]; then
    dirs=("$@")
else
    dirs=()
    for f in examples/*/Dockerfile; do dirs+=("$(dirname "$f")"); done
fi

done_dir=""  # a folder already holding "$want": copy it instead of installing again
for d in "${dirs[@]}"; do
    target="$d/.wheels"
    marker="$target/.algodock-reqs"
    want="${REQS[*]} $PLATFORM cp$PYVER"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
        say "$target is up to date ($want)"
        done_dir=$target
        continue
    fi
    rm -rf "$target.tmp"
    if [ -n "$done_dir" ]; then
        say "copying $done_dir to $target"
        cp -a "$done_dir" "$target.tmp"
    else
        say "installing ${REQS[*]} into $target ($PLATFORM, cp$PYVER)"
        # shellcheck disable=SC2086
        $PIP install --quiet --disable-pip-version-check --no-warn-script-location \
            --target "$target.tmp" --platform "$PLATFORM" --only-binary=:all: \
            --python-version "$PYVER" --implementation cp "${REQS[@]}" >&2
        rm -rf "$target.tmp/bin"
        echo "$want" >"$target.tmp/.algodock-reqs"
    fi
    rm -rf "$target"
    mv "$target.tmp" "$target"
    done_dir=$target
done
