"""folio's models against Hugging Face transformers on the same weights.

Every comparison runs folio through the paged KV pool the way the model runner
does: block ids handed out scattered and descending, the pool pre-filled with
large garbage (so a read of a slot nobody wrote shows), and context read back
from the pool across forward calls. Reference: transformers in fp32 with eager
attention, one unpadded sequence at a time (SmolLM2's is tests/hf_reference.py's,
with transformers' default attention: the engine tests load it too).

Tolerances. Tiny models (3 layers, fp32): folio and HF differ only in summation
order (fused GEMMs, SDPA vs eager softmax); the observed max |diff| is ~2e-5 on
logits up to ~50, so atol 1e-4. SmolLM2 (30 layers, logits up to ~35): observed
max |diff| 5e-5 (one pass) to 8e-5 (ragged batch); 1e-3 leaves headroom for other
CPUs' BLAS while a real bug (rope, q/k row order, a missing bias) moves logits
by O(1). Greedy tokens must match exactly everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from folio.kernels.interface import REFERENCE_OPS
from folio.worker.config import ModelConfig
from folio.worker.loader import default_model_path, load_model, load_tokenizer, resolve_model_path
from folio.worker.models.rope import inverse_frequencies
from tests import hf_reference
from tests.gguf_fixtures import make_tiny_gguf
from tests.model_fixtures import (
    TINY_FAMILIES,
    make_tiny_model,
    smollm2_path,
)
from tests.paged import metadata_for

TINY_ATOL = 1e-4
SMOLLM2_ATOL = 1e-3
BLOCK_SIZE = 4


# ------------------------------------------------------------------ harness


class _Seq:
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens  # [L] long, the whole sequence up front
        self.computed = 0  # tokens whose K/V are in the pool
        self.blocks: list[int] = []


class _Pool:
    """A paged KV pool whose block ids come out scattered: odd ids descending,
    then even ids descending, so neighbouring blocks of a sequence are never
    neighbours in memory and sequences' blocks interleave."""

    def __init__(self, cfg: ModelConfig, num_blocks: int = 96, dtype=torch.float32):
        gen = torch.Generator().manual_seed(123)
        shape = (num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
        self.caches = [
            (torch.randn(shape, generator=gen).mul(1e3).to(dtype), torch.randn(shape, generator=gen).mul(1e3).to(dtype))
            for _ in range(cfg.num_layers)
        ]
        self.free = list(range(num_blocks - 1, 0, -2)) + list(range(num_blocks - 2, -1, -2))

    def step(self, model, work: list[tuple[_Seq, int]]) -> list[torch.Tensor]:
        """One forward over (sequence, new token count) pairs -> each one's logits rows."""
        ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        for seq, n in work:
            start, end = seq.computed, seq.computed + n
            while len(seq.blocks) * BLOCK_SIZE < end:
                seq.blocks.append(self.free.pop(0))
            ids.append(seq.tokens[start:end])
            positions.append(torch.arange(start, end))
            query_lens.append(n)
            context_lens.append(start)
            tables.append(list(seq.blocks))
            seq.computed = end
        meta = metadata_for(query_lens, context_lens, tables, BLOCK_SIZE)
        with torch.inference_mode():
            hidden = model(torch.cat(ids), torch.cat(positions), meta, self.caches)
            return list(model.compute_logits(hidden).split(query_lens))


def _hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(tokens[None]).logits[0].float()


def _check(out: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def _prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ fixtures

ALL = TINY_FAMILIES + ("smollm2",)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def loaded(model_dir, gguf_parsed_once):
    """family -> (folio model, ModelConfig, HF model, vocab, atol); built on first use."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(family: str):
        if family not in cache:
            if family == "smollm2":
                path = smollm2_path()
                hf = hf_reference.hf_model(path)
                atol = SMOLLM2_ATOL
            else:
                path = make_tiny_model(family, model_dir)
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
                atol = TINY_ATOL
            model, cfg = load_model(path, ops=REFERENCE_OPS)  # exact fp32: SmolLM2 dequantized at load
            cache[family] = (model, cfg, hf.eval(), cfg.vocab_size, atol)
        return cache[family]

    return get


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("family", ALL)
def test_whole_prompt_in_one_pass(loaded, family):
    model, cfg, hf, vocab, atol = loaded(family)
    tokens = _prompt(vocab, 27, seed=1)  # 27 > MISTRAL_WINDOW; last block half full
    (out,) = _Pool(cfg).step(model, [(_Seq(tokens), len(tokens))])
    _check(out, _hf_logits(hf, tokens), atol)


@pytest.mark.parametrize("family", ALL)
def test_prompt_in_chunks_reads_context_from_pool(loaded, family):
    model, cfg, hf, vocab, atol = loaded(family)
    tokens = _prompt(vocab, 30, seed=2)
    pool, seq = _Pool(cfg), _Seq(tokens)
    # Chunks end mid-block; one is a lone token; the last one's context alone is
    # longer than Mistral's window.
    out = torch.cat([pool.step(model, [(seq, n)])[0] for n in (7, 1, 4, 18)])
    _check(out, _hf_logits(hf, tokens), atol)


@pytest.mark.parametrize("family", ALL)
def test_ragged_batch_with_decodes(loaded, family):
    model, cfg, hf, vocab, atol = loaded(family)
    seqs = [_Seq(_prompt(vocab, n, seed=10 + n)) for n in (18, 10, 25)]
    pool = _Pool(cfg)
    a, b, c = seqs
    rows = {id(s): [] for s in seqs}
    schedule = [
        [(a, 16), (b, 5), (c, 23)],  # prefills of different lengths, b only partly
        [(a, 1), (b, 4), (c, 1)],  # two decodes beside a prefill chunk
        [(a, 1), (b, 1), (c, 1)],  # a pure decode step
    ]
    for work in schedule:
        for (seq, _), out in zip(work, pool.step(model, work)):
            rows[id(seq)].append(out)
    for seq in seqs:
        assert seq.computed == len(seq.tokens)
        _check(torch.cat(rows[id(seq)]), _hf_logits(hf, seq.tokens), atol)


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3"])
def test_gguf_conversion_matches_hf(loaded, model_dir, family):
    """llama.cpp-style GGUF (q/k rows interleaved, llama3 scaling as rope_freqs)."""
    _, _, hf, vocab, _ = loaded(family)
    model, cfg = load_model(make_tiny_gguf(family, model_dir))
    expected = ModelConfig.from_hf_config(hf.config.to_dict())
    # GGUF stores eps as float32, and llama3 scaling as per-frequency divisors
    # (which the logits below check); everything else must agree exactly.
    assert cfg.rms_norm_eps == pytest.approx(expected.rms_norm_eps, rel=1e-6)
    assert (cfg.rope_scaling is not None) == (expected.rope_scaling is not None)
    assert dataclasses.replace(cfg, rms_norm_eps=expected.rms_norm_eps, rope_scaling=expected.rope_scaling) == expected
    tokens = _prompt(vocab, 40, seed=3)
    (out,) = _Pool(cfg).step(model, [(_Seq(tokens), len(tokens))])
    _check(out, _hf_logits(hf, tokens), TINY_ATOL)


def test_bf16_model_tracks_fp32(loaded, model_dir):
    """bf16 weights and pool: logits within bf16 noise of HF's fp32 ones."""
    _, _, hf, vocab, _ = loaded("llama")
    model, cfg = load_model(make_tiny_model("llama", model_dir), dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    tokens = _prompt(vocab, 20, seed=4)
    (out,) = _Pool(cfg, dtype=torch.bfloat16).step(model, [(_Seq(tokens), len(tokens))])
    assert out.dtype == torch.float32
    # bf16 keeps 8 mantissa bits (~0.4%); on logits up to ~4 the observed max |diff| is 0.05.
    torch.testing.assert_close(out, _hf_logits(hf, tokens), atol=0.15, rtol=0)


def test_smollm2_greedy_answer(loaded):
    """Greedy decoding through the pool, one decode step per token, answers right."""
    model, cfg, _, _, _ = loaded("smollm2")
    tok = load_tokenizer(smollm2_path())
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt").input_ids[0]
    seq = _Seq(torch.cat([ids, torch.zeros(8, dtype=torch.long)]))
    pool, n = _Pool(cfg), len(ids)
    logits = pool.step(model, [(seq, n)])[0][-1]
    for i in range(7):
        seq.tokens[n + i] = logits.argmax()
        logits = pool.step(model, [(seq, 1)])[0][-1]
    assert tok.decode(seq.tokens[n : n + 7]).startswith("The capital of France is Paris")


# ------------------------------------------------------------------ configs


def test_gguf_config_matches_hf_config(loaded):
    _, cfg, hf_model, _, _ = loaded("smollm2")  # cfg as load_model read it from the GGUF
    hf = hf_model.config
    assert cfg == ModelConfig.from_hf_config(hf.to_dict())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.num_hidden_layers,
        hf.hidden_size,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
    )
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (
        hf.vocab_size,
        hf.rope_parameters["rope_theta"],
        hf.rms_norm_eps,
        True,
    )
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))


