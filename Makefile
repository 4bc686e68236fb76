# Two commands do everything from a fresh clone:
#   make study   — set up .venv and run the main job on the offline shapes model (writes out/study/)
#   make test    — set up .venv, run the test suite (with the example notebooks) and build the docs strictly
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup study test docs clean

setup: $(STAMP)

# torch is pinned: `pip install torch==2.13.0` takes the local CPU build on these machines; an open range would
# pull a multi-GB CUDA build. On a GPU machine, install your own torch first and `pip install -e .[study]`.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[study,test]"
	touch $(STAMP)

study: $(STAMP)
	$(VENV)/bin/attnprobe study --out out/study

# two workers, one file each at a time (a module's pipelines are built once), one thread each: two torch processes
# with a thread per core each would fight over 2 cores
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d build/site

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) out .pytest_cache
