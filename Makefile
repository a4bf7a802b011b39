# Every target creates .venv when it is missing and installs covpool with its extras into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.covpool-installed
DOCS_STAMP := $(VENV)/.covpool-docs-installed

.PHONY: demo test bench gpu-check docs docs-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e ".[train,test,docs]"
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(PY) -m covpool demo

# The type check first (mypy, configured in pyproject.toml: about 20 s), then the tests and doctests.
test: $(STAMP)
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m covpool bench

# On a machine with a CUDA GPU, every figure in one call: the backend, layer, Gram-side, head and model tests
# on the GPU (and the CUDA-only ones), the backend benchmark, and the training-step benchmark under bf16 autocast.
gpu-check: $(STAMP)
	COVPOOL_TEST_DEVICE=cuda $(PY) -m pytest -q -p no:cacheprovider tests/test_linalg.py tests/test_layers.py \
		tests/test_gram.py tests/test_heads.py tests/test_models.py
	$(PY) -m covpool bench --device cuda --batch 128 --dims 64 128 256 512 --out bench_out/cuda
	$(PY) -m covpool bench --models resnet50 --device cuda --amp bf16 --batch 64 --out bench_out/cuda

# The documentation site, into docs/_build/html: every page read afresh (-E) into an emptied folder (Sphinx
# leaves the page of a name that no longer exists, which docs-check then reports), any warning an error (-W,
# after reporting them all); the gallery re-runs only the examples that changed.
docs: $(DOCS_STAMP)
	rm -rf docs/_build/html
	$(PY) -m sphinx -b html -E -W --keep-going docs docs/_build/html

# The built site: internal links and anchors, nothing fetched from the network, and the pages in a headless
# Chromium from Debian's packages (apt-get install chromium) with the network off.
docs-check: $(DOCS_STAMP)
	$(PY) docs/tools/check_links.py docs/_build/html
	$(PY) docs/tools/check_browser.py docs/_build/html

clean:
	rm -rf $(VENV) runs bench_out .pytest_cache .mypy_cache docs/_build docs/_generated docs/api docs/gallery \
		docs/sg_execution_times.rst
