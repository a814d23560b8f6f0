# Everything starts from nothing: the first target that needs the venv creates it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned first so no other requirement can pull a different build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test test-fast lint bench ui reference results clean-venv

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
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

bench: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/bench_models.py

# The reference experiment (README "Results"): the photographs in ../shared/trainsets, x4 bicubic,
# the pretrained PAN teacher, Set5 as an extra evaluation set; a distilled student and the same
# student without distillation (loss.kd=0, loss.feature=0), same steps, run side by side on one
# thread each. Absolute paths: queued experiments run in a temporary copy of the repo.
SHARED ?= $(abspath ../shared)
REF_STEPS ?= 24000
REF_PARAMS := -S data.source=folder -S data.folder.train=$(SHARED)/trainsets -S degradation.jpeg_prob=0 \
	-S teacher.source=pan -S weights.dir=$(SHARED)/weights -S ++eval.sets.Set5=$(SHARED)/testsets/Set5/HR \
	-S distill.steps=$(REF_STEPS) -S distill.batch_size=32 -S distill.eval_every=1000 \
	-S distill.checkpoint_every=1000 -S distill.threads=1

reference: $(VENV)/.installed
	-PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc exp remove ref-distill ref-baseline 2>/dev/null
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc exp run --queue -n ref-distill $(REF_PARAMS)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc exp run --queue -n ref-baseline $(REF_PARAMS) -S loss.kd=0 -S loss.feature=0
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc exp run --run-all -j 2
	$(MAKE) results

results: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/results_table.py ref-distill ref-baseline --readme README.md

ui: $(VENV)/.installed
	$(BIN)/sharpkd ui

clean-venv:
	rm -rf $(VENV)
