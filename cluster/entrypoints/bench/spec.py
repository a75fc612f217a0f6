"""`folio bench spec`: speculative decoding against plain decoding.

Drafts come from n-gram prompt lookup (`--drafts ngram`, the default) or from a
draft model (`--drafts model`): `--speculative-model PATH`, by default the
target's own file. For the bundled GGUF on CPU that is a quantized self-draft
in bfloat16 (worker/drafter.py load_draft): nearly always right, but no cheaper
per token than the target since the CPU default keeps the target's 4-bit weights
too; it shows what a draft of the target's own size costs.

Two workloads on the same model, greedy, each run with speculation off (the
baseline) and on, in this process:
- copy: prompts that ask the model to repeat or quote lines given in the
  prompt (what summaries, code edits and RAG answers do in part), where
  prompt lookup should pay off;
- open: prompts with nothing to copy, where n-gram drafts are mostly wrong and
  only a draft model can help.
Each workload runs at each `--concurrency` (requests generated together; 1 is
single-stream latency). Speculation is not paused in large batches here
(--speculative-max-batch defaults high), so the table shows where it stops
paying, which is what --speculative-max-batch should be set below.
Greedy outputs are identical with and without speculation in exact arithmetic
(tests/cluster/test_speculative*.py). The benchmark counts the outputs that are,
and with `--kernels reference` requires all of them to be. The default CPU
kernels round each matmul's input to bfloat16, so a verification's attention,
which torch's SDPA rounds differently from a single-row decode's (by about 1e-7),
can flip a near-tie, after which a greedy continuation differs.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import time

from folio.cluster.entrypoints.options import add_config_args, options_from_args
from folio.protos.config import EngineConfig

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


def _run(llm, prompts: list[list[int]], max_tokens: int, streams: int) -> tuple[float, int, list]:
    from folio.protos.messages import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    results = [r for i in range(0, len(prompts), streams) for r in llm.generate(prompts[i : i + streams], params)]
    seconds = time.perf_counter() - t0
    return seconds, sum(len(r.outputs[0].token_ids) for r in results), [r.outputs[0].token_ids for r in results]


def main(args: argparse.Namespace) -> dict:
    from folio.cluster.entrypoints.llm import LLM
    from folio.worker.loader import default_model_path

    options = options_from_args(EngineConfig, args)
    k = args.num_speculative_tokens
    plain = LLM(**{**options, "num_speculative_tokens": 0, "speculative_model": None})
    if args.drafts == "model" and not options.get("speculative_model"):
        options["speculative_model"] = options.get("model") or default_model_path()
    if args.drafts == "ngram":
        options["speculative_model"] = None
    engines = {0: plain, k: LLM(**options)}
    draft = options.get("speculative_model")
    print(f"drafts: {'model ' + draft if draft else 'n-gram prompt lookup'}, up to {k} per step")
    rows = []
    print(
        f"{'workload':10s} {'streams':>7s} {'plain tok/s':>12s} {'spec tok/s':>11s} {'ratio':>6s} "
        f"{'accepted':>9s} {'tokens/step':>12s} {'same outputs':>13s}"
    )
    for name, texts in workloads().items():
        if args.workload not in ("all", name):
            continue
        base = [plain.chat_token_ids([{"role": "user", "content": t}]) for t in texts[: args.num_prompts]]
        for streams in args.concurrency:
            prompts = (base * streams)[: max(streams, len(base))]
            figures = {}
            for key, llm in engines.items():
                llm.generate([prompts[0][:8]])  # warm-up
                before = llm.scheduler.stats()
                seconds, tokens, outs = _run(llm, prompts, args.max_tokens, streams)
                after = llm.scheduler.stats()
                figures[key] = dict(
                    seconds=seconds,
                    tokens=tokens,
                    outputs=outs,
                    drafts=after.num_draft_tokens - before.num_draft_tokens,
                    accepted=after.num_accepted_tokens - before.num_accepted_tokens,
                )
            baseline, spec = figures[0], figures[k]
            same = sum(a == b for a, b in zip(baseline["outputs"], spec["outputs"], strict=True))
            if options.get("kernels") == "reference":
                assert same == len(prompts), "speculation changed greedy outputs on exact kernels"
            row = {
                "workload": name,
                "concurrency": streams,
                "plain_tok_s": baseline["tokens"] / baseline["seconds"],
                "spec_tok_s": spec["tokens"] / spec["seconds"],
                "acceptance": spec["accepted"] / spec["drafts"] if spec["drafts"] else 0.0,
                "same_outputs": same,
                "outputs": len(prompts),
            }
            row["ratio"] = row["spec_tok_s"] / row["plain_tok_s"]
            # Each sampling of a request yields one token plus the drafts it accepted.
            row["tokens_per_step"] = spec["tokens"] / max(1, spec["tokens"] - spec["accepted"])
            rows.append(row)
            print(
                f"{name:10s} {streams:7d} {row['plain_tok_s']:12.1f} {row['spec_tok_s']:11.1f} "
                f"{row['ratio']:5.2f}x {row['acceptance']:9.2f} {row['tokens_per_step']:12.2f} "
                f"{f'{same}/{len(prompts)}':>13s}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num_speculative_tokens": k, "drafts": draft or "ngram", "rows": rows}, f, indent=2)
    return {"rows": rows}


HELP = "speculative decoding (n-gram or draft-model drafts) against plain decoding"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--workload", choices=["all", "copy", "open"], default="all")
    p.add_argument("--drafts", choices=["ngram", "model"], default="ngram", help="where drafts come from")
    p.add_argument(
        "--draft-layers",
        type=int,
        default=8,
        help="--drafts model without --speculative-model: layers of the target kept",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 32], help="requests generated together")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per workload (at most 4)")
    p.add_argument("--json", default=None, help="also write the results here")
    add_config_args(p, EngineConfig)  # both engines' settings; the plain one has no drafts
    p.set_defaults(num_speculative_tokens=4, speculative_max_batch=1 << 20)
