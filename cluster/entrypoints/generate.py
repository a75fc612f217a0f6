"""`folio generate`: offline batch generation in one process, JSONL in and out."""

from __future__ import annotations

import argparse
import json

from cluster.config import SchedulerConfig

HELP = "offline batch generation in one process"


def add_cli_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--model", default=None, help="model dir or .gguf (default: bundled SmolLM2)")
    g.add_argument("--input", required=True, help="JSONL: {prompt | messages, max_tokens?, ...}")
    g.add_argument("--output", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    g.add_argument("--kv-cache-gib", type=float, default=1.0)


def main(args: argparse.Namespace) -> None:
    import torch

    from cluster.entrypoints.llm import LLM
    from protos.messages import SamplingParams
    from worker.worker import default_dtype

    dtype = args.dtype or default_dtype(args.device)
    llm = LLM(
        args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        device=args.device,
        dtype=getattr(torch, dtype),
        kv_cache_bytes=int(args.kv_cache_gib * 2**30),
    )
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
