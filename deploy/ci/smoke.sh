#!/usr/bin/env bash
# The container smoke test (.ci/run calls it after `make test`; needs root and the project's .venv).
#
#   deploy/ci/smoke.sh
#
# Installs podman (Debian) and podman-compose (PyPI, own venv), makes the base images locally,
# builds the serving image from deploy/Dockerfile, builds the tiny test model, brings up
# deploy/docker-compose.yml (cloud, edge, mobile, Prometheus; see smoke.py for the few changes this
# machine needs), then checks: healthy, answers through the mobile container equal those of the
# same model served as processes, Prometheus sees the three targets up, and edge stopped and
# started comes back to full answers (seconds from SERVING printed). Tears everything down on any
# exit, failure or signal included, and checks that nothing of it is left running.
# Every workaround for CI and sandbox machines is here in deploy/ci/, none in what users run.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
CI_HOME=${TIERSERVE_CI_HOME:-/var/tmp/tierserve-ci}
COMPOSE="$CI_HOME/venv/bin/podman-compose"
PROJECT=${TIERSERVE_SMOKE_PROJECT:-tierserve-smoke}
IMAGE=localhost/tierserve:latest
export PYTHON_BASE=${PYTHON_BASE:-localhost/tierserve-ci/python:3.11-bookworm}
export PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-localhost/tierserve-ci/prometheus:debian}
# pip inside the image build goes through this machine's TLS-intercepting proxy: hand it the
# host's CA bundle as the Dockerfile's `pip_ca` build secret
CA_BUNDLE=${TIERSERVE_CI_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# the sandbox's ulimits, runc instead of crun, no systemd
export CONTAINERS_CONF="$ROOT/deploy/ci/containers.conf"
export OMP_NUM_THREADS=1

if [ "$(id -u)" -ne 0 ]; then echo "smoke.sh: run as root (rootful podman, apt-get)" >&2; exit 2; fi
if [ ! -x "$PY" ]; then echo "smoke.sh: no $PY: run \`make install\` first" >&2; exit 2; fi

WORK=$(mktemp -d /var/tmp/tierserve-smoke.XXXXXX)
chmod 755 "$WORK"  # the image's user (uid 10001) reads the model below it
TICKER=""
STARTED=$SECONDS
declare -a TIMES=()

step() { echo "== $* ($((SECONDS - STARTED)) s)"; }
took() { TIMES+=("$1 $(( SECONDS - $2 )) s"); }

project_containers() {
  podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$TICKER" ]; then kill "$TICKER" 2>/dev/null || true; wait "$TICKER" 2>/dev/null || true; fi
  if [ "$rc" -ne 0 ] && [ -n "$(project_containers)" ]; then
    echo "== smoke test failed (exit $rc): the containers' last log lines"
    for c in $(project_containers); do
      echo "-- $(podman inspect --format '{{.Name}}' "$c" 2>/dev/null)"
      podman logs --tail 25 "$c" 2>&1 || true
    done
  fi
  echo "== teardown"
  if [ -f "$WORK/compose.yml" ]; then
    TIERSERVE_ARTIFACTS="$WORK/model" timeout 120 "$COMPOSE" -p "$PROJECT" -f "$WORK/compose.yml" down -v -t 15 \
      >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
  fi
  local left
  left=$(project_containers)
  if [ -n "$left" ]; then podman rm -f -t 5 $left >/dev/null 2>&1 || true; fi
  podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  for kind in container volume network; do  # what the k8s pods step made (smoke.py pods)
    case $kind in container) list=(ps -a -q);; *) list=("$kind" ls -q);; esac
    podman "${list[@]}" --filter "label=io.tierserve.smoke=$PROJECT" 2>/dev/null \
      | xargs -r podman "$kind" rm -f >/dev/null 2>&1 || true
  done
  podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null \
    | xargs -r podman volume rm -f >/dev/null 2>&1 || true
  rm -rf "$WORK"
  if [ -n "$(project_containers)$(podman ps -a -q --filter "label=io.tierserve.smoke=$PROJECT" 2>/dev/null)" ]; then
    echo "teardown left containers behind: $(project_containers)" >&2
    rc=1
  else
    echo "left behind: no container, network or volume of project $PROJECT"
  fi
  echo "== container smoke test $([ "$rc" -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - STARTED)) s"
  for t in "${TIMES[@]}"; do echo "   $t"; done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "container engine"; t=$SECONDS
