# Both verbs set themselves up: a .venv in the repo root, created when missing.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The registry's CUDA builds of this pair import on CPU-only machines; a CPU-only torch wheel
# has no matching torchvision on PyPI (torchvision then fails with 'torchvision::nms does not exist').
TORCH := torch==2.13.0 torchvision==0.28.0

.PHONY: demo test test-all test-gpu bench setup

demo: $(STAMP)
	$(VENV)/bin/tsm-surgery demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -n 2

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 -m ''

# The CUDA suite alone (tests/test_cuda.py): skipped, not failed, on a machine without a GPU.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m cuda -p no:xdist

bench: $(STAMP)
	$(VENV)/bin/tsm-surgery bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -e '.[timm,mmaction,export,deploy,test]' $(TORCH)
	touch $(STAMP)
