# syntax=docker/dockerfile:1
# hvdbert for clusters: Open MPI, PyTorch, Horovod (MPI and Gloo controllers; NCCL tensor operations
# in the CUDA variant) and hvdbert, with SSH for multi-node runs, running as the non-root user hvdbert.
#
#   docker build -t hvdbert .
#   docker run --rm --gpus all --ipc=host hvdbert launch/local.sh -n 8 --recipe recipes/bert-base-phase1.toml
#
# (8 workers split BERT-base phase 1's global batch; the default tiny recipe takes 1 or 2.)
#
# VARIANT picks the build: `cuda` (the default) is the GPU image (a CUDA base, PyTorch's CUDA
# build, Horovod with NCCL); `cpu` is the same image for CPUs (a Debian base, PyTorch's CPU build,
# Horovod with MPI and Gloo), for example
#   docker build --build-arg VARIANT=cpu --build-arg BASE_IMAGE=debian:bookworm -t hvdbert:cpu .
#   docker run --rm hvdbert:cpu launch/local.sh -n 2 --set train.max_steps=20
# `make image` (tools/build-image.sh) builds either with docker, podman or buildah.
#
# Python package versions come from requirements.txt alone (torch and horovod included), so the
# image and `make setup` install the same versions; nothing here names a version of them.
# CUDA_IMAGE and TORCH_INDEX_URL must name the same CUDA version, one that the pinned torch is
# published for (https://download.pytorch.org/whl/ lists them): for example
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 -t hvdbert .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
# The base image: CUDA_IMAGE unless named (the cpu variant names a Debian or Ubuntu release with
# Python 3.10 or later, e.g. debian:bookworm).
ARG BASE_IMAGE=${CUDA_IMAGE}
FROM ${BASE_IMAGE}

