# Two commands do everything: `make demo` and `make test`. Both create .venv first.
#
# torch is installed on its own, before the project, so pip never resolves a multi-GB
# CUDA build by accident. GPU users pick another build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# (both are read from the environment too).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
EXTRAS ?= dev,gis,hpc
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sitfuse run -c configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	bash benchmarks/fetch_data.sh
	$(BIN)/python benchmarks/bench_tiling.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
