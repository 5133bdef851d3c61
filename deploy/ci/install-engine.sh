#!/usr/bin/env bash
# The container engine for the smoke test (CI and sandbox machines; never needed by `make test`):
# podman, runc, netavark (+ iptables, which it needs), aardvark-dns (service names on compose
# networks) and debootstrap from Debian; podman-compose from PyPI into its own venv
# ($TIERSERVE_CI_HOME/venv), outside the project's dependencies. Idempotent and quiet.
set -euo pipefail
CI_HOME=${TIERSERVE_CI_HOME:-/var/tmp/tierserve-ci}
PODMAN_COMPOSE_VERSION=${PODMAN_COMPOSE_VERSION:-1.5.0}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need=()
for pkg in podman runc netavark aardvark-dns iptables debootstrap uidmap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  LOG=$(mktemp)
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
         $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    exit 1
  fi
  rm -f "$LOG"
fi
if [ ! -x "$CI_HOME/venv/bin/podman-compose" ]; then
  mkdir -p "$CI_HOME"
  python3 -m venv "$CI_HOME/venv"
  if ! "$CI_HOME/venv/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION" >"$CI_HOME/pip.log" 2>&1; then
    cat "$CI_HOME/pip.log" >&2
    exit 1
  fi
fi
echo "$(podman --version), podman-compose $("$CI_HOME/venv/bin/podman-compose" version 2>/dev/null | grep -o 'podman-compose version [0-9.]*' | awk '{print $3}')"
