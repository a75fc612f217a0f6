"""End to end on a GPU: whole models on folio's Triton kernels against
transformers on the same GPU and weights. Skipped without CUDA.

Serving-sized random-weight models (tests/model_fixtures.GPU_FAMILIES: head
dims 64 and 128, GQA 4 to 7, a sliding window shorter than the prompts,
llama3 rope scaling, q/k/v biases), prompts up to 2.5k tokens with a shared
prefix, chunked prefill and long decode rows that take the split-K kernel.

- fp32: transformers' exact greedy tokens, logprobs within 2e-3; also for a GPTQ
  checkpoint kept quantized (the Triton matmul), against the dense weights it represents.
- bf16 and fp16: two correct implementations break near-ties differently and
  then diverge, so transformers is teacher-forced on folio's output instead
  (tests/hf_reference.half_precision_errors): every folio token must be in
  the fp32 model's top 5, and folio's logprobs must be about as close to the
  fp32 truth as transformers' own in the same dtype (within 2x).

    pytest tests/kernels/test_gpu_model.py --confcutdir=tests/kernels
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.hf_reference import assert_greedy_parity, half_precision_errors, run_staggered
from tests.model_fixtures import GPU_FAMILIES, make_gpu_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-models")
    return {f: make_gpu_model(f, root, num_layers=2) for f in GPU_FAMILIES}  # 2 layers: quick to build


def _prompts(seed: str) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 32000) for _ in range(48)]  # three blocks of 16: prefix hits
    lengths = [1, 7, 16, 33, 130, 301, 640, 1100, 2500]
    prompts = [[rng.randrange(3, 32000) for _ in range(n)] for n in lengths]
    prompts += [shared + [rng.randrange(3, 32000) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    rng.shuffle(prompts)
    return prompts


def _run(path: str, dtype: torch.dtype, prompts: list[list[int]], speculate: int = 0, quantization: str = "auto"):
    from folio.cluster.entrypoints.llm import LLM
    from folio.protos.messages import SamplingParams

    llm = LLM(
        path,
        block_size=16,
        kv_cache_memory=2 << 30,
        max_num_seqs=16,
        max_num_batched_tokens=512,
        dtype=dtype,
        device="cuda",
        num_speculative_tokens=speculate,
        prompt_lookup_min=1,
        quantization=quantization,
        tokenizer=False,
    )
    assert llm.worker.model.ops.name == "triton"
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    results = run_staggered(llm, prompts, params, per_step=3)
    assert sum(r.num_cached_tokens for r in results) > 0, "the shared prefix was meant to hit the cache"
    if speculate:
        assert llm.scheduler.stats().num_draft_tokens > 0, "no drafts were verified"
    return results


@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_fp32_greedy_parity(gpu_models, family):
    prompts = _prompts(family)
    results = _run(gpu_models[family], torch.float32, prompts)
    assert_greedy_parity(
        gpu_models[family], prompts, results, NEW_TOKENS, logprob_tol=2e-3, dtype=torch.float32, device="cuda"
    )


def test_fp32_greedy_parity_with_speculative_drafts(gpu_models):
    """Verification steps (1 + k query rows per sequence over its cached context)
    through the prefill kernel; prompts repeat a phrase so drafts get proposed."""
    family = "mistral-window"
    prompts = [p + p[-40:] * 3 for p in _prompts(family)]
    results = _run(gpu_models[family], torch.float32, prompts, speculate=4)
    assert_greedy_parity(
        gpu_models[family], prompts, results, NEW_TOKENS, logprob_tol=2e-3, dtype=torch.float32, device="cuda"
    )


def test_fp32_greedy_parity_of_a_gptq_checkpoint(gpu_models, tmp_path_factory):
    """A GPTQ checkpoint (4-bit, groups of 128, act-order) of a serving-sized model, kept
    quantized on the Triton matmul: transformers' greedy tokens on the dense weights it
    represents (tests/quant_formats.py packs both)."""
    from tests import quant_formats as qf

    out = str(tmp_path_factory.mktemp("gptq") / "llama3-gqa4-gptq")
    options = dict(bits=4, group=128, desc_act=True, sym=False)
    path, dense = qf.make_packed_checkpoint(gpu_models["llama3-gqa4"], out, "gptq", **options)
    prompts = _prompts("gptq")
    results = _run(path, torch.float32, prompts, quantization="gptq")
    assert_greedy_parity(dense, prompts, results, NEW_TOKENS, logprob_tol=2e-3, dtype=torch.float32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_half_precision_as_accurate_as_transformers(gpu_models, family, dtype):
    prompts = _prompts(family)
    results = _run(gpu_models[family], dtype, prompts)
    ours, theirs = half_precision_errors(gpu_models[family], prompts, results, dtype, device="cuda")
    print(f"{family} {dtype}: mean |logprob - fp32| folio {ours:.4f}, transformers {theirs:.4f}")
    assert ours <= 2 * theirs + 1e-3, f"folio {ours:.4f} vs transformers {theirs:.4f} from fp32"
