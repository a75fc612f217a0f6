"""GGUF files for tests: tiny random-weight models written in GGUF (F32, and a mix of
the quantized block types folio keeps quantized), through gguf-py's writer.

Built like tests/model_fixtures.py's checkpoints: each builder takes a cache
directory, returns the file's path and reuses a file already there.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from tests.model_fixtures import make_tiny_model


def make_tiny_gguf(family: str, path) -> str:
    """make_tiny_model(family) converted to an F32 GGUF file, as llama.cpp would:
    q/k rows of Llama interleaved per head, llama3 scaling as a rope_freqs tensor.
    Families: "llama", "llama3", "qwen2", "qwen3", and those of tests/gguf_convert.py
    (gemma, gemma2, phi3, falcon, falcon_new, mixtral, qwen2_moe, qwen3_moe).
    Returns the .gguf file path."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tests import gguf_convert

    if family in gguf_convert.ARCHS:
        return gguf_convert.convert(family, path)
    out = os.path.join(str(path), f"{family}-gguf", f"tiny-{family}.F32.gguf")
    if os.path.isfile(out):
        return out
    src = make_tiny_model(family, path)
    config = AutoConfig.from_pretrained(src)
    arch = family if family in ("qwen2", "qwen3") else "llama"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    def tensors():
        if family == "llama3":
            yield "rope_freqs.weight", _llama3_freq_factors(config), None
        for name, t in load_file(os.path.join(src, "model.safetensors")).items():
            if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                t = _interleave_rope_rows(t, heads if ".q_proj." in name else kv_heads)
            yield _gguf_name(name), t.numpy(), None

    hparams = dict(
        layers=config.num_hidden_layers,
        context=config.max_position_embeddings,
        hidden=config.hidden_size,
        inter=config.intermediate_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=config.hidden_size // heads,
        rope_theta=config.rope_parameters["rope_theta"],
        eps=config.rms_norm_eps,
        vocab=config.vocab_size,
        bos=config.bos_token_id,
        eos=config.eos_token_id,
    )
    _write_gguf(out, arch, hparams, tensors())
    return out


