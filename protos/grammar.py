"""A request's output constraint: what its tokens must spell, as the grammar engine reads it.

One Grammar travels with a request's SamplingParams from the router (which
compiles it once to refuse a bad one with a 400) to every worker that samples
it (which compiles it again, cached, and masks the logits with it each step).
The grammar engine is xgrammar: on SmolLM2's 49k-token vocabulary it computed
a mask and advanced in 3-11 us per token where llguidance took 28-129 us, and
compiled the same schemas in 3-7 ms (/work/prof/grammar_engines.py; README,
"Structured output").

kinds and their spec:
  json_schema  a JSON Schema document, as JSON text
  json_object  any JSON object (spec empty)
  regex        a regular expression the whole output must match
  choice       a JSON array of strings: the output is exactly one of them
  ebnf         a grammar in xgrammar's EBNF (GBNF) dialect, rule `root` first
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

KINDS = ("json_schema", "json_object", "regex", "choice", "ebnf")
# A GitHub API payload's schema is about 60 KB; a grammar this large compiles in
# well under a second, and its text is carried in every copy of the request.
MAX_SPEC_CHARS = 256 * 1024


@dataclass(frozen=True)
class Grammar:
    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"a grammar is at most {MAX_SPEC_CHARS} characters, got {len(self.spec)}")

    @staticmethod
    def choice(options: list[str]) -> "Grammar":
        return Grammar("choice", json.dumps(options))


class GrammarCompiler:
    """Compiles Grammars for one vocabulary. The vocabulary's token table is built on the
    first compile (the tokenizer loads then, not at startup); xgrammar caches compiled
    grammars by their text, so a schema that many requests share compiles once."""

    def __init__(
        self,
        tokenizer: Callable[[], Any],
        vocab_size: int,
        stop_token_ids: Optional[Sequence[int]] = None,
        cache_bytes: int = 256 << 20,
    ):
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, stop_token_ids
        self._cache_bytes = cache_bytes
        self._compiler = None
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None

    def _engine(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                stop = list(self._stop_ids) if self._stop_ids else None
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer(), vocab_size=self.vocab_size, stop_token_ids=stop
                )
                self._compiler = xgrammar.GrammarCompiler(
                    info, max_threads=1, cache_enabled=True, cache_limit_bytes=self._cache_bytes
                )
            return self._compiler

    def compile_async(self, grammar: Grammar) -> Future:
        """compile() on a thread of this compiler's own: a Future of the CompiledGrammar."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        return self._pool.submit(self.compile, grammar)

    def compile(self, grammar: Grammar):
        """The xgrammar CompiledGrammar. Raises ValueError saying why a grammar does not
        compile, or admits no output at all."""
        try:
            compiled = compile_grammar(self._engine(), grammar)
        except (ValueError, RuntimeError) as e:  # xgrammar reports a bad spec as RuntimeError
            raise ValueError(compile_error_message(e)) from None
        if not admits_output(compiled):
            raise ValueError("the grammar admits no output: no value satisfies it")
        return compiled


def compile_grammar(compiler, grammar: Grammar):
    """The xgrammar CompiledGrammar of `grammar` (compiler: an xgrammar.GrammarCompiler).
    Raises ValueError (or xgrammar's RuntimeError) for a spec that does not compile."""
    if grammar.kind == "json_schema":
        json.loads(grammar.spec)  # a clear message for text that is not JSON at all
        return compiler.compile_json_schema(grammar.spec, any_whitespace=False, strict_mode=True)
    if grammar.kind == "json_object":
        return compiler.compile_builtin_json_grammar()
    if grammar.kind == "regex":
        return compiler.compile_regex(grammar.spec)
    if grammar.kind == "choice":
        options = json.loads(grammar.spec)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("a choice needs a non-empty list of non-empty strings")
        # json.dumps writes each option as a quoted literal with the escapes EBNF reads.
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
    return compiler.compile_grammar(grammar.spec)


def compile_error_message(e: Exception) -> str:
    """The engine's message without its C++ log prefix ("[14:34:54] /project/cpp/x.cc:94: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()


def admits_output(compiled) -> bool:
    """False when not even a first token fits (a schema no value satisfies, such as a
    string of at least 5 and at most 2 characters)."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(mask)
    return bool(mask.any()) or matcher.is_terminated()
