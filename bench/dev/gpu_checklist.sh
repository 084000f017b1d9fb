#!/usr/bin/env bash
# The GPU checklist in one time-boxed run on a CUDA machine, from the repository root:
#
#     bash bench/dev/gpu_checklist.sh [RESULTS_DIR] [BUDGET_S]
#
# RESULTS_DIR defaults to $OUT/cuda-<gpu>-<date> (or bench/results/cuda-<gpu>-<date> without
# $OUT), BUDGET_S to 540 seconds in all. Each step gets a time box, cut to what is left of the
# budget; a step that fails or runs out of time is recorded and the next one still runs. Every
# step writes its log (and its results) into RESULTS_DIR, and summary.md lists the steps with
# their exit status and seconds (124: timed out).
#
# The steps, in the checklist's order of value (STEPS="tests kernel ..." runs a subset, in the
# order given):
#   env     the GPU, driver, Python, torch, Triton, transformers and peft versions
#   tests   pytest on CUDA tensors, compiled kernels: the large-shape GPU tests and the kernel,
#           multi-adapter and model-level Triton tests (junit XML kept)
#   kernel  steer-fast bench --suites kernel (copy bandwidth, the fused op against eager and
#           torch.compile)
#   switch  bench/dev/multi_adapter_switch.py: multi_adapter_steer's gather/grouped switch point
#   mixed   steer-fast bench --suites mixed (many adapters in one batch against PEFT)
#   model   steer-fast bench --suites training inference on the Llama-3.2-1B-shaped preset
#   tune    bench/dev/tune_kernels.py on d = 4096 (block shapes against the heuristic's)
#
# The GPU image has torch, Triton, transformers and peft but may lack pytest and tqdm, and has
# no network. Before the run, on the CPU machine:
#     pip download --no-deps -d .gpu-wheels pytest pluggy iniconfig tqdm
# and pass ".gpu-wheels" in the device tool's carry list (the folder is git-ignored); the script
# installs from it offline. steer_fast itself is installed without dependencies (editable), or,
# where that fails, put on PYTHONPATH with steer_fast.kernels linked to kernels/.
set -uo pipefail
cd "$(dirname "$0")/../.."

BUDGET_S=${2:-540}
START_S=$(date +%s)
STEPS=${STEPS:-env tests kernel switch mixed model tune}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
      | tr '[:upper:] ' '[:lower:]-')
NAME="cuda-${GPU:-unknown}-$(date +%Y-%m-%d)"
RESULTS=${1:-${OUT:-bench/results}/$NAME}
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.md"
{
  echo "# GPU checklist run: $NAME"
  echo
  echo "Command: \`bash bench/dev/gpu_checklist.sh $*\` (STEPS=\"$STEPS\", budget ${BUDGET_S} s)"
  echo
  echo "| step | exit status | seconds | command |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

seconds_left() { echo $(( BUDGET_S - ($(date +%s) - START_S) )); }

# step NAME BOX_S COMMAND...: run COMMAND for at most BOX_S seconds (less if the budget is
# nearly spent), its output in RESULTS/NAME.log.
step() {
  local name=$1 box=$2 left started status
  shift 2
  left=$(seconds_left)
  (( box > left )) && box=$left
  if (( box < 15 )); then
    echo "| $name | skipped: budget spent | 0 | \`$*\` |" >> "$SUMMARY"
    return
  fi
  started=$(date +%s)
  echo "== $name (up to ${box} s): $*"
  timeout --kill-after=10 "$box" "$@" > "$RESULTS/$name.log" 2>&1
  status=$?
  echo "| $name | $status | $(( $(date +%s) - started )) | \`$*\` |" >> "$SUMMARY"
  tail -n 5 "$RESULTS/$name.log"
}

install() {
  if [ -d .gpu-wheels ]; then
    python -m pip install --quiet --no-index --find-links .gpu-wheels .gpu-wheels/*.whl || true
  fi
  if ! python -m pip install --quiet --no-deps --no-build-isolation -e . -e bench; then
    echo "editable install failed: steer_fast and steer_fast_bench from PYTHONPATH," \
      "steer_fast/kernels -> kernels/"
    [ -e steer_fast/kernels ] || ln -s ../kernels steer_fast/kernels
    export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
  fi
  python -c "import steer_fast.kernels.multi_adapter_steer, steer_fast, steer_fast_bench
print(steer_fast.__file__, steer_fast_bench.__file__)"
}

environment() {
  nvidia-smi
  python - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
for name in ("triton", "transformers", "peft", "pytest", "tqdm", "safetensors"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # a missing package is what this step is here to say
        print(name, "missing:", error)
EOF
}

export -f environment  # so that `timeout bash -c environment` finds it

# SKIP_INSTALL=1: steer_fast is already importable (a check of this script on the CPU).
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  install > "$RESULTS/install.log" 2>&1 || true
fi
unset TRITON_INTERPRET

for name in $STEPS; do
  case $name in
    env) step env 30 bash -c environment ;;
    tests) step tests 200 python -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/pytest.xml" \
             tests/test_gpu_large.py tests/test_gpu_large_vector.py \
             tests/test_post_block_steer.py tests/test_steering_vector.py \
             tests/test_multi_adapter_steer.py tests/test_mixed_batch.py tests/test_model_triton.py ;;
    kernel) step kernel 120 python -m steer_fast_bench bench --suites kernel --device cuda \
              --no-progress --out "$RESULTS/bench-kernel" ;;
    switch) step switch 120 python bench/dev/multi_adapter_switch.py --hidden-sizes 2048 4096 \
              --ranks 16 64 --out "$RESULTS/multi-switch" ;;
    mixed) step mixed 120 python -m steer_fast_bench bench --suites mixed --device cuda \
             --no-progress --out "$RESULTS/bench-mixed" ;;
    model) step model 150 python -m steer_fast_bench bench --suites training inference \
             --device cuda --no-progress --out "$RESULTS/bench-model" ;;
    tune) step tune 150 python bench/dev/tune_kernels.py --hidden-sizes 4096 --ranks 8 16 64 \
            --out "$RESULTS/tuning" ;;
    *) echo "| $name | unknown step | 0 | |" >> "$SUMMARY" ;;
  esac
done
cat "$SUMMARY"
