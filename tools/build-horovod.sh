#!/usr/bin/env bash
# Compiles Horovod, at the version requirements.txt pins, against the torch already installed in
# PYTHON's environment, installs it there and checks the result with `horovodrun --check-build`.
#
#   tools/build-horovod.sh cpu  PYTHON WHEEL_DIR   PyTorch, MPI and Gloo            (tools/setup.sh)
#   tools/build-horovod.sh nccl PYTHON WHEEL_DIR   the same plus NCCL GPU operations (Dockerfile,
#                                                   tools/check-gpu-build.sh)
#   tools/build-horovod.sh cc-list                 prints the compute capabilities a nccl build
#                                                   compiles Horovod's CUDA kernels for
#   tools/build-horovod.sh wheel-name cpu|nccl PYTHON
#                                                   prints the name of the wheel cache's directory
#                                                   for such a build (tools/setup.sh, Dockerfile)
#
# The one place the build's commands live, so that the image, the GPU build check and `make setup`
# cannot drift apart. The wheel goes to WHEEL_DIR; when WHEEL_DIR already holds a Horovod wheel it
# is installed without compiling (tools/setup.sh caches it that way; the others pass a fresh one).
#
# Settings (environment): CUDA_HOME (default /usr/local/cuda), HOROVOD_CUDA_CC_LIST (compute
# capabilities, comma-separated; default: the GPU generations below that this nvcc can compile for)
# and HVDBERT_HOROVOD_MPI (1, the default: with the MPI controller, which needs Open MPI's mpicxx;
# 0: Gloo alone, for a machine without Open MPI, as tools/gpu-check.sh does there).
set -euo pipefail

usage="usage: tools/build-horovod.sh cpu|nccl PYTHON WHEEL_DIR, tools/build-horovod.sh cc-list, or tools/build-horovod.sh wheel-name cpu|nccl PYTHON"
log() { printf '[build-horovod] %s\n' "$*" >&2; }
die() { log "$*"; exit 2; }

cuda_home=${CUDA_HOME:-/usr/local/cuda}

# Compute capabilities for Horovod's CUDA kernels: V100, T4, A100, A10/A40, L4/L40, H100/H200, B200,
# RTX 50xx/RTX PRO 6000, each where this nvcc still compiles for it: CUDA 13 dropped Volta (sm_70),
# CUDA 12 before 12.8 knows no Blackwell (sm_100, sm_120). HOROVOD_CUDA_CC_LIST overrides the list.
# Horovod's own default is every architecture nvcc lists, which multiplies the compile time.
cc_list() {
    if [ -n "${HOROVOD_CUDA_CC_LIST:-}" ]; then
        printf '%s\n' "$HOROVOD_CUDA_CC_LIST"
        return
    fi
    [ -x "$cuda_home/bin/nvcc" ] || die "no nvcc in CUDA_HOME=$cuda_home (set CUDA_HOME to the CUDA toolkit)"
    local supported list="" cc
    supported=" $("$cuda_home/bin/nvcc" --list-gpu-code | sed -n 's/^sm_\([0-9]*\)$/\1/p' | tr '\n' ' ') "
    for cc in 70 75 80 86 89 90 100 120; do
        if [[ "$supported" == *" $cc "* ]]; then
            list=${list:+$list,}$cc
        fi
    done
    [ -n "$list" ] || die "$cuda_home/bin/nvcc compiles for none of the GPU generations tools/build-horovod.sh lists"
    printf '%s\n' "$list"
}

if [ "${1:-}" = cc-list ] && [ "$#" = 1 ]; then
    cc_list
    exit 0
fi
wheel_name=0
if [ "${1:-}" = wheel-name ] && [ "$#" = 3 ]; then
    wheel_name=1
    shift
    set -- "$1" "$2" ""
fi
[ "$#" = 3 ] || die "$usage"
mode=$1 py=$2 wheel_dir=$3
case "$mode" in cpu | nccl) ;; *) die "unknown mode '$mode': cpu or nccl ($usage)" ;; esac
[ -x "$py" ] || die "PYTHON '$py' is not an executable interpreter ($usage)"

root=$(cd "$(dirname "$0")/.." && pwd)
requirements=$root/requirements.txt
horovod_version=$(sed -n 's/^horovod==\([^ ;]*\).*/\1/p' "$requirements")
torch_version=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$requirements")
[ -n "$horovod_version" ] || die "$requirements pins no horovod version"
[ -n "$torch_version" ] || die "$requirements pins no torch version"

# torch's CUDA version, empty for a CPU build, which mode nccl refuses.
torch_cuda_of() {
    local cuda
    cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")') \
        || die "torch is not importable by $py: install torch==$torch_version first"
    if [ "$mode" = nccl ] && [ -z "$cuda" ]; then
        die "the torch in $py is a CPU build; mode nccl needs a CUDA build of torch==$torch_version"
    fi
    printf '%s\n' "$cuda"
}

