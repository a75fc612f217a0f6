"""Sampling through the whole engine: seeds in mixed batches, stop strings, detokenization."""

import pytest

from folio.cluster.entrypoints.llm import LLM
from folio.protos.messages import SamplingParams
from folio.router.detokenizer import Detokenizer
from tests.hf_reference import drain_engine


def test_seed_gives_same_tokens_alone_and_in_a_mixed_batch(tiny_model):
    path = tiny_model("llama")  # its next-token distributions are broad
    seeded = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = LLM(path, tokenizer=False).generate([[7, 8, 9, 10]], seeded)[0].outputs[0].token_ids

    llm = LLM(path, block_size=4, num_kv_blocks=40, max_num_batched_tokens=16, tokenizer=False)
    prompts = [[3] * 30, [7, 8, 9, 10], [11, 12], [5] * 17]
    params = [
        SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True),
        seeded,
        SamplingParams(temperature=1.3, seed=99, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    ]
    mixed = llm.generate(prompts, params)[1].outputs[0].token_ids
    assert mixed == alone
    other = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=4321, max_tokens=12, ignore_eos=True)
    assert LLM(path, tokenizer=False).generate([[7, 8, 9, 10]], other)[0].outputs[0].token_ids != alone


@pytest.fixture(scope="module")
def smol(smollm2):
    return LLM(smollm2)


def _chat(llm, text):
    return llm.chat_token_ids([{"role": "user", "content": text}])


@pytest.mark.parametrize(
    "stop,expected",
    [
        (["Paris"], "The capital of France is "),
        (["capital", "Paris"], "The "),
        ([" of"], "The capital"),
    ],
)
def test_stop_strings_end_text_exactly_before_the_stop(smol, stop, expected):
    prompt = _chat(smol, "What is the capital of France?")
    [res] = smol.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=stop))
    out = res.outputs[0]
    assert out.text == expected
    assert out.finish_reason == "stop" and out.stop_reason in stop
    smol.scheduler.check_integrity()


def test_include_stop_string_in_output(smol):
    prompt = _chat(smol, "What is the capital of France?")
    [res] = smol.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=20, stop=["Paris"], include_stop_str_in_output=True)
    )
    assert res.outputs[0].text == "The capital of France is Paris"


def test_detokenizer_never_cuts_a_multibyte_character(smol):
    tok = smol.tokenizer
    text = "Grüße aus Köln 🚀🌍 — 東京タワー and naïve café ✓"
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok, [], stop=["タワ"])
    streamed = ""
    for t in ids:
        d.add([t])
        chunk = d.flush(final=False)
        assert "\ufffd" not in chunk
        streamed += chunk
    streamed += d.flush(final=True)
    assert streamed == "Grüße aus Köln 🚀🌍 — 東京"
    assert d.stopped_by == "タワ"


def test_streamed_chunks_hold_back_a_forming_stop_string(smol):
    tok = smol.tokenizer
    ids = tok.encode("one two three four", add_special_tokens=False)
    d = Detokenizer(tok, [], stop=["three four five"])
    pieces = []
    for t in ids:
        d.add([t])
        pieces.append(d.flush(final=False))
    pieces.append(d.flush(final=True))
    assert "".join(pieces) == "one two three four"
    assert d.stopped_by is None


def test_offline_bad_token_ids_are_refused_and_a_worker_refusal_fails_alone(tiny_model):
    from folio.protos.messages import EngineRequest

    llm = LLM(tiny_model("llama"), num_kv_blocks=32, tokenizer=False)
    for bad in (SamplingParams(logit_bias={384: 1.0}), SamplingParams(stop_token_ids=[-1])):
        with pytest.raises(ValueError, match="out of the vocabulary"):
            llm.generate([[1, 2, 3]], bad)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[1, 384]], SamplingParams())
    # Past the offline checks (straight into the engine), the worker refuses it alone.
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    llm.engine.add_request(EngineRequest("poison", [1, 2, 3], SamplingParams(logit_bias={999: 1.0})))
    rid = llm.add_request([5, 6, 7], greedy)
    outs, done = drain_engine(llm)
    assert [o.finish_reason for o in outs if o.request_id == "poison"] == ["abort"]
    assert [r.outputs[0].token_ids for r in done if r.request_id == rid] == [want]
    llm.scheduler.check_integrity()
