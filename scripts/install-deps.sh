#!/usr/bin/env bash
# install-deps.sh - installs everything the build, the tests and the demo need.
#
# Idempotent and quiet: Debian packages are installed only when one is missing
# (apt-get update runs only then), Python packages only when one cannot be
# imported. Output is shown only when a step fails.
set -euo pipefail

#
# Why each package is needed: docs/development.md ("What the scripts install").
# Installed with --no-install-recommends, so everything a phase needs is listed
# here explicitly (clang alone, for one, does not bring its fuzzer runtime).
APT_PACKAGES=(
    build-essential cmake pkg-config git
    libsqlite3-dev sqlite3
    libnats-dev libcbor-dev libzstd-dev libcjson-dev libyaml-dev
    libmicrohttpd-dev libcurl4-openssl-dev libc-ares-dev libssl-dev
    check openssl
    clang libclang-rt-dev
    nats-server
    dnsmasq-base iproute2 buildah debootstrap
    python3 python3-pip
    golang-go openssh-server nginx libnginx-mod-http-dav-ext
)
# pip name -> import name, in the same order.
PIP_PACKAGES=(pytest nats-py cbor2 prometheus-client pyyaml kubernetes-validate==1.37.0)
PIP_MODULES=(pytest nats cbor2 prometheus_client yaml kubernetes_validate)

log_file=$(mktemp "${TMPDIR:-/tmp}/install-deps.XXXXXX")
trap 'rm -f "$log_file"' EXIT

# Runs "$@" with its output going to the log; on failure prints the log and exits.
run_quiet() {
    if ! "$@" >>"$log_file" 2>&1; then
        echo "install-deps: failed: $*" >&2
        cat "$log_file" >&2
        exit 1
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "install-deps: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
    if [ "${status:0:2}" != "ii" ]; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run_quiet as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    run_quiet as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
fi

# Python packages go into whatever `python3` is first on PATH (a pyenv
# interpreter on our machines, the system one on a plain Debian), since that is
# the interpreter scripts/test.sh runs pytest with.
pip_missing=()
for i in "${!PIP_MODULES[@]}"; do
    if ! python3 -c "import ${PIP_MODULES[$i]}" >/dev/null 2>&1; then
        pip_missing+=("${PIP_PACKAGES[$i]}")
    fi
done
if [ "${#pip_missing[@]}" -gt 0 ]; then
    echo "install-deps: installing Python packages: ${pip_missing[*]}"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
    if ! python3 -m pip install -q "${pip_missing[@]}" >>"$log_file" 2>&1; then
        # Debian's own python3 refuses pip installs outside a venv (PEP 668);
        # only then is it told that we mean it.
        if grep -q "externally-managed-environment" "$log_file"; then
            run_quiet python3 -m pip install -q --break-system-packages "${pip_missing[@]}"
        else
            echo "install-deps: failed: python3 -m pip install ${pip_missing[*]}" >&2
            cat "$log_file" >&2
            exit 1
        fi
    fi
    for i in "${!PIP_MODULES[@]}"; do
        if ! python3 -c "import ${PIP_MODULES[$i]}" >/dev/null 2>&1; then
            echo "install-deps: python3 still cannot import ${PIP_MODULES[$i]} after installing" >&2
            cat "$log_file" >&2
            exit 1
        fi
    done
fi

# The S3 server the snapshot tests run against: built once, cached outside the
# repository (a few minutes the first time).
if ! "$(dirname "$0")/install-s3-server.sh" >>"$log_file" 2>&1; then
    echo "install-deps: failed: scripts/install-s3-server.sh" >&2
    cat "$log_file" >&2
    exit 1
fi
