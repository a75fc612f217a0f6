#!/usr/bin/env bash
# The whole GPU check of folio, in one call on a GPU machine (never timed on one yet):
#   install  the wheels carried in $WHEELS (default .whl; absent is fine);
#   tests    tests/kernels/test_gpu.py (each kernel in bf16/fp16 at serving sizes against
#            its reference) and tests/kernels/test_gpu_model.py (whole models on the
#            Triton kernels against transformers on the same GPU);
#   kernels  the kernel benchmark (cluster/entrypoints/bench/kernels.py: decode vs SDPA, prefill TFLOP/s,
#            quantized matmul vs dequantize+linear and dense, fused MoE vs the per-expert loop,
#            decode config sweep);
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
# Everything here needs only torch, triton, transformers, safetensors, numpy, tqdm and
# pytest, which the GPU image has (gguf, ray and the HTTP stack are not imported).
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


if wants tests; then
    # --confcutdir keeps conftests outside tests/kernels (and their imports) out of this run.
    timeout 270 "$PY" -m pytest tests/kernels/test_gpu.py tests/kernels/test_gpu_model.py tests/kernels/test_gpu_kv_pool.py \
        --confcutdir=tests/kernels -p no:cacheprovider -q -rfE --durations=10 \
        --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wants kernels; then
    timeout 180 "$PY" -c "from folio.cluster.entrypoints.bench.kernels import run_kernel_bench; run_kernel_bench('$OUT')" \
        2>&1 | tee "$OUT/bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wants throughput; then
    {
        model=$(timeout 90 "$PY" -c 'from tests.model_fixtures import make_gpu_model
print(make_gpu_model("llama3-gqa4", "/tmp/folio-models", num_layers=16))') &&
        timeout 150 "$PY" -m folio.cluster.entrypoints.cli bench throughput --model "$model" --device cuda \
            --dtype bfloat16 --kv-cache-memory 16GiB --max-num-seqs 128 --max-num-batched-tokens 2048 \
            --json "$OUT/throughput.json"
    } 2>&1 | grep -v ' INFO ' | tee "$OUT/throughput.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED), results in $OUT"
exit $status