def _write_gguf(out: str, arch: str, hp: dict, tensors, more=None) -> None:
    """A GGUF file at `out` (written beside it, then moved in place) with a Llama-style
    model's hyperparameters hp and tensors: (GGUF name, array, raw ggml type or None);
    more(writer), when given, adds metadata of its own."""
    import gguf

    os.makedirs(os.path.dirname(out), exist_ok=True)
    w = gguf.GGUFWriter(out + ".partial", arch)
    w.add_block_count(hp["layers"])
    w.add_context_length(hp["context"])
    w.add_embedding_length(hp["hidden"])
    w.add_feed_forward_length(hp["inter"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_dimension_count(hp["head_dim"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_vocab_size(hp["vocab"])
    w.add_bos_token_id(hp["bos"])
    w.add_eos_token_id(hp["eos"])
    if more is not None:
        more(w)
    for name, array, raw_dtype in tensors:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(out + ".partial", out)


def _interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter order: per head, rows (0, D/2, 1, D/2+1, ...)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama3_freq_factors(config) -> np.ndarray:
    """Per-frequency divisors, derived from transformers' own rope functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    base = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return (base / scaled).numpy().astype(np.float32)


def _gguf_name(hf: str) -> str:
    table = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
    }
    base, _, kind = hf.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{table[part]}.{kind}"
    return f"{table[base]}.{kind}"


QUANTIZED_GGUF_TYPES = {
    "token_embd": "Q8_0",
    "output": "Q6_K",
    "blk.0.attn_q": "Q4_K",
    "blk.0.attn_k": "Q4_K",
    "blk.0.attn_v": "Q6_K",
    "blk.0.attn_output": "Q5_K",
    "blk.0.ffn_gate": "Q4_1",
    "blk.0.ffn_up": "Q4_1",
    "blk.0.ffn_down": "Q8_0",
    "blk.1.attn_q": "Q5_0",
    "blk.1.attn_k": "Q5_1",
    "blk.1.attn_v": "Q4_0",
    "blk.1.attn_output": "Q4_0",
    "blk.1.ffn_gate": "Q5_K",
    "blk.1.ffn_up": "Q6_K",
    "blk.1.ffn_down": "Q4_K",
}


def make_tiny_quantized_gguf(path) -> str:
    """A tiny random Llama stored as a llama.cpp GGUF in QUANTIZED_GGUF_TYPES.

    The blocks are random bytes with their fp16 scales set so that weights have
    a standard deviation near 0.05 (any bytes are a valid block), so every block
    type is exercised without a quantizer for it. K-quants need 256-wide rows:
    hidden 256, MLP 512, 4 query heads of 64, 2 KV heads, vocab 512.
    """
    import gguf

    out = os.path.join(str(path), "tiny-quantized-gguf", "tiny-llama.mixed.gguf")
    if os.path.isfile(out):
        return out
    hidden, inter, heads, kv_heads, vocab, layers = 256, 512, 4, 2, 512, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(7)
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden)} | _llama_matrices(
        hidden, inter, kv_heads * head_dim, layers
    )

    def tensors():
        for name, (rows, cols) in shapes.items():
            qtype = gguf.GGMLQuantizationType[QUANTIZED_GGUF_TYPES[name]]
            yield f"{name}.weight", random_gguf_blocks(qtype, rows, cols, rng), qtype
        for name in ["output_norm"] + [f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm", "ffn_norm")]:
            yield f"{name}.weight", (1.0 + 0.2 * rng.standard_normal(hidden)).astype(np.float32), None

    hparams = dict(
        layers=layers,
        context=256,
        hidden=hidden,
        inter=inter,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=10000.0,
        eps=1e-5,
        vocab=vocab,
        bos=1,
        eos=2,
    )
    _write_gguf(out, "llama", hparams, tensors())
    return out


def random_gguf_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, bytes per row] of random `qtype` blocks whose weights have std
    near 0.05: random codes and sub-scales, fp16 super-scales chosen per type."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)

    def put(offset: int, values) -> None:
        b[:, offset : offset + 2] = np.asarray(values, dtype=np.float16).reshape(-1, 1).view(np.uint8)

    d = rng.uniform(0.5, 1.5, size=b.shape[0]) * rng.choice([-1.0, 1.0], size=b.shape[0])
    name = qtype.name
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        spread = {"Q4_0": 4.6, "Q4_1": 4.6, "Q5_0": 9.2, "Q5_1": 9.2, "Q8_0": 74.0}[name]
        put(0, 0.05 / spread * d)
        if name in ("Q4_1", "Q5_1"):  # min m: centre the codes (w = d q + m)
            put(2, -(8 if name == "Q4_1" else 16) * 0.05 / spread * d)
    elif name in ("Q4_K", "Q5_K"):
        half = 7.5 if name == "Q4_K" else 15.5  # dmin = half * d centres w = d sc q - dmin m
        scale = 0.05 / (255 if name == "Q4_K" else 510) * np.abs(d)
        put(0, scale)
        put(2, half * scale)
    elif name == "Q6_K":
        put(208, 0.05 / 1370 * d)
    else:
        raise ValueError(f"no random blocks for {name}")
    return b.reshape(rows, -1)


def _llama_matrices(hidden: int, inter: int, kv: int, layers: int) -> dict[str, tuple[int, int]]:
    """GGUF name -> (rows, cols) of a Llama's per-layer matrices, in the file's order."""
    shapes = {}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q": (hidden, hidden),
            f"blk.{i}.attn_k": (kv, hidden),
            f"blk.{i}.attn_v": (kv, hidden),
            f"blk.{i}.attn_output": (hidden, hidden),
            f"blk.{i}.ffn_gate": (inter, hidden),
            f"blk.{i}.ffn_up": (inter, hidden),
            f"blk.{i}.ffn_down": (hidden, inter),
        }
    return shapes


def write_random_llama_gguf(out: str, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> str:
    """A Llama of random weights at any size, as the bundled SmolLM2 GGUF stores one
    (Q4_1 layers, a tied Q8_0 embedding, fp32 norms) and with its tokenizer and chat
    template, so that `folio serve --model out` serves it: a model to measure memory on
    where the weights, not the runtime, are most of a worker (README, "Quantized
    weights"). TinyLlama's shape, 1.1B parameters and 682 MiB: hidden 2048, inter 5632,
    layers 22, heads 32, kv_heads 4. Random blocks, so the text it writes is noise."""
    import gguf

    from tests.model_fixtures import smollm2_path

    src = gguf.GGUFReader(smollm2_path())
    field = lambda key: src.fields[key].contents()  # noqa: E731
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)

    def tokenizer(w) -> None:
        w.add_tokenizer_model(field("tokenizer.ggml.model"))
        w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
        w.add_token_list(field("tokenizer.ggml.tokens"))
        w.add_token_types(field("tokenizer.ggml.token_type"))
        w.add_token_merges(field("tokenizer.ggml.merges"))
        w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
        w.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
        w.add_add_bos_token(field("tokenizer.ggml.add_bos_token"))
        w.add_add_space_prefix(field("tokenizer.ggml.add_space_prefix"))
        w.add_chat_template(field("tokenizer.chat_template"))

    def tensors():
        rng = np.random.default_rng(0)
        q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
        yield "token_embd.weight", random_gguf_blocks(q8_0, vocab, hidden, rng), q8_0
        for name in ["output_norm"] + [f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm", "ffn_norm")]:
            yield f"{name}.weight", np.ones(hidden, np.float32), None
        for name, (rows, cols) in _llama_matrices(hidden, inter, kv_heads * (hidden // heads), layers).items():
            yield f"{name}.weight", random_gguf_blocks(q4_1, rows, cols, rng), q4_1

    hparams = dict(
        layers=layers,
        context=2048,
        hidden=hidden,
        inter=inter,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=hidden // heads,
        rope_theta=10000.0,
        eps=1e-5,
        vocab=vocab,
        bos=field("tokenizer.ggml.bos_token_id"),
        eos=field("tokenizer.ggml.eos_token_id"),
    )
    _write_gguf(os.path.abspath(out), "llama", hparams, tensors(), more=tokenizer)
    return out
