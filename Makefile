# `make test` and `make demo` create or reuse .venv. torch is pinned to the local CPU wheel FIRST
# so that no dependency pulls a multi-GB CUDA build; the package itself never pins torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test check demo lint bench reproduce clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps clip-anytorch
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv lint
	$(VENV)/bin/pytest

# The quick lane for edit-test loops: ruff plus every test not marked `slow`, on both cores
# (pytest-xdist; about 75 s on 2 cores, 125 s in one process). CI runs `make test` (everything,
# one process: the concurrency tests start their own processes).
check: venv lint
	$(VENV)/bin/pytest -m "not slow" -n 2

demo: venv
	$(VENV)/bin/dpagg demo

bench: venv
	$(PY) bench/calibrate_timing.py
	$(PY) bench/aggregate_timing.py
	$(PY) bench/ti_throughput.py

# The paper's comparison on the mini model (hours on 2 CPU cores; resumes from bench/results).
reproduce: venv
	nice -n 19 $(PY) bench/reproduce_paper.py --jobs 2

clean:
	rm -rf $(VENV) build *.egg-info
