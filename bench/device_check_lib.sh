# Steps shared by bench/gpu_device_check.sh and bench/tpu_device_check.sh
# (sourced after setting VENV; `start_check` reads the options, `device_steps`
# runs the steps both devices share). Each step's output goes to
# $OUT/<name>.log and its exit status and time to $OUT/steps.log; a failed step
# does not stop the next. With DRY set nothing runs: pytest only collects and a
# Python script only parses its arguments (its argparse call exits right after,
# so a missing script, module or option still fails the step).

start_check() {  # kind ("gpu" / "tpu"), the script's arguments: sets QUICK, DRY, OUT, PY
  local kind=$1; shift
  QUICK="" DRY=""
  for arg in "$@"; do
    case $arg in
      --quick) QUICK=--quick ;;
      --dry-run) DRY=1 ;;
      *) echo "usage: bench/${kind}_device_check.sh [--quick] [--dry-run]" >&2; exit 2 ;;
    esac
  done
  OUT=${OUT:-bench/out/$kind-device-$(date -u +%Y%m%dT%H%M%SZ)}
  PY=$VENV/bin/python
  mkdir -p "$OUT"
}

probe_device() {  # the backend jax must see ("gpu" / "tpu"), what to call it: sets KIND
  $PY -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/jax-devices.txt" 2>&1
  $PY -m pip freeze > "$OUT/pip-freeze.txt" 2>&1
  if [[ $($PY -c "import jax; print(jax.default_backend())" 2>/dev/null) != "$1" ]]; then
    echo "jax sees no $2: $(cat "$OUT/jax-devices.txt")" >&2; exit 1
  fi
  KIND=$($PY -c "import jax; print(jax.devices()[0].device_kind)")
}

log() { echo "== $* ($(date -u +%T))" | tee -a "$OUT/steps.log"; }

run() {  # run a step, keep its output and exit status, go on either way
  local name=$1; shift
  log "$name: ${SHOWN:-$*}"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.log"
  [[ $rc == 0 ]] || FAILED="${FAILED:-} $name"
  return 0
}

run_pytest() {  # name, pytest arguments
  local name=$1; shift
  if [[ -n ${DRY:-} ]]; then run "$name" "$PY" -m pytest --collect-only "$@"
  else run "$name" "$PY" -m pytest "$@"; fi
}

# A Python script (a path, or a console script such as $VENV/bin/sluice) run
# as __main__ with ArgumentParser.parse_args stopping after a successful parse.
_PARSE_ONLY='
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_only(self, *args, **kwargs):
    namespace = parse(self, *args, **kwargs)
    print("dry run: parsed", sys.argv[0], vars(namespace))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_only
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'

run_py() {  # name, script, its arguments
  local name=$1; shift
  if [[ -n ${DRY:-} ]]; then SHOWN="(parse only) $PY $*" run "$name" "$PY" -c "$_PARSE_ONLY" "$@"
  else run "$name" "$PY" "$@"; fi
}

keep() {  # copy a step's result files into $OUT (not in a dry run: nothing was made)
  [[ -n ${DRY:-} ]] && return 0
  cp "$@" "$OUT/" 2>/dev/null || echo "missing one of: $*" | tee -a "$OUT/steps.log"
}

finish() {  # the steps' summary; exit status 1 if any step failed
  log "done: $OUT"
  if [[ -n ${FAILED:-} ]]; then echo "failed steps:$FAILED" | tee -a "$OUT/steps.log"; return 1; fi
}

device_steps() {  # the roofline's target (h100, h200, v5e, v6e)
  # --noconftest: the CPU suite's conftest (XLA:CPU flags such as
  # --xla_backend_optimization_level=0, hypothesis) is not for a device.
  run_pytest device-tests -q -p no:cacheprovider --noconftest tests/test_kernels_on_device.py \
    --junitxml="$OUT/device-tests.xml"
  run_py kernels bench/kernel_speed.py $QUICK
  keep bench/out/kernels.json bench/out/kernels.png
  run_py throughput bench/throughput.py $QUICK
  keep bench/out/throughput.json bench/out/throughput.png
  if [[ -n ${MODEL_DIR:-} ]]; then
    run_py throughput-real "$(dirname "$PY")/sluice" bench throughput --model "$MODEL_DIR" \
      --num-prompts 256 --input-len 512 --output-len 256
  fi
  # The roofline compiles for the same chip without using it (compile_tests/offline.py
  # inside: JAX_PLATFORMS=cpu, libtpu offline).
  XLA_FLAGS= run_py roofline bench/compile_roofline.py --target "$1"
  keep "bench/results/compile_roofline_$1.json"
  finish
}
