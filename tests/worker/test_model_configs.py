"""ModelConfig read from Hugging Face config.json files: every tiny family's fields,
older layouts read as transformers reads them, and what folio cannot run refused
with the reason (its parity with transformers' models is tests/worker/test_models.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from folio.worker.config import ModelConfig
from tests.model_fixtures import GEMMA2_ATTN_SOFTCAP, MISTRAL_WINDOW, TINY_FAMILIES, TINY_VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


# What each tiny family's config.json must read as (tests/model_fixtures.py builds them):
# the fields that differ from a plain Llama's.
_PLAIN = dict(
    vocab_size=TINY_VOCAB,
    num_layers=3,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=16,
    sliding_window=None,
    qkv_bias=False,
    o_bias=False,
    qk_norm=False,
    tie_word_embeddings=False,
    rope_type=None,
    layer_types=None,
    attn_scale=None,
    local_rope_theta=None,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    rotary_dim=None,
    max_position_embeddings=256,
    parallel_residual=False,
    norm_kind="rms",
    hidden_act="silu",
    norm_weight_offset=0.0,
    embedding_multiplier=1.0,
    qkv_layout="blocks",
    shared_input_norm=False,
    num_experts=0,
    num_experts_per_tok=0,
    moe_intermediate_size=0,
    norm_topk_prob=False,
    shared_expert_intermediate_size=0,
    dense_layers=(),
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_GEMMA = dict(
    tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0, embedding_multiplier=8.0
)
_GEMMA3 = dict(
    _GEMMA,
    sliding_window=MISTRAL_WINDOW,
    qk_norm=True,
    rope_type="linear",
    layer_types=("sliding_attention",) * 2 + ("full_attention",),
    attn_scale=24**-0.5,
    local_rope_theta=10000.0,
)
_FALCON = dict(norm_kind="layer", hidden_act="gelu", tie_word_embeddings=True)
_EXPECTED = {
    "llama": {},
    "llama3": dict(tie_word_embeddings=True, rope_type="llama3"),
    "mistral": dict(sliding_window=MISTRAL_WINDOW),
    "qwen2": dict(qkv_bias=True, tie_word_embeddings=True),
    "gemma": dict(_GEMMA, num_kv_heads=1, head_dim=32),
    "gpt_neox": dict(
        num_kv_heads=4,
        qkv_bias=True,
        o_bias=True,
        rotary_dim=4,
        parallel_residual=True,
        norm_kind="layer",
        hidden_act="gelu",
    ),
    "gpt_neox_sequential": dict(
        num_kv_heads=4, tie_word_embeddings=True, rotary_dim=8, norm_kind="layer", hidden_act="gelu_pytorch_tanh"
    ),
    "qwen3": dict(qkv_bias=True, o_bias=True, qk_norm=True, tie_word_embeddings=True),
    "phi3": dict(sliding_window=MISTRAL_WINDOW, rope_type="longrope", rotary_dim=8, max_position_embeddings=128),
    "gemma3": _GEMMA3,
    # and no attention cap: transformers' Gemma 3 ignores the config's
    "gemma3_capped": dict(_GEMMA3, final_logit_softcapping=30.0),
    "gemma2": dict(
        _GEMMA,
        sliding_window=MISTRAL_WINDOW,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        attn_scale=24**-0.5,
        attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP,
        final_logit_softcapping=30.0,
    ),
    "falcon": dict(_FALCON, num_kv_heads=1, parallel_residual=True, shared_input_norm=True),
    "falcon_new": dict(
        _FALCON,
        qkv_bias=True,
        o_bias=True,
        tie_word_embeddings=False,
        parallel_residual=True,
        qkv_layout="per_kv_group",
    ),
    "falcon_rw": dict(_FALCON, num_kv_heads=4, qkv_bias=True, o_bias=True, qkv_layout="per_head"),
    "mixtral": dict(_MOE, norm_topk_prob=True),
    "qwen2_moe": dict(_MOE, qkv_bias=True, shared_expert_intermediate_size=48, dense_layers=(1,)),
    "qwen3_moe": dict(_MOE, qk_norm=True, norm_topk_prob=True),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_config_from_hf_dir(model_dir, family):
    with open(os.path.join(make_tiny_model(family, model_dir), "config.json")) as f:
        cfg = ModelConfig.from_hf_config(json.load(f))
    got = {k: getattr(cfg, k) for k in _PLAIN if k != "rope_type"}
    got["rope_type"] = (cfg.rope_scaling or {}).get("rope_type")
    assert got == {**_PLAIN, **_EXPECTED[family]}


def test_config_rejects_what_folio_cannot_run():
    base = dict(
        model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf_config({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="some layers"):
        ModelConfig.from_hf_config(
            {
                **base,
                "model_type": "qwen2",
                "num_hidden_layers": 2,
                "layer_types": ["full_attention", "sliding_attention"],
            }
        )
    with pytest.raises(ValueError, match="parallel residual"):
        dataclasses.replace(ModelConfig.from_hf_config(base), parallel_residual=True)
    phi3 = {**base, "model_type": "phi3", "num_hidden_layers": 2}
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        ModelConfig.from_hf_config({**phi3, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    longrope = {"type": "su", "short_factor": [1.0, 2.0], "long_factor": [1.0, 2.0]}
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        ModelConfig.from_hf_config({**phi3, "rope_scaling": longrope})
    with pytest.raises(ValueError, match="short_factor has 1"):
        ModelConfig.from_hf_config(
            {**phi3, "rope_scaling": {**longrope, "short_factor": [1.0]}, "original_max_position_embeddings": 64}
        )
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig.from_hf_config({**base, "model_type": "phi3small"})
    falcon = {
        "model_type": "falcon",
        "vocab_size": 8,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    for change, message in [
        ({"alibi": True}, "ALiBi"),
        ({"activation": "relu"}, "activation"),
        ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
        ({"multi_query": False, "num_kv_heads": 1}, "KV head per query head"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_hf_config({**falcon, **change})
    mixtral = {**base, "model_type": "mixtral", "num_local_experts": 4}
    with pytest.raises(ValueError, match="num_experts_per_tok 5 must be in 1..4"):
        ModelConfig.from_hf_config({**mixtral, "num_experts_per_tok": 5})
    legacy = {
        "model_type": "falcon",
        "vocab_size": 8,
        "n_embed": 8,
        "n_layer": 2,
        "n_head": 2,
    }  # Falcon's own spellings
    assert (ModelConfig.from_hf_config(legacy).num_layers, ModelConfig.from_hf_config(legacy).intermediate_size) == (
        2,
        32,
    )


@pytest.mark.parametrize(
    "change,message",
    [
        # Gemma 2 runs, but not what its transformers class would compute differently.
        ({"model_type": "gemma2", "hidden_activation": "gelu"}, "activation"),
        ({"model_type": "gemma2", "tie_word_embeddings": False}, "untied"),
        ({"model_type": "gemma2", "use_bidirectional_attention": True}, "bidirectional"),
        ({"model_type": "gemma2", "sliding_window": None}, "sliding_window"),
        ({"model_type": "gemma2", "layer_types": ["chunked_attention"]}, "layer_types"),
        ({"model_type": "gemma2", "attn_logit_softcapping": 0.0}, "softcapping must be positive"),
        ({"model_type": "gemma2", "final_logit_softcapping": -30.0}, "softcapping must be positive"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        # Exact GELU in transformers 4.x, the tanh one in 5.x: folio cannot be both.
        ({"hidden_activation": "gelu"}, "activation"),
        ({"hidden_act": "relu"}, "activation"),
        # Gemma 3 (text) runs, but not Gemma 2's softcapping nor what it never had.
        ({"model_type": "gemma3_text", "tie_word_embeddings": False}, "untied"),
        ({"model_type": "gemma3_text", "layer_types": ["global"]}, "layer_types"),
        ({"model_type": "gemma3_text", "layer_types": ["sliding_attention"]}, "sliding_window"),
        ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "architecture"),
    ],
)
def test_config_rejects_gemma_variants(change, message):
    base = dict(
        model_type="gemma",
        vocab_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=8,
    )
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**base, **change})


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hidden_act": "gelu_fast"}, "hidden_act"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"rotary_pct": 0.1}, "rotary"),  # 1.6 of 16 features: not a whole even number
        ({"hidden_size": 66}, "split hidden_size"),
    ],
)
def test_config_rejects_gpt_neox_variants(change, message):
    base = dict(
        model_type="gpt_neox",
        vocab_size=8,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=8,
    )
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**base, **change})


@pytest.mark.parametrize(
    "raw",
    [
        # Pythia's config.json as transformers 4.x wrote it (rotary settings at the top level).
        {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "hidden_act": "gelu",
            "hidden_size": 512,
            "intermediate_size": 2048,
            "layer_norm_eps": 1e-05,
            "num_attention_heads": 8,
            "num_hidden_layers": 6,
            "rotary_emb_base": 10000,
            "rotary_pct": 0.25,
            "use_parallel_residual": True,
            "vocab_size": 50304,
            "max_position_embeddings": 2048,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        # Older Pythia-style config leaving the rotary settings to the defaults, with linear rope scaling.
        {
            "model_type": "gpt_neox",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "vocab_size": 100,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "use_parallel_residual": False,
        },
        # Gemma-2B's config.json (MQA, head_dim 256, the legacy "gelu" beside hidden_activation).
        {
            "architectures": ["GemmaForCausalLM"],
            "model_type": "gemma",
            "hidden_act": "gelu",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "num_hidden_layers": 18,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "vocab_size": 256000,
            "max_position_embeddings": 8192,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        # Gemma-2-27B's config.json as transformers 4.42 wrote it (no layer_types: even
        # layers slide; rope_theta at the top level; hidden_act beside hidden_activation).
        {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "attention_bias": False,
            "attn_logit_softcapping": 50.0,
            "bos_token_id": 2,
            "cache_implementation": "hybrid",
            "eos_token_id": 1,
            "final_logit_softcapping": 30.0,
            "head_dim": 128,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 4608,
            "intermediate_size": 36864,
            "max_position_embeddings": 8192,
            "num_attention_heads": 32,
            "num_hidden_layers": 46,
            "num_key_value_heads": 16,
            "pad_token_id": 0,
            "query_pre_attn_scalar": 144,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "vocab_size": 256000,
        },
        # A Gemma 2 config.json that leaves every Gemma 2 default out (caps, window, query scale).
        {
            "model_type": "gemma2",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 8,
            "num_hidden_layers": 5,
            "vocab_size": 100,
        },
    ],
    ids=["pythia-4.x", "neox-defaults", "gemma-2b", "gemma-2-27b", "gemma2-defaults"],
)
def test_older_config_layouts_read_as_transformers_reads_them(raw):
    """transformers normalizes a config.json on load (5.x folds the rotary settings
    into rope_parameters and the Gemma activation into hidden_act); folio must read
    the raw file the same way as the normalized one."""
    from transformers import AutoConfig

    normalized = AutoConfig.for_model(**raw).to_dict()
    assert ModelConfig.from_hf_config(raw) == ModelConfig.from_hf_config(normalized)
    if raw["model_type"] == "gemma2":  # and as Gemma 2's own code reads its config
        cfg, hf = ModelConfig.from_hf_config(raw), AutoConfig.for_model(**raw)
        assert (
            cfg.layer_types
            == tuple(hf.layer_types)
            == ("sliding_attention", "full_attention") * 2 + cfg.layer_types[4:]
        )
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
        assert (cfg.attn_scale, cfg.sliding_window) == (hf.query_pre_attn_scalar**-0.5, 4096)
        assert (cfg.num_kv_heads, cfg.head_dim) == (hf.num_key_value_heads, hf.head_dim)
