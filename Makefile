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
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1 ninja numpy pytest pytest-benchmark hypothesis ruff==0.17.6 mypy==2.4.1 rich matplotlib \
		onnx onnxruntime onnxscript mmengine==0.10.7 mmdet==3.3.0 mmcv-lite==2.1.0
	FPN_KERNELS_NO_EXTENSIONS=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The extensions, built in place under build/ by ninja: only what changed is recompiled.
build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace

test: setup
	$(VPY) -m ruff check fpn_kernels tests benchmarks setup.py
	$(VPY) -m mypy
	$(VPY) -m pytest -q tests benchmarks --benchmark-disable

bench: setup
	$(VPY) -m fpn_kernels bench

check: setup
	$(VPY) -m fpn_kernels check

profile: setup
	$(VPY) -m fpn_kernels profile

lint: $(STAMP)
	$(VPY) -m ruff check fpn_kernels tests benchmarks setup.py
	$(VPY) -m mypy

clean:
	rm -rf build *.egg-info fpn_kernels/*.so

# The GPU machine's stack (torch 2.11 / torchvision 0.26 / triton 3.6, no registry there): a
# second venv, a copy of the working tree (so its extensions never replace .venv's in place),
# the extensions built against torch 2.11, then the CPU suite, which includes the Triton
# interpreter run and the sm_80/sm_90 AOT checks. Downloads several GB once. Not part of `test`.
# numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4
# refuses, so every kernel loop over a runtime bound fails there (triton 3.8 squeezes first);
# compiled kernels do not use numpy.
COMPAT     := .venv-compat
CPY        := $(abspath $(COMPAT))/bin/python
COMPAT_SRC := $(COMPAT)/src

.PHONY: test-compat
test-compat:
	test -x $(CPY) || $(PY) -m venv $(COMPAT)
	$(CPY) -m pip install -q torch==2.11.0 torchvision==0.26.0 ninja "numpy<2.4" pytest pytest-benchmark hypothesis rich matplotlib
	rm -rf $(COMPAT_SRC) && mkdir -p $(COMPAT_SRC)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(COMPAT_SRC)
	cd $(COMPAT_SRC) && $(CPY) setup.py -q build_ext --inplace
	cd $(COMPAT_SRC) && $(CPY) -c "import torch, triton; print('test-compat: torch', torch.__version__, 'triton', triton.__version__)"
	cd $(COMPAT_SRC) && $(CPY) -m pytest -q tests --benchmark-disable -p no:cacheprovider