# ------------------------------------------------------------------ rope


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_inverse_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={**scaling, "rope_theta": 500000.0})
    ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(inverse_frequencies(128, 500000.0, scaling), ref, atol=0, rtol=1e-6)


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(NotImplementedError, match="yarn"):
        inverse_frequencies(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


# ------------------------------------------------------------------ loader


def test_resolve_model_path(model_dir, tmp_path):
    hf_dir = make_tiny_model("llama", model_dir)
    assert resolve_model_path(hf_dir) == (hf_dir, None)
    gguf_file = make_tiny_gguf("llama", model_dir)
    folder, name = os.path.split(gguf_file)
    assert resolve_model_path(gguf_file) == (folder, name)
    assert resolve_model_path(folder) == (folder, name)
    assert default_model_path() == smollm2_path()
    shutil.copy(gguf_file, tmp_path / "a.gguf")
    shutil.copy(gguf_file, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="several"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "nothing"))


def test_checkpoint_missing_a_tensor_is_refused(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny_model("llama", model_dir)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="k_proj"):
        load_model(str(tmp_path))


def test_gpt_neox_checkpoint_checks(loaded, model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = loaded("gpt_neox")[0]
    with pytest.raises(ValueError, match="query_key_value.weight: checkpoint shape"):
        model.load_weight("gpt_neox.layers.0.attention.query_key_value.weight", torch.zeros(190, 64))
    src = make_tiny_model("gpt_neox", model_dir)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["embed_out.weight"]
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)  # old checkpoints' buffers
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"lacks 1 tensors, e.g. \['embed_out.weight'\]"):
        load_model(str(tmp_path))


def test_misplaced_tensors_are_refused(loaded):
    model = loaded("qwen2")[0]
    with pytest.raises(KeyError, match="foo_proj"):
        model.load_weight("model.layers.0.mlp.foo_proj.weight", torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        model.load_weight("model.layers.0.self_attn.k_proj.bias", torch.zeros(33))
