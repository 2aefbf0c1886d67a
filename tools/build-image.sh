#!/usr/bin/env bash
# Builds the image from the Dockerfile with the container engine this machine has (docker, else
# podman, else buildah) and ends with one line naming the image, its size and the time taken.
#
#   tools/build-image.sh                  the cpu variant, tagged hvdbert:cpu    (make image)
#   VARIANT=cuda tools/build-image.sh     the GPU variant, tagged hvdbert:cuda   (make image VARIANT=cuda)
#   tools/build-image.sh --configure      only the engine settings below, then exit
#
# Settings (environment):
#   VARIANT       cpu (default) or cuda: the Dockerfile's VARIANT build argument
#   IMAGE         the tag (default hvdbert:VARIANT)
#   ENGINE        docker, podman or buildah (default: docker when its daemon answers, else podman,
#                 else buildah)
#   BASE_IMAGE    the base (default: debian:bookworm for cpu, the Dockerfile's CUDA image for cuda).
#                 When a cpu base can be neither found nor pulled, one is made from the Debian
#                 mirror with mmdebstrap (about a minute) and imported as localhost/hvdbert-base:bookworm.
#   TORCH_INDEX_URL, HOROVOD_CUDA_CC_LIST, USER_UID, SSH_PORT   the Dockerfile's build arguments
#   PIP_FROM_HOST 1 (default, with podman or buildah, when this machine's pip has a configuration):
#                 the build's pip gets this machine's pip configuration (`pip config list`: indexes,
#                 find-links, constraints, CA bundle), with every local file or directory it names
#                 mounted read-only into the build; and the cpu variant's torch then comes from it
#                 (TORCH_INDEX_URL=pip) unless TORCH_INDEX_URL is set (the cuda variant's comes from
#                 PyTorch's CUDA index as before). 0: the build reaches the package indexes by itself.
#   HVDBERT_CACHE where compiled Horovod wheels are kept (default ~/.cache/hvdbert; `wheels/` below
#                 it, shared with tools/setup.sh): podman and buildah mount it into the build, so a
#                 Horovod compiled once (by either) is installed by later builds without compiling.
#                 docker keeps it in its layer cache only (the Horovod layer comes before the sources).
#
# Engine settings (podman and buildah; written by --configure and before every build, as root, to
# /etc/containers/containers.conf.d/hvdbert.conf, only where this machine needs them):
#   runtime = "runc"   when crun is not installed or cannot run here (hybrid cgroups)
#   default_ulimits    nofile and nproc within this machine's hard limits, when podman's defaults
#                      (nofile 1048576) exceed them; a --ulimit on a command line replaces both
# Builds use `--format docker`, without which podman ignores the Dockerfile's SHELL.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HVDBERT_CACHE:-$HOME/.cache/hvdbert}
variant=${VARIANT:-cpu}
image=${IMAGE:-hvdbert:$variant}
started=$(date +%s)

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "$*"; exit 2; }

case "$variant" in cpu | cuda) ;; *) die "VARIANT=$variant: cpu or cuda" ;; esac

# --- the engine -------------------------------------------------------------------------------
engine=${ENGINE:-}
if [ -z "$engine" ]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    elif command -v buildah >/dev/null 2>&1; then
        engine=buildah
    else
        die "no container engine: install docker, or podman (Debian: apt-get install podman buildah runc fuse-overlayfs slirp4netns uidmap mmdebstrap)"
    fi
fi
case "$engine" in docker | podman | buildah) ;; *) die "ENGINE=$engine: docker, podman or buildah" ;; esac
command -v "$engine" >/dev/null 2>&1 || die "ENGINE=$engine, which is not installed"

# Writes the containers.conf settings this machine needs (podman, buildah), as root.
configure() {
    local conf=/etc/containers/containers.conf.d/hvdbert.conf containers="" engine_section="" nofile
    nofile=$(ulimit -Hn)
    if [ "$nofile" != unlimited ] && [ "$nofile" -lt 1048576 ]; then
        # podman's default nofile (1048576) exceeds the hard limit; its runtime here allows at most
        # 32768 processes, below the usual default too.
        containers="default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=32768:32768\"]"
    fi
    if ! command -v crun >/dev/null 2>&1 || [ -d /sys/fs/cgroup/unified ]; then
        command -v runc >/dev/null 2>&1 || die "neither crun (usable here) nor runc is installed: apt-get install runc"
        engine_section='runtime = "runc"'
    fi
    [ -n "$containers$engine_section" ] || return 0
    local wanted
    wanted=$(printf '# Written by tools/build-image.sh: what podman needs on this machine.\n%s%s' \
        "${containers:+[containers]
$containers
}" "${engine_section:+[engine]
$engine_section
}")
    if [ -f "$conf" ] && [ "$(cat "$conf")" = "$wanted" ]; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "podman needs these settings in $conf (as root): $containers $engine_section"
    mkdir -p "$(dirname "$conf")"
    printf '%s\n' "$wanted" > "$conf"
    log "wrote $conf"
}

if [ "$engine" != docker ]; then
    configure
fi
if [ "${1:-}" = --configure ]; then
    exit 0
fi
[ "$#" = 0 ] || die "unknown argument '$1' (usage: tools/build-image.sh [--configure]; settings come from the environment)"

