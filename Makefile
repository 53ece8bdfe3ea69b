# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing
# and install the package (editable) with everything the tests need, pinned to the CPU torch.
VENV   ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-full test bench clean

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

test: install
	$(PY) -m pytest -n 2 --dist loadfile

bench: install
	$(PY) bench/latency.py
	$(PY) bench/patching.py
	$(PY) bench/capture.py

clean:
	rm -rf $(VENV) .pytest_cache
