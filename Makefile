# The two set-up commands: `make demo` runs the main job on the built-in demo, `make test` runs the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CORES ?= 4

.PHONY: demo test test-fast style lint clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/snakemake --cores $(CORES) results/engine_int8.plan

test: style lint
	$(PYTHON) -m pytest

# every test that runs neither Snakemake nor nvcc (no `pipeline` mark): a few minutes instead of CI's full suite
test-fast: style
	$(PYTHON) -m pytest -m "not pipeline"

# ruff formats and checks the tree
style: $(INSTALLED)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# Snakemake's linter on the workflow (part of `make test`, so of CI)
lint: $(INSTALLED)
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results logs .snakemake
