"""Whole models through the Triton kernels, on CPU in Triton's interpreter.

The kernel tests compare each kernel with its reference in isolation; this runs
the model runner's real launches (q/k views into the fused qkv output, the
step's metadata, decode-only and mixed steps, chunked prefill after a cached
prefix, prefix-cache hits, preemption) through kernels="triton", the path a
GPU takes, and demands transformers' greedy tokens and logprobs (those of the
top 5 too: gemma2's greedy tokens take nearly all the probability, so theirs
alone hardly move).

The interpreter runs every program of a launch in Python, so a family costs
what its tokens and layers cost (the rotary kernel alone takes a program per
token and head): the models keep two of their three layers, and every kernel
feature runs through one family, the rest being covered by the reference
kernels' parity tests (tests/e2e/test_engine_parity.py):

- qwen3: q/k norms (rms_norm over each head's row), biases on q/k/v and o,
  GQA (4 query heads on 2 KV heads), SiLU (silu_and_mul), full rotary;
- gemma2: soft-capped scores in both attention kernels, on a sliding-window layer
  and a full one, a query scale that is not head_dim's, Gemma's (1 + w)
  rms_norm, tanh GELU;
- phi3: a sliding window without a cap on every layer, half of each head rotating;
- gpt_neox: a quarter of each head rotating, LayerNorm, exact GELU, one KV head
  per query head, biases everywhere;
- qwen2_moe: the fused MoE kernels beside a shared expert, then a dense layer
  (Mixtral's and Qwen3-MoE's renormalized top-k differ only in the router,
  which CPU parity covers).

Mistral (window without a cap), Qwen2 (q/k/v biases), Gemma 3 (q/k norms with
Gemma's offset, sliding beside full layers) and Falcon-40B (GQA, LayerNorm,
biases) add no kernel feature to these.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
import torch

from folio.cluster.entrypoints.llm import LLM
from folio.kernels.ops import select_ops
from folio.kernels.quant import QuantizedWeight
from folio.protos.messages import SamplingParams
from folio.worker.parallel import PackedWeight
from tests.hf_reference import assert_greedy_parity, run_staggered
from tests.model_fixtures import TINY_VOCAB

NEW_TOKENS = 4
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
# Prompt lengths, in arrival order; negative: after the two-block shared prefix. The
# schedule depends on these alone (not on the model): 34 tokens take three chunks of
# at most 16, the last one and the decodes reading past the kernels' 32-key tile; the
# shared prefix is computed once, then hit; 7 blocks of 8 run out, so a request is
# preempted. Each step kind is counted below, so a change here cannot lose one unseen.
PROMPT_LENGTHS = [-5, 34, -3]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is for CPU")


def _count_steps(llm: LLM) -> Counter:
    """Count the engine's steps by what the attention kernels get: only decodes
    (paged_decode), decodes beside a prefill (paged_prefill's decode rows), and a
    prefill over context already in the pool (a cached prefix or an earlier chunk)."""
    kinds: Counter = Counter()
    execute = llm.engine.executor.execute

    def counted(step):
        work = [(r.num_computed_tokens, r.num_scheduled_tokens) for r in (*step.new_requests, *step.cached_requests)]
        kinds["decode-only"] += bool(work) and all(n == 1 for _, n in work)
        kinds["mixed"] += any(n == 1 for _, n in work) and any(n > 1 for _, n in work)
        kinds["prefill after context"] += any(n > 1 and done > 0 for done, n in work)
        return execute(step)

    llm.engine.executor.execute = counted
    return kinds


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3", "gpt_neox", "qwen2_moe"])
def test_tiny_model_on_triton_kernels_matches_transformers(family, tiny_model):
    path = tiny_model(family, num_layers=2)
    rng = random.Random(f"triton-{family}")
    shared = [rng.randrange(3, TINY_VOCAB) for _ in range(16)]  # two full blocks: prefix hits
    prompts = [
        (shared if n < 0 else []) + [rng.randrange(3, TINY_VOCAB) for _ in range(abs(n))] for n in PROMPT_LENGTHS
    ]
    llm = LLM(
        path,
        block_size=8,
        num_kv_blocks=7,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        kernels="triton",
        tokenizer=False,
    )
    assert llm.worker.model.ops.name == "triton"
    steps = _count_steps(llm)
    results = run_staggered(llm, prompts, PARAMS, per_step=2)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert sum(r.num_cached_tokens for r in results) > 0, "the shared prefix was meant to hit the cache"
    assert min(steps["decode-only"], steps["mixed"], steps["prefill after context"]) > 0, steps
    assert_greedy_parity(path, prompts, results, NEW_TOKENS, logprob_tol=1e-4, top_logprobs=True)


@pytest.mark.slow
def test_a_gptq_checkpoint_on_triton_kernels_matches_transformers(tiny_model, model_dir):
    """Kept-quantized weights through the Triton matmul in the model runner's own
    launches, the path a GPU serves GPTQ/AWQ/compressed-tensors by: 4-bit groups of 32
    with act-order, against transformers on the dense weights the checkpoint represents."""
    from tests import quant_formats as qf

    src = tiny_model("llama", num_layers=2)
    options = dict(bits=4, group=32, desc_act=True, sym=False)
    path, dense = qf.make_packed_checkpoint(src, os.path.join(str(model_dir), "gptq-triton"), "gptq", **options)
    rng = random.Random("triton-gptq")
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (5, 34, 3)]
    llm = LLM(
        path,
        block_size=8,
        num_kv_blocks=16,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        kernels="triton",
        quantization="gptq",
        tokenizer=False,
    )
    assert llm.worker.model.ops.name == "triton"
    runs = [r for m in llm.worker.model.modules() if isinstance(m, PackedWeight) for r in m.runs]
    kept = [r for r in runs if isinstance(r, QuantizedWeight)]
    assert len(kept) >= 8 and all(r.codes is not None for r in kept), runs  # the Triton kernel reads codes
    results = run_staggered(llm, prompts, PARAMS, per_step=2)
    assert_greedy_parity(dense, prompts, results, NEW_TOKENS, logprob_tol=1e-4, top_logprobs=True)


def test_kernel_choice():
    assert select_ops("cpu").name == "cpu"  # the references, with torch's int4 kernel in fp32 too
    assert select_ops("cpu", "reference").name == "reference"
    assert select_ops("cpu", "triton").name == "triton"  # TRITON_INTERPRET=1 here (conftest)
    assert select_ops("cuda", "reference").name == "reference"
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_ops("cpu", "cutlass")
