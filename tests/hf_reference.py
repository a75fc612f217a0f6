"""Hugging Face transformers as the independent reference: greedy tokens and logprobs."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=4)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    if path.endswith(".gguf"):
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.eval()


@torch.inference_mode()
def hf_greedy(path: str, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens for one prompt alone, and the logprob of each under the raw model."""
    m = hf_model(path)
    out = m.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     output_logits=True, return_dict_in_generate=True,
                     pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, logprobs
