#!/usr/bin/env bash
# Train on one host with NP worker processes: `horovodrun -np NP -H localhost:NP`.
#
#   launch/local.sh [-n NP] [--recipe FILE] [--data DIR] [--output DIR] [--mpi] [PRETRAIN ARGS...]
#   NP=2 launch/local.sh --set train.max_steps=100
#
# Settings (flag or environment variable; see launch/common.sh):
#   NP           worker processes, one per GPU on a GPU host      (default 2)
#   RECIPE       recipe TOML                                     (default recipes/tiny.toml)
#   DATA         prepared data directory                         (default: the embedded corpus)
#   OUTPUT       run directory                                   (default runs/<recipe name>)
#   CONTROLLER   gloo | mpi, Horovod's controller (--gloo/--mpi)  (default gloo: needs no MPI install)
#   PYTHON, HOROVODRUN  interpreter and horovodrun to use
# Other arguments go to `python -m hvdbert.pretrain` (for example `--set train.max_steps=10`,
# `--resume auto`).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NP=${NP:-2}
CONTROLLER=${CONTROLLER:-gloo}
while [ $# -gt 0 ]; do
    case $1 in
        --) shift; passthrough+=("$@"); break ;;
        *)
            if parse_controller_option "$1"; then shift
            elif parse_common_option "$@"; then shift "$consumed"
            else passthrough+=("$1"); shift; fi ;;
    esac
done
check_controller
finish_settings
check_plan "$NP"
need_command "$HOROVODRUN" HOROVODRUN
run_logged "$HOROVODRUN" -np "$NP" -H "localhost:$NP" "--$CONTROLLER" "${pretrain_cmd[@]}"
