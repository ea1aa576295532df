# make setup: idempotent venv + editable build;  make test: setup, then pytest;  make bench.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-stamp

.PHONY: setup build test bench check profile lint clean

setup: $(STAMP) build

# Re-run when this file changes (new test dependencies reach existing venvs too).
$(STAMP): Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1 ninja numpy pytest pytest-benchmark hypothesis ruff mypy rich matplotlib \
		onnx onnxruntime onnxscript mmengine==0.10.7 mmdet==3.3.0 mmcv-lite==2.1.0
	FPN_KERNELS_NO_EXTENSIONS=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The extensions, built in place under build/ by ninja: only what changed is recompiled.
build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace

test: setup
	$(VPY) -m ruff check fpn_kernels tests benchmarks setup.py
	$(VPY) -m pytest -q tests benchmarks --benchmark-disable

bench: setup
	$(VPY) -m fpn_kernels bench

check: setup
	$(VPY) -m fpn_kernels check

profile: setup
	$(VPY) -m fpn_kernels profile

lint: $(STAMP)
	$(VPY) -m ruff check fpn_kernels tests benchmarks setup.py

clean:
	rm -rf build *.egg-info fpn_kernels/*.so
