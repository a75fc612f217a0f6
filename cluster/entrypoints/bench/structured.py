"""`folio bench structured`: what constrained decoding costs.

1. The grammar engine alone, per schema (a flat object, a nested one with arrays and
   enums, a GitHub issue payload): compile time on a cold compiler, and the time to
   compute one token's mask and advance, over a valid instance's tokens.
2. The engine: one batch of requests, all free (the baseline), then the same batch with
   half of them constrained to the schemas, side by side in this process: output
   tokens per second of each, and the share of the constrained run's step time spent
   masking logits and advancing matchers.
"""

from __future__ import annotations

import argparse
import json
import time

from folio.cluster.entrypoints.options import add_config_args, options_from_args
from folio.protos.config import EngineConfig

FLAT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]}},
            },
            "required": ["id", "roles"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"],
            },
        },
    },
    "required": ["user", "items"],
}


def _github_issue() -> dict:
    """The shape of GitHub's REST issue payload (the fields its clients read)."""
    s, i, b = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
    opt_s = {"type": ["string", "null"]}
    user = {
        "type": "object",
        "properties": {"login": s, "id": i, "node_id": s, "avatar_url": s, "html_url": s, "type": s, "site_admin": b},
        "required": ["login", "id", "node_id", "avatar_url", "html_url", "type", "site_admin"],
    }
    label = {
        "type": "object",
        "properties": {"id": i, "name": s, "color": s, "default": b, "description": opt_s},
        "required": ["id", "name", "color", "default", "description"],
    }
    milestone = {
        "type": ["object", "null"],
        "properties": {"id": i, "number": i, "title": s, "state": {"enum": ["open", "closed"]}, "due_on": opt_s},
        "required": ["id", "number", "title", "state", "due_on"],
    }
    props = {
        "id": i,
        "node_id": s,
        "url": s,
        "html_url": s,
        "number": i,
        "state": {"enum": ["open", "closed"]},
        "state_reason": {"enum": ["completed", "not_planned", "reopened", None]},
        "title": s,
        "body": opt_s,
        "user": user,
        "labels": {"type": "array", "items": label},
        "assignees": {"type": "array", "items": user},
        "milestone": milestone,
        "locked": b,
        "comments": i,
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "closed_at": {"type": ["string", "null"], "format": "date-time"},
        "author_association": {"enum": ["OWNER", "MEMBER", "CONTRIBUTOR", "NONE"]},
        "reactions": {
            "type": "object",
            "properties": {k: i for k in ("total_count", "+1", "-1", "laugh", "hooray", "confused", "heart")},
            "required": ["total_count", "+1", "-1", "laugh", "hooray", "confused", "heart"],
        },
    }
    return {"type": "object", "properties": props, "required": list(props)}


def _instance(kind: str) -> dict:
    """A valid value of each schema, whose tokens the matcher walks."""
    if kind == "flat":
        return {"name": "Ada Lovelace", "age": 36, "city": "London"}
    if kind == "nested":
        return {
            "user": {"id": 7, "roles": ["admin", "viewer"]},
            "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": 1}],
        }
    user = {
        "login": "octocat",
        "id": 1,
        "node_id": "MDQ6VXNlcjE=",
        "avatar_url": "https://github.com/images/error/octocat_happy.gif",
        "html_url": "https://github.com/octocat",
        "type": "User",
        "site_admin": False,
    }
    return {
        "id": 1,
        "node_id": "MDU6SXNzdWUx",
        "url": "https://api.github.com/repos/octocat/Hello-World/issues/1347",
        "html_url": "https://github.com/octocat/Hello-World/issues/1347",
        "number": 1347,
        "state": "open",
        "state_reason": None,
        "title": "Found a bug",
        "body": "I'm having a problem with this.",
        "user": user,
        "labels": [{"id": 208045946, "name": "bug", "color": "f29513", "default": True, "description": None}],
        "assignees": [user],
        "milestone": None,
        "locked": False,
        "comments": 0,
        "created_at": "2011-04-22T13:33:48Z",
        "updated_at": "2011-04-22T13:33:48Z",
        "closed_at": None,
        "author_association": "OWNER",
        "reactions": {k: 0 for k in ("total_count", "+1", "-1", "laugh", "hooray", "confused", "heart")},
    }


