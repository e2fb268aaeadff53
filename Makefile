# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# `make example` runs examples/digits_compare.py, the optimizers in a plain PyTorch loop.
# Both set up a virtual environment first; torch is pinned by constraints.txt (CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench example setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/otmdr compare --config configs/demo-label-noise.yaml --methods sgd,sam,otmdr --seeds 5 \
	  --grid sam.rho=0.05,0.1,0.2,0.5 --grid 'otmdr.rho=[0.025,0.05],[0.05,0.1],[0.1,0.2],[0.25,0.5]' \
	  --grid sgd:optim.lr=0.01,0.025,0.05,0.1 --grid sgd:optim.weight_decay=5e-4,5e-3,2e-2,5e-2 \
	  --reference sgd,sam --quiet --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest -q

example: $(STAMP)
	$(PY) examples/digits_compare.py

bench: $(STAMP)
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
