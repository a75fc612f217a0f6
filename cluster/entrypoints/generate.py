"""`folio generate`: offline batch generation in one process, JSONL in and out."""

from __future__ import annotations

import argparse
import json

from folio.cluster.entrypoints.options import add_config_args, build_config, options_from_args
from folio.protos.config import EngineConfig

HELP = "offline batch generation in one process"


def add_cli_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--input",
        required=True,
        help="JSONL: {prompt | messages, max_tokens?, temperature?, top_p?, top_k?, seed?, stop?, and one output "
        "constraint as the HTTP API takes it: response_format?, guided_json?, guided_regex?, guided_choice?, "
        "guided_grammar?, structured_outputs?}",
    )
    g.add_argument("--output", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    add_config_args(g, EngineConfig)


def main(args: argparse.Namespace) -> None:
    from folio.cluster.entrypoints.llm import LLM
    from folio.protos.messages import SamplingParams

    options = options_from_args(EngineConfig, args)
    try:
        build_config(EngineConfig, **options)
    except ValueError as e:
        raise SystemExit(f"folio generate: {e}") from None
    # Every row is read and checked before the model loads: a bad line costs a second.
    rows, params, ids = [], [], []
    with open(args.input) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            rows.append(row)
            ids.append(row.get("id", n))
            params.append(
                SamplingParams(
                    max_tokens=row.get("max_tokens", args.max_tokens),
                    temperature=row.get("temperature", args.temperature),
                    top_p=row.get("top_p", 1.0),
                    top_k=row.get("top_k", 0),
                    seed=row.get("seed"),
                    stop=row.get("stop") or [],
                    grammar=_grammar(row, n + 1),
                )
            )
    llm = LLM(**options)
    prompts = [llm.chat_token_ids(row["messages"]) if "messages" in row else row["prompt"] for row in rows]
    try:
        results = llm.generate(prompts, params, use_tqdm=True)
    except ValueError as e:  # a request the engine refuses (a grammar that does not compile, ...)
        raise SystemExit(f"folio generate: {e}") from None
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


def _grammar(row: dict, line: int):
    """The row's output constraint, read as the HTTP API reads it (router/structured.py)."""
    from pydantic import ValidationError

    from folio.router.errors import ApiError
    from folio.router.protocol import _Sampling
    from folio.router.structured import STRUCTURED_FIELDS, requested_grammar

    fields = {k: row[k] for k in STRUCTURED_FIELDS if k in row}
    if not fields:
        return None
    try:
        grammar, _ = requested_grammar(_Sampling.model_validate(fields))
    except (ApiError, ValidationError) as e:
        raise SystemExit(f"folio generate: line {line}: {getattr(e, 'message', e)}") from None
    return grammar
