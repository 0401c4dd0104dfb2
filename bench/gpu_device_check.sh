#!/usr/bin/env bash
# On a machine with an NVIDIA H100/H200 (CUDA 12 driver), in one go:
#   1. the kernels compiled for the device against the reference
#      (tests/test_kernels_on_device.py: Triton attention, including long decodes
#      that take the KV split, KV update, block copies);
#   2. bench/kernels.py: decode attention against the copy bandwidth measured in
#      the same run (goal: at least 80%), the same decodes without the KV split
#      (path pallas-nosplit: the split's gain as a ratio), block copies;
#   3. bench/throughput.py (smollm2-135m-random), and `sluice bench throughput`
#      on a real checkpoint when MODEL_DIR names one;
#   4. bench/compile_roofline.py for the device's target, for the "modelled"
#      column next to the measured one in bench/RESULTS.md.
# Everything lands in $OUT (default bench/out/gpu-device-<UTC time>), with the
# device, driver and package versions. Usage: bench/gpu_device_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=${1:-}
OUT=${OUT:-bench/out/gpu-device-$(date -u +%Y%m%dT%H%M%SZ)}
VENV=${VENV:-.venv-cuda}
mkdir -p "$OUT"
log() { echo "== $* ($(date -u +%T))" | tee -a "$OUT/steps.log"; }
run() {  # run a step, keep its output and exit status, go on either way
  local name=$1; shift
  log "$name: $*"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.log"
  return 0
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "no GPU: nvidia-smi failed" >&2; exit 1; }
if [[ ! -x $VENV/bin/python ]]; then
  run install bash -c "python3 -m venv $VENV && $VENV/bin/pip install -q \
    'jax[cuda12]==0.10.2' -e '.[test]'"
fi
PY=$VENV/bin/python
$PY -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/jax-devices.txt" 2>&1
$PY -m pip freeze > "$OUT/pip-freeze.txt" 2>&1
if ! grep -q -i "cuda" "$OUT/jax-devices.txt"; then
  echo "jax sees no CUDA device: $(cat "$OUT/jax-devices.txt")" >&2; exit 1
fi
KIND=$($PY -c "import jax; print(jax.devices()[0].device_kind)")
TARGET=h100; [[ $KIND == *H200* ]] && TARGET=h200

run device-tests $PY -m pytest -q -p no:cacheprovider tests/test_kernels_on_device.py \
  --junitxml="$OUT/device-tests.xml"
run kernels $PY bench/kernels.py $QUICK
cp bench/out/kernels.json bench/out/kernels.png "$OUT/" 2>/dev/null
run throughput $PY bench/throughput.py $QUICK
cp bench/out/throughput.json bench/out/throughput.png "$OUT/" 2>/dev/null
if [[ -n ${MODEL_DIR:-} ]]; then
  run throughput-real $VENV/bin/sluice bench throughput --model "$MODEL_DIR" \
    --num-prompts 256 --input-len 512 --output-len 256
fi
# The roofline compiles for the same chip without using it (JAX_PLATFORMS=cpu inside).
run roofline env -u XLA_FLAGS $PY bench/compile_roofline.py --target "$TARGET"
cp "bench/results/compile_roofline_$TARGET.json" "$OUT/" 2>/dev/null
log "done: $OUT"; cat "$OUT/steps.log"
