# Set-up is part of every target: a local .venv, the CPU torch wheel first
# (a bare `torch` requirement would pull gigabytes of CUDA wheels), then easympt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -n 2 --timeout 600
SERVE_ARGS  ?=

.PHONY: install test serve bench clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,serve,train,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/easympt serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
