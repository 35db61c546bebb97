# Two entry points on a fresh machine:
#   make demo   - generate the toy face dataset, train a backbone + ArcFace head, verify
#                 (seconds to minutes once installed: the README quotes the measured range)
#   make test   - ruff, mypy and the whole pytest suite (doctests, the nitpicky docs builds and
#                 the example smoke runs included)
# Each creates .venv (once) and installs what it needs into it, saying what it installs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 are the pair that import together on this platform's wheels.
TORCH  := torch==2.14.1 torchvision==0.29.1
# The oldest torch the library is tested with (pyproject.toml's floor); PyPI's torchvision
# does not import beside it here, so that environment runs the library tests only.
TORCH_OLDEST := torch==2.13.0
VENV_OLDEST  ?= .venv-oldest
PY_OLDEST    := $(VENV_OLDEST)/bin/python
DEMO_DIR ?= runs/demo
SPHINX   := -m sphinx -n -W --keep-going

.PHONY: demo test test-oldest lint typecheck pytest docs figures figures-check demo-results \
        mnist-results bench bench-quick bench-small dist clean

$(VENV)/.created:
	@echo ">>> creating $(VENV) and installing $(TORCH) (PyPI's build brings its CUDA libraries:"
	@echo ">>> about 4 GB installed; 1-2 minutes from a nearby mirror, longer over a slow link)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	touch $@

$(VENV)/.examples: $(VENV)/.created pyproject.toml
	@echo ">>> installing marginloss (editable) with the examples' extras: tqdm, matplotlib (under a minute)"
	$(PY) -m pip install -q -e '.[examples]'
	touch $@

$(VENV)/.dev: $(VENV)/.created pyproject.toml
	@echo ">>> installing marginloss (editable) with the examples', test and docs extras: pytest, hypothesis,"
	@echo ">>> pytorch-metric-learning, scikit-learn, ruff, mypy, Sphinx and its extensions (about a minute)"
	$(PY) -m pip install -q -e '.[examples,dev,docs]'
	touch $@

$(VENV_OLDEST)/.dev: pyproject.toml
	@echo ">>> creating $(VENV_OLDEST) with $(TORCH_OLDEST), the test extras and matplotlib (no torchvision)"
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install -q --upgrade pip
	$(PY_OLDEST) -m pip install -q $(TORCH_OLDEST)
	$(PY_OLDEST) -m pip install -q -e '.[dev]' matplotlib '$(TORCH_OLDEST)'
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

# The library's tests on the oldest supported torch; tests that need torchvision or Sphinx
# (the face example, the docs builds) skip themselves there.
test-oldest: $(VENV_OLDEST)/.dev
	$(PY_OLDEST) -c "import torch; print('>>> testing with torch', torch.__version__)"
	$(PY_OLDEST) -m pytest -n 2 --dist loadgroup marginloss tests

docs: $(VENV)/.dev
	$(PY) $(SPHINX) -b html docs docs/_build/html
	$(PY) $(SPHINX) -b doctest docs docs/_build/doctest

# Figures quoted in README.md, examples/*/README.md and the docs, rewritten from the results
# files (seconds); figures-check only reports what disagrees (tests/test_figures.py does too).
figures:
	$(PYTHON) docs/scripts/figures.py

figures-check:
	$(PYTHON) docs/scripts/figures.py --check

# The results files behind those figures: two runs each, so wall times are ranges
# (the demo: about a minute on an idle 2-core machine; the MNIST runs: several minutes).
demo-results: $(VENV)/.examples
	rm -f examples/face/results/demo.json
	for run in 1 2; do rm -rf runs/demo-results; \
	  $(PY) examples/face/demo.py --out runs/demo-results --record examples/face/results/demo.json || exit 1; done
	cp runs/demo-results/run/curves.png examples/face/results/
	$(PY) docs/scripts/figures.py

mnist-results: $(VENV)/.examples
	rm -f examples/mnist_arcface/results/results.json
	for run in 1 2; do \
	  $(PY) examples/mnist_arcface/train.py --data synthetic --epochs 3 --threads 1 --out runs/mnist_results \
	    --record examples/mnist_arcface/results/results.json || exit 1; done
	cp runs/mnist_results/embeddings_2d.png runs/mnist_results/embeddings_3d.png \
	   runs/mnist_results/training_curves.png examples/mnist_arcface/results/
	$(PY) docs/scripts/figures.py

bench: $(VENV)/.dev
	$(PY) benchmarks/heads.py

bench-quick: $(VENV)/.dev
	$(PY) benchmarks/heads.py --quick

bench-small: $(VENV)/.dev
	$(PY) benchmarks/small.py

dist: $(VENV)/.dev
	rm -rf dist
	$(PY) -m build
	$(PY) -m twine check dist/*

clean:
	rm -rf $(VENV) $(VENV_OLDEST) dist build docs/_build docs/_generated .pytest_cache .mypy_cache .ruff_cache runs
