# Two-command quick start: `make demo` and `make test` on a fresh clone with only python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dinov2.cli.demo --output-dir outputs/demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)  # make bench ARGS=--quick: a smoke run into benchmarks/results/quick/ (committed tables kept)
	$(PY) -m benchmarks.run_all $(ARGS)

clean:
	rm -rf $(VENV) outputs build *.egg-info
