#!/usr/bin/env bash
# Host discovery for elastic Horovod (`horovodrun --host-discovery-script`, launch/multinode.sh
# --elastic): prints the hosts that can take workers now, one `host:slots` line each.
# horovodrun runs it every few seconds; a host that disappears from the list is removed from the
# job, a new one is added (up to --max-np).
#
#   HVDBERT_HOSTS_FILE  a file the cluster tooling keeps up to date: one host per line, as
#                       `host:slots`, `host slots=N` (hostfile style, as launch/multinode.sh --hostfile reads it) or `host` (HVDBERT_SLOTS
#                       slots); blank lines and `#` comments are skipped. Read afresh every call.
#   HVDBERT_SLOTS       slots of a host that names none (default: the GPUs on this machine, or 1)
# Without HVDBERT_HOSTS_FILE it prints `localhost:HVDBERT_SLOTS`: one machine, handy for trying
# elastic training out.
set -euo pipefail

default_slots() {
    local gpus
    if [ -n "${HVDBERT_SLOTS:-}" ]; then
        printf '%s' "$HVDBERT_SLOTS"
    elif command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$gpus" -gt 0 ]; then
        printf '%s' "$gpus"
    else
        printf '1'
    fi
}

slots=$(default_slots)
case $slots in
    ''|*[!0-9]*|0) echo "discover_hosts.sh: error: HVDBERT_SLOTS must be a positive integer, got '$slots'" >&2; exit 2 ;;
esac

hosts_file=${HVDBERT_HOSTS_FILE:-}
if [ -z "$hosts_file" ]; then
    printf 'localhost:%s\n' "$slots"
    exit 0
fi
if [ ! -r "$hosts_file" ]; then
    # A failing script makes horovodrun stop the job; report why.
    echo "discover_hosts.sh: error: HVDBERT_HOSTS_FILE '$hosts_file' cannot be read" >&2
    exit 1
fi
# The same reading of the file as launch/multinode.sh --hostfile (launch/common.sh).
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
hosts=$(hostfile_to_hosts "$hosts_file" "$slots") || {
    echo "discover_hosts.sh: error: $hosts" >&2
    exit 1
}
if [ -n "$hosts" ]; then
    tr ',' '\n' <<<"$hosts"
fi
