# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv/ at the repo root if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-output

.PHONY: demo test lint bench bench-quick clean chromium viewer

$(BIN)/nasar-zarr: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU-only PyTorch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet 'torch==2.13.0'
	$(BIN)/pip install --quiet -e '.[test,s3,notebooks,torch]'
	touch $@

# Synthetic corpus (3 tar shards x 40 samples) -> Zarr v3 cube, then describe it.
demo: $(BIN)/nasar-zarr
	rm -rf $(DEMO)
	$(BIN)/nasar-zarr synth $(DEMO)/corpus --shards 3 --samples-per-shard 40 --seed 3
	$(BIN)/nasar-zarr convert $(DEMO)/corpus $(DEMO)/nasar.zarr --shard 32 --workers 2
	$(BIN)/nasar-zarr info $(DEMO)/nasar.zarr

# Lint, format, types, then the tests: CI runs exactly this (.ci/run).
test: $(BIN)/nasar-zarr chromium
	$(BIN)/ruff check nasar_zarr tests benchmarks
	$(BIN)/ruff format --check nasar_zarr tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(BIN)/nasar-zarr
	$(BIN)/ruff check nasar_zarr tests benchmarks
	$(BIN)/ruff format --check nasar_zarr tests benchmarks
	$(BIN)/mypy

bench-quick: $(BIN)/nasar-zarr
	$(BIN)/python benchmarks/run.py --quick

bench: $(BIN)/nasar-zarr
	$(BIN)/python benchmarks/run.py

# Headless Chromium for the viewer's browser tests (Debian's package; we run as root).
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)

# Rebuild the viewer's committed bundle from viewer/src (needs node/npm; pip install does not).
viewer:
	cd viewer && npm ci && npm run build

clean:
	rm -rf $(DEMO) .pytest_cache
