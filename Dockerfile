# syntax=docker/dockerfile:1
# hvdbert for GPU clusters: CUDA, Open MPI, NCCL, PyTorch, Horovod (NCCL tensor operations, MPI and
# Gloo controllers) and hvdbert, with SSH for multi-node runs, running as the non-root user hvdbert.
#
#   docker build -t hvdbert .
#   docker run --rm --gpus all --ipc=host hvdbert launch/local.sh -n 8
#
# Python package versions come from requirements.txt alone (torch and horovod included), so the
# image and `make setup` install the same versions; nothing here names a version of them.
# CUDA_IMAGE and TORCH_INDEX_URL must name the same CUDA version, one that the pinned torch is
# published for (https://download.pytorch.org/whl/ lists them): for example
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 -t hvdbert .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# GPU generations Horovod compiles its CUDA kernels for: V100, T4, A100, A10/A40, L4/L40, H100.
ARG HOROVOD_CUDA_CC_LIST=70,75,80,86,89,90
ARG USER_UID=1000
# sshd runs as the non-root user, so it listens on a port above 1024.
ARG SSH_PORT=2222

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

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

WORKDIR /opt/hvdbert
COPY requirements.txt ./

# torch first, alone, as the CUDA build from TORCH_INDEX_URL at the version requirements.txt pins.
# Every later install is constrained to that version, so nothing can swap in another build.
RUN torch_version="$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' requirements.txt)" \
    && if [ -z "${torch_version}" ]; then echo "requirements.txt pins no torch version" >&2; exit 1; fi \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${torch_version}" \
    && printf 'torch==%s\n' "${torch_version}" > /opt/venv/constraints.txt \
    && python -c 'import torch; assert torch.version.cuda, "torch was installed without CUDA"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'

# The other pinned packages, Horovod aside (it is compiled below).
RUN grep -vE '^(torch|horovod)==' requirements.txt \
    | pip install -c /opt/venv/constraints.txt -r /dev/stdin

# Horovod, compiled against this torch with NCCL for GPU tensor operations and both controllers.
# - NCCL: the one that came with torch (the nvidia-nccl wheel: headers and library), so that one
#   NCCL serves both; the build looks for libnccl.so, the wheel ships libnccl.so.2.
# - C++17: Horovod's last release compiles its PyTorch extension with -std=c++14, but torch >= 2.1 headers
#   need C++17. gcc honours the last -std flag, so CXX is a wrapper that appends -std=c++17
#   (upstream fixed this in pull request 3998, after its last release).
# - The CUDA driver stubs stand in for libcuda at link time: there is no GPU during a build.
# hadolint ignore=SC2016
RUN horovod_version="$(sed -n 's/^horovod==\([^ ;]*\).*/\1/p' requirements.txt)" \
    && if [ -z "${horovod_version}" ]; then echo "requirements.txt pins no horovod version" >&2; exit 1; fi \
    && nccl_lib="$(find /opt/venv/lib -name libnccl.so.2 -path '*nvidia*' | head -n 1)" \
    && if [ -z "${nccl_lib}" ]; then echo "torch brought no NCCL (nvidia-nccl wheel)" >&2; exit 1; fi \
    && nccl_home="$(dirname "$(dirname "${nccl_lib}")")" \
    && ln -sf libnccl.so.2 "${nccl_home}/lib/libnccl.so" \
    && echo "${nccl_home}/lib" > /etc/ld.so.conf.d/hvdbert-nccl.conf \
    && ldconfig \
    && printf '#!/bin/sh\nexec g++ "$@" -std=c++17\n' > /tmp/cxx-std17 \
    && chmod +x /tmp/cxx-std17 \
    && CXX=/tmp/cxx-std17 \
       HOROVOD_GPU_OPERATIONS=NCCL \
       HOROVOD_NCCL_HOME="${nccl_home}" \
       HOROVOD_NCCL_LINK=SHARED \
       HOROVOD_CUDA_HOME=/usr/local/cuda \
       HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_CUDA_CC_LIST}" \
       HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
       HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
       LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
       MAKEFLAGS="-j$(nproc)" \
       pip install --no-build-isolation -c /opt/venv/constraints.txt "horovod==${horovod_version}" \
    && rm /tmp/cxx-std17

# Fail the build, not the first job, when Horovod lacks a piece: PyTorch, NCCL, MPI or Gloo.
# (libcuda.so.1 from the driver stubs lets the extension load on a build machine without a GPU.)
RUN stubs="$(mktemp -d)" \
    && ln -s /usr/local/cuda/lib64/stubs/libcuda.so "${stubs}/libcuda.so.1" \
    && LD_LIBRARY_PATH="${stubs}:${LD_LIBRARY_PATH:-}" horovodrun --check-build | tee /tmp/check-build.txt \
    && for needed in PyTorch NCCL MPI Gloo; do \
           grep -q "\[X\] ${needed}" /tmp/check-build.txt \
               || { echo "Horovod was built without ${needed}" >&2; exit 1; }; \
       done \
    && rm -rf "${stubs}" /tmp/check-build.txt

# SSH between containers for horovodrun, mpirun and the Kubeflow MPI Operator. Workers run
# `/usr/sbin/sshd -De -f /home/hvdbert/.sshd_config` as hvdbert; the key pair and authorized_keys
# are mounted into /home/hvdbert/.ssh (the MPI Operator does it through sshAuthMountPath).
RUN printf 'Host *\n    Port %s\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n' \
        "${SSH_PORT}" > /etc/ssh/ssh_config.d/hvdbert.conf \
    && printf 'Port %s\nPidFile /home/hvdbert/.sshd.pid\nHostKey /home/hvdbert/.ssh/id_rsa\nAuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\nStrictModes no\n' \
        "${SSH_PORT}" > /home/hvdbert/.sshd_config \
    && chown hvdbert:hvdbert /home/hvdbert/.sshd_config

# hvdbert itself; the checkout (recipes/, launch/) stays in /opt/hvdbert, the working directory.
COPY --chown=hvdbert:hvdbert . /opt/hvdbert
RUN pip install --no-deps --no-build-isolation /opt/hvdbert \
    && python -c 'import hvdbert'

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${USER_UID}
EXPOSE ${SSH_PORT}
CMD ["bash"]
