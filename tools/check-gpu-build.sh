#!/usr/bin/env bash
# Performs the Docker image's Horovod build (CUDA torch, NCCL GPU operations, MPI and Gloo) on this
# machine, outside Docker, with the same script the Dockerfile runs (tools/build-horovod.sh), and
# ends with one summary line. Needs CUDA's compiler (nvcc) but no GPU and no Docker engine.
#
#   bash tools/check-gpu-build.sh
#
# Not part of `make test`: it downloads the CUDA build of torch and its CUDA libraries (several GB)
# and compiles Horovod's CUDA kernels for every GPU generation (75 minutes on 2 busy cores).
#
# Settings (environment):
#   GPU_VENV         the virtual environment it builds in (default $HVDBERT_CACHE/gpu-venv,
#                    HVDBERT_CACHE defaulting to ~/.cache/hvdbert): outside the repository, so the
#                    CUDA torch never mixes with the one `make setup` installs in .venv
#   TORCH_INDEX_URL  where the CUDA torch comes from (default https://pypi.org/simple, whose Linux
#                    x86_64 torch is a CUDA build; the Dockerfile names download.pytorch.org/whl/cuXYZ)
#   CUDA_HOME, HOROVOD_CUDA_CC_LIST   passed to tools/build-horovod.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HVDBERT_CACHE:-$HOME/.cache/hvdbert}
venv=${GPU_VENV:-$cache/gpu-venv}
index=${TORCH_INDEX_URL:-https://pypi.org/simple}
started=$(date +%s)

log() { printf '[check-gpu-build] %s\n' "$*" >&2; }
summary() { # summary OUTCOME DETAIL: the one line this script ends with
    printf 'check-gpu-build: %s: %s (%ss)\n' "$1" "$2" "$(($(date +%s) - started))"
}
fail() { summary FAILED "$*"; exit 1; }

mkdir -p "$(dirname "$venv")"
case "$(cd "$(dirname "$venv")" && pwd)/" in
    "$root"/*) log "GPU_VENV=$venv is inside the repository; use a path outside it"; exit 2 ;;
esac

# The install must take torch from the index named here and nothing else: a machine's pip
# configuration (find-links, extra indexes, constraints) can hold a CPU build of the same version,
# and pip ranks 2.13.0+cpu above 2.13.0. Only this script's processes drop it.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi
py=$venv/bin/python

# torch as the Dockerfile installs it: the pinned version, alone, from the CUDA index.
torch_version=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$root/requirements.txt")
[ -n "$torch_version" ] || fail "requirements.txt pins no torch version"
log "installing torch==$torch_version from $index (a CUDA build: several GB the first time)"
"$py" -m pip install -q --index-url "$index" "torch==$torch_version" || fail "could not install torch==$torch_version from $index"
torch_cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")')
[ -n "$torch_cuda" ] || fail "$index gave a CPU build of torch==$torch_version; set TORCH_INDEX_URL to a CUDA index"

# The build itself, into a fresh wheel directory, so every run compiles as `docker build` would.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
build_log=$cache/check-gpu-build.log
log "building Horovod (log: $build_log)"
if ! bash "$root/tools/build-horovod.sh" nccl "$py" "$wheels" > "$build_log" 2>&1; then
    tail -n 30 "$build_log" >&2
    fail "the Horovod build failed, see $build_log"
fi
# `horovodrun --check-build`, as build-horovod.sh printed it (it has already required every piece).
grep -E '^(Horovod v|Available |    \[[X ]\] )' "$build_log"
pieces=$(grep -Eo '\[X\] (PyTorch|NCCL|MPI|Gloo) *$' "$build_log" | sed 's/ *$//' | sort -u | tr '\n' ' ')
horovod=$("$py" -c 'import horovod; print(horovod.__version__)')
summary OK "Horovod $horovod for torch $torch_version (CUDA $torch_cuda), CUDA kernels for compute capabilities $(bash "$root/tools/build-horovod.sh" cc-list): ${pieces% }"
