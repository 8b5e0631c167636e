# Two commands for a fresh clone: `make demo` (the main job on the built-in benchmark) and `make test`.
# Each creates the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mtil-installed

.PHONY: demo test env arguments bench bench-toyworld clean-demo

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,trackers]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mtil.demo

test: $(STAMP)
	$(PY) -m pytest

arguments: $(STAMP)
	$(PY) -m mtil.arguments_doc > ARGUMENTS.md

bench-toyworld: $(STAMP)
	$(PY) scripts/bench_toyworld.py

bench: $(STAMP)
	$(PY) scripts/bench_eval.py --model ViT-B/32 --batch-size 32 --device auto
