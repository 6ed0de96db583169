# Two commands on a fresh machine: `make demo` and `make test`. Both create the environment if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build we test against; GPU clusters bring their own torch in the image.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Ray job entrypoints and workers run `python`: make it the environment's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test test-fast setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,mlflow,cloud]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.run --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not ray and not model"

clean:
	rm -rf runs .pytest_cache
