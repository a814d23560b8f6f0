# Everything starts from nothing: the first target that needs the venv creates it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned first so no other requirement can pull a different build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test test-fast lint bench ui queue-reference reference results queue-domain domain domain-results \
	experiments queue-sweep sweep sweep-results clean-venv

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
# the pretrained PAN teacher, Set5 and 20 Manga109 pages with HR ($(MANGA)/test/HR) as extra evaluation
# sets; three arms at equal compute (same steps and batch size), run side by side on one thread each:
#   ref-baseline  the student on HR alone: no teacher (distill.teacher=false: the teacher is run on the
#                 validation images only, for evaluate's teacher row; no training cache is waited for)
#   ref-distill   the distilled student on the labelled images (pixel + KD)
#   ref-upcycle   the same plus teacher-only data: the labelled images upcycled, REF_FRACTION of each
#                 batch. REF_UPCYCLE picks DUKD's zoom-out (the LR downscaled again by the scale, the
#                 teacher's output of it as the target), which helped in a short trial where zoom-in
#                 (the HR as the teacher's input; cropped to REF_ZOOM_SIDE) did not (README). A tenth
#                 of each batch: at the default student a quarter fell behind plain distillation.
# Every arm trains the student REF_BLOCK, REF_CHANNELS x REF_BLOCKS at REF_LR with REF_WARMUP warm-up
# steps (by default params.yaml's, the sweep's best) and is named after it: ref-baseline-rep64x5, ...
# The earlier plain 32 x 4 arms: REF_BLOCK=plain REF_CHANNELS=32 REF_BLOCKS=4 REF_LR=0.002 REF_WARMUP=30.
# Absolute paths: queued experiments run in a temporary copy of the repo.
SHARED ?= $(abspath ../shared)
MANGA ?= $(SHARED)/domains/Manga109
REF_STEPS ?= 24000
REF_JOBS ?= 3
REF_UPCYCLE ?= [zoom_out]
REF_ZOOM_SIDE ?= 128
REF_FRACTION ?= 0.1
REF_BLOCK ?= rep
REF_CHANNELS ?= 64
REF_BLOCKS ?= 5
REF_LR ?= 0.001
REF_WARMUP ?= 300
REF_STUDENT = $(REF_BLOCK)$(REF_CHANNELS)x$(REF_BLOCKS)
REF_PARAMS := -S data.source=folder -S data.folder.train=$(SHARED)/trainsets -S degradation.jpeg_prob=0 \
	-S teacher.source=pan -S weights.dir=$(SHARED)/weights -S ++eval.sets.Set5=$(SHARED)/testsets/Set5/HR \
	-S distill.steps=$(REF_STEPS) -S distill.batch_size=32 -S distill.eval_every=1000 \
	-S distill.checkpoint_every=1000 -S distill.threads=1
# The sweep is judged on Set5 only and sets its own students; the reference and domain arms are also
# evaluated on Manga109.
SWEEP_PARAMS := $(REF_PARAMS)
REF_PARAMS += -S ++eval.sets.Manga109=$(MANGA)/test/HR -S student.block=$(REF_BLOCK) \
	-S student.channels=$(REF_CHANNELS) -S student.blocks=$(REF_BLOCKS) -S distill.lr=$(REF_LR) \
	-S distill.warmup_steps=$(REF_WARMUP)
NO_TEACHER := -S distill.teacher=false -S loss.kd=0 -S loss.feature=0
UPCYCLE := -S 'data.upcycle=$(REF_UPCYCLE)' -S data.teacher_only_max_side=$(REF_ZOOM_SIDE) \
	-S distill.unlabeled_fraction=$(REF_FRACTION)
DVC := PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc
# `dvc exp remove a b` removes nothing when one of the names does not exist: one name at a time.
REMOVE_EXPERIMENTS = for name in $(1); do $(DVC) exp remove $$name 2>/dev/null; done; true
REFERENCE_ARMS = ref-baseline-$(REF_STUDENT)="HR only, no teacher" \
	ref-distill-$(REF_STUDENT)="distilled, labelled images" \
	ref-upcycle-$(REF_STUDENT)="distilled, labelled + upcycled teacher-only images"

queue-reference: $(VENV)/.installed
	$(call REMOVE_EXPERIMENTS,ref-baseline-$(REF_STUDENT) ref-distill-$(REF_STUDENT) ref-upcycle-$(REF_STUDENT))
	$(DVC) exp run --queue -n ref-baseline-$(REF_STUDENT) $(REF_PARAMS) $(NO_TEACHER)
	$(DVC) exp run --queue -n ref-distill-$(REF_STUDENT) $(REF_PARAMS)
	$(DVC) exp run --queue -n ref-upcycle-$(REF_STUDENT) $(REF_PARAMS) $(UPCYCLE)

