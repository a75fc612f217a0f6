#!/usr/bin/env bash
# The whole GPU check of folio's kernels, in one call on a GPU machine:
#   1. install the wheels carried in $WHEELS (default .whl; absent is fine),
#   2. run tests/kernels/test_gpu.py (bf16/fp16 kernels at serving sizes vs the references),
#   3. run the kernel benchmark (kernels/bench.py: decode vs SDPA, prefill TFLOP/s, config sweep),
# writing everything under $OUT: env.txt, gpu_tests.log, gpu_tests.xml, bench.log,
# kernel_bench.json, kernel_bench.txt. Exits non-zero if a step failed; later steps still run.
#
# On the GPU machine (device tool, repo root; name .whl in carry when it exists):
#   bash .ci/gpu_check.sh
# On a development machine, to fill .whl with wheels the GPU machine lacks
# (Python 3.12, x86-64; pass NAME==VERSION for each, dependencies included):
#   bash .ci/gpu_check.sh fetch NAME==VERSION ...
#
# The kernels and their tests need only torch, triton and pytest, which the GPU
# image has; wheels matter only if other tests or conftests are added to the run.
set -u
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}

if [ "${1:-}" = "fetch" ]; then
    shift
    [ $# -gt 0 ] || { echo "usage: $0 fetch NAME==VERSION ..." >&2; exit 2; }
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$WHEELS" "$@"
fi

: "${OUT:?OUT must name the folder for results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET                      # compiled kernels, not the interpreter
status=0

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || status=1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --confcutdir keeps conftests outside tests/kernels (and their imports) out of this run.
timeout 300 "$PY" -m pytest tests/kernels/test_gpu.py --confcutdir=tests/kernels -p no:cacheprovider \
    -q -rfE --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 240 "$PY" -c "from kernels.bench import run_kernel_bench; run_kernel_bench('$OUT')" \
    2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED), results in $OUT"
exit $status
