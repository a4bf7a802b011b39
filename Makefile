# Both targets create .venv when it is missing and install covpool with its extras into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.covpool-installed

.PHONY: demo test bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m covpool demo

test: $(STAMP)
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

clean:
	rm -rf $(VENV) runs bench_out .pytest_cache
