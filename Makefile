# tracetape — the README's two set-up commands are `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

## up: start the collector sidecar and the replayer on the embedded LMDB store (127.0.0.1:4317/4318, replayer 4380)
up: $(STAMP)
	$(BIN)/tracetape up --config otel-config.yaml

## test: install everything and run the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q

## bench: run the benchmarks (full) / bench-quick: under 5 minutes
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
