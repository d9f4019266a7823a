#!/usr/bin/env bash
# One prepared GPU session (issue 28), under 9 minutes on an H200 with torch 2.11 / triton 3.6:
# the GPU tests, the whole test suite on CUDA (what `make test` runs, in parallel), the Triton
# kernel benchmark at the issue's sizes (docs/benchmarks/kernels_cuda.md) and the layer
# benchmark's CUDA table (`make bench`'s GPU section: docs/benchmarks/layer_cuda.md).
# Every step has a time limit; one that fails or runs out is reported and the next one runs.
# The tables and one log are copied to $OUT when it is set (the device tool brings that back).
#
#   bash benchmarks/gpu_session.sh              # on the GPU machine
#   bash benchmarks/gpu_session.sh --dry-run    # print the steps, run nothing
#   bash benchmarks/gpu_session.sh --cpu-smoke  # the benchmarks' quick modes on this CPU (the
#                                               # kernels under triton's interpreter): a check
#                                               # of the script, no timing
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODE=${1:-run}
LOGS=${OUT:-/tmp/xmoe-gpu-session}
LOG=$LOGS/session.log
mkdir -p "$LOGS"
failed=0

step() { # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, logged
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*" | tee -a "$LOG"
    [[ $MODE == --dry-run ]] && return 0
    local start=$SECONDS rc
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    ((rc == 0)) || failed=1
}

if [[ $MODE == --cpu-smoke ]]; then
    QUICK=(--quick --rounds 1 --warmup 0 --out "$LOGS")
    step kernels-quick 900 "$PY" -m benchmarks.kernels --device cpu "${QUICK[@]}"
    step layer-quick 900 "$PY" -m benchmarks.layer --device cpu --no-memory "${QUICK[@]}"
    exit $failed
fi
if [[ $MODE != run && $MODE != --dry-run ]]; then
    echo "usage: $0 [--dry-run | --cpu-smoke]" >&2
    exit 2
fi

step env 20 "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name())"
step test-gpu 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
step test 180 "$PY" -m pytest -q -p no:cacheprovider -n 12 tests
step kernels 150 "$PY" -m benchmarks.kernels --device cuda
step layer 120 "$PY" -m benchmarks.layer --device cuda --no-memory

if [[ $MODE == run && -n ${OUT:-} ]]; then
    cp docs/benchmarks/kernels_cuda.md docs/benchmarks/layer_cuda.md \
        docs/benchmarks/layer_sweep_cuda.png "$OUT"/ 2>/dev/null
fi
exit $failed
