# The README's two commands: `make demo` and `make test`. Each creates its own virtual env.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench format clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The demo is a CPU study (libtpu, installed for the tests, would otherwise probe for a TPU).
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m doremi_jax.pipeline --gin_file=gin/pipelines/demo_cpu.gin

test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q --runslow tests

bench: $(STAMP)
	$(PY) bench/bench_train.py

# One formatter for the repository (yapf, .style.yapf).
format: $(STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m yapf -i -r -p doremi_jax data_pipelines tests bench launch setup.py

clean:
	rm -rf $(VENV) build *.egg-info
