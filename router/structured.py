"""Structured output as clients ask for it, read into one folio.protos.grammar.Grammar.

The fields, each honoured or refused, never ignored:
- OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"}
  (any JSON object), {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
  on completions too, as vLLM accepts it there.
- vLLM's `guided_json` (a schema, as an object or JSON text), `guided_regex`,
  `guided_choice`, `guided_grammar` (EBNF), and their newer form `structured_outputs`
  ({"json" | "regex" | "choice" | "grammar" | "json_object"}).
- `guided_decoding_backend` names a backend; the constraint is honoured by xgrammar
  whatever it names. `guided_whitespace_pattern`, `structured_outputs.whitespace_pattern`
  and `structural_tag` are refused: folio does not implement them.

At most one constraint per request. Each is compiled here, on the router's own thread
and within `--grammar-compile-timeout`, so a schema that does not compile, admits no
output or takes too long is a 400 before any work reaches a worker. Grammars that
compiled are remembered (by their text), so a schema many requests share compiles once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from folio.protos.grammar import Grammar, GrammarCompiler
from folio.router.errors import ApiError
from folio.router.protocol import _Sampling
from folio.router.templating import run_with_deadline

_REMEMBERED = 512  # grammars known to compile
# The request fields that may carry an output constraint.
STRUCTURED_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
)


def requested_grammar(req: _Sampling) -> tuple[Optional[Grammar], str]:
    """The request's one constraint and the field that set it ("" when none)."""
    found: list[tuple[str, Grammar]] = []

    def add(param: str, kind: str, spec: str = "") -> None:
        try:
            found.append((param, Grammar(kind, spec)))
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None

    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        add("response_format", "json_object")
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        add("response_format", "json_schema", _schema_text(rf.json_schema.schema_, "response_format"))
    if req.guided_json is not None:
        add("guided_json", "json_schema", _schema_text(req.guided_json, "guided_json"))
    if req.guided_regex is not None:
        add("guided_regex", "regex", req.guided_regex)
    if req.guided_choice is not None:
        add("guided_choice", "choice", json.dumps(req.guided_choice))
    if req.guided_grammar is not None:
        add("guided_grammar", "ebnf", req.guided_grammar)
    if req.guided_whitespace_pattern is not None:
        raise ApiError(400, "guided_whitespace_pattern is not supported", param="guided_whitespace_pattern")
    so = req.structured_outputs
    if so is not None:
        if so.whitespace_pattern is not None or so.structural_tag is not None:
            raise ApiError(
                400,
                "structured_outputs whitespace_pattern and structural_tag are not supported",
                param="structured_outputs",
            )
        for value, kind in ((so.json_, "json_schema"), (so.regex, "regex"), (so.grammar, "ebnf")):
            if value is not None:
                add(
                    "structured_outputs",
                    kind,
                    _schema_text(value, "structured_outputs") if kind == "json_schema" else value,
                )
        if so.choice is not None:
            add("structured_outputs", "choice", json.dumps(so.choice))
        if so.json_object:
            add("structured_outputs", "json_object")
    if len(found) > 1:
        names = ", ".join(sorted({p for p, _ in found}))
        raise ApiError(400, f"a request takes one output constraint, got several ({names})", param=found[1][0])
    return (found[0][1], found[0][0]) if found else (None, "")


def _schema_text(schema, param: str) -> str:
    """A schema given as an object or as JSON text, as compact JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the JSON schema is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise ApiError(400, "a JSON schema must be an object", param=param)
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


class GrammarCheck:
    """Compiles requests' grammars on one thread of its own, each within a time limit."""

    def __init__(self, tokenizer, vocab_size: int, timeout_s: float):
        eos = getattr(tokenizer, "eos_token_id", None)
        self.compiler = GrammarCompiler(lambda: tokenizer, vocab_size, None if eos is None else [eos])
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-check")
        self._compiled: OrderedDict[Grammar, None] = OrderedDict()

    async def check(self, grammar: Grammar, param: str) -> None:
        """Raise a 400 naming `param` unless the grammar compiles and admits some output."""
        if grammar in self._compiled:
            self._compiled.move_to_end(grammar)
            return
        try:
            await run_with_deadline(self._pool, lambda: self.compiler.compile(grammar), self.timeout_s)
        except TimeoutError:
            raise ApiError(
                400, f"the {param} grammar did not compile within {self.timeout_s:g} s", param=param
            ) from None
        except ValueError as e:
            raise ApiError(400, f"the {param} grammar does not compile: {_bounded(str(e))}", param=param) from None
        self._compiled[grammar] = None
        if len(self._compiled) > _REMEMBERED:
            self._compiled.popitem(last=False)


def _bounded(text: str) -> str:
    return text if len(text) <= 300 else text[:300] + "..."
