# Quick start on a fresh machine: `make demo` and `make test` (both run `setup` first).
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Single-machine Ray stays on 127.0.0.1 (README, "Tests and environment").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PINS)
	$(PIP) install -e ".[test]" $(TORCH_PINS)
	touch $@

demo: setup
	$(VENV)/bin/python -m launch.demo

test: setup
	$(VENV)/bin/python -m pytest -q tests

# The unit layer alone: no Ray, DeepSpeed engines, training subprocesses or servers (tests/conftest.py).
test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not integration" tests

clean:
	rm -rf runs data/samples
