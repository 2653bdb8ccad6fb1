# `make test` and `make demo` work from a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo style quality

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch may pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

style: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

quality: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check .