# The wheel cache's name for this build: the versions, the interpreter and machine, and this
# script's own hash, so that a changed build (a mend here) compiles anew; a nccl build adds the
# CUDA version of torch and the compute capabilities. Spelled here once for tools/setup.sh and the
# Dockerfile, whose caches then hold each other's wheels.
if [ "$wheel_name" = 1 ]; then
    py_tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])') \
        || die "PYTHON '$py' does not run"
    name=horovod-$horovod_version-torch-$torch_version-$py_tag-$(uname -m)-build$(sha256sum "$0" | cut -c1-12)
    if [ "$mode" = nccl ]; then
        cuda=$(torch_cuda_of)
        name=$name-cuda$cuda-cc$(cc_list | tr , _)
    fi
    printf '%s\n' "$name"
    exit 0
fi

# Every install below is constrained to the pinned torch, so nothing can swap in another build.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'torch==%s\n' "$torch_version" > "$work/constraints.txt"
torch_cuda=$(torch_cuda_of)

# Horovod 0.28.1 compiles its PyTorch extension with -std=c++14, but torch >= 2.1 headers need
# C++17. gcc honours the last -std flag, so CXX is a wrapper that appends -std=c++17 (upstream
# fixed this in pull request 3998, after its last release). Horovod makes CXX nvcc's host compiler
# too, and nvcc's front end parses CUDA code (Horovod's kernels: C++11) in the standard nvcc was
# given: the host compiler must not switch to C++17 under it (gcc 12's headers then declare C++17
# features that nvcc rejects). nvcc's calls are the ones that define __CUDA_ARCH_LIST__.
#
# The same wrapper gives every g++ call GLOO_USE_AVX=1, the first of the two mends that Gloo's
# float16 sum needs (see below): gloo/math.h declares the AVX/F16C specialisation only when
# GLOO_USE_AVX is set, and it never includes the config.h where Gloo's CMake would set it.
cat > "$work/cxx" <<'EOF'
#!/bin/sh
case "$*" in
    *-D__CUDA_ARCH_LIST__=*) exec g++ "$@" ;;
esac
exec g++ "$@" -std=c++17 -DGLOO_USE_AVX=1
EOF
chmod +x "$work/cxx"
build_env=(
    CXX="$work/cxx"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    MAKEFLAGS="-j$(nproc)"
)
needed=(PyTorch Gloo)
case "${HVDBERT_HOROVOD_MPI:-1}" in
    1) build_env+=(HOROVOD_WITH_MPI=1); needed+=(MPI) ;;
    0) build_env+=(HOROVOD_WITHOUT_MPI=1) ;;
    *) die "HVDBERT_HOROVOD_MPI=$HVDBERT_HOROVOD_MPI: 1 (with MPI) or 0 (Gloo alone)" ;;
esac

if [ "$mode" = nccl ]; then
    [ -x "$cuda_home/bin/nvcc" ] || die "no nvcc in CUDA_HOME=$cuda_home (set CUDA_HOME to the CUDA toolkit)"
    nvcc_cuda=$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    [ "${nvcc_cuda%%.*}" = "${torch_cuda%%.*}" ] \
        || die "nvcc in $cuda_home is CUDA $nvcc_cuda but torch was built with CUDA $torch_cuda: use one CUDA major version"

    # NCCL: the one torch depends on (the nvidia-nccl wheel: headers and library), so that one NCCL
    # serves both. Horovod's FindNCCL looks for libnccl.so, the wheel ships only libnccl.so.2: a
    # link in the work directory provides the name without touching the installed package. The
    # extension records libnccl.so.2 (the soname), which `import torch` has loaded before Horovod.
    # Every directory of the interpreter's path: a venv with --system-site-packages sees the
    # system's torch and its nvidia wheels there.
    sites=$("$py" -c 'import sys, os; print("\n".join(p for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))))')
    nccl_lib=""
    while IFS= read -r site; do
        [ -n "$site" ] && [ -z "$nccl_lib" ] || continue
        nccl_lib=$(find "$site/nvidia" -name libnccl.so.2 2>/dev/null | head -n 1)
    done <<<"$sites"
    [ -n "$nccl_lib" ] || die "torch brought no NCCL: no libnccl.so.2 under an nvidia/ directory of $py's path (the nvidia-nccl wheel)"
    nccl_home=$(dirname "$(dirname "$nccl_lib")")
    mkdir "$work/nccl-lib"
    ln -s "$nccl_lib" "$work/nccl-lib/libnccl.so"

    cuda_cc_list=$(cc_list)
    log "CUDA $nvcc_cuda (torch: CUDA $torch_cuda), compute capabilities $cuda_cc_list, NCCL from $nccl_home"

    # The CUDA driver stubs stand in for libcuda at link time when the machine has no GPU driver.
    build_env+=(
        HOROVOD_GPU_OPERATIONS=NCCL
        HOROVOD_NCCL_INCLUDE="$nccl_home/include"
        HOROVOD_NCCL_LIB="$work/nccl-lib"
        HOROVOD_NCCL_LINK=SHARED
        HOROVOD_CUDA_HOME="$cuda_home"
        # torch's cpp_extension (which Horovod asks for the CUDA libraries to link) otherwise takes
        # the directory above the first nvcc on PATH, which can be a wrapper outside the toolkit.
        CUDA_HOME="$cuda_home"
        HOROVOD_BUILD_CUDA_CC_LIST="$cuda_cc_list"
        LIBRARY_PATH="$cuda_home/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
    )
    needed+=(NCCL)