bash deploy/ci/install-engine.sh
bash deploy/ci/install-prometheus.sh
took "install engine" "$t"

step "base images (made locally: no registry)"; t=$SECONDS
bash deploy/ci/base-images.sh
took "base images" "$t"

step "serving image from deploy/Dockerfile"; t=$SECONDS
secret=()
if [ -s "$CA_BUNDLE" ]; then secret=(--secret "id=pip_ca,src=$CA_BUNDLE"); fi
# --format docker: podman's default OCI format drops HEALTHCHECK
podman build -q --format docker --target serve --build-arg "PYTHON_IMAGE=$PYTHON_BASE" "${secret[@]}" \
  -f deploy/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; exit 1; }
if ! podman image inspect "$IMAGE" | grep -q '"Healthcheck"'; then
  echo "$IMAGE has no HEALTHCHECK (built in OCI format?)" >&2; exit 1
fi
echo "$IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'), HEALTHCHECK kept"
took "image build" "$t"

step "tiny model"; t=$SECONDS
"$PY" deploy/ci/smoke.py model "$WORK/model" >"$WORK/model.log" 2>&1 || { cat "$WORK/model.log" >&2; exit 1; }
took "model" "$t"

step "compose up"; t=$SECONDS
for port in 50051 50052 50053 9101 9102 9103 9090; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is taken: the stack publishes it" >&2; exit 1
  fi
done
"$PY" deploy/ci/smoke.py compose deploy/docker-compose.yml "$WORK/compose.yml" \
  --image "$IMAGE" --prometheus-image "$PROMETHEUS_IMAGE"
# no systemd: podman schedules no healthchecks, so run them every 2 s while the test lasts
( while :; do
    for c in $(podman ps -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null); do
      podman healthcheck run "$c" >/dev/null 2>&1 || true
    done
    sleep 2
  done ) &
TICKER=$!
TIERSERVE_ARTIFACTS="$WORK/model" "$COMPOSE" -p "$PROJECT" -f "$WORK/compose.yml" up -d >"$WORK/up.log" 2>&1 \
  || { cat "$WORK/up.log" >&2; exit 1; }
# podman-compose ignores `condition: service_healthy` before podman 4.6 (it says so): the tiers
# start together and tolerate it (a forwarding tier waits up to 5 s for its next one)
grep -i "warn" "$WORK/up.log" | sort -u || true
podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}} {{.Image}} {{.Status}}'
took "compose up" "$t"

step "checks"; t=$SECONDS
"$PY" deploy/ci/smoke.py check --project "$PROJECT" --artifacts "$WORK/model"
took "checks" "$t"

step "deploy/k8s/base's pods as containers"; t=$SECONDS
if command -v kubectl >/dev/null 2>&1; then
  # the base names the serving image by the project's version (a tag the kubelet does not pull again)
  VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
  podman tag "$IMAGE" "localhost/tierserve:$VERSION"
  podman build -q --format docker --build-arg "BASE=$IMAGE" -f deploy/k8s/model.Dockerfile \
    -t localhost/tierserve-model:default "$WORK/model" >"$WORK/model-image.log" 2>&1 \
    || { cat "$WORK/model-image.log" >&2; exit 1; }
  mkdir "$WORK/pods"
  "$PY" deploy/ci/smoke.py pods --prefix "$PROJECT" --workdir "$WORK/pods"
else
  echo "no kubectl (it renders deploy/k8s offline): skipped"
fi
took "k8s pods" "$t"
