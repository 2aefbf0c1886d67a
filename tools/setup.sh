#!/usr/bin/env bash
# Installs everything hvdbert needs into $VENV (default .venv) on a fresh Linux machine:
# OpenMPI (Debian packages, when missing and we are root), torch, Horovod compiled with
# PyTorch + Gloo + MPI, and the Python packages pinned in requirements.txt.
#
# Idempotent: a stamp records what was installed; when requirements.txt and this script are
# unchanged, a re-run returns in seconds. The compiled Horovod wheel is cached outside the
# repository ($HVDBERT_CACHE, default ~/.cache/hvdbert) so a new clone or a new venv does not
# recompile it (about 8 minutes on 2 cores).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
cache=${HVDBERT_CACHE:-$HOME/.cache/hvdbert}
requirements=$root/requirements.txt

log() { printf '[setup] %s\n' "$*" >&2; }
pin() { # pin NAME -> the version requirements.txt pins for NAME
    local version
    version=$(sed -n "s/^$1==\\([^ ]*\\).*/\\1/p" "$requirements")
    [ -n "$version" ] || { log "requirements.txt pins no version for $1"; exit 2; }
    printf '%s' "$version"
}

stamp_file=$venv/.hvdbert-setup
stamp=$(cat "$requirements" "$0" "$root/tools/build-horovod.sh" "$root/setup.py" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -x "$venv/bin/horovodrun" ]; then
    log "up to date ($venv)"
    exit 0
fi

# --- OpenMPI: Horovod's MPI controller and mpi4py compile against it.
if ! command -v mpicxx >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        log "installing OpenMPI from Debian packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends libopenmpi-dev openmpi-bin >/dev/null
    else
        log "OpenMPI is missing and this is not root: install libopenmpi-dev and openmpi-bin, then re-run"
        exit 2
    fi
fi

# --- The virtual environment.
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
fi
py=$venv/bin/python
"$py" -m pip install -q --upgrade pip wheel setuptools

# torch first, by itself: later installs are constrained to this exact version, so nothing can
# pull a different (for example CUDA) build.
torch_version=$(pin torch)
constraints=$venv/hvdbert-constraints.txt
printf 'torch==%s\n' "$torch_version" > "$constraints"
log "installing torch==$torch_version"
"$py" -m pip install -q "torch==$torch_version"

log "installing the pinned Python packages"
grep -vE '^(torch|horovod)==' "$requirements" | "$py" -m pip install -q -c "$constraints" -r /dev/stdin

# --- Horovod, compiled once per (Horovod, torch, Python) and cached as a wheel; tools/build-horovod.sh
# (shared with the Dockerfile) compiles it, installs it and checks it with `horovodrun --check-build`.
horovod_version=$(pin horovod)
# The name carries the build script's own hash: a changed build (a mend in it) compiles anew.
wheel_dir=$cache/wheels/$(bash "$root/tools/build-horovod.sh" wheel-name cpu "$py")
if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "compiling Horovod $horovod_version against torch $torch_version (several minutes, once)"
fi
if ! bash "$root/tools/build-horovod.sh" cpu "$py" "$wheel_dir" >"$venv/horovod-build.log" 2>&1; then
    tail -n 30 "$venv/horovod-build.log" >&2
    log "building or checking Horovod failed (log: $venv/horovod-build.log); remove $wheel_dir and re-run"
    exit 1
fi

log "installing hvdbert (editable)"
"$py" -m pip install -q --no-deps --no-build-isolation -e "$root"

printf '%s' "$stamp" > "$stamp_file"
log "done: $venv"
