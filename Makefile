# The two commands: `make demo` (set up; the shipped U-Net outlines a real case; then train a short U-Net,
# evaluate, export) and `make test`.
PYTHON := .venv/bin/python
DATA ?= data
RUNS ?= runs

.PHONY: setup setup-dev demo app train test test-fast lint format results bench clean

# the environment is (re)installed when requirements.txt or pyproject.toml is newer than its stamp; the tests, the
# linter and the PyTorch backend (requirements-dev.txt) only for `make test`, `lint`, `format` and CI.
# BASE_PYTHON: the interpreter the environment is made from (make demo BASE_PYTHON=python3.12)
BASE_PYTHON ?= python3
INSTALLED := .venv/.lgg-installed
DEV_INSTALLED := .venv/.lgg-dev-installed
$(INSTALLED): requirements.txt pyproject.toml
	@$(BASE_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "$(BASE_PYTHON) is Python $$($(BASE_PYTHON) -c 'import platform; print(platform.python_version())');" \
	  "this project needs 3.11 or later: make $(MAKECMDGOALS) BASE_PYTHON=python3.11 (or newer)" >&2; exit 1; }
	@if [ -x $(PYTHON) ] && ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	  echo ".venv was made with Python $$($(PYTHON) -c 'import platform; print(platform.python_version())')," \
	  "below 3.11, and venv keeps it: remove .venv (rm -rf .venv) and run make again" >&2; exit 1; fi
	$(BASE_PYTHON) -m venv .venv
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps --editable .
	touch $(INSTALLED)

$(DEV_INSTALLED): requirements-dev.txt $(INSTALLED)
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_INSTALLED)

setup: $(INSTALLED)

setup-dev: $(DEV_INSTALLED)

# Real data in data/ if present (restored from ../shared/lgg on team machines), else the SYNTHETIC demo set. Its two run
# folders are recorded as made by it ($(RUNS)/.made-by-demo-NAME) before anything is written there; a folder of that
# name that it did not make is refused, not overwritten.
DEMO_FOLDERS = demo-predict demo-unet
demo: setup
	@for name in $(DEMO_FOLDERS); do \
	  if [ -L $(RUNS)/$$name ] || { [ -e $(RUNS)/$$name ] && [ ! -f $(RUNS)/.made-by-demo-$$name ]; }; then \
	    echo "$(RUNS)/$$name exists and make demo did not make it: move it away (make demo writes only its own folders)"; \
	    exit 1; fi; done
	@mkdir -p $(RUNS) && for name in $(DEMO_FOLDERS); do touch $(RUNS)/.made-by-demo-$$name; done
	@if [ -d $(DATA)/kaggle_3m ]; then echo "Using the real data in $(DATA)/kaggle_3m"; \
	elif [ -f ../shared/lgg/restore.py ]; then $(PYTHON) ../shared/lgg/restore.py $(DATA); \
	else echo "No dataset in $(DATA)/: using a SYNTHETIC demo set (see data/README.md for the real one)"; \
	  $(PYTHON) -m lgg demo-data --dest $(DATA)/demo; fi
	@if [ -d $(DATA)/kaggle_3m ] && [ -f models/unet/model.h5 ]; then \
	  case=$$(ls -d $(DATA)/kaggle_3m/*/ | head -1); echo "The shipped U-Net (models/unet) on $$case:"; \
	  $(PYTHON) -m lgg predict --out $(RUNS)/demo-predict --overwrite $$case; fi
	$(PYTHON) -m lgg train unet --data $$( [ -d $(DATA)/kaggle_3m ] && echo $(DATA) || echo $(DATA)/demo ) \
	  --out $(RUNS)/demo-unet --max-cases 24 --epochs 3 --image-size 128 --overwrite

# The web page on http://127.0.0.1:7860: upload a NIfTI volume, a zipped case folder or slices (the shipped U-Net).
app: setup
	$(PYTHON) -m lgg app

# The shipped model's recipe (an hour on a 2-core CPU; lgg.config.SHIPPED_RECIPE): without --precision, `train` computes
# a U-Net in bfloat16 on a CPU with AVX-512 BF16 (1.5-1.9x the slices/s; README, Speed), as the recipe was measured,
# and in float32 elsewhere.
train: setup
	$(PYTHON) -m lgg train unet --data $(DATA) --out $(RUNS)/unet --image-size 128 --tumor-fraction 0.5 --max-minutes 60 \
	  --schedule time-cosine --snapshot-minutes 15 30 45 60 --augmentation strong --flair-only 0.2

lint: setup-dev
	$(PYTHON) -m ruff check lgg tests benchmarks U_Net ResNet50_plus_UNet Classification
	$(PYTHON) -m ruff format --check lgg tests benchmarks U_Net ResNet50_plus_UNet Classification

format: setup-dev  # rewrite the code in the project's style (what `make lint` checks)
	$(PYTHON) -m ruff check --fix lgg tests benchmarks U_Net ResNet50_plus_UNet Classification
	$(PYTHON) -m ruff format lgg tests benchmarks U_Net ResNet50_plus_UNet Classification

test: lint
	$(PYTHON) -m pytest -q --durations=15

test-fast: setup-dev  # everything but the slow end-to-end tests (training, notebooks)
	$(PYTHON) -m pytest -q -m "not slow"

results: setup
	bash benchmarks/results.sh

bench: setup
	$(PYTHON) benchmarks/bench.py --data $(DATA) --out results/benchmark.json

# only what make itself created, by its records: the environment (its stamp) and, in the folders make demo made (its
# records), what train and predict wrote there; never other runs, a hand-made .venv, or files of yours (kept, named)
CLEAN_FOLDER = import sys; from lgg.guards import clean_command; sys.exit(clean_command(sys.argv[1]))
clean:
	@status=0; for name in $(DEMO_FOLDERS); do folder=$(RUNS)/$$name; record=$(RUNS)/.made-by-demo-$$name; \
	  if [ -f $$record ] && [ ! -e $$folder ]; then rm -f $$record; \
	  elif [ -f $$record ] && [ -x $(PYTHON) ]; then \
	    if $(PYTHON) -c '$(CLEAN_FOLDER)' $$folder; then [ -e $$folder ] || rm -f $$record; else status=1; fi; \
	  elif [ -e $$folder ]; then echo "kept $$folder: make demo did not make it (or no $(PYTHON) to clean it with)"; fi; \
	done; exit $$status
	@if [ -f $(INSTALLED) ]; then rm -rf .venv; echo "removed .venv"; \
	elif [ -e .venv ]; then echo "kept .venv: make setup did not make it (no $(INSTALLED))"; fi
