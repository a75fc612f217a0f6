"""`folio generate`: offline batch generation in one process, JSONL in and out."""

from __future__ import annotations

import argparse
import json

from cluster.entrypoints.options import add_config_args, build_config, options_from_args
from protos.config import EngineConfig

HELP = "offline batch generation in one process"


def add_cli_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--input", required=True, help="JSONL: {prompt | messages, max_tokens?, ...}")
    g.add_argument("--output", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    add_config_args(g, EngineConfig)


def main(args: argparse.Namespace) -> None:
    from cluster.entrypoints.llm import LLM
    from protos.messages import SamplingParams

    options = options_from_args(EngineConfig, args)
    try:
        build_config(EngineConfig, **options)
    except ValueError as e:
        raise SystemExit(f"folio generate: {e}") from None
    llm = LLM(**options)
    prompts, params, ids = [], [], []
    with open(args.input) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                prompts.append(llm.chat_token_ids(row["messages"]))
            else:
                prompts.append(row["prompt"])
            ids.append(row.get("id", n))
            params.append(
                SamplingParams(
                    max_tokens=row.get("max_tokens", args.max_tokens),
                    temperature=row.get("temperature", args.temperature),
                    top_p=row.get("top_p", 1.0),
                    top_k=row.get("top_k", 0),
                    seed=row.get("seed"),
                    stop=row.get("stop") or [],
                )
            )
    results = llm.generate(prompts, params, use_tqdm=True)
    with open(args.output, "w") as f:
        for rid, res in zip(ids, results):
            out = res.outputs[0]
            f.write(
                json.dumps(
                    {"id": rid, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
                )
                + "\n"
            )
    print(f"wrote {len(results)} completions to {args.output}")