reference: queue-reference
	$(DVC) exp run --run-all -j $(REF_JOBS)
	$(MAKE) results

# REF_EXTRA_ARMS: more rows for the table, NAME="label" each, e.g. an arm queued by hand (README).
REF_EXTRA_ARMS ?=
results: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/results_table.py --readme README.md --block results \
		$(REFERENCE_ARMS) $(REF_EXTRA_ARMS)

# The new-domain experiment (README "A new domain"): one more arm on the reference's data, budget,
# student and evaluation sets: the photographs distilled, plus the 40 Manga109 pages of
# $(MANGA)/unlabeled_x4 that exist only as x4 LR images (no HR) as teacher-only inputs, DOMAIN_FRACTION
# of each batch. Its table compares it with the reference's ref-baseline and ref-distill arms of the
# same student on the 20 Manga109 test pages, so it needs `make reference` (or `make experiments`,
# which runs all four arms at once).
DOMAIN_FRACTION ?= 0.5
DOMAIN_ARMS = ref-baseline-$(REF_STUDENT)="photographs only, no teacher" \
	ref-distill-$(REF_STUDENT)="photographs only, distilled" \
	dom-manga-$(REF_STUDENT)="photographs + unlabeled Manga109 pages, distilled"

queue-domain: $(VENV)/.installed
	$(call REMOVE_EXPERIMENTS,dom-manga-$(REF_STUDENT))
	$(DVC) exp run --queue -n dom-manga-$(REF_STUDENT) $(REF_PARAMS) -S data.unlabeled=$(MANGA)/unlabeled_x4 \
		-S distill.unlabeled_fraction=$(DOMAIN_FRACTION)

domain: queue-domain
	$(DVC) exp run --run-all -j 1
	$(MAKE) domain-results

domain-results: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/results_table.py --readme README.md --block domain \
		$(DOMAIN_ARMS)

# All four arms at once (over three hours on a 2-core CPU at the default student), then both tables.
EXPERIMENT_JOBS ?= 4
experiments: queue-reference queue-domain
	$(DVC) exp run --run-all -j $(EXPERIMENT_JOBS)
	$(MAKE) results domain-results

# The student-size sweep (README "A stronger student at the same cost"): students of several widths,
# depths and block types on the reference data and budget, distilled from PAN, two at a time; then
# scripts/sweep_table.py measures each size's float32 and INT8 speed side by side in one run and writes
# the Pareto table and docs/sweep.png into the README. The defaults are the recipe of the first arms
# (rep at lr 5e-4, 30 warm-up steps); the default student's is SWEEP_REP_LR=0.001 SWEEP_WARMUP=300.
# SWEEP_TAG is appended to the arm names, so a second recipe does not replace the first's arms.
SWEEP_JOBS ?= 2
SWEEP_REP_LR ?= 0.0005
SWEEP_PLAIN_LR ?= 0.002
SWEEP_WARMUP ?= 30
SWEEP_BLOCKS ?= plain rep
SWEEP_SIZES ?= 32x4 48x4 48x6 64x4
SWEEP_TAG ?=
SWEEP_ARMS = $(foreach b,$(SWEEP_BLOCKS),$(foreach s,$(SWEEP_SIZES),sweep-$(b)-$(s)$(SWEEP_TAG)))
queue-sweep: $(VENV)/.installed
	$(call REMOVE_EXPERIMENTS,$(SWEEP_ARMS))
	$(foreach a,$(SWEEP_ARMS),$(DVC) exp run --queue -n $(a) $(SWEEP_PARAMS) \
		-S student.block=$(word 2,$(subst -, ,$(a))) \
		-S student.channels=$(word 1,$(subst x, ,$(word 3,$(subst -, ,$(a))))) \
		-S student.blocks=$(word 2,$(subst x, ,$(word 3,$(subst -, ,$(a))))) \
		-S distill.lr=$(if $(filter rep,$(word 2,$(subst -, ,$(a)))),$(SWEEP_REP_LR),$(SWEEP_PLAIN_LR)) \
		-S distill.warmup_steps=$(SWEEP_WARMUP) && ) true

sweep: queue-sweep
	$(DVC) exp run --run-all -j $(SWEEP_JOBS)
	$(MAKE) sweep-results

sweep-results: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python scripts/sweep_table.py $(SWEEP_RESULTS) --prefix sweep- --readme README.md

ui: $(VENV)/.installed
	$(BIN)/sharpkd ui

clean-venv:
	rm -rf $(VENV)
