# Everything starts from nothing: the first target that needs the venv creates it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned first so no other requirement can pull a different build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test test-fast lint bench ui clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m "not slow and not browser"

lint: $(VENV)/.installed
	$(BIN)/ruff check src stages tests scripts
	$(BIN)/ruff format --check src stages tests scripts

bench: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/bench_models.py

ui: $(VENV)/.installed
	$(BIN)/sharpkd ui

clean-venv:
	rm -rf $(VENV)
