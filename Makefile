# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test lint bench data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

# Debian's Fashion-MNIST, when missing and apt-get is usable (as root).
data:
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && apt-get install -y -q dataset-fashion-mnist; fi

demo: $(VENV)/.installed data
	$(PY) -m engine.cli demo

test: $(VENV)/.installed-dev data
	$(PY) -m ruff check engine kernels benchmarks examples tests
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check engine kernels benchmarks examples tests

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.installed-bench data
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
