# shellcheck shell=bash disable=SC2034  # variables here are read by the scripts that source it
# Shared by launch/local.sh, launch/multinode.sh and launch/mpirun.sh (sourced, not run): the
# settings every launcher takes, the command line for `python -m hvdbert.pretrain`, and the
# pre-flight check of the worker count.
#
# Each setting comes from a flag or an environment variable (the flag wins):
#   --recipe FILE  / RECIPE   recipe TOML                      (default recipes/tiny.toml)
#   --data DIR     / DATA     output of `hvdbert.prepare`      (default empty: the embedded corpus)
#   --output DIR   / OUTPUT   run directory                    (default runs/<recipe name>)
#   -n, --np N     / NP       number of worker processes
#   -H, --hosts / HOSTS, --hostfile / HOSTFILE   where they run (multinode.sh, mpirun.sh)
#   PYTHON, HOROVODRUN        the interpreter and horovodrun   (default: `python`, `horovodrun` on PATH)
# Every other argument goes to `python -m hvdbert.pretrain` unchanged (`--set k=v`, `--resume auto`);
# a `--` ends the launcher's own flags. -h, --help prints the launcher's own header.

PYTHON=${PYTHON:-python}
HOROVODRUN=${HOROVODRUN:-horovodrun}
RECIPE=${RECIPE:-recipes/tiny.toml}
DATA=${DATA:-}
OUTPUT=${OUTPUT:-}
NP=${NP:-}
passthrough=()    # arguments for hvdbert.pretrain that the launcher does not interpret
consumed=0        # set by parse_common_option
pretrain_cmd=()   # set by finish_settings: the training command
plan_args=()      # set by finish_settings: `-- PRETRAIN ARGS`, for hvdbert.plan --workers N

die() { # die MESSAGE: one line on stderr, exit status 2 (bad input, as every hvdbert command)
    printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
    exit 2
}

# parse_common_option "$@": consumes one launcher flag shared by all launchers; sets `consumed` to
# the number of words it used, or returns 1 when "$1" is not one of them.
parse_common_option() {
    case $1 in
        --recipe|--data|--output|-n|--np|-np)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --recipe) RECIPE=$2 ;;
                --data) DATA=$2 ;;
                --output) OUTPUT=$2 ;;
                *) NP=$2 ;;
            esac
            consumed=2 ;;
        --recipe=*) RECIPE=${1#*=}; consumed=1 ;;
        --data=*) DATA=${1#*=}; consumed=1 ;;
        --output=*) OUTPUT=${1#*=}; consumed=1 ;;
        --np=*) NP=${1#*=}; consumed=1 ;;
        -h|--help) usage; exit 0 ;;
        *) return 1 ;;
    esac
}

# The horovodrun launchers (local.sh, multinode.sh): parse_controller_option "$1" takes --gloo or
# --mpi (Horovod's controller; returns 1 for anything else) and check_controller validates CONTROLLER.
parse_controller_option() {
    case $1 in
        --gloo) CONTROLLER=gloo ;;
        --mpi) CONTROLLER=mpi ;;
        *) return 1 ;;
    esac
}

check_controller() {
    case $CONTROLLER in
        gloo|mpi) ;;
        *) die "CONTROLLER must be gloo or mpi, got '$CONTROLLER'" ;;
    esac
}

# usage: prints the comment block at the top of the launcher, which documents it.
usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 && !/^#SBATCH/ { sub(/^# ?/, ""); print }' "$0"
}

# finish_settings: validates the settings and builds the arrays `pretrain_cmd` and `plan_args`.
finish_settings() {
    check_count "the worker count (NP or --np)" "$NP"
    [ -f "$RECIPE" ] || die "recipe '$RECIPE' not found (set RECIPE or --recipe to a TOML file under recipes/)"
    if [ -z "$OUTPUT" ]; then
        local name
        name=$(basename "$RECIPE")
        OUTPUT=runs/${name%.toml}
    fi
    pretrain_cmd=("$PYTHON" -m hvdbert.pretrain --recipe "$RECIPE")
    if [ -n "$DATA" ]; then
        pretrain_cmd+=(--data "$DATA")
    fi
    pretrain_cmd+=(--output "$OUTPUT" "${passthrough[@]}")

    # hvdbert.plan's pre-flight reads the training's own command line (after `--`) with pretrain's
    # parser: what every worker would refuse (a flag without its value, an unknown flag, a used or
    # read-only --output, data or --eval-data that do not fit, a missing checkpoint) is refused before
    # any worker starts. Only "$PYTHON -m hvdbert.pretrain" is left out.
    plan_args=(-- "${pretrain_cmd[@]:3}")
}

