# cellseg — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# the real data for `make compare`: where the README unzips it, else the development checkout's
DSB2018 ?= $(firstword $(wildcard data/dsb2018/stage1_train ../shared/data/dsb2018/stage1_train) data/dsb2018/stage1_train)

.DEFAULT_GOAL := help
.PHONY: help install train test test-quick test-full sweep compare bench model tensorboard lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | sed 's|$$(DSB2018)|$(DSB2018)|g' | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install cellseg with its dev tools

train: $(STAMP) ## train the augmented study on the embedded synthetic data (ends with its checkpoint)
	$(PY) -m cellseg.train experiment=augmented

# a virtual screen for the napari tests where the machine has one (apt-get install xvfb)
XVFB := $(if $(DISPLAY),,$(if $(shell command -v xvfb-run),xvfb-run -a))

test: $(STAMP) ## run the test suite (without slow tests)
	$(XVFB) $(PY) -m pytest -m "not slow" --durations=15

test-quick: $(STAMP) ## the quick part: functions alone, no whole command or training (e2e)
	$(XVFB) $(PY) -m pytest -m "not slow and not e2e" --durations=10

test-full: $(STAMP) ## run every test, slow ones included
	$(XVFB) $(PY) -m pytest

sweep: $(STAMP) ## baseline and augmented side by side (DATA=dsb2018 for the real data)
	$(PY) -m cellseg.train -m experiment=baseline,augmented $(if $(DATA),data=$(DATA))

NOW := $(shell date +%Y-%m-%d_%H-%M-%S)
REAL_DATA := $(if $(wildcard $(DSB2018)/*),data=dsb2018 data.root=$(abspath $(DSB2018)))
compare: $(STAMP) ## baseline vs augmented (real data when $(DSB2018) exists), then their comparison
	@echo "make compare: $(if $(REAL_DATA),the real data in $(abspath $(DSB2018)),the synthetic data (no images in $(DSB2018); DSB2018=DIR names the real data))"
	$(PY) -m cellseg.train -m experiment=baseline,augmented $(REAL_DATA) hydra.sweep.dir=logs/train/multiruns/compare_$(NOW)
	$(PY) -m cellseg.compare 'runs=[logs/train/multiruns/compare_$(NOW)]'

bench: $(STAMP) ## measure training and prediction speed (writes bench.md and bench.json)
	$(PY) -m cellseg.bench $(if $(wildcard $(MODEL_DATA)/dsb2018-pool),folder.root=$(MODEL_DATA)/dsb2018-pool)

# the folder holding dsb2018/stage1_train (the 50-image sample) and dsb2018-pool (300 more)
MODEL_DATA ?= ../shared/data
model: $(STAMP) ## retrain the shipped model: experiment=general on MODEL_DATA=../shared/data (21-90 min, 2 cores)
	$(PY) -m cellseg.train experiment=general paths.data_dir=$(abspath $(MODEL_DATA)) hydra.run.dir=logs/general/$(NOW)
	$(PY) scripts/ship_model.py logs/general/$(NOW)

tensorboard: $(STAMP) ## open TensorBoard on every run under logs/
	$(VENV)/bin/tensorboard --logdir logs

lint: $(STAMP) ## check the style with ruff
	$(VENV)/bin/ruff check src tests

clean: ## remove logs and caches (keeps .venv and data/)
	rm -rf logs .pytest_cache .ruff_cache build dist
	find . -name __pycache__ -prune -exec rm -rf {} +
