# Two commands do everything from a fresh clone:
#   make study   — set up .venv and run the main job on the offline shapes model (writes out/study/)
#   make test    — set up .venv, run the test suite (with the example notebooks) and build the docs strictly
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup study test docs clean browser

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
test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d build/site

# tests/test_report_page.py opens report.html in Debian's chromium through its chromedriver (no driver downloaded): installed
# with apt-get when missing (as root, or through sudo); without apt-get or a network, the test says why it is skipped
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null \
	      || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; } \
	      || echo "make: chromium could not be installed: the report page's browser test will be skipped"; \
	  else echo "make: no apt-get: install chromium and chromedriver for the report page's browser test"; fi; \
	fi

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) out .pytest_cache
