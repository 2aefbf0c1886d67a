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
# Compute capabilities Horovod compiles its CUDA kernels for, comma-separated. Empty: the GPU
# generations from V100 to Blackwell that this CUDA version compiles for (tools/build-horovod.sh).
ARG HOROVOD_CUDA_CC_LIST=
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

# Horovod, compiled against this torch with NCCL GPU operations and both controllers, then checked
# with `horovodrun --check-build` (a build without PyTorch, NCCL, MPI or Gloo fails here, not in the
# first job). tools/build-horovod.sh holds the build's commands, the same that tools/setup.sh and
# tools/check-gpu-build.sh run: the NCCL of torch's nvidia-nccl wheel, the C++17 compiler wrapper,
# the CUDA driver stubs at link time, the compute capabilities this CUDA version compiles for.
COPY tools/build-horovod.sh tools/
RUN bash tools/build-horovod.sh nccl /opt/venv/bin/python /tmp/horovod-wheel \
    && rm -rf /tmp/horovod-wheel

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
