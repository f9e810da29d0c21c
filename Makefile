# kdsl-replication — `make help` lists the targets.
#
#   make reproduce                      # paper profile where CUDA is visible, else mini; synthetic data
#   make reproduce DATA_DIR=../shared/mire PROFILE=mini
#   make test
#
# Targets are files: each notebook's run.json depends on the notebook, the package sources
# and the data, so a second `make reproduce` re-runs only what changed. Results live in
# RESULTS_ROOT/<profile>/<data>/seed<SEED>/ (another SEED writes beside, never over); the
# other result-changing parameters and the data files' content are in that folder's
# params.json, rewritten only when they change, on which every run.json depends.

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
RESULTS_ROOT ?= results
PRODUCTS_ROOT ?= products
# Profile: PROFILE=... wins; else paper where CUDA is visible, mini elsewhere (decided once per make run).
PROFILE ?= $(shell if [ -x $(PY) ]; then $(PY) -c "import torch; print('paper' if torch.cuda.is_available() else 'mini')" 2>/dev/null || echo mini; \
  elif nvidia-smi -L >/dev/null 2>&1; then echo paper; else echo mini; fi)
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
RESULTS := $(RESULTS_ABS)/$(PROFILE)/$(DATA_TAG)/seed$(SEED)
PRODUCTS := $(PRODUCTS_ABS)/$(PROFILE)/$(DATA_TAG)/seed$(SEED)
PARAMS := $(RESULTS)/params.json
PKG_SRC := $(shell find kdsl_utils -name '*.py' -o -name '*.json' 2>/dev/null) pyproject.toml
NOTEBOOKS := $(sort $(basename $(notdir $(wildcard notebooks/[0-8]*.ipynb))))
NB_PARAMS = -p PROFILE $(PROFILE) -p DATA_DIR "$(DATA_ABS)" -p SEED $(SEED) \
            -p SMOKE $(SMOKE) -p RESULTS_DIR "$(RESULTS_ABS)" $(if $(TEST_FILES),-p TEST_FILES '$(TEST_FILES)',)
RUN_ARGS = PROFILE=$(PROFILE) DATA_DIR="$(DATA_DIR)" SEED=$(SEED) TEST_FILES='$(TEST_FILES)' SMOKE=$(SMOKE) \
           RESULTS_ROOT="$(RESULTS_ROOT)" PRODUCTS_ROOT="$(PRODUCTS_ROOT)"
# The parameter stamp is refreshed (only if its content changes) whenever notebooks may run.
ifneq ($(filter-out help setup test lint clean figures banner,$(or $(MAKECMDGOALS),help)),)
  $(shell [ -x $(PY) ] && $(PY) -m kdsl_utils.notebooks --stamp "$(PARAMS)" $(NB_PARAMS) >&2)
endif

# A recipe that fails leaves no target behind (a half-written run.json is never trusted).
.DELETE_ON_ERROR:

.PHONY: help setup reproduce notebooks test figures lint clean banner

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=paper|mini|tiny  DATA_DIR=<MIRE dir>  SEED=0  TEST_FILES='[\"test1\"]'  SMOKE=true"

setup: $(STAMP) ## create .venv with the pinned packages

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

banner:
	@echo "[kdsl] profile=$(PROFILE) data=$(if $(DATA_DIR),$(DATA_ABS),synthetic (built-in generator)) seed=$(SEED) -> $(RESULTS)"

reproduce: banner $(STAMP) ## run the numbered notebooks in order (results/, products/), then the report
	@$(MAKE) --no-print-directory notebooks $(RUN_ARGS)
	@$(MAKE) --no-print-directory figures
	@echo "[kdsl] done: results in $(RESULTS), rendered notebooks in $(PRODUCTS), figures in figures/"

notebooks: $(foreach nb,$(NOTEBOOKS),$(call esc,$(RESULTS))/$(nb)/run.json) ## only the run notebooks whose inputs changed

$(call esc,$(PARAMS)): | $(STAMP)
	@$(PY) -m kdsl_utils.notebooks --stamp "$@" $(NB_PARAMS)

# Notebook NN depends on the one before it (and so on all earlier ones: their results are its inputs).
define NOTEBOOK_RULE
$(call esc,$(RESULTS))/$(1)/run.json: notebooks/$(1).ipynb $(PKG_SRC) $(call esc,$(PARAMS)) $(2) | $(STAMP)
	$(PY) -m kdsl_utils.notebooks $(1) --out "$(PRODUCTS)" $(NB_PARAMS)
	@test -f "$$@" || { echo "[kdsl] notebook $(1) did not write $$@"; exit 1; }
endef
PREV_RUN :=
$(foreach nb,$(NOTEBOOKS),$(eval $(call NOTEBOOK_RULE,$(nb),$(PREV_RUN)))$(eval PREV_RUN := $(call esc,$(RESULTS))/$(nb)/run.json))

test: $(STAMP) ## run the test suite (unit tests + notebook smoke runs)
	$(PY) -m pytest -q -n 2 --durations=15

figures: $(STAMP) ## regenerate figures and the README results section from results files
	$(PY) -m kdsl_utils.notebooks 90_report --out "$(PRODUCTS_ABS)/report" -p RESULTS_DIR "$(RESULTS_ABS)" \
	  -p FIGURES_DIR "$(CURDIR)/figures" -p README "$(CURDIR)/README.md"

lint: $(STAMP) ## ruff over the package and tests
	$(PY) -m pip install -q ruff==0.17.5 && $(PY) -m ruff check kdsl_utils tests benchmarks

clean: ## remove caches and build leftovers (never results/ or products/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
