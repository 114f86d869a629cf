# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment .venv and install torch==2.13.0 before anything
# else: an unpinned torch would pull a multi-GB CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= disabled

.PHONY: install test test-fast lint demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-bench.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-bench.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The unit tier: everything but the multi-process and end-to-end runs (marked slow); under 2 minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(VENV)/bin/ddpo demo --output-dir demo_output

clean:
	rm -rf $(VENV) build *.egg-info
