#!/usr/bin/env bash
# Base images made locally for the container smoke test, because no image registry is reachable
# from CI or the development machine (workaround, CI only):
#   localhost/tierserve-ci/python:3.11-bookworm  Debian bookworm (debootstrap, minbase) with
#       python3.11 in a venv at /opt/python on PATH: what deploy/Dockerfile needs of python:3.11-slim
#   localhost/tierserve-ci/prometheus:debian     that base + Debian's prometheus binary (installed on
#       the host by install-prometheus.sh), run as nobody like prom/prometheus
# Idempotent: an image that exists is kept. Needs root, podman, debootstrap.
set -euo pipefail
PYTHON_BASE=${PYTHON_BASE:-localhost/tierserve-ci/python:3.11-bookworm}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-localhost/tierserve-ci/prometheus:debian}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=$(mktemp -d /var/tmp/tierserve-ci-base.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if ! podman image exists "$PYTHON_BASE"; then
  started=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
  chroot "$WORK/rootfs" python3 -m venv /opt/python
  rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*.bin \
    "$WORK"/rootfs/var/cache/apt/archives/*.deb
  tar -C "$WORK/rootfs" -c . | podman import -q \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$PYTHON_BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  echo "base image $PYTHON_BASE made in $((SECONDS - started)) s"
fi

if ! podman image exists "$PROMETHEUS_IMAGE"; then
  bin=$(command -v prometheus) || { echo "no prometheus binary: run deploy/ci/install-prometheus.sh" >&2; exit 1; }
  mkdir -p "$WORK/prometheus"
  cp "$bin" "$WORK/prometheus/prometheus"
  cat >"$WORK/prometheus/Containerfile" <<CONTAINERFILE
FROM $PYTHON_BASE
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
CONTAINERFILE
  podman build -q --format docker -t "$PROMETHEUS_IMAGE" "$WORK/prometheus" >/dev/null
  echo "prometheus image $PROMETHEUS_IMAGE made ($(prometheus --version 2>&1 | head -n 1))"
fi