fi

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "compiling Horovod $horovod_version ($mode) against torch $torch_version"
    mkdir -p "$wheel_dir"
    # The second mend: Gloo's CMakeLists leaves out gloo/math.cc, the file that holds the AVX/F16C
    # float16 sum. Without both mends every float16 allreduce (dist.compression = fp16) is summed
    # one element at a time in software, at twice float32's time for half its bytes
    # (docs/performance.md). The source is the release's sdist, patched here.
    "$py" -m pip download --no-deps --no-binary :all: --no-build-isolation -q \
        "horovod==$horovod_version" -d "$work/sdist"
    tar -xzf "$work/sdist/horovod-$horovod_version.tar.gz" -C "$work/sdist"
    source_dir=$work/sdist/horovod-$horovod_version
    gloo_lists=$source_dir/third_party/gloo/gloo/CMakeLists.txt
    if ! grep -q '/math\.cc"' "$gloo_lists"; then
        # shellcheck disable=SC2016 # ${CMAKE_CURRENT_SOURCE_DIR} is CMake's, written as it is
        sed -i 's|^\(  *\)"${CMAKE_CURRENT_SOURCE_DIR}/types\.cc"$|&\n\1"${CMAKE_CURRENT_SOURCE_DIR}/math.cc"|' "$gloo_lists"
        grep -q '/math\.cc"' "$gloo_lists" || die "could not add math.cc to $gloo_lists (Gloo's layout changed)"
    fi
    # --no-build-isolation: the build must see the installed torch, not a fresh one.
    env "${build_env[@]}" "$py" -m pip wheel --no-build-isolation --no-deps --no-cache-dir \
        -c "$work/constraints.txt" "$source_dir" -w "$work/out"
    mv "$work"/out/horovod-*.whl "$wheel_dir"/
fi
log "installing $(basename "$(ls "$wheel_dir"/horovod-*.whl)")"
"$py" -m pip install --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
# Horovod's own run-time dependencies (cloudpickle, psutil, ...), which the first install skipped.
"$py" -m pip install -c "$work/constraints.txt" "$wheel_dir"/horovod-*.whl

# Fail here, not in the first job, when Horovod lacks a piece. Without a GPU driver, the driver
# stub (when the toolkit has one) stands in for libcuda.so.1 so that the extension can load.
check_env=()
if [ "$mode" = nccl ] && [ -e "$cuda_home/lib64/stubs/libcuda.so" ]; then
    mkdir "$work/stubs"
    ln -s "$cuda_home/lib64/stubs/libcuda.so" "$work/stubs/libcuda.so.1"
    check_env+=(LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$work/stubs")
fi
check=$(env "${check_env[@]}" "$(dirname "$py")/horovodrun" --check-build)
printf '%s\n' "$check"
for piece in "${needed[@]}"; do
    grep -q "\[X\] $piece" <<<"$check" || { log "Horovod was built without $piece"; exit 1; }
done
# Gloo's float16 sum is the vectorised one (F16C's vcvtph2ps), not the element-wise fallback. The
# extension is found without importing it (a nccl build needs libcuda to load).
if command -v objdump >/dev/null; then
    extension=$("$py" -c 'import glob, importlib.util, os; d = importlib.util.find_spec("horovod").submodule_search_locations[0]; print(glob.glob(os.path.join(d, "torch", "mpi_lib_v2*.so"))[0])')
    objdump -d -C "$extension" \
        | awk '/^[0-9a-f]+ <void gloo::sum<gloo::float16>\(void\*, void const\*, void const\*, unsigned long\)>:/ { body = 1; next }
               body && /^$/ { body = 0 }
               body && /vcvtph2ps/ { found = 1 }
               END { exit !found }' \
        || { log "Horovod's Gloo sums float16 element by element: gloo/math.cc or GLOO_USE_AVX is missing"; exit 1; }
    needed+=("Gloo's AVX float16 sum")
fi
log "Horovod $horovod_version has ${needed[*]}"
