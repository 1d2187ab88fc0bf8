# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned so that pip takes the CPU wheel instead of a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[deep,demo,test,bench,ray,sfm,serve]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/asmkit demo --out demo_output

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/python -m benchmarks.bench_reference --synthetic 1000

clean:
	rm -rf $(VENV) demo_output
