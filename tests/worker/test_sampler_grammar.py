"""The sampler's grammar masks on SmolLM2's vocabulary, with logits chosen by the test: the
grammar wins over any logit, drafts it forbids are rejected, a rebuilt request replays its
outputs, and a request whose grammar is complete can only end."""

from __future__ import annotations

import threading

import pytest
import torch

from folio.protos.grammar import Grammar, GrammarCompiler
from folio.protos.messages import SamplingParams
from folio.worker.loader import load_tokenizer
from folio.worker.sampler import Sampler

VOCAB = 49152
EOS = 2  # SmolLM2-Instruct's <|im_end|>


@pytest.fixture(scope="module")
def tok(smollm2):
    return load_tokenizer(smollm2)


@pytest.fixture
def sampler(tok):
    return Sampler(VOCAB, [EOS], grammars=GrammarCompiler(lambda: tok, VOCAB, [EOS]))


def _add(sampler, rid: str, params: SamplingParams, outputs=()) -> None:
    """add_request, then wait for its grammar to compile."""
    sampler.add_request(rid, params, [5], list(outputs))
    assert sampler.ready([rid], wait_s=60) == (set(), {})


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _favouring(*token_ids: int, rows: int = 1) -> torch.Tensor:
    """Logits where token_ids[i] is row i's clear favourite."""
    logits = torch.zeros(rows, VOCAB)
    for row, t in enumerate(token_ids):
        logits[row, t] = 50.0
    return logits


CHOICE = Grammar.choice(["yes", "no"])


def test_the_grammar_overrides_the_logits_and_leaves_free_rows_alone(sampler, tok):
    _add(sampler, "free", SamplingParams(temperature=0.0))
    _add(sampler, "bound", SamplingParams(temperature=0.0, grammar=CHOICE))
    maybe = _ids(tok, "maybe")[0]
    logits = _favouring(maybe, maybe, rows=2)
    (free, _), (bound, _) = sampler.sample(logits.clone(), ["free", "bound"])
    assert free == maybe
    assert tok.decode([bound]) in ("yes", "no", "y", "n")
    # logprobs stay those of the model's own logits
    _add(sampler, "lp", SamplingParams(temperature=0.0, grammar=CHOICE, logprobs=0))
    ((_, lp),) = sampler.sample(logits[:1].clone(), ["lp"])
    assert lp.logprob == pytest.approx(torch.log_softmax(logits[0], -1)[lp.token_id].item(), abs=1e-5)


def test_a_draft_the_grammar_forbids_is_rejected(sampler, tok):
    yes = _ids(tok, "yes")
    assert len(yes) == 1
    _add(sampler, "r", SamplingParams(temperature=0.0, grammar=CHOICE))
    maybe = _ids(tok, "maybe")[0]
    # Row 0 favours the draft "maybe", which the grammar forbids: rejected, and the
    # token sampled instead comes from the grammar's set.
    (picked,) = sampler.verify(_favouring(maybe, EOS, rows=2), ["r"], [[maybe]])
    assert len(picked) == 1 and picked[0][0] != maybe
    assert tok.decode([picked[0][0]]) in ("yes", "no", "y", "n")


def test_an_allowed_draft_is_kept_and_the_grammar_then_ends_the_output(sampler, tok):
    (yes,) = _ids(tok, "yes")
    _add(sampler, "r", SamplingParams(temperature=0.0, grammar=CHOICE))
    (picked,) = sampler.verify(_favouring(yes, yes, rows=2), ["r"], [[yes]])
    # "yes" accepted; after it the grammar is complete, so EOS wins over the logits.
    assert [t for t, _ in picked] == [yes, EOS]
    # A step the head scheduled before it saw the EOS: still only EOS, no error.
    assert sampler.sample(_favouring(yes), ["r"])[0][0] == EOS


def test_a_rebuilt_request_replays_its_outputs(sampler, tok):
    grammar = Grammar("regex", "(ab)+c")
    a, b, c = (_ids(tok, x)[0] for x in "abc")
    _add(sampler, "r", SamplingParams(temperature=0.0, grammar=grammar), [a, b, a])
    # after "aba" only "b" fits, whatever the logits favour
    assert sampler.sample(_favouring(c), ["r"])[0][0] == b
    sampler.add_request("s", SamplingParams(grammar=grammar), [5, 6], [b])
    assert "do not fit" in sampler.ready(["s"], wait_s=60)[1]["s"]


def test_a_grammar_still_compiling_is_reported_not_waited_for(tok):
    gate = threading.Event()
    grammars = GrammarCompiler(lambda: tok, VOCAB, [EOS])
    real = grammars.compile
    grammars.compile = lambda g: gate.wait(60) and real(g)
    sampler = Sampler(VOCAB, [EOS], grammars=grammars)
    sampler.add_request("r", SamplingParams(temperature=0.0, grammar=CHOICE), [5])
    sampler.add_request("free", SamplingParams(temperature=0.0), [5])
    assert sampler.ready(["r", "free"], wait_s=0.01) == ({"r"}, {})
    with pytest.raises(ValueError, match="before ready"):
        sampler.sample(_favouring(EOS), ["r"])
    assert sampler.sample(_favouring(7), ["free"])[0][0] == 7
    gate.set()
    assert sampler.ready(["r"], wait_s=60) == (set(), {})
    ((token, _),) = sampler.sample(_favouring(_ids(tok, "maybe")[0]), ["r"])
    assert tok.decode([token]) in ("yes", "no", "y", "n")


def test_a_bad_grammar_is_refused_with_the_reason(sampler):
    for grammar, reason in [
        (Grammar("regex", "(a"), "parenthesis"),
        (Grammar("json_schema", '{"type": "string", "minLength": 3, "maxLength": 1}'), "minLength"),
        (Grammar("json_schema", "{nope"), "property name"),
        (Grammar("ebnf", "root ::= missing"), "not defined"),
    ]:
        sampler.add_request("r", SamplingParams(grammar=grammar), [5])
        with pytest.raises(ValueError, match="before ready"):
            sampler.sample(_favouring(EOS), ["r"])
        assert reason in sampler.ready(["r"], wait_s=60)[1]["r"]
    with pytest.raises(ValueError, match="no grammar engine"):
        Sampler(VOCAB, [EOS]).add_request("r", SamplingParams(grammar=CHOICE), [5])


def test_params_that_would_forbid_the_grammars_end_are_refused():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(grammar=CHOICE, ignore_eos=True)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(grammar=CHOICE, min_tokens=2)
    with pytest.raises(ValueError, match="grammar kind"):
        Grammar("yaml", "")


def test_a_grammar_engine_failure_ends_that_request_alone(sampler, tok, monkeypatch):
    _add(sampler, "broken", SamplingParams(temperature=0.0, grammar=CHOICE))
    _add(sampler, "fine", SamplingParams(temperature=0.0, grammar=CHOICE))
    matcher = sampler._requests["broken"].grammar.matcher

    def fail(*args):
        raise RuntimeError("engine failure")

    monkeypatch.setattr(matcher, "fill_next_token_bitmask", fail)
    maybe = _ids(tok, "maybe")[0]
    (broken, _), (fine, _) = sampler.sample(_favouring(maybe, maybe, rows=2), ["broken", "fine"])
    assert broken == EOS  # the failed request may only end
    assert tok.decode([fine]) in ("yes", "no", "y", "n")  # the other still follows its grammar
    ((again, _),) = sampler.sample(_favouring(maybe), ["broken"])
    assert again == EOS
