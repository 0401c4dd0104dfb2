#!/usr/bin/env bash
# On a machine with an NVIDIA H100/H200 (CUDA 12 driver), in one go:
#   1. the kernels compiled for the device against the reference
#      (tests/test_kernels_on_device.py: Triton attention, including long decodes
#      that take the KV split, KV update, block copies);
#   2. bench/kernel_speed.py: decode attention against the copy bandwidth measured in
#      the same run (goal: at least 80%), the same decodes without the KV split
#      (path pallas-nosplit: the split's gain as a ratio), block copies;
#   3. bench/throughput.py (smollm2-135m-random), and `sluice bench throughput`
#      on a real checkpoint when MODEL_DIR names one;
#   4. bench/compile_roofline.py for the device's target, for the "modelled"
#      column next to the measured one in bench/RESULTS.md.
# Everything lands in $OUT (default bench/out/gpu-device-<UTC time>), with the
# device, driver and package versions. Which Python runs it:
#   - $VENV when it exists (default .venv-cuda);
#   - else, when the machine's python3 already has JAX with CUDA (the lent
#     H100/H200 machines: jax 0.11.2, torch, transformers, and no network), that
#     one: the dependencies it lacks come as wheels in .whl/ (bench/device_wheels.sh
#     downloads them here; carry .whl), installed with --no-index, and Sluice
#     itself is installed editable without build isolation (nothing fetched);
#   - else $VENV is made (jax[cuda12] 0.10.2 and the test extra), which needs
#     the network.
# Usage: bench/gpu_device_check.sh [--quick] [--dry-run]
#   --dry-run: no GPU needed; checks that every step's command exists and parses
#   its options (pytest collects, each script's argparse accepts its arguments)
#   and runs nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-cuda}
source bench/device_check_lib.sh
start_check gpu "$@"

image_python() {  # the machine's python3 when its JAX sees a GPU (the lent machines)
  python3 -c "import jax, sys; assert jax.default_backend() == 'gpu'; print(sys.executable)" \
    2> /dev/null
}

install_offline() {  # the wheels in .whl/, then Sluice (editable), into $PY: nothing fetched
  local wheels=(.whl/*.whl)
  if [[ -e ${wheels[0]} ]]; then
    "$PY" -m pip install -q --no-index --no-deps "${wheels[@]}" || return
  else
    echo "no wheels in .whl/ (run bench/device_wheels.sh here and carry .whl)"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
}

if [[ -z $DRY ]]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "no GPU: nvidia-smi failed" >&2; exit 1; }
  if [[ ! -x $PY ]] && IMAGE_PY=$(image_python); then
    PY=$IMAGE_PY
    run install install_offline
  elif [[ ! -x $PY ]]; then
    run install bash -c "python3 -m venv $VENV && $VENV/bin/pip install -q \
      'jax[cuda12]==0.10.2' -e '.[test]'"
  fi
  probe_device gpu "CUDA device"
else
  [[ -x $PY ]] || { echo "no $PY (set VENV)" >&2; exit 1; }
  KIND="NVIDIA H200 (dry run)"
fi
TARGET=h100; [[ $KIND == *H200* ]] && TARGET=h200

device_steps "$TARGET"