# hostfile_to_hosts FILE [DEFAULT_SLOTS]: a hostfile -> host:N,host:N on stdout (a host that names
# no slots gets DEFAULT_SLOTS, 1 unless given); on a line it cannot read, one
# message on stdout naming the file, the line and what is valid, and status 1.
# Reads what both Open MPI (`mpirun --hostfile`) and horovodrun (`--hostfile`) accept, plus `host:N`:
# one host per line, `host`, `host slots=N`, `host:N`, with Open MPI's `max_slots=M` (also spelled
# max-slots, slots_max, slots-max; a cap on oversubscription that launching N <= slots never
# reaches, so it is checked and otherwise ignored), spaces around `=`, `#` comments, blank lines and
# Windows (CRLF) line ends. A host named twice gets the sum of its slots, as Open MPI counts it.
# Anything else (two names on a line, `a,b`, an unknown keyword, a slot count that is not a
# positive integer) is refused rather than guessed at. horovodrun's own --hostfile parser accepts
# neither comments nor blank lines, so launch/multinode.sh reads the file here and hands it over as -H.
hostfile_to_hosts() {
    awk -v file="$1" -v default_slots="${2:-1}" '
        function refuse(why) {
            printf "hostfile %s, line %d: %s in \"%s\"; a line reads `host`, `host slots=N [max_slots=M]` or `host:N`\n", file, FNR, why, original
            failed = 1
            exit 1
        }
        {
            sub(/\r$/, "")
            original = $0
            sub(/#.*/, "")
            gsub(/[ \t]*=[ \t]*/, "=")  # Open MPI allows `slots = 2`
            if (NF == 0) next
            host = $1; slots = ""; max_slots = ""
            if (host ~ /:/) {
                if (split(host, part, ":") != 2) refuse("bad host:slots \"" host "\"")
                host = part[1]; slots = part[2]
            }
            if (host !~ /^[A-Za-z0-9][A-Za-z0-9._-]*$/) refuse("bad host name \"" host "\" (one host per line)")
            for (i = 2; i <= NF; i++) {
                if ($i ~ /^slots=/) {
                    if (slots != "") refuse("slots given twice")
                    slots = substr($i, 7)
                    if (slots == "") refuse("slots= needs a number")
                } else if ($i ~ /^(max_slots|max-slots|slots_max|slots-max)=/) {
                    max_slots = substr($i, index($i, "=") + 1)
                    if (max_slots !~ /^[0-9]+$/ || max_slots + 0 == 0) refuse("bad max_slots \"" max_slots "\"")
                } else if ($i ~ /=/) {
                    refuse("unknown keyword \"" substr($i, 1, index($i, "=") - 1) "\"")
                } else {
                    refuse("unexpected \"" $i "\" after the host name")
                }
            }
            if (slots == "") slots = default_slots
            if (slots !~ /^[0-9]+$/ || slots + 0 == 0) refuse("bad slot count \"" slots "\" (a positive integer)")
            if (max_slots != "" && slots + 0 > max_slots + 0) refuse("slots exceed max_slots")
            if (!(host in total)) order[++hosts] = host
            total[host] += slots
        }
        END {
            if (failed) exit 1
            for (k = 1; k <= hosts; k++) printf "%s%s:%d", (k > 1 ? "," : ""), order[k], total[order[k]]
        }' "$1"
}

# total_slots HOSTS: the sum of the slots in host:N,host:N (a host without :N has one).
total_slots() {
    local entry total=0
    local -a entries
    IFS=, read -r -a entries <<<"$1"
    for entry in "${entries[@]}"; do
        case $entry in
            *:*) total=$((total + ${entry##*:})) ;;
            *) total=$((total + 1)) ;;
        esac
    done
    printf '%s' "$total"
}

# resolve_hosts: turns HOSTFILE (when set) into HOSTS, checks that HOSTS reads host:N,host:N, and
# defaults NP to the total number of slots. Leaves an empty HOSTS empty.
resolve_hosts() {
    if [ -n "$HOSTFILE" ]; then
        [ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' not found"
        [ -z "$HOSTS" ] || die "give either --hosts (HOSTS) or --hostfile (HOSTFILE), not both"
        HOSTS=$(hostfile_to_hosts "$HOSTFILE") || die "$HOSTS"
        [ -n "$HOSTS" ] || die "hostfile '$HOSTFILE' names no host"
    fi
    [ -n "$HOSTS" ] || return 0
    local host_pattern='[A-Za-z0-9._-]+(:[0-9]+)?'
    [[ $HOSTS =~ ^$host_pattern(,$host_pattern)*$ ]] ||
        die "hosts must read host1:4,host2:4 (host:slots, comma-separated), got '$HOSTS'"
    NP=${NP:-$(total_slots "$HOSTS")}
}

# check_plan N...: fail fast, before any process starts, on what every worker would refuse: a
# worker count that the recipe cannot use (it must divide the global batch), and the pre-flight of
# the training's whole command line (see finish_settings). `hvdbert.plan` prints one line naming
# the problem and exits 2; so does the launcher then. An interpreter that cannot import hvdbert
# gets one line saying how to point PYTHON at one that can.
check_plan() {
    local workers checked=' ' errors status
    need_command "$PYTHON" PYTHON
    for workers in "$@"; do
        case $checked in *" $workers "*) continue ;; esac
        status=0
        errors=$("$PYTHON" -m hvdbert.plan --workers "$workers" "${plan_args[@]}" 2>&1 >/dev/null) || status=$?
        if [ "$status" -ne 0 ]; then
            case $errors in
                *"No module named"*)  # an interpreter without hvdbert (or its packages) installed
                    die "$PYTHON cannot run hvdbert ($(grep -o "No module named [^)]*" <<<"$errors" | tail -n 1));" \
                        "activate its environment (. .venv/bin/activate) or set PYTHON=.venv/bin/python" \
                        "(make setup creates it)" ;;
            esac
            printf '%s\n' "$errors" >&2
            exit "$status"
        fi
        checked="$checked$workers "
    done
}

# check_count NAME VALUE: VALUE must be a positive integer.
check_count() {
    case $2 in
        ''|*[!0-9]*|0) die "$1 must be a positive integer, got '$2'" ;;
    esac
}

# need_command PROGRAM SETTING: exit 127 with one line when PROGRAM cannot be run.
need_command() {
    command -v "$1" >/dev/null 2>&1 && return 0
    printf '%s: error: %s not found; activate the environment (. .venv/bin/activate) or set %s\n' \
        "$(basename "$0")" "$1" "$2" >&2
    exit 127
}

# run_logged CMD...: shows the exact command line, then replaces this shell with it, so that
# signals (Ctrl-C, SIGTERM from a scheduler) reach the launcher directly.
run_logged() {
    printf '+' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    exec "$@"
}
