#!/usr/bin/env bash
# Install what the test suite needs: the Debian servers the integration
# fixtures start (etcd, SoftHSM, PostgreSQL, Prometheus) and a virtualenv at
# .venv with the package and its dev/etcd/aws/pkcs11/postgres extras.
#
# Idempotent and non-interactive; a warm re-run skips apt entirely and only
# lets pip confirm the venv is current.
#
# Environment:
#   SKIP_APT=1      do not touch apt even if something is missing
#   PYTHON=python3  interpreter used to create .venv
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

log() { printf '[install-deps] %s\n' "$*"; }

# package -> a file or command that proves it is installed and usable.
declare -A apt_probe=(
    [etcd-server]=/usr/bin/etcd
    [softhsm2]=/usr/bin/softhsm2-util
    [postgresql]=/usr/lib/postgresql
    [prometheus]=/usr/bin/prometheus
    [procps]=/usr/bin/pkill
    [util-linux]=/usr/sbin/runuser
    [ca-certificates]=/etc/ssl/certs/ca-certificates.crt
)

missing=()
for pkg in "${!apt_probe[@]}"; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1 || [ ! -e "${apt_probe[$pkg]}" ]; then
        missing+=("$pkg")
    fi
done

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo)
fi

stop_services() {
    # Debian's postgresql and prometheus packages start system services when
    # an init system is present; our fixtures run their own instances on free
    # loopback ports, so stop them and keep them from starting at boot.
    local svc
    for svc in postgresql prometheus prometheus-node-exporter etcd; do
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            "${sudo_cmd[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
        elif command -v service >/dev/null 2>&1; then
            "${sudo_cmd[@]}" service "$svc" stop >/dev/null 2>&1 || true
        fi
    done
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters --no-header 2>/dev/null | while read -r ver name _port status _rest; do
            if [ "$status" = "online" ]; then
                "${sudo_cmd[@]}" pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
            fi
        done
    fi
}

if [ "${#missing[@]}" -eq 0 ]; then
    log "apt: everything already installed"
elif [ "${SKIP_APT:-0}" = "1" ]; then
    log "apt: SKIP_APT=1, not installing: ${missing[*]}"
else
    log "apt: installing ${missing[*]}"
    # Keep maintainer scripts from starting services during the install
    # (invoke-rc.d honours policy-rc.d); remove the guard only if we made it.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo_cmd[@]}" chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    remove_policy() {
        if [ "$created_policy" = 1 ]; then
            "${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d
        fi
    }
    trap remove_policy EXIT
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null
    log "apt: done"
fi
stop_services

# Fail early, with a clear message, if a server binary is still absent.
for bin in /usr/bin/etcd /usr/bin/softhsm2-util /usr/bin/prometheus; do
    [ -x "$bin" ] || { log "missing $bin after install"; exit 1; }
done
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null \
    || { log "missing /usr/lib/postgresql/*/bin/postgres after install"; exit 1; }

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    log "venv: creating .venv with $($python --version 2>&1)"
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi

# pip is the slow part of a warm run; skip it when pyproject.toml has not
# changed since the last successful install into this venv.
stamp=.venv/.secrets-agent-deps
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c 'import agent' >/dev/null 2>&1; then
    log "venv: up to date"
else
    log "venv: pip install -e '.[dev,etcd,aws,pkcs11,postgres]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,etcd,aws,pkcs11,postgres]'
    printf '%s\n' "$want" >"$stamp"
    log "venv: done"
fi
