#!/usr/bin/env bash
# On a TPU VM (v5e / v6e, libtpu), in one go, the TPU counterpart of
# bench/gpu_device_check.sh:
#   1. the kernels compiled by Mosaic for the chip against the reference
#      (tests/test_kernels_on_device.py: attention in bf16 and f32, long decodes,
#      KV update, block copies, Gemma 3's one-KV-head pool);
#   2. bench/kernel_speed.py: decode attention against the copy bandwidth measured in
#      the same run (goal: at least 80%), JAX's own TPU paged attention beside it,
#      block copies;
#   3. bench/throughput.py (smollm2-135m-random), and `sluice bench throughput`
#      on a real checkpoint when MODEL_DIR names a local one (the VM may have no
#      network: nothing is downloaded);
#   4. bench/compile_roofline.py for the chip's target, for the "modelled"
#      column next to the measured one in bench/RESULTS.md.
# Everything lands in $OUT (default bench/out/tpu-device-<UTC time>), with the
# device and package versions. The venv ($VENV, default .venv-tpu: `make
# .venv-tpu/.installed`, jax[tpu] 0.10.2) must exist already, with the test
# extra (`$VENV/bin/pip install -e '.[test]'`) for bench/throughput.py's
# transformers baseline (torch); the dry run says so if it is missing.
# Usage: bench/tpu_device_check.sh [--quick] [--dry-run]
#   --dry-run: no TPU needed; checks that every step's command exists and parses
#   its options (pytest collects, each script's argparse accepts its arguments)
#   and runs nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-tpu}
source bench/device_check_lib.sh
start_check tpu "$@"

[[ -x $PY ]] || { echo "no $PY: run 'make $VENV/.installed' first" >&2; exit 1; }
if [[ -z $DRY ]]; then
  # A TPU VM's libtpu finds its chips itself; the compile tier's offline
  # settings (compile_tests/offline.py) must not leak in.
  unset JAX_PLATFORMS TPU_SKIP_MDS_QUERY TPU_ACCELERATOR_TYPE
  probe_device tpu "TPU"
else
  KIND="TPU v6 lite (dry run)"
fi
case $KIND in
  *v5*lite*|*v5e*) TARGET=v5e ;;
  *v6*) TARGET=v6e ;;
  *) TARGET=v6e; echo "unknown TPU kind '$KIND': the roofline models v6e" | tee -a "$OUT/steps.log" ;;
esac

device_steps "$TARGET"
