#!/usr/bin/env bash
# Installs Debian's Prometheus server (/usr/bin/prometheus) for tests/test_prometheus.py.
# Idempotent and quiet. The test starts the binary itself (own config, tmp storage, loopback
# port), so the package's own service is neither needed nor started.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101: forbid starting services from the package's maintainer scripts
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi
LOG=$(mktemp)
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus; } \
    >"$LOG" 2>&1; then
  cat "$LOG" >&2
  exit 1
fi
rm -f "$LOG"
prometheus --version 2>&1 | head -n 1
