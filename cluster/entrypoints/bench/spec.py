"""`folio bench spec`: speculative decoding with n-gram drafts against plain decoding.

Two workloads on the same model, greedy, each run with speculation off (the
baseline) and on, in this process:
- copy: prompts that ask the model to repeat or quote lines given in the
  prompt (what summaries, code edits and RAG answers do in part), where
  prompt lookup should pay off;
- open: prompts with nothing to copy, where drafts are mostly wrong and
  speculation can only cost.
Each workload runs one request at a time (latency) and all at once (batch).
Greedy outputs are identical with and without speculation (tests/cluster/test_speculative.py);
the benchmark checks that too.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import time

from cluster.entrypoints.options import add_config_args, options_from_args
from protos.config import EngineConfig

OPEN = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Give me three ideas for a birthday party.",
    "Why is the sky blue?",
]


def _zen() -> list[str]:
    """The Zen of Python: real English text that ships with every Python (and prints on import)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13").splitlines()[2:]


def workloads() -> dict[str, list[str]]:
    zen, copy = _zen(), []
    for i in range(4):
        lines = "\n".join(zen[i * 4 : i * 4 + 5])
        copy.append(f"Repeat these lines exactly, then repeat them once more:\n\n{lines}")
    return {"copy": copy, "open": OPEN}


def early_exit_draft(target: str, num_layers: int, out: str) -> str:
    """A draft model cut from the target: its first num_layers layers under its own final
    norm and LM head (a self-speculative, LayerSkip-style draft), saved as a transformers
    checkpoint with the target's tokenizer in `out` (reused when there). Needs no second
    model on disk; an untrained cut agrees with the target less than a trained draft."""
    import os

    from transformers import AutoModelForCausalLM

    from worker.loader import load_tokenizer, resolve_model_path

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    directory, gguf_file = resolve_model_path(target)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype="float32")
    if not 0 < num_layers < model.config.num_hidden_layers:
        raise ValueError(f"a draft keeps 1 to {model.config.num_hidden_layers - 1} layers, not {num_layers}")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    tmp = out + ".partial"
    model.save_pretrained(tmp)
    try:
        load_tokenizer(target).save_pretrained(tmp)
    except (OSError, ValueError):
        pass  # a token-id-only target: the draft has no tokenizer either
    os.replace(tmp, out)
    return out


def _run(llm, prompts: list[list[int]], max_tokens: int, batched: bool) -> tuple[float, int, list]:
    from protos.messages import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    if batched:
        results = llm.generate(prompts, params)
    else:
        results = [r for p in prompts for r in llm.generate([p], params)]
    seconds = time.perf_counter() - t0
    return seconds, sum(len(r.outputs[0].token_ids) for r in results), [r.outputs[0].token_ids for r in results]


def main(args: argparse.Namespace) -> dict:
    from cluster.entrypoints.llm import LLM

    options = options_from_args(EngineConfig, args)
    engines = {k: LLM(**{**options, "num_speculative_tokens": k}) for k in (0, args.num_speculative_tokens)}
    rows = []
    print(
        f"{'workload':10s} {'mode':8s} {'plain tok/s':>12s} {'spec tok/s':>11s} {'ratio':>6s} "
        f"{'accepted':>9s} {'tokens/step':>12s}"
    )
    for name, texts in workloads().items():
        if args.workload not in ("all", name):
            continue
        prompts = [engines[0].chat_token_ids([{"role": "user", "content": t}]) for t in texts[: args.num_prompts]]
        for batched in (False, True):
            figures = {}
            for k, llm in engines.items():
                llm.generate([prompts[0][:8]])  # warm-up
                before = llm.scheduler.stats()
                seconds, tokens, outs = _run(llm, prompts, args.max_tokens, batched)
                after = llm.scheduler.stats()
                figures[k] = dict(
                    seconds=seconds,
                    tokens=tokens,
                    outputs=outs,
                    drafts=after.num_draft_tokens - before.num_draft_tokens,
                    accepted=after.num_accepted_tokens - before.num_accepted_tokens,
                )
            plain, spec = figures[0], figures[args.num_speculative_tokens]
            assert plain["outputs"] == spec["outputs"], "speculation changed greedy outputs"
            row = {
                "workload": name,
                "mode": "batch" if batched else "single",
                "plain_tok_s": plain["tokens"] / plain["seconds"],
                "spec_tok_s": spec["tokens"] / spec["seconds"],
                "acceptance": spec["accepted"] / spec["drafts"] if spec["drafts"] else 0.0,
            }
            row["ratio"] = row["spec_tok_s"] / row["plain_tok_s"]
            # Each sampling of a request yields one token plus the drafts it accepted.
            row["tokens_per_step"] = spec["tokens"] / max(1, spec["tokens"] - spec["accepted"])
            rows.append(row)
            print(
                f"{name:10s} {row['mode']:8s} {row['plain_tok_s']:12.1f} {row['spec_tok_s']:11.1f} "
                f"{row['ratio']:5.2f}x {row['acceptance']:9.2f} {row['tokens_per_step']:12.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num_speculative_tokens": args.num_speculative_tokens, "rows": rows}, f, indent=2)
    return {"rows": rows}


HELP = "speculative decoding (n-gram drafts) against plain decoding"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--workload", choices=["all", "copy", "open"], default="all")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per workload (at most 4)")
    p.add_argument("--json", default=None, help="also write the results here")
    add_config_args(p, EngineConfig)  # both engines' settings; the plain one has no drafts
    p.set_defaults(num_speculative_tokens=4)
