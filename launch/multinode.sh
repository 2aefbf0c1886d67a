#!/usr/bin/env bash
# Train on several hosts with horovodrun, which starts the workers over SSH.
#
#   launch/multinode.sh -H host1:4,host2:4 [options] [PRETRAIN ARGS...]
#   launch/multinode.sh --hostfile launch/hostfile [options] [PRETRAIN ARGS...]
#   launch/multinode.sh --elastic --min-np 4 --max-np 8 [options] [PRETRAIN ARGS...]
#
# Every host needs the same checkout (or image) at the same path, the same Python environment,
# passwordless SSH from this host, and the data and run directory on a shared file system.
#
# Settings (flag or environment variable; see also launch/common.sh):
#   -H, --hosts / HOSTS        host:slots,host:slots (slots = worker processes = GPUs on that host)
#   --hostfile / HOSTFILE      one host per line, `host slots=N` (or `host:N`); `#` starts a comment
#   -n, --np / NP              worker processes (default: all slots)
#   --gloo, --mpi / CONTROLLER Horovod's controller (default gloo)
#   --nic / NIC                network interface(s) for Horovod's traffic, e.g. eth0 or ib0
#   --ssh-port / SSH_PORT      SSH port of the other hosts (default: ssh's own setting)
#   --elastic / ELASTIC=1      elastic run (`hvdbert.pretrain --elastic`, Gloo): hosts come from
#   --min-np / MIN_NP          DISCOVERY (default launch/discover_hosts.sh, see there) and may join
#   --max-np / MAX_NP          or leave while it trains; needs --min-np, --max-np caps the workers.
#   RECIPE, DATA, OUTPUT, PYTHON, HOROVODRUN as in launch/local.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$here/common.sh"

HOSTS=${HOSTS:-}
HOSTFILE=${HOSTFILE:-}
CONTROLLER=${CONTROLLER:-gloo}
NIC=${NIC:-}
SSH_PORT=${SSH_PORT:-}
ELASTIC=${ELASTIC:-0}
MIN_NP=${MIN_NP:-}
MAX_NP=${MAX_NP:-}
DISCOVERY=${DISCOVERY:-$here/discover_hosts.sh}

while [ $# -gt 0 ]; do
    case $1 in
        -H|--hosts|--hostfile|--nic|--ssh-port|--min-np|--max-np)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                -H|--hosts) HOSTS=$2 ;;
                --hostfile) HOSTFILE=$2 ;;
                --nic) NIC=$2 ;;
                --ssh-port) SSH_PORT=$2 ;;
                --min-np) MIN_NP=$2 ;;
                --max-np) MAX_NP=$2 ;;
            esac
            shift 2 ;;
        --elastic) ELASTIC=1; shift ;;
        --) shift; passthrough+=("$@"); break ;;
        *)
            if parse_controller_option "$1"; then shift
            elif parse_common_option "$@"; then shift "$consumed"
            else passthrough+=("$1"); shift; fi ;;
    esac
done

check_controller

hvd_args=()
plan_workers=()  # worker counts to check against the recipe (elastic runs can have several)
if [ "$ELASTIC" = 1 ]; then
    # Horovod's elastic mode runs only with the Gloo controller.
    [ "$CONTROLLER" = gloo ] || die "--elastic needs the Gloo controller, not --mpi"
    [ -n "$MIN_NP" ] || die "--elastic needs --min-np (MIN_NP): the fewest workers worth running with"
    [ -x "$DISCOVERY" ] || die "host discovery script '$DISCOVERY' is missing or not executable"
    check_count "--min-np (MIN_NP)" "$MIN_NP"
    NP=${NP:-$MIN_NP}
    plan_workers=("$MIN_NP")
    hvd_args+=(--min-np "$MIN_NP" --host-discovery-script "$DISCOVERY")
    # ... and hvdbert's elastic loop, which commits state and survives workers coming and going.
    case " ${passthrough[*]} " in
        *" --elastic "*) ;;
        *) passthrough+=(--elastic) ;;
    esac
    if [ -n "$MAX_NP" ]; then
        check_count "--max-np (MAX_NP)" "$MAX_NP"
        plan_workers+=("$MAX_NP")
        hvd_args+=(--max-np "$MAX_NP")
    fi
else
    resolve_hosts
    [ -n "$HOSTS" ] || die "name the hosts: -H host1:4,host2:4 (HOSTS) or --hostfile FILE (HOSTFILE)"
    hvd_args+=(-H "$HOSTS")
fi
hvd_args+=("--$CONTROLLER")
if [ -n "$NIC" ]; then
    hvd_args+=(--network-interfaces "$NIC")
fi
if [ -n "$SSH_PORT" ]; then
    hvd_args+=(--ssh-port "$SSH_PORT")
fi

finish_settings
check_plan "$NP" "${plan_workers[@]}"
need_command "$HOROVODRUN" HOROVODRUN
run_logged "$HOROVODRUN" -np "$NP" "${hvd_args[@]}" "${pretrain_cmd[@]}"
