#!/usr/bin/env bash
# Run HERE (with network), before a device run: downloads into .whl/ (ignored by
# git) the wheels of Sluice's runtime dependencies that the lent H100/H200
# machines lack. Those machines cannot reach any package index; their image's
# python3 (3.12, x86_64) already holds jax 0.11.2 with CUDA, torch, transformers,
# numpy, scipy, tokenizers, safetensors, orbax, jinja2, tqdm, prometheus-client,
# pytest and hypothesis (as the device tool's KINDS.md lists them), so only the rest
# travels, and bench/gpu_device_check.sh installs them with --no-index. Ray (70 MB,
# used by no device step) stays behind; the wheels come to about 7 MB. The device
# tool returns at most 8 files and the check writes about 15, so pack them:
#   run(carry=[".whl"], command="OUT=/tmp/gpu-check bench/gpu_device_check.sh
#       --quick; tar -czf $OUT/gpu-check.tgz -C /tmp gpu-check")
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PLATFORMS=(manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
# The versions .venv runs `make test` on, so the device runs tested code; one of
# each name (two versions of one stop the whole install there).
WHEELS=(gguf==0.19.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        bm25s==0.3.16 PyStemmer==3.1.0 pypdf==7.1.1 llguidance==1.9.1)
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "${WHEELS[@]}"
du -sh "$DEST"
