"""Hugging Face transformers as the independent reference, and the parity
checks built on it: folio's greedy tokens and logprobs against transformers'
for the same prompt run alone.

Used on CPU (fp32, exact tokens) and on a GPU (tests/kernels/test_gpu_model.py:
fp32 exact, bf16/fp16 teacher-forced), so it imports only torch and transformers.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


def hf_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' model of a checkpoint dir or .gguf file, loaded once: on the CPU for
    the whole session (tiny models, and SmolLM2, which tests in several modules compare
    against and which takes ~10 s to load from its GGUF), on a GPU the 4 latest."""
    if device == "cpu":
        return _session_model(path, dtype)
    return _recent_model(path, dtype, device)


@functools.lru_cache(maxsize=None)
def _session_model(path: str, dtype: torch.dtype):
    return _load(path, dtype, "cpu")


@functools.lru_cache(maxsize=4)
def _recent_model(path: str, dtype: torch.dtype, device: str):
    return _load(path, dtype, device)


def _load(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.to(device).eval()


@dataclass
class Greedy:
    tokens: list[int]
    logprobs: list[float]  # of each chosen token
    dists: list[torch.Tensor]  # [vocab] fp32 log-probabilities at each step


@torch.inference_mode()
def hf_greedy(
    path: str, prompt_ids: list[int], n: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Greedy:
    """n greedy tokens for one prompt alone, with logprobs under the raw model."""
    m = hf_model(path, dtype, device)
    out = m.generate(
        torch.tensor([prompt_ids], device=device),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    dists = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    return Greedy(tokens, [d[t].item() for d, t in zip(dists, tokens)], dists)


def run_staggered(llm, prompts: list[list[int]], params, per_step: int) -> list:
    """Add `per_step` prompts before each step until all are in; run to completion,
    checking the block manager's integrity after every step. Results in prompt order."""
    ids, pending, results = [], list(prompts), {}
    while pending or llm.has_unfinished():
        for p in pending[:per_step]:
            ids.append(llm.add_request(p, params))
        pending = pending[per_step:]
        for res in llm.step():
            results[res.request_id] = res
        llm.scheduler.check_integrity()
    return [results[i] for i in ids]


def drain_engine(llm) -> tuple[list, list]:
    """Step the engine itself until nothing is left: (every RequestOutput, every finished
    GenerationResult), for tests that put requests straight into the engine."""
    outs, done = [], []
    while llm.has_unfinished():
        step_outs = llm.engine.step()
        outs += step_outs
        done += llm._apply(step_outs)
    return outs, done


def assert_greedy_parity(
    path: str,
    prompts: list[list[int]],
    results: list,
    n: int,
    logprob_tol: float,
    *,
    top_logprobs: bool = False,
    **hf_kwargs,
) -> None:
    """Each prompt got exactly transformers' greedy tokens, logprobs within tolerance.

    top_logprobs: the top alternatives' logprobs too (the results must carry them:
    logprobs=k). Where one token takes nearly all the probability its logprob stays
    near 0 whatever the model computed; the alternatives' still move with every logit.
    """
    for p, res in zip(prompts, results):
        want = hf_greedy(path, p, n, **hf_kwargs)
        out = res.outputs[0]
        assert out.token_ids == want.tokens, f"prompt of {len(p)} tokens diverged"
        got = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(got, want.logprobs)) < logprob_tol
        if top_logprobs:
            errors = [abs(v - dist[t].item()) for lp, dist in zip(out.logprobs, want.dists) for t, v in lp.top]
            assert errors, "no top logprobs to compare: ask for logprobs=k"
            assert max(errors) < logprob_tol, f"prompt of {len(p)} tokens: top logprobs off by {max(errors):.2e}"


@torch.inference_mode()
def hf_logprobs(path: str, ids: list[int], *, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[len(ids), vocab] fp32 log-probabilities of the next token at every position."""
    logits = hf_model(path, dtype, device)(torch.tensor([ids], device=device)).logits[0]
    return torch.log_softmax(logits.float(), -1)


def half_precision_errors(
    path: str, prompts: list[list[int]], results: list, dtype: torch.dtype, device: str
) -> tuple[float, float]:
    """How far folio's and transformers' low-precision logprobs fall from the fp32 truth.

    Two correct low-precision implementations break near-ties differently and then
    diverge, so free-running greedy tokens cannot be compared. Instead transformers
    is teacher-forced on folio's own output, in fp32 (the truth) and in `dtype`,
    and at every generated position the logprobs of folio's top candidates are
    compared. Returns (folio's mean absolute error, transformers' in the same
    dtype): the second calibrates the first.
    """
    ours, theirs = [], []
    for p, res in zip(prompts, results):
        out = res.outputs[0]
        seq = p + out.token_ids[:-1]
        rows = slice(len(p) - 1, len(seq))  # positions that predicted the outputs
        truth = hf_logprobs(path, seq, dtype=torch.float32, device=device)[rows]
        low = hf_logprobs(path, seq, dtype=dtype, device=device)[rows]
        for i, lp in enumerate(out.logprobs):
            tokens = torch.tensor([t for t, _ in lp.top], device=device)
            got = torch.tensor([v for _, v in lp.top], device=device)
            assert lp.token_id in truth[i].topk(5).indices.tolist(), (
                f"prompt of {len(p)} tokens, output {i}: token {lp.token_id} is not among the fp32 top 5"
            )
            ours.append((got - truth[i, tokens]).abs().mean().item())
            theirs.append((low[i, tokens] - truth[i, tokens]).abs().mean().item())
    return sum(ours) / len(ours), sum(theirs) / len(theirs)
