#!/usr/bin/env bash
# The whole GPU check of folio, in one call on a GPU machine (about 5 minutes on an H200):
#   install  the wheels carried in $WHEELS (default .whl; absent is fine);
#   tests    tests/kernels/test_gpu.py (each kernel in bf16/fp16 at serving sizes against
#            its reference) and tests/kernels/test_gpu_model.py (whole models on the
#            Triton kernels against transformers on the same GPU);
#   kernels  the kernel benchmark (cluster/entrypoints/bench/kernels.py: decode vs SDPA, prefill TFLOP/s,
#            quantized matmul vs dequantize+linear and dense, fused MoE vs the per-expert loop,
#            launch-config sweeps of decode, prefill and quantized matmul);
#   throughput  `folio bench throughput` on a Llama-3.2-1B-shaped random-weight model,
#            bf16: folio against transformers generate() on the same GPU.
# Results under $OUT: env.txt, gpu_tests.log, gpu_tests.xml, bench.log, kernel_bench.json,
# kernel_bench.txt, throughput.log, throughput.json. Exits non-zero if a stage failed;
# later stages still run, and each has its own time limit so a hang costs only its share.
#
# On the GPU machine (device tool, repo root; name .whl in carry when it exists):
#   bash .ci/gpu_check.sh                      # every stage
#   bash .ci/gpu_check.sh tests throughput     # just these
# On a development machine, to fill .whl with wheels the GPU machine lacks
# (Python 3.12, x86-64; pass NAME==VERSION for each, dependencies included):
#   bash .ci/gpu_check.sh fetch NAME==VERSION ...
#
# Everything here needs torch, triton, transformers, safetensors, numpy, tqdm and pytest,
# which the GPU image has, and pydantic (folio.router.errors, which the LLM entry point
# raises), which it lacks: before the call, fetch it into .whl and carry .whl:
#   bash .ci/gpu_check.sh fetch pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 typing_extensions==4.16.0
# (gguf, ray and the HTTP server are not imported.)
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

stages=${*:-tests kernels throughput}
for s in $stages; do
    case $s in tests|kernels|throughput) ;; *) echo "unknown stage $s (tests, kernels, throughput)" >&2; exit 2;; esac
done
wants() { [[ " $stages " == *" $1 "* ]]; }
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
# folio is not installed here: the folders import as folio.<name> through links in
# /tmp/folio-src/folio (what pyproject.toml's package-dir maps); $PWD serves tests.*.
mkdir -p /tmp/folio-src/folio
for p in cluster worker kernels router protos; do ln -sfn "$PWD/$p" "/tmp/folio-src/folio/$p"; done
export PYTHONPATH=/tmp/folio-src:$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"


if wants throughput; then
    # Built on the CPU while the tests run: writing ~2.5 GB of random weights takes a while.
    (timeout 150 "$PY" -c 'from tests.model_fixtures import make_gpu_model
print(make_gpu_model("llama3-gqa4", "/tmp/folio-models", num_layers=16))' > /tmp/throughput-model 2> /tmp/throughput-model.err) &
    model_pid=$!
fi

if wants tests; then
    # --confcutdir keeps conftests outside tests/kernels (and their imports) out of this run.
    # Kernel and model tests in 4 processes (compiles dominate); the KV-pool tests size the
    # pool from the device's free memory, so they run alone afterwards.
    par=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
    timeout 180 "$PY" -m pytest tests/kernels/test_gpu.py tests/kernels/test_gpu_model.py $par \
        --confcutdir=tests/kernels -p no:cacheprovider -q -rfE --durations=10 \
        --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    timeout 50 "$PY" -m pytest tests/kernels/test_gpu_kv_pool.py \
        --confcutdir=tests/kernels -p no:cacheprovider -q -rfE 2>&1 | tee -a "$OUT/gpu_tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wants kernels; then
    # KERNEL_SECTIONS picks sections (default all: decode prefill quant moe sweep).
    timeout "${KERNEL_TIMEOUT:-120}" "$PY" -m folio.cluster.entrypoints.cli bench kernels --out "$OUT" \
        ${KERNEL_SECTIONS:+--sections $KERNEL_SECTIONS} \
        2>&1 | tee "$OUT/bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wants throughput; then
    wait "$model_pid"; made=$?          # here, not in the pipeline's subshell, whose child it is not
    {
        { [ $made -eq 0 ] || { cat /tmp/throughput-model.err; false; }; } && model=$(cat /tmp/throughput-model) &&
        timeout 140 "$PY" -m folio.cluster.entrypoints.cli bench throughput --model "$model" --device cuda \
            --dtype bfloat16 --kv-cache-memory 16GiB --max-num-seqs 128 --max-num-batched-tokens 2048 \
            --num-requests 128 --json "$OUT/throughput.json"
    } 2>&1 | grep -v ' INFO ' | tee "$OUT/throughput.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED), results in $OUT"
exit $status
