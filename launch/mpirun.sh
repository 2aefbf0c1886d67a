#!/usr/bin/env bash
# Train with Open MPI's mpirun instead of horovodrun (Horovod then uses its MPI controller).
#
#   launch/mpirun.sh [-n NP] [-H host1:8,host2:8 | --hostfile FILE] [options] [PRETRAIN ARGS...]
#
# Every host needs the same checkout (or image) at the same path, the same Python environment,
# passwordless SSH from this host, and the data and run directory on a shared file system.
#
# Settings (flag or environment variable; see also launch/common.sh):
#   -H, --hosts / HOSTS      host:slots,host:slots              (default localhost:NP)
#   --hostfile / HOSTFILE    `host slots=N` lines, `#` comments (Open MPI's format)
#   -n, --np / NP            worker processes                   (default: all slots, or 2 on localhost)
#   --nic / NIC              network interface for MPI's and NCCL's TCP traffic (eth0, ib0, ...)
#   MPIRUN                   the mpirun to use                  (default mpirun)
#   MPIRUN_ARGS              more mpirun flags, split on spaces (e.g. "-mca btl_tcp_if_exclude lo,docker0")
#   RECIPE, DATA, OUTPUT, PYTHON as in launch/local.sh.
#
# The flags are the ones Horovod documents for NCCL jobs under Open MPI: no CPU binding (each rank
# drives a GPU and starts several threads), ranks placed slot by slot, the ob1 point-to-point layer
# with the old openib transport off (it can hang or crash next to NCCL's own InfiniBand traffic),
# and the environment (NCCL_*, HOROVOD_*, PATH, LD_LIBRARY_PATH, ...) exported to every rank.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MPIRUN=${MPIRUN:-mpirun}
MPIRUN_ARGS=${MPIRUN_ARGS:-}
HOSTS=${HOSTS:-}
HOSTFILE=${HOSTFILE:-}
NIC=${NIC:-}

while [ $# -gt 0 ]; do
    case $1 in
        -H|--hosts|--hostfile|--nic)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                -H|--hosts) HOSTS=$2 ;;
                --hostfile) HOSTFILE=$2 ;;
                --nic) NIC=$2 ;;
            esac
            shift 2 ;;
        --) shift; passthrough+=("$@"); break ;;
        *)
            if parse_common_option "$@"; then shift "$consumed"; else passthrough+=("$1"); shift; fi ;;
    esac
done

resolve_hosts
if [ -z "$HOSTS" ]; then
    NP=${NP:-2}
    HOSTS=localhost:$NP
fi
finish_settings

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
mpi_args=(-np "$NP" -H "$HOSTS" --bind-to none --map-by slot -mca pml ob1 -mca btl '^openib')
if [ "$(id -u)" = 0 ]; then
    # Containers often run as root; Open MPI refuses that unless told it is intended.
    mpi_args+=(--allow-run-as-root)
fi
if [ -n "$NIC" ]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NIC}
    mpi_args+=(-mca btl_tcp_if_include "$NIC" -mca oob_tcp_if_include "$NIC")
fi
# Export what the ranks need from this environment; only variables that are set, as mpirun warns
# about each missing one.
for name in $(compgen -e); do
    case $name in
        PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|OMP_NUM_THREADS|TOKENIZERS_PARALLELISM|\
        NCCL_*|HOROVOD_*|CUDA_*|TORCH_*|HF_*|TRANSFORMERS_*|HVDBERT_*)
            mpi_args+=(-x "$name") ;;
    esac
done
if [ -n "$MPIRUN_ARGS" ]; then
    read -r -a extra_mpi_args <<<"$MPIRUN_ARGS"
    mpi_args+=("${extra_mpi_args[@]}")
fi

check_plan "$NP"
need_command "$MPIRUN" MPIRUN
run_logged "$MPIRUN" "${mpi_args[@]}" "${pretrain_cmd[@]}"
