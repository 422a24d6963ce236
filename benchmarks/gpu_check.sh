#!/usr/bin/env bash
# GPU acceptance check for sta, in one command, on a machine with an NVIDIA GPU:
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# 1. checks that a CUDA GPU is present and that the installed torch can use it (a CUDA build of
#    torch must be preinstalled: `pip install torch==2.13.0` from PyPI is the CPU wheel here);
# 2. installs sta (editable, with the test and triton extras, against that torch);
# 3. compiles every Triton kernel ahead of time for sm_80 and sm_90 (`python -m sta.kernels.aot`:
#    registers, spills, shared memory per kernel and config; no GPU needed), so that the GPU run
#    starts from known figures; its summary line goes into summary.txt, its table to triton_aot.log;
# 4. runs the GPU tests (`pytest -m gpu`) and the triton backend tests on the GPU;
# 5. runs the flow_step benchmark once per available provider (BENCH_PROVIDERS below).
# Everything it writes goes under OUT_DIR: install.log, triton_aot.txt, triton_aot.log,
# pytest_gpu.log, pytest_triton.log, bench_<provider>.csv and bench_<provider>.log,
# nvidia-smi.txt, summary.txt.
#
# Exit codes:
#   0  every step ran and passed
#   1  a step failed (see OUT_DIR/summary.txt and the step's log)
#   2  usage error (no OUT_DIR given)
#   3  no CUDA GPU present: nothing was installed, tested or benchmarked
#   4  a GPU is present but the Python environment cannot use it (no torch, or a CPU-only
#      torch); the message says what to install
#
# Environment: PYTHON (default python3); STA_GPU_CHECK_SKIP_INSTALL=1 to use the installed sta;
# BENCH_PROVIDERS to override the provider list.
#
# Extending: a new backend adds its benchmark provider name to BENCH_PROVIDERS (and its GPU tests
# carry the `gpu` marker, so step 3 picks them up).
set -uo pipefail

# Providers of benchmarks/bench_flow_step.py to run; one CSV each, a failing one does not stop
# the others. `torch` and `torch_compile` are the references the kernels are compared with.
BENCH_PROVIDERS=${BENCH_PROVIDERS:-"torch torch_compile triton cuda"}

EXIT_FAILED=1
EXIT_USAGE=2
EXIT_NO_GPU=3
EXIT_NO_CUDA_TORCH=4

if [ $# -lt 1 ] || [ -z "${1:-}" ]; then
  echo "usage: $0 OUT_DIR   (writes logs and CSVs under OUT_DIR; see the header for exit codes)" >&2
  exit "$EXIT_USAGE"
fi
out=$1
mkdir -p "$out" || exit "$EXIT_USAGE"
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit "$EXIT_FAILED"
PY=${PYTHON:-python3}
summary="$out/summary.txt"
: > "$summary"

say() { echo "gpu_check: $*" | tee -a "$summary"; }

# -- 1. is there a GPU, and can torch use it? ----------------------------------------------
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > "$out/nvidia-smi.txt" 2>&1 \
    || ! grep -q "^GPU" "$out/nvidia-smi.txt"; then
  rm -f "$out/nvidia-smi.txt"
  say "no CUDA GPU present (nvidia-smi missing or lists no GPU); nothing was run. Exit code $EXIT_NO_GPU."
  exit "$EXIT_NO_GPU"
fi
say "GPU: $(head -n 1 "$out/nvidia-smi.txt")"
torch_info=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1)
case "$torch_info" in
  *" True")
    say "torch $torch_info" ;;
  *)
    say "a GPU is present but this Python cannot use it: torch says: $torch_info"
    say "install a CUDA build of torch first, e.g. pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    say "(the PyPI wheel pinned by .ci/run is CPU-only). Exit code $EXIT_NO_CUDA_TORCH."
    exit "$EXIT_NO_CUDA_TORCH" ;;
esac

status=0
step() {  # step NAME LOG command...: run, log, record pass/fail
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    say "$name: ok ($((SECONDS - start)) s, log $(basename "$log"))"
  else
    say "$name: FAILED with exit code $rc ($((SECONDS - start)) s, log $(basename "$log"))"
    tail -n 20 "$log" | sed 's/^/    /'
    status=$EXIT_FAILED
  fi
  return "$rc"
}

# -- 2. install --------------------------------------------------------------------------------
if [ "${STA_GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
  # --no-build-isolation: build against the CUDA torch already installed (never replace it)
  if ! step install "$out/install.log" "$PY" -m pip install --no-build-isolation -e ".[test,triton]"; then
    say "install failed: not running tests or benchmarks. Exit code $EXIT_FAILED."
    exit "$EXIT_FAILED"
  fi
fi
"$PY" -m sta.info > "$out/sta_info.txt" 2>&1

# -- 3. ahead-of-time compiles of the Triton kernels (sm_80, sm_90) ----------------------------
step "triton AOT compiles" "$out/triton_aot.txt" \
  env TRITON_INTERPRET=0 "$PY" -m sta.kernels.aot --jobs 4 --log "$out/triton_aot.log"
say "$(tail -n 1 "$out/triton_aot.txt")"

# -- 4. tests ------------------------------------------------------------------------------
# pytest exits 5 when it selects nothing: that counts as a failure here.
step "pytest -m gpu" "$out/pytest_gpu.log" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rs
step "triton backend tests on the GPU" "$out/pytest_triton.log" \
  "$PY" -m pytest tests/test_backend_triton.py -q -p no:cacheprovider -rs

# -- 5. benchmarks -------------------------------------------------------------------------
if [ ! -f benchmarks/bench_flow_step.py ]; then
  say "benchmarks/bench_flow_step.py not found: no benchmark run"
  status=$EXIT_FAILED
else
  for provider in $BENCH_PROVIDERS; do
    step "bench_flow_step[$provider]" "$out/bench_$provider.log" \
      "$PY" benchmarks/bench_flow_step.py --device cuda --providers "$provider" --out "$out/bench_$provider.csv"
  done
fi

if [ -f benchmarks/bench_grid_transport.py ]; then
  step "bench_grid_transport" "$out/bench_grid_transport.log" \
    "$PY" benchmarks/bench_grid_transport.py --device cuda --out "$out/bench_grid_transport.csv"
fi

say "done: exit code $status (0 = all passed)"
exit "$status"
