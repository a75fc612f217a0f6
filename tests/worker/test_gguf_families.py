"""GGUF files of Gemma 1 and 2, Phi-3, Falcon (7B and 40B layouts), Mixtral,
Qwen2-MoE and Qwen3-MoE, each in llama.cpp's layout (tests/gguf_convert.py),
read by folio against transformers on the same (dequantized) weights: logits
within 1e-4 at every position of a prompt read back from the paged pool, and
greedy continuations identical.

The reference is transformers reading the GGUF file itself wherever it can
read that layout: Gemma 2 (norms stored as 1 + weight), Phi-3 (fused attn_qkv
and ffn_up), Qwen2-MoE and Qwen3-MoE (stacked experts, shared expert). Its GGUF
metadata reader misses settings llama.cpp keeps (soft caps, LongRoPE, partial
rotary, mlp_only_layers), so it gets the source checkpoint's config, and the
weights come from the file through its own tensor renames and transforms: an
independent reading of the layout, not a round trip of our writer.

Where transformers cannot read the layout, the reference is the HF checkpoint
the file was converted from: Gemma 1 (no gemma GGUF arch in transformers),
Falcon (it reads attn_qkv without undoing the converter's q/k/v regrouping, so
Falcon-40B files come out wrong there), Mixtral (its llama arch reader drops
the experts) and Qwen2-MoE with a dense layer (its qwen2moe reader has no
dense MLP names). That is still an independent check because the writer follows
llama.cpp's convert script step by step (norm + 1, the q/k row interleave of
llama-arch files, Falcon's regrouping, stacked experts): folio must undo each
transform, in the file's own terms, to reproduce the original model.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from folio.kernels.interface import REFERENCE_OPS
from folio.worker.config import ModelConfig
from folio.worker.loader import load_model
from folio.worker.parallel import PackedWeight
from tests.gguf_convert import ARCHS, Q8_0_PARTS, gguf_source
from tests.gguf_fixtures import make_tiny_gguf
from tests.worker.test_models import TINY_ATOL, _check, _hf_logits, _Pool, _prompt, _Seq

TRANSFORMERS_READS = ("gemma2", "phi3", "qwen2_moe", "qwen3_moe")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-families")


def _reference(family: str, model_dir, path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = gguf_source(family, model_dir)
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if family in TRANSFORMERS_READS:
        config = AutoConfig.from_pretrained(src)
        folder, name = os.path.split(path)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(src, **kwargs).eval()


def _greedy(model, cfg: ModelConfig, prompt: torch.Tensor) -> list[int]:
    """NEW_TOKENS greedy tokens, one decode step each through the paged pool."""
    seq = _Seq(torch.cat([prompt, torch.zeros(NEW_TOKENS, dtype=torch.long)]))
    pool, n = _Pool(cfg), len(prompt)
    logits = pool.step(model, [(seq, n)])[0][-1]
    for i in range(NEW_TOKENS):
        seq.tokens[n + i] = logits.argmax()
        if i + 1 < NEW_TOKENS:
            logits = pool.step(model, [(seq, 1)])[0][-1]
    return seq.tokens[n:].tolist()


@pytest.mark.parametrize("family", list(ARCHS))
def test_gguf_file_matches_transformers(model_dir, family):
    path = make_tiny_gguf(family, model_dir)
    model, cfg = load_model(path, ops=REFERENCE_OPS)  # exact fp32: Q8_0 blocks are dequantized at load
    hf = _reference(family, model_dir, path)
    expected = ModelConfig.from_hf_config(hf.config.to_dict())
    # GGUF stores floats as float32; Falcon files a context of 2048 (FalconModel's) and
    # q/k/v regrouped into blocks. Every other field must be what transformers' config says.
    assert cfg.rms_norm_eps == pytest.approx(expected.rms_norm_eps, rel=1e-6)
    same = dict(rms_norm_eps=expected.rms_norm_eps, rope_scaling=expected.rope_scaling)
    if family.startswith("falcon"):
        assert cfg.qkv_layout == "blocks"
        same |= dict(max_position_embeddings=expected.max_position_embeddings, qkv_layout=expected.qkv_layout)
    assert dataclasses.replace(cfg, **same) == expected
    tokens = _prompt(cfg.vocab_size, 30, seed=5)  # longer than the sliding windows
    seq, pool = _Seq(tokens), _Pool(cfg)
    out = torch.cat([pool.step(model, [(seq, n)])[0] for n in (11, 1, 18)])
    _check(out, _hf_logits(hf, tokens), TINY_ATOL)
    prompt = tokens[:12]
    with torch.inference_mode():
        want = hf.generate(prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt) :]
    assert _greedy(model, cfg, prompt) == want.tolist()


@pytest.mark.parametrize("family", list(Q8_0_PARTS))
def test_kept_quantized_computes_the_dequantized_model(model_dir, family, caplog):
    """Q8_0 blocks kept quantized (Gemma 2: every 2-D weight, the embedding too;
    Phi-3: o and down kept, its fused qkv and gate_up dequantized at load; Qwen3-MoE:
    attention kept, the stacked experts dequantized at load): in fp32 the dense
    model's logits; in bfloat16 its greedy tokens and logits within bf16 noise."""
    path = make_tiny_gguf(family, model_dir)
    dense, cfg = load_model(path, quantization="none")
    tokens = _prompt(cfg.vocab_size, 24, seed=6)
    (want,) = _Pool(cfg).step(dense, [(_Seq(tokens), len(tokens))])
    with caplog.at_level("INFO", logger="folio.worker.gguf_loader"):
        exact, qcfg = load_model(path, quantization="gguf", ops=REFERENCE_OPS)
    assert qcfg.quantization == "gguf"
    assert ("expert weights dequantized" in caplog.text) == (family == "qwen3_moe")
    o_proj = exact.model.layers[0].self_attn.o_proj.weight
    assert isinstance(o_proj, PackedWeight) and [r.bits for r in o_proj.runs] == [8]
    (got,) = _Pool(qcfg).step(exact, [(_Seq(tokens), len(tokens))])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    bf16, bcfg = load_model(path, dtype=torch.bfloat16, quantization="gguf")
    (low,) = _Pool(bcfg, dtype=torch.bfloat16).step(bf16, [(_Seq(tokens), len(tokens))])
    # bf16 activations: ~0.4% per op; these logits reach ~10-30.
    torch.testing.assert_close(low.float().log_softmax(-1), want.log_softmax(-1), atol=0.25, rtol=0)
    assert _greedy(bf16, bcfg, tokens[:12]) == _greedy(dense, cfg, tokens[:12])


