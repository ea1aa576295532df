# make setup: idempotent venv + editable build;  make test: setup, then pytest;  make bench.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-stamp
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup build test bench lint clean

setup: $(STAMP) build

$(STAMP):
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1 ninja numpy pytest pytest-benchmark hypothesis ruff mypy rich matplotlib
	touch $(STAMP)

# Rebuilds only what changed (ninja); an up-to-date tree costs a second.
build: $(STAMP)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: setup
	$(VPY) -m ruff check fpn_kernels tests benchmarks setup.py
	$(VPY) -m pytest -q tests benchmarks --benchmark-disable

bench: setup
	$(VPY) -m fpn_kernels bench

lint: $(STAMP)
	$(VPY) -m ruff check fpn_kernels tests benchmarks setup.py

clean:
	rm -rf build *.egg-info fpn_kernels/*.so
