#!/usr/bin/env bash
# A first check of hvdbert on a GPU machine, in one command, without network: it builds Horovod with
# NCCL for this GPU's compute capability only, runs `horovodrun --check-build`, the GPU tests
# (tests/test_gpu.py: fp16 GradScaler, bf16, train.compile, non-blocking copies) and
# `hvdbert.bench` on BERT-large phase 1 (sequence 128) and phase 2 (sequence 512) shapes at 1 GPU
# in bf16 and fp16, then prints seq/s, MFU and peak memory beside NVIDIA's published per-GPU figures.
#
#   tools/gpu-check.sh --prepare DIR     where pip reaches PyPI: Horovod's sdist and the wheels a
#                                        GPU machine's Python 3.12 lacks, into DIR (at most 64 MiB)
#   tools/gpu-check.sh --dry-run [DIR]   print every command and check the inputs; needs no GPU
#   tools/gpu-check.sh [DIR]             run it (DIR: what --prepare wrote, default .gpu-carry)
#
# The GPU machine needs CUDA's torch, nvcc of torch's CUDA major version, cmake and a C++ compiler;
# Open MPI is optional (without mpicxx, Horovod is built with Gloo alone). Everything it writes goes
# to GPU_CHECK_OUT (default /tmp/hvdbert-gpu-check): the Horovod build's log, the bench results.
# Settings (environment): PYTHON (default python3), CUDA_HOME (default /usr/local/cuda),
# GPU_CHECK_STEPS (timed bench steps, default 20), GPU_CHECK_OUT.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
cuda_home=${CUDA_HOME:-/usr/local/cuda}
steps=${GPU_CHECK_STEPS:-20}
out=${GPU_CHECK_OUT:-/tmp/hvdbert-gpu-check}
max_carry_bytes=$((64 * 1024 * 1024))
# Wheels a GPU machine with CUDA torch, transformers and the usual scientific stack lacks: hvdbert's
# StableAdamW and Horovod's cffi. Versions: requirements.txt's pin where it has one.
carry_packages=(torch-optimi cffi pycparser)
usage="usage: tools/gpu-check.sh --prepare DIR | --dry-run [DIR] | [DIR]"

log() { printf '[gpu-check] %s\n' "$*" >&2; }
die() { log "$*"; exit 2; }
pin() { sed -n "s/^$1==\\([^ ;]*\\).*/\\1/p" "$root/requirements.txt"; }

horovod_version=$(pin horovod)
[ -n "$horovod_version" ] || die "$root/requirements.txt pins no horovod version"

mode=run
case "${1:-}" in
    --prepare) mode=prepare; shift; [ "$#" = 1 ] || die "$usage" ;;
    --dry-run) mode=dry-run; shift ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$1' ($usage)" ;;
esac
[ "$#" -le 1 ] || die "$usage"
carry=${1:-$root/.gpu-carry}

if [ "$mode" = prepare ]; then
    mkdir -p "$carry"
    pip_dl=("$py" -m pip download --quiet --no-deps --dest "$carry")
    "${pip_dl[@]}" --no-binary :all: "horovod==$horovod_version"
    for name in "${carry_packages[@]}"; do
        version=$(pin "$name")
        "${pip_dl[@]}" --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            "$name${version:+==$version}"
    done
fi

# --- the inputs: what the run needs, checked before anything is built --------------------------
[ -d "$carry" ] || die "no $carry: make it where pip reaches PyPI with tools/gpu-check.sh --prepare $carry"
sdist=$(find "$carry" -maxdepth 1 -name "horovod-$horovod_version.tar.gz" | head -n 1)
[ -n "$sdist" ] || die "$carry holds no horovod-$horovod_version.tar.gz (tools/gpu-check.sh --prepare $carry)"
carry_bytes=$(du -sb "$carry" | cut -f1)
[ "$carry_bytes" -le "$max_carry_bytes" ] || die "$carry holds $carry_bytes bytes, more than 64 MiB"
for name in "${carry_packages[@]}"; do
    wheel_name=${name//-/_}
    compgen -G "$carry/$wheel_name-*.whl" >/dev/null || die "$carry holds no wheel of $name (tools/gpu-check.sh --prepare $carry)"
done
for recipe in recipes/bert-large-phase1.toml recipes/bert-large-phase2.toml; do
    [ -f "$root/$recipe" ] || die "no $recipe in $root"
done
if [ "$mode" = prepare ]; then
    log "$carry is ready: $(find "$carry" -maxdepth 1 -type f | wc -l) files, $((carry_bytes / 1024)) KiB"
    exit 0
fi

venv=$out/venv
bench() { # bench NAME RECIPE PRECISION: one bench command line
    printf '%q ' "$venv/bin/python" -m hvdbert.bench --recipe "$2" --workers 1 --steps "$steps" --warmup-steps 3 \
        --set "train.precision=$3" --json "$out/bench-$1-$3.json" --output "$out/bench-$1-$3"
}
commands=(
    "mkdir -p $out && $py -m venv --system-site-packages $venv"
    "$venv/bin/python -m pip install --quiet --no-index --no-deps $carry/*.whl"
    "export PIP_NO_INDEX=1 PIP_FIND_LINKS=$carry HOROVOD_CUDA_CC_LIST=\$cc CUDA_HOME=$cuda_home HVDBERT_HOROVOD_MPI=\$mpi"
    "bash $root/tools/build-horovod.sh nccl $venv/bin/python $out/horovod-wheel > $out/horovod-build.log 2>&1 || { tail -n 40 $out/horovod-build.log; exit 1; }"
    "$venv/bin/horovodrun --check-build"
    "cd $root && PYTHONPATH=$root $venv/bin/python -m pytest tests/test_gpu.py -q -p no:cacheprovider"
    "cd $root && PYTHONPATH=$root $(bench phase1 recipes/bert-large-phase1.toml bf16)"
    "cd $root && PYTHONPATH=$root $(bench phase1 recipes/bert-large-phase1.toml fp16)"
    "cd $root && PYTHONPATH=$root $(bench phase2 recipes/bert-large-phase2.toml bf16)"
    "cd $root && PYTHONPATH=$root $(bench phase2 recipes/bert-large-phase2.toml fp16)"
    "$py $root/tools/gpu_check_report.py $out"
)

if [ "$mode" = dry-run ]; then
    "$py" -c 'import torch' 2>/dev/null || die "$py cannot import torch"
    log "inputs: $(basename "$sdist"), $(find "$carry" -maxdepth 1 -name '*.whl' | wc -l) wheels, $((carry_bytes / 1024)) KiB in $carry"
    log "cc: the compute capability of GPU 0; mpi: 1 where mpicxx is installed, else 0"
    for command in "${commands[@]}"; do
        printf '+ %s\n' "$command"
    done
    exit 0
fi

# --- the run ------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: this machine has no NVIDIA driver"
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || die "$py's torch sees no GPU (torch.cuda.is_available() is False)"
[ -x "$cuda_home/bin/nvcc" ] || die "no nvcc in CUDA_HOME=$cuda_home"
command -v cmake >/dev/null 2>&1 || die "no cmake on PATH"
cc=$("$py" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability(0))')
mpi=0
if command -v mpicxx >/dev/null 2>&1; then
    mpi=1
fi
export cc mpi
started=$(date +%s)
for command in "${commands[@]}"; do
    printf '+ %s\n' "$command" >&2
    eval "$command"
    log "$(($(date +%s) - started)) s so far"
done
