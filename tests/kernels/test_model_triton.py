"""Whole models through the Triton kernels, on CPU in Triton's interpreter.

The kernel tests compare each kernel with its reference in isolation; this runs
the model runner's real launches (q/k views into the fused qkv output, the
step's metadata, decode-only and mixed steps, chunked prefill after a cached
prefix, prefix-cache hits, preemption) through kernels="triton", the path a
GPU takes, and demands transformers' greedy tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster.entrypoints.llm import LLM
from kernels.ops import select_ops
from protos.messages import SamplingParams
from tests.hf_reference import assert_greedy_parity, run_staggered
from tests.model_fixtures import TINY_VOCAB

NEW_TOKENS = 6
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is for CPU")


@pytest.mark.slow
# gpt_neox: partial rotary (a quarter of each head) through the rotary kernel.
# gemma2: soft-capped scores in both attention kernels, beside a sliding window.
# qwen2_moe: the fused MoE kernels beside a shared expert and a dense layer (Mixtral's and
# Qwen3-MoE's renormalized top-k differ only in the router, which CPU parity covers).
@pytest.mark.parametrize(
    "family", ["mistral", "qwen2", "qwen3", "phi3", "gemma3", "gemma2", "falcon_new", "gpt_neox", "qwen2_moe"]
)
def test_tiny_model_on_triton_kernels_matches_transformers(family, tiny_model):
    path = tiny_model(family)
    rng = random.Random(f"triton-{family}")
    shared = [rng.randrange(3, TINY_VOCAB) for _ in range(16)]  # two full blocks: prefix hits
    prompts = [shared + [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    prompts += [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(12, 40))] for _ in range(4)]
    llm = LLM(
        path,
        block_size=8,
        num_kv_blocks=10,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        kernels="triton",
        tokenizer=False,
    )
    assert llm.worker.model.ops.name == "triton"
    results = run_staggered(llm, prompts, PARAMS, per_step=2)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert sum(r.num_cached_tokens for r in results) > 0, "the shared prefix was meant to hit the cache"
    assert_greedy_parity(path, prompts, results, NEW_TOKENS, logprob_tol=1e-4)


def test_kernel_choice():
    assert select_ops("cpu").name == "reference"
    assert select_ops("cpu", "triton").name == "triton"  # TRITON_INTERPRET=1 here (conftest)
    assert select_ops("cuda", "reference").name == "reference"
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_ops("cpu", "cutlass")
