"""Structured output in the engine, on the bundled SmolLM2: every constrained output parses
and validates against its schema, whatever runs beside it and whatever happens to it
(batching with free requests, preemption, n > 1, speculative drafts); free requests in
the same batch get exactly the tokens they get alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from folio.cluster.entrypoints.llm import LLM
from folio.protos.grammar import Grammar
from folio.protos.messages import SamplingParams
from folio.worker import grammar_state
from tests.hf_reference import drain_engine

pytestmark = pytest.mark.slow

MAX_TOKENS = 160
FREE_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
KEYS = ["name", "id", "tags", "color", "size", "ok", "note", "kind"]

# Bounded leaves, so that a small greedy model finishes every value: integers in a
# range, strings of at most a dozen characters, enums, booleans, null.
_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-100, 100),
        st.integers(0, 1000),
    ),
    st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.sampled_from(["red", "green", "blue", "amber"]), min_size=1, max_size=4, unique=True).map(
        lambda xs: {"enum": xs}
    ),
)


def _object(children):
    return st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
    )


def _array(children):
    return children.map(lambda item: {"type": "array", "items": item, "maxItems": 3})


SCHEMAS = st.recursive(_leaf, lambda ch: st.one_of(_object(ch), _array(ch)), max_leaves=5).map(
    lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"value": s}, "required": ["value"]}
)


def _prompt(schema: dict) -> str:
    return f"Reply with a JSON value for this schema: {json.dumps(schema)}\nJSON:"


def _constrained(schema: dict, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=Grammar("json_schema", json.dumps(schema)))


def _check(schema: dict, out) -> None:
    assert out.finish_reason == "stop", f"did not finish within {MAX_TOKENS} tokens: {out.text!r}"
    jsonschema.validate(json.loads(out.text), schema)


@pytest.fixture(scope="module")
def llm(smollm2):
    # Exact kernels: test_preempted_requests_replay_their_grammar wants the same tokens from
    # a rebuilt request as from one prefilled in a wide step, which the default CPU kernels'
    # wide-batch path does not promise at a near-tie (README, "Quantized weights").
    return LLM(smollm2, kernels="reference")


@pytest.fixture(scope="module")
def free_alone(llm):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    return [r.outputs[0].token_ids for r in llm.generate(FREE_PROMPTS, params)]


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(SCHEMAS, min_size=2, max_size=3))
def test_constrained_outputs_validate_and_free_requests_are_unchanged(llm, free_alone, schemas):
    prompts = [_prompt(s) for s in schemas] + FREE_PROMPTS
    params = [_constrained(s) for s in schemas] + [SamplingParams(max_tokens=24, temperature=0.0)] * 2
    results = llm.generate(prompts, params)
    for schema, r in zip(schemas, results):
        _check(schema, r.outputs[0])
    assert [r.outputs[0].token_ids for r in results[len(schemas) :]] == free_alone


FIXED = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "size": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "tags", "size"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog"]}},
        "required": ["ok", "kind"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def fixed_outputs(llm):
    results = llm.generate([_prompt(s) for s in FIXED], [_constrained(s) for s in FIXED])
    for schema, r in zip(FIXED, results):
        _check(schema, r.outputs[0])
    return [r.outputs[0].token_ids for r in results]


@contextlib.contextmanager
def _grammars_held_back(llm):
    """The worker's grammar compiles wait until the test lets them go (the real compile
    then runs): a grammar that takes as long as the test likes to compile."""
    grammars, gate = llm.worker.sampler.grammars, threading.Event()

    def gated(grammar):
        return pool.submit(lambda: gate.wait(60) and grammars.compile(grammar))

    with ThreadPoolExecutor(1) as pool:
        grammars.compile_async = gated
        try:
            yield gate
        finally:
            gate.set()
            del grammars.compile_async


def test_a_grammar_still_compiling_holds_up_only_its_own_request(llm, free_alone, fixed_outputs):
    """The batch runs on while a grammar compiles: the free request finishes, the
    constrained one waits without a token, then produces exactly its usual output."""
    before = llm.scheduler.num_deferred_samples
    with _grammars_held_back(llm) as gate:
        constrained = llm.add_request(_prompt(FIXED[0]), _constrained(FIXED[0]))
        free = llm.add_request(FREE_PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0))
        done = []
        for _ in range(100):
            done += llm.step()
            if any(r.request_id == free for r in done):
                break
        assert [r.outputs[0].token_ids for r in done] == [free_alone[0]]
        assert not llm._results[constrained].outputs[0].token_ids
        assert llm.scheduler.num_deferred_samples > before
        gate.set()
        while llm.has_unfinished():
            done += llm.step()
    assert [r.outputs[0].token_ids for r in done if r.request_id == constrained] == [fixed_outputs[0]]
    llm.scheduler.check_integrity()


@pytest.fixture(scope="module")
def tight(smollm2):
    """A second engine for what the first does not do, both at once (each test below checks
    that its part happened): n-gram drafts (prompt lookup) to verify, and 180 tokens of KV.
    The prompts of FIXED (112 and 60 tokens) fit in it together, their outputs do not: the
    later one is preempted with tokens out, and rebuilt, it replays them into its grammar."""
    return LLM(
        smollm2,
        kernels="reference",
        block_size=4,
        num_kv_blocks=45,
        max_num_batched_tokens=64,
        num_speculative_tokens=4,
        prompt_lookup_min=1,
    )


@pytest.fixture
def replays(monkeypatch) -> list[int]:
    """How many output tokens each grammar matcher built from now on replayed (the real ones are built)."""
    seen, build = [], grammar_state.build_matcher

    def spy(compiled, output_token_ids):
        seen.append(len(output_token_ids))
        return build(compiled, output_token_ids)

    monkeypatch.setattr(grammar_state, "build_matcher", spy)
    return seen


def test_preempted_requests_replay_their_grammar(llm, tight, replays):
    prompts = [prefix + _prompt(s) for prefix in ("", "Again. ") for s in FIXED]
    params = [_constrained(s, max_tokens=60) for _ in range(2) for s in FIXED]
    want = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    replays.clear()
    results = tight.generate(prompts, params)
    assert max(replays) > 0, "no request was preempted after its first tokens"
    assert [r.outputs[0].token_ids for r in results] == want


def test_speculative_drafts_are_checked_against_the_grammar(tight, fixed_outputs):
    before = tight.scheduler.num_draft_tokens
    # Within the KV cache: each prompt plus 60 tokens (more than the outputs take).
    results = tight.generate([_prompt(s) for s in FIXED], [_constrained(s, max_tokens=60) for s in FIXED])
    assert tight.scheduler.num_draft_tokens > before
    assert [r.outputs[0].token_ids for r in results] == fixed_outputs


def test_each_of_n_samples_has_its_own_grammar_state(llm):
    schema = FIXED[1]
    params = SamplingParams(
        n=4, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, grammar=Grammar("json_schema", json.dumps(schema))
    )
    outs = llm.generate([_prompt(schema)], params)[0].outputs
    assert len(outs) == 4
    for out in outs:
        _check(schema, out)


@pytest.mark.parametrize(
    "grammar, allowed",
    [
        (Grammar.choice(["yes", "no", "maybe"]), {"yes", "no", "maybe"}),
        (Grammar("regex", r"[0-9]{3}-[0-9]{4}"), None),
        (Grammar("ebnf", 'root ::= "(" [a-z]+ ")"'), None),
    ],
    ids=["choice", "regex", "ebnf"],
)
def test_choice_regex_and_ebnf_constrain_the_text(llm, grammar, allowed):
    import re

    out = llm.generate(["Answer:"], SamplingParams(max_tokens=24, temperature=0.7, seed=1, grammar=grammar))[0]
    text = out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    if allowed is not None:
        assert text in allowed
    elif grammar.kind == "regex":
        assert re.fullmatch(grammar.spec, text), text
    else:
        assert re.fullmatch(r"\([a-z]+\)", text), text


def test_a_grammar_that_does_not_compile_fails_its_request_alone(llm):
    bad = SamplingParams(max_tokens=4, grammar=Grammar("regex", "(unclosed"))
    good = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="parenthesis"):
        llm.generate(["x", "y"], [bad, good])
    assert llm.generate(["y"], good)[0].outputs[0].token_ids  # the engine still serves


def test_past_the_offline_checks_the_worker_fails_a_bad_grammar_alone(llm):
    from folio.protos.messages import EngineRequest

    good = SamplingParams(max_tokens=4, temperature=0.0)
    want = llm.generate(["y"], good)[0].outputs[0].token_ids
    bad = SamplingParams(max_tokens=4, grammar=Grammar("regex", "(unclosed"))
    llm.engine.add_request(EngineRequest("poison", llm.encode("x"), bad))
    rid = llm.add_request("y", good)
    outs, done = drain_engine(llm)
    assert [o.finish_reason for o in outs if o.request_id == "poison"] == ["abort"]
    assert [r.outputs[0].token_ids for r in done if r.request_id == rid] == [want]
    llm.scheduler.check_integrity()


def test_two_tensor_parallel_ranks_keep_constrained_outputs_valid(llm, smollm2):
    """Rank 0 masks and samples, the other rank takes its tokens: over real gRPC, the
    outputs still parse and validate, and a grammar that fails on rank 0 fails its
    request alone on both ranks (the other rank learns of it from rank 0)."""
    from tests.worker_processes import WorkerProcesses, replica_outputs

    prompts = [llm.encode(_prompt(s)) for s in FIXED] + [llm.encode("x")]
    params = [_constrained(s, max_tokens=60) for s in FIXED]
    params.append(SamplingParams(max_tokens=4, grammar=Grammar("regex", "(unclosed")))
    with WorkerProcesses(2) as ranks:
        outputs, _ = asyncio.run(replica_outputs(ranks, smollm2, prompts, params))
    assert outputs[-1] == []
    for schema, ids in zip(FIXED, outputs):
        assert ids[-1] in llm.worker.model_config.eos_token_ids, "did not finish"
        jsonschema.validate(json.loads(llm.tokenizer.decode(ids, skip_special_tokens=True)), schema)