ARG VARIANT=cuda
# Where torch comes from. Empty: PyTorch's index for the variant (https://download.pytorch.org/whl/
# cu128 for cuda, .../whl/cpu for cpu); `pip`: the indexes pip is configured with in the build.
ARG TORCH_INDEX_URL=
# Compute capabilities Horovod compiles its CUDA kernels for, comma-separated. Empty: the GPU
# generations from V100 to Blackwell that this CUDA version compiles for (tools/build-horovod.sh).
ARG HOROVOD_CUDA_CC_LIST=
# A directory, inside the build, that keeps compiled Horovod wheels across builds (a volume the
# build engine mounts, as tools/build-image.sh does with podman and buildah). Empty: compile afresh.
ARG HOROVOD_WHEEL_CACHE=
ARG USER_UID=1000
# sshd runs as the non-root user, so it listens on a port above 1024.
ARG SSH_PORT=2222
# A pip configuration file for the build's own installs (a CA bundle, local indexes), in a volume
# the build engine mounts (tools/build-image.sh does): a build argument, so the image keeps none.
ARG PIP_CONFIG_FILE

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# PATH is spelled out: a base image made from a file system (podman import) defines none.
# Open MPI (Horovod's MPI controller, mpi4py, mpirun), a compiler and CMake to build Horovod, SSH
# for horovodrun/mpirun across hosts, and ip/ps for looking around when a job hangs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv build-essential cmake \
        openmpi-bin libopenmpi-dev openssh-client openssh-server \
        ca-certificates iproute2 procps \
    && rm -rf /var/lib/apt/lists/*

# The Ubuntu base image has a user `ubuntu` with uid 1000; hvdbert takes that uid (the one the
# Kubernetes example runs as).
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid "${USER_UID}" --shell /bin/bash hvdbert

# pip's own build tools float (as in tools/setup.sh); the packages hvdbert uses are pinned below.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --upgrade pip setuptools wheel

# The checkout belongs to hvdbert, so that runs/ and caches can be written below it; WORKDIR alone
# would leave the directory to root.
RUN install -d -o "${USER_UID}" -g "${USER_UID}" /opt/hvdbert
WORKDIR /opt/hvdbert
COPY requirements.txt ./

# torch first, alone, as the variant's build from its index at the version requirements.txt pins
# (the cpu variant asks for the local version +cpu, so a CUDA build cannot slip in). Every later
# install is constrained to that version, so nothing can swap in another build.
# hadolint ignore=DL3013
RUN torch_version="$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' requirements.txt)" \
    && if [ -z "${torch_version}" ]; then echo "requirements.txt pins no torch version" >&2; exit 1; fi \
    && case "${VARIANT}" in \
        cuda) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" torch_spec="torch==${torch_version}" \
              check='assert torch.version.cuda, "torch was installed without CUDA"' ;; \
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" torch_spec="torch==${torch_version}+cpu" \
             check='assert torch.version.cuda is None, "the cpu variant got a CUDA build of torch"' ;; \
        *) echo "VARIANT=${VARIANT}: cuda or cpu" >&2; exit 1 ;; \
    esac \
    && if [ "${index}" = pip ]; then index=; fi \
    && pip install ${index:+--index-url "${index}"} "${torch_spec}" \
    && printf 'torch==%s\n' "${torch_version}" > /opt/venv/constraints.txt \
    && python -c "import torch; ${check}; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The other pinned packages, Horovod aside (it is compiled below).
RUN grep -vE '^(torch|horovod)==' requirements.txt \
    | pip install -c /opt/venv/constraints.txt -r /dev/stdin

# Horovod, compiled against this torch with both controllers (and NCCL GPU operations in the cuda
# variant), then checked with `horovodrun --check-build` (a build without PyTorch, NCCL, MPI or Gloo
# fails here, not in the first job). tools/build-horovod.sh holds the build's commands, the same that
# tools/setup.sh and tools/check-gpu-build.sh run: the NCCL of torch's nvidia-nccl wheel, the C++17
# compiler wrapper, the CUDA driver stubs at link time, the compute capabilities this CUDA version
# compiles for, Gloo's AVX float16 sum. With HOROVOD_WHEEL_CACHE the wheel is kept there under the
# name tools/setup.sh uses (versions and the build script's hash; plus the CUDA version and compute
# capabilities for nccl), and a kept wheel is installed as is.
COPY tools/build-horovod.sh tools/
RUN case "${VARIANT}" in cuda) horovod_mode=nccl ;; *) horovod_mode=cpu ;; esac \
    && wheel_dir=/tmp/horovod-wheel \
    && if [ -n "${HOROVOD_WHEEL_CACHE}" ]; then \
        wheel_dir="${HOROVOD_WHEEL_CACHE}/$(bash tools/build-horovod.sh wheel-name "${horovod_mode}" /opt/venv/bin/python)"; \
    fi \
    && bash tools/build-horovod.sh "${horovod_mode}" /opt/venv/bin/python "${wheel_dir}" \
    && rm -rf /tmp/horovod-wheel

# SSH between containers for horovodrun, mpirun and the Kubeflow MPI Operator. Workers run
# `/usr/sbin/sshd -De -f /home/hvdbert/.sshd_config` as hvdbert; the key pair and authorized_keys
# are mounted into /home/hvdbert/.ssh (the MPI Operator does it through sshAuthMountPath).
RUN printf 'Host *\n    Port %s\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n' \
        "${SSH_PORT}" > /etc/ssh/ssh_config.d/hvdbert.conf \
    && printf 'Port %s\nPidFile /home/hvdbert/.sshd.pid\nHostKey /home/hvdbert/.ssh/id_rsa\nAuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\nStrictModes no\n' \
        "${SSH_PORT}" > /home/hvdbert/.sshd_config \
    && chown hvdbert:hvdbert /home/hvdbert/.sshd_config

# hvdbert itself; the checkout (recipes/, launch/) stays in /opt/hvdbert, the working directory,
# owned by hvdbert. The package is installed from a copy, so that pip's build/ and egg-info (root's)
# do not land in the checkout.
COPY --chown=hvdbert:hvdbert . /opt/hvdbert
# hadolint ignore=DL3013
RUN src="$(mktemp -d)" \
    && cp -a /opt/hvdbert/. "${src}" \
    && pip install --no-deps --no-build-isolation "${src}" \
    && rm -rf "${src}" \
    && python -P -c 'import hvdbert'

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${USER_UID}
EXPOSE ${SSH_PORT}
CMD ["bash"]
