# Everything starts from nothing: the first target that needs the venv creates it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned first so no other requirement can pull a different build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test test-fast lint bench ui reference results domain domain-results experiments sweep \
	sweep-results speed speed-results teachers teachers-results recipe recipe-results lr lr-results crop crop-results clean-venv

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

# ruff's rules in pyproject.toml, C901 (complexity over 12) among them; tests/test_layout.py keeps
# every stages/ script under 120 lines.
lint: $(VENV)/.installed
	$(BIN)/ruff check src stages tests scripts
	$(BIN)/ruff format --check src stages tests scripts

bench: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/bench_models.py

# Experiments: each is a profile, profiles/<name>.yaml, an overlay of params.yaml a user can read and
# diff (its arms, their labels, the values every arm shares; docs/experiments.md). `sharpkd profile
# queue` validates every arm against params.yaml, replaces same-named experiments and queues them;
# `sharpkd profile run` also runs the queue. The results tables are written into docs/results.md by
# scripts reading the experiments' metrics. Queued experiments run in a temporary copy of the repo:
# profiles name ../shared as {shared}, expanded to an absolute path ($SHARPKD_SHARED overrides it).
SHARPKD := PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/sharpkd
PY := PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python
RESULTS := docs/results.md

queue-%: $(VENV)/.installed
	$(SHARPKD) profile queue profiles/$*.yaml

reference: $(VENV)/.installed
	$(SHARPKD) profile run profiles/reference.yaml
	$(MAKE) results

domain: $(VENV)/.installed
	$(SHARPKD) profile run profiles/domain.yaml
	$(MAKE) domain-results

sweep: $(VENV)/.installed
	$(SHARPKD) profile run profiles/sweep.yaml
	$(MAKE) sweep-results

# Which teacher (issue 26): DCTLSA and the DCTLSA + PAN ensemble against the reference's arms.
teachers: $(VENV)/.installed
	$(SHARPKD) profile run profiles/teachers.yaml
	$(MAKE) teachers-results

# The speed students (issue 26): the best at or under 60 and 33 ms per 1080p frame in INT8, beside the
# published models of their size.
speed: $(VENV)/.installed
	$(SHARPKD) profile run profiles/speed.yaml
	$(MAKE) speed-results

# Recipe levers (issue 26), each against its control at equal compute.
recipe: $(VENV)/.installed
	$(SHARPKD) profile run profiles/recipe.yaml
	$(MAKE) recipe-results

# The learning rate (issue 26), against a float32 control of its own.
lr: $(VENV)/.installed
	$(SHARPKD) profile run profiles/lr.yaml
	$(MAKE) lr-results

# Crop size at equal pixels per step (issue 26), the 96-pixel crops as the control.
crop: $(VENV)/.installed
	$(SHARPKD) profile run profiles/crop.yaml
	$(MAKE) crop-results

# The reference and domain arms at once (over three hours on a 2-core CPU), then both tables.
experiments: $(VENV)/.installed
	$(SHARPKD) profile run profiles/reference.yaml profiles/domain.yaml --jobs 4
	$(MAKE) results domain-results

results: $(VENV)/.installed
	$(PY) scripts/results_table.py --profile profiles/reference.yaml --doc $(RESULTS) --block results

domain-results: $(VENV)/.installed
	$(PY) scripts/results_table.py --profile profiles/domain.yaml --doc $(RESULTS) --block domain

sweep-results: $(VENV)/.installed
	$(PY) scripts/sweep_table.py --profile profiles/sweep.yaml --doc $(RESULTS)

speed-results: $(VENV)/.installed
	$(PY) scripts/sweep_table.py --profile profiles/speed.yaml --doc $(RESULTS) --block speed \
		--plot docs/speed.png --published

teachers-results: $(VENV)/.installed
	$(PY) scripts/results_table.py --profile profiles/teachers.yaml --doc $(RESULTS) --block teachers

recipe-results: $(VENV)/.installed
	$(PY) scripts/results_table.py --profile profiles/recipe.yaml --doc $(RESULTS) --block recipe

lr-results: $(VENV)/.installed
	$(PY) scripts/results_table.py --profile profiles/lr.yaml --doc $(RESULTS) --block lr

crop-results: $(VENV)/.installed
	$(PY) scripts/results_table.py --profile profiles/crop.yaml --doc $(RESULTS) --block crop

ui: $(VENV)/.installed
	$(BIN)/sharpkd ui

clean-venv:
	rm -rf $(VENV)
