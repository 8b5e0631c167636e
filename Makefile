# Two commands for a fresh clone: `make demo` (the main job on the built-in benchmark) and `make test`.
# Each creates the virtual environment .venv when it is missing. `make docs` builds the documentation site into site/.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mtil-installed

.PHONY: demo demo-full test env docs arguments bench bench-toyworld clean-demo

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,trackers,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mtil.demo --quick

demo-full: $(STAMP)
	$(PY) -m mtil.demo

test: $(STAMP)
	$(PY) -m pytest

# The site, with warnings as errors; installs the docs extra into .venv when mkdocs is missing.
docs: $(STAMP)
	$(PY) -c "import mkdocs, material" 2>/dev/null || $(PY) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

arguments: $(STAMP)
	$(PY) -m mtil.arguments_doc > ARGUMENTS.md
	$(PY) -m mtil.arguments_doc --spec

bench-toyworld: $(STAMP)
	$(PY) scripts/bench_toyworld.py

bench: $(STAMP)
	$(PY) scripts/bench_eval.py --model ViT-B/32 --batch-size 32 --device auto