def _header_only(path: str, arch: str, meta: dict, tensor_names: list[str]) -> str:
    """A GGUF file with these metadata keys and small zero tensors, for the config reader."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        w.add_uint32(f"{arch}.{key}", value)
    for name in tensor_names:
        w.add_tensor(name, np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "arch, extra, tensors, reason",
    [
        ("starcoder2", {}, [], "unsupported GGUF architecture 'starcoder2'"),
        ("falcon", {}, ["blk.0.attn_qkv.bias"], "Falcon GGUF with linear biases"),
        ("qwen2", {"rope.dimension_count": 8}, [], "partial rotary"),
        ("qwen2moe", {"expert_count": 4, "expert_used_count": 6}, [], "not a mixture of experts"),
        ("qwen3moe", {"expert_count": 4, "expert_used_count": 2, "expert_gating_func": 2}, [], "gating function 2"),
        ("llama", {"expert_count": 4, "expert_used_count": 2}, ["blk.0.ffn_gate_inp.weight"], "without stacked"),
    ],
)
def test_what_llama_cpp_computes_otherwise_is_refused(tmp_path, arch, extra, tensors, reason):
    from folio.worker.gguf_loader import gguf_config, read_gguf

    meta = {"embedding_length": 64, "attention.head_count": 4, "block_count": 1, "feed_forward_length": 128}
    path = _header_only(str(tmp_path / "f.gguf"), arch, meta | extra, ["token_embd.weight", *tensors])
    with pytest.raises(ValueError, match=reason):
        gguf_config(read_gguf(path))
