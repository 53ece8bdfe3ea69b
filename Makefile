# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing
# and install the package (editable) with everything the tests need, pinned to the CPU torch.
VENV   ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: install demo demo-full lint test bench dashboard screenshot chromium clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the package metadata or the pins change.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/rim-lens demo

demo-full: install
	$(VENV)/bin/rim-lens demo --full

# tests/test_browser.py drives Debian's Chromium (never `playwright install`: it downloads a
# browser). Install it when missing; the test skips, saying why, only if that is impossible.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: apt-get install chromium failed; tests/test_browser.py will be skipped"; \
	  else echo "note: $(CHROMIUM) missing; 'sudo apt-get install -y chromium' enables tests/test_browser.py"; fi; \
	fi

# ruff's config is in pyproject.toml (line length 110); `make test` lints before it tests.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: install chromium lint
	$(PY) -m pytest -n 2 --dist load

dashboard: install
	$(VENV)/bin/rim-lens dashboard runs

screenshot: install chromium  # rewrites docs/dashboard.png
	RIM_LENS_UPDATE_SCREENSHOT=1 $(PY) -m pytest tests/test_browser.py -q

# Every benchmark on the demo runs (BENCH_RUNS), each writing bench/results/*.json; a few minutes each.
BENCH_RUNS ?= runs/demo
bench: install
	$(PY) bench/latency.py --runs $(BENCH_RUNS)
	$(PY) bench/patching.py --run $(BENCH_RUNS)/rim --scaling
	$(PY) bench/throughput.py --runs $(BENCH_RUNS)
	$(PY) bench/capture.py --run $(BENCH_RUNS)/rim --n 1000

clean:
	rm -rf $(VENV) .pytest_cache