# --- the base image ---------------------------------------------------------------------------
have_image() {
    case "$engine" in
        buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
        *) "$engine" image inspect "$1" >/dev/null 2>&1 ;;
    esac
}

base=${BASE_IMAGE:-}
if [ "$variant" = cpu ]; then
    base=${base:-debian:bookworm}
    if ! have_image "$base" && ! "$engine" pull -q "$base" >/dev/null 2>&1; then
        made=localhost/hvdbert-base:bookworm
        if [ -n "${BASE_IMAGE:-}" ]; then
            die "BASE_IMAGE=$BASE_IMAGE can be neither found nor pulled"
        elif have_image "$made"; then
            log "no registry: using $made"
        else
            command -v mmdebstrap >/dev/null 2>&1 || die "cannot pull $base and mmdebstrap is not installed (apt-get install mmdebstrap) to make a base from the Debian mirror"
            log "cannot pull $base: making $made from the Debian mirror with mmdebstrap"
            tmp=$(mktemp -d)
            trap 'rm -rf "$tmp"' EXIT
            mmdebstrap --quiet --variant=minbase --components=main --include=ca-certificates bookworm "$tmp/base.tar" \
                || die "mmdebstrap failed"
            # An imported file system defines no PATH; the Dockerfile spells its own out, other users of
            # the base may not.
            "$engine" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'CMD ["bash"]' "$tmp/base.tar" "$made" >/dev/null
            rm -rf "$tmp"
        fi
        base=$made
    fi
fi

build_args=(--build-arg "VARIANT=$variant")
[ -z "$base" ] || build_args+=(--build-arg "BASE_IMAGE=$base")
for name in TORCH_INDEX_URL HOROVOD_CUDA_CC_LIST USER_UID SSH_PORT; do
    if [ -n "${!name:-}" ]; then
        build_args+=(--build-arg "$name=${!name}")
    fi
done

# --- what podman and buildah mount into the build ---------------------------------------------
volumes=()
if [ "$engine" != docker ]; then
    mkdir -p "$cache/wheels"
    volumes+=(--volume "$cache/wheels:/var/cache/hvdbert/wheels")
    build_args+=(--build-arg HOROVOD_WHEEL_CACHE=/var/cache/hvdbert/wheels)

    pip_config=""
    if [ "${PIP_FROM_HOST:-1}" = 1 ] && command -v python3 >/dev/null 2>&1; then
        pip_config=$(python3 -m pip config list 2>/dev/null || true)
    fi
    if [ -n "$pip_config" ]; then
        # The host's settings as one pip.conf, each local path moved below /run/hvdbert-build/host,
        # where that path (a file:// index: the directory above it) is mounted read-only.
        stage=$cache/image/pip
        rm -rf "$stage"
        mkdir -p "$stage"
        stage_out=$(PIP_CONFIG_LIST="$pip_config" python3 - "$stage/pip.conf" <<'EOF'
import configparser, os, re, sys
conf = configparser.ConfigParser()
paths = set()
for line in os.environ["PIP_CONFIG_LIST"].splitlines():
    match = re.match(r"^([^.]*)\.([^=]+)='(.*)'$", line)
    if not match:
        continue
    section, key, value = match.groups()
    section = "global" if section in ("", ":env:") else section
    words = []
    for word in value.split():
        local = word[len("file://"):] if word.startswith("file://") else word
        if local.startswith("/") and os.path.exists(local):
            # A file:// index's pages link to files beside it (../../files/...): mount its parent.
            paths.add(os.path.dirname(local.rstrip("/")) if word.startswith("file://") else local)
            word = word.replace(local, "/run/hvdbert-build/host" + local, 1)
        words.append(word)
    if not conf.has_section(section):
        conf.add_section(section)
    conf.set(section, key, " ".join(words))
with open(sys.argv[1], "w") as out:
    conf.write(out)
print("\n".join(sorted(paths)))
EOF
        )
        while IFS= read -r path; do
            [ -n "$path" ] || continue
            volumes+=(--volume "$path:/run/hvdbert-build/host$path:ro")
        done <<<"$stage_out"
        volumes+=(--volume "$stage:/run/hvdbert-build/pip:ro")
        build_args+=(--build-arg PIP_CONFIG_FILE=/run/hvdbert-build/pip/pip.conf)
        if [ -z "${TORCH_INDEX_URL:-}" ] && [ "$variant" = cpu ]; then
            build_args+=(--build-arg TORCH_INDEX_URL=pip)
        fi
        log "the build's pip uses this machine's pip configuration ($(grep -c = "$stage/pip.conf") settings)"
    fi
fi

log "building $image ($variant, base ${base:-the CUDA image}) with $engine"
case "$engine" in
    docker) DOCKER_BUILDKIT=1 docker build "${build_args[@]}" -t "$image" "$root" ;;
    podman) podman build --format docker --layers "${volumes[@]}" "${build_args[@]}" -t "$image" "$root" ;;
    buildah) buildah build --format docker --layers "${volumes[@]}" "${build_args[@]}" -t "$image" "$root" ;;
esac

size=$("$engine" image inspect --format '{{.Size}}' "$image" 2>/dev/null || echo 0)
printf 'build-image: %s (%s, %s MB) built with %s in %ss\n' "$image" "$variant" "$((size / 1000000))" "$engine" \
    "$(($(date +%s) - started))"
