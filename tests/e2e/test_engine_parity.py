"""Greedy parity with transformers under continuous batching, chunked prefill,
prefix-cache hits and preemption.

Every prompt must get exactly the tokens transformers gives it alone, with
logprobs within 1e-4, although folio runs them batched, arriving at different
steps, in chunks, starting from blocks another prompt computed, and through a
pool so small that requests get preempted and recomputed.
"""

import os
import random

import pytest

from folio.cluster.entrypoints.llm import LLM
from folio.protos.messages import SamplingParams
from tests.gguf_fixtures import make_tiny_quantized_gguf
from tests.hf_reference import assert_greedy_parity, run_staggered
from tests.model_fixtures import TINY_VOCAB

NEW_TOKENS = 8
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "llama3",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma3",
        "gemma2",
        "gemma",
        "gpt_neox",
        "gpt_neox_sequential",
        "falcon",
        "falcon_new",
        "falcon_rw",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
    ],
)
def test_tiny_models_match_transformers(family, tiny_model):
    path = tiny_model(family)
    rng = random.Random(family)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 70))] for _ in range(18)]
    # Every third prompt continues the first one's opening blocks: prefix-cache hits.
    shared = prompts[0][:32] + [rng.randrange(3, TINY_VOCAB) for _ in range(32 - len(prompts[0][:32]))]
    prompts[0] = shared + prompts[0][32:]
    for i in range(3, 18, 3):
        prompts[i] = shared[: rng.randint(17, 32)] + prompts[i][:20]
    llm = _assert_parity_under_preemption(path, prompts, reference=path)
    assert llm.scheduler.stats().prefix_hit_tokens >= 16, "the shared openings were meant to hit the cache"


def _assert_parity_under_preemption(path: str, prompts: list[list[int]], reference: str, **options) -> LLM:
    """prompts through LLM(path, **options), staggered and chunked in a pool too small
    for them (14 blocks of 8 tokens hold fewer than half: preemption must happen),
    against transformers' greedy tokens on `reference`, with the exact fp32 kernels
    (the default CPU ones round a kept-quantized matmul's input to bf16). -> the LLM."""
    llm = LLM(
        path,
        block_size=8,
        num_kv_blocks=14,
        max_num_seqs=8,
        max_num_batched_tokens=24,
        tokenizer=False,
        kernels="reference",
        **options,
    )
    results = run_staggered(llm, prompts, PARAMS, per_step=3)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert_greedy_parity(reference, prompts, results, NEW_TOKENS, logprob_tol=1e-4)
    return llm


@pytest.mark.slow
def test_kept_quantized_gguf_matches_transformers(model_dir):
    """Every GGUF block type folio keeps quantized, computed in fp32 through the
    engine (batched, chunked, preempted), against transformers' dequantized load."""
    path = make_tiny_quantized_gguf(model_dir)
    rng = random.Random("quantized")
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(3, 70))] for _ in range(12)]
    _assert_parity_under_preemption(path, prompts, reference=path, quantization="gguf")


# Hugging Face quantized checkpoints of the tiny Llama (tests/quant_formats.py packs them).
HF_SCHEMES = {
    "gptq-4bit-g32-act-order": ("gptq", dict(bits=4, group=32, desc_act=True, sym=False)),
    "gptq-8bit-per-row": ("gptq", dict(bits=8, group=-1, desc_act=False, sym=True)),
    "awq-g32": ("awq", dict(group=32)),
    "compressed-tensors-W4A16-g32": ("compressed-tensors", dict(bits=4, strategy="group", group=32)),
}


def _hf_quantized(tiny_model, model_dir, case: str) -> tuple[str, str]:
    """(quantized checkpoint, dense checkpoint of the weights it represents)."""
    from tests import quant_formats as qf

    method, options = HF_SCHEMES[case]
    src, out = tiny_model("llama"), os.path.join(str(model_dir), case)
    if method != "compressed-tensors":
        return qf.make_packed_checkpoint(src, out, method, **options)
    scheme = qf.ct_scheme(qf.ct_args(options["bits"], options["strategy"], options["group"], symmetric=False))
    qf.make_ct_checkpoint(src, out, scheme, "pack-quantized")
    dense = out + "-dense"
    if not os.path.isdir(dense):  # compressed-tensors' own dequantization, through transformers
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
        model.config.quantization_config = None
        model.save_pretrained(dense)
    return out, dense


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HF_SCHEMES))
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_hf_quantized_checkpoints_match_transformers(case, tiny_model, model_dir):
    """GPTQ (act-order too), AWQ and compressed-tensors kept quantized, in fp32
    through the engine (batched, chunked, preempted), against transformers on
    the weights each checkpoint represents."""
    path, dense = _hf_quantized(tiny_model, model_dir, case)
    rng = random.Random(case)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 70))] for _ in range(10)]
    method = HF_SCHEMES[case][0]
    llm = _assert_parity_under_preemption(path, prompts, reference=dense, quantization=method)
    assert llm.worker.model_config.quantization == method


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2, gguf_parsed_once):
    # Exact fp32: dequantized at load. Kept quantized, its logits equal these too
    # (tests/worker/test_quantized.py).
    llm = LLM(smollm2, block_size=16, num_kv_blocks=8, max_num_seqs=8, max_num_batched_tokens=64, kernels="reference")
    text = (
        "The history of the city begins with a small settlement by the river, where traders "
        "met to exchange grain, salt and cloth. Over the centuries the market grew into a town, "
        "the town into a city, and the city into the capital of a region known for its bridges, "
        "its university and its long winters. Visitors today walk the old streets and"
    )
    words = text.split()
    rng = random.Random(0)
    prompts = [llm.tokenizer.encode(" ".join(words[: rng.randint(2, len(words))])) for _ in range(6)]
    results = run_staggered(llm, prompts, PARAMS, per_step=4)
    assert llm.scheduler.num_preemptions > 0
    assert max(len(p) for p in prompts) > 64, "a prompt must need chunked prefill"
    assert_greedy_parity(smollm2, prompts, results, NEW_TOKENS, logprob_tol=1e-4)


@pytest.mark.parametrize("quantization", ["auto", pytest.param("gguf", marks=pytest.mark.slow)])
def test_capital_of_france(smollm2, quantization, gguf_parsed_once):
    llm = LLM(smollm2, quantization=quantization)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [res] = llm.generate([llm.chat_token_ids(chat)], SamplingParams(temperature=0, max_tokens=20))
    assert res.outputs[0].text.strip() == "The capital of France is Paris."
    assert res.outputs[0].finish_reason == "stop"
