"""The `folio` command: serve, batch, generate, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence


def _generate(args: argparse.Namespace) -> None:
    """Offline batch generation: JSONL of prompts in, JSONL of completions out."""
    import torch

    from cluster.llm import LLM
    from protos.messages import SamplingParams
    from worker.worker import default_dtype
    dtype = args.dtype or default_dtype(args.device)
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              device=args.device, dtype=getattr(torch, dtype),
              kv_cache_bytes=int(args.kv_cache_gib * 2**30))
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
            params.append(SamplingParams(
                max_tokens=row.get("max_tokens", args.max_tokens),
                temperature=row.get("temperature", args.temperature),
                top_p=row.get("top_p", 1.0), top_k=row.get("top_k", 0),
                seed=row.get("seed"), stop=row.get("stop") or []))
    results = llm.generate(prompts, params, use_tqdm=True)
    with open(args.output, "w") as f:
        for rid, res in zip(ids, results):
            out = res.outputs[0]
            f.write(json.dumps({"id": rid, "text": out.text, "token_ids": out.token_ids,
                                "finish_reason": out.finish_reason}) + "\n")
    print(f"wrote {len(results)} completions to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folio", description="LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    try:
        from cluster.serve import build_serve_parser
        build_serve_parser(sub)
    except ImportError:        # the serving path is optional for offline use
        pass

    from cluster.batch import build_batch_parser
    build_batch_parser(sub)

    g = sub.add_parser("generate", help="offline batch generation in one process")
    g.add_argument("--model", default=None, help="model dir or .gguf (default: bundled SmolLM2)")
    g.add_argument("--input", required=True, help="JSONL: {prompt | messages, max_tokens?, ...}")
    g.add_argument("--output", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--kv-cache-gib", type=float, default=1.0)
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks that print figures beside a baseline")
    bsub = b.add_subparsers(dest="bench", required=True)
    from cluster import bench_spec, bench_throughput
    bench_throughput.build_parser(bsub)
    bench_spec.build_parser(bsub)
    try:
        from cluster.bench_serve import build_bench_serve_parser
        build_bench_serve_parser(bsub)
        from cluster import bench_replicas
        bench_replicas.build_parser(bsub)
    except ImportError:
        pass
    k = bsub.add_parser("kernels", help="Triton kernels against SDPA (needs a GPU)")
    k.add_argument("--out", default=None)
    k.set_defaults(func=lambda a: __import__("kernels.bench", fromlist=["run_kernel_bench"])
                   .run_kernel_bench(a.out))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
