# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv/ at the repo root if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo-output

.PHONY: demo test lint bench bench-quick clean

$(BIN)/nasar-zarr: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,s3,notebooks]'
	touch $@

# Synthetic corpus (3 tar shards x 40 samples) -> Zarr v3 cube, then describe it.
demo: $(BIN)/nasar-zarr
	rm -rf $(DEMO)
	$(BIN)/nasar-zarr synth $(DEMO)/corpus --shards 3 --samples-per-shard 40 --seed 3
	$(BIN)/nasar-zarr convert $(DEMO)/corpus $(DEMO)/nasar.zarr --shard 32 --workers 2
	$(BIN)/nasar-zarr info $(DEMO)/nasar.zarr

test: $(BIN)/nasar-zarr
	$(BIN)/python -m pytest -q

lint: $(BIN)/nasar-zarr
	$(BIN)/ruff check nasar_zarr tests benchmarks

bench-quick: $(BIN)/nasar-zarr
	$(BIN)/python benchmarks/run.py --quick

bench: $(BIN)/nasar-zarr
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(DEMO) .pytest_cache
