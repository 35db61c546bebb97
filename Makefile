# Two entry points on a fresh machine:
#   make demo   - generate the toy face dataset, train a backbone + ArcFace head, verify (<= 5 min, 2 CPU cores)
#   make test   - ruff, mypy and the whole pytest suite (doctests and example smoke runs included)
# Each creates .venv (once) and installs what it needs into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 are the pair that import together on this platform's wheels.
TORCH  := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: demo test lint typecheck pytest docs bench bench-quick dist clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	touch $@

$(VENV)/.examples: $(VENV)/.created pyproject.toml
	$(PY) -m pip install -q -e '.[examples]'
	touch $@

$(VENV)/.dev: $(VENV)/.created pyproject.toml
	$(PY) -m pip install -q -e '.[examples,dev,docs]'
	touch $@

demo: $(VENV)/.examples
	$(PY) examples/face/demo.py --out $(DEMO_DIR)

lint: $(VENV)/.dev
	$(PY) -m ruff check .

typecheck: $(VENV)/.dev
	$(PY) -m mypy

pytest: $(VENV)/.dev
	$(PY) -m pytest -n 2 --dist loadgroup marginloss tests

test: lint typecheck pytest

docs: $(VENV)/.dev
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
	$(PY) -m sphinx -W --keep-going -b doctest docs docs/_build/doctest

bench: $(VENV)/.dev
	$(PY) benchmarks/heads.py

bench-quick: $(VENV)/.dev
	$(PY) benchmarks/heads.py --quick

dist: $(VENV)/.dev
	rm -rf dist
	$(PY) -m build
	$(PY) -m twine check dist/*

clean:
	rm -rf $(VENV) dist build docs/_build .pytest_cache .mypy_cache .ruff_cache runs
