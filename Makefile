# Two commands on a fresh machine: `make demo` (set up, then the main job on built-in data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel for development and CI; GPU users: make setup TORCH=torch (or a CUDA build of their choice)
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/crystalae demo

# pytest exits 5 when it collects no tests; that is not a failure of the suite
test: setup
	$(BIN)/ruff check crystalae search dashboard tests bench
	$(BIN)/python -m pytest -q -x; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: setup
	$(BIN)/python bench/voxelize.py