SCHEMAS = {"flat": FLAT, "nested": NESTED, "github issue": _github_issue()}


def grammar_figures(tokenizer, vocab_size: int, eos: list[int]) -> list[dict]:
    import xgrammar

    from folio.protos.grammar import Grammar, GrammarCompiler

    rows = []
    for name, schema in SCHEMAS.items():
        compiler = GrammarCompiler(lambda: tokenizer, vocab_size, eos)  # cold: no cache
        compiler._engine()  # the vocabulary's table is built once per server, not per schema
        t0 = time.perf_counter()
        compiled = compiler.compile(Grammar("json_schema", json.dumps(schema)))
        compile_s = time.perf_counter() - t0
        # The engine writes objects as json.dumps does (", " and ": ").
        ids = tokenizer.encode(json.dumps(_instance(name)), add_special_tokens=False)
        matcher = xgrammar.GrammarMatcher(compiled)
        mask = xgrammar.allocate_token_bitmask(1, vocab_size)
        t0 = time.perf_counter()
        for t in ids:
            matcher.fill_next_token_bitmask(mask)
            if not matcher.accept_token(t):
                raise AssertionError(f"the {name} instance does not fit its schema at token {t}")
        per_token = (time.perf_counter() - t0) / len(ids)
        rows.append(
            dict(schema=name, schema_chars=len(json.dumps(schema)), compile_ms=compile_s * 1e3, mask_us=per_token * 1e6)
        )
    return rows


def _timed(obj, name: str, totals: dict) -> None:
    """Wrap obj.name so that its wall time adds up in totals[name]."""
    fn = getattr(obj, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    setattr(obj, name, timed)


def main(args: argparse.Namespace) -> dict:
    from folio.cluster.entrypoints.llm import LLM
    from folio.protos.grammar import Grammar
    from folio.protos.messages import SamplingParams

    llm = LLM(**options_from_args(EngineConfig, args))
    cfg = llm.worker.model_config
    rows = grammar_figures(llm.tokenizer, cfg.vocab_size, list(cfg.eos_token_ids))
    print(f"{'schema':14s} {'chars':>7s} {'compile ms':>11s} {'mask us/token':>14s}")
    for r in rows:
        print(f"{r['schema']:14s} {r['schema_chars']:7d} {r['compile_ms']:11.1f} {r['mask_us']:14.1f}")

    n = args.batch
    schemas = list(SCHEMAS.values())
    texts = [f"Reply in JSON matching this schema: {json.dumps(schemas[i % 3])}" for i in range(n)]
    prompts = [llm.chat_token_ids([{"role": "user", "content": t}]) for t in texts]
    free = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    mixed = [
        SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens, grammar=Grammar("json_schema", json.dumps(schemas[i % 3]))
        )
        if i % 2
        else free
        for i in range(n)
    ]
    totals: dict = {}
    sampler = llm.worker.sampler
    for name in ("_mask_by_grammar", "_record"):
        _timed(sampler, name, totals)
    # Warm-up, the grammar engine's vocabulary table included (built on the first
    # constrained request of a worker's life, once).
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, grammar=Grammar("json_object")))
    results = {}
    for label, params in (("all free", free), ("half constrained", mixed)):
        totals.clear()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results[label] = dict(seconds=seconds, tokens=tokens, tok_s=tokens / seconds, grammar_s=sum(totals.values()))
    base, con = results["all free"], results["half constrained"]
    print(f"\nbatch of {n} requests, greedy, up to {args.max_tokens} tokens each")
    print(f"{'run':18s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>7s} {'grammar share':>14s}")
    for label, r in results.items():
        print(
            f"{label:18s} {r['tokens']:7d} {r['seconds']:8.1f} {r['tok_s']:7.1f} "
            f"{100 * r['grammar_s'] / r['seconds']:13.2f}%"
        )
    print(f"half constrained / all free throughput: {con['tok_s'] / base['tok_s']:.2f}x")
    out = {"grammars": rows, "engine": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


HELP = "structured output: grammar compile and mask times, and a mixed batch against a free one"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=64, help="requests in the engine's batch")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the results here")
    add_config_args(p, EngineConfig)
