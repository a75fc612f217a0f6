"""Speculative decoding on the serving path: drafts and accepted tokens over real
gRPC, across two tensor-parallel ranks, and through the HTTP server with the
openai SDK, with n-gram drafts and with a draft model. Outputs must equal those
of a replica that does not speculate."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from folio.protos.messages import SamplingParams
from tests.e2e.reference import reference_llm
from tests.e2e.serving.server import MAX_MODEL_LEN, NUM_KV_BLOCKS, WORKER_THREADS
from tests.worker_processes import WorkerProcesses, replica_outputs

pytestmark = pytest.mark.slow

COPY = (
    "Repeat the following text word for word, three times:\n\nThe river runs past the old mill, "
    "under the stone bridge, and out to the sea."
)


def test_two_rank_replica_verifies_drafts(tiny_model):
    """Rank 0 verifies and broadcasts a variable number of tokens per request; both
    ranks must keep the same tokens, and the result equals one rank not speculating."""
    from tests.model_fixtures import repetitive_prompts

    path = tiny_model("llama")
    prompts = repetitive_prompts("tp", 5)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with WorkerProcesses(1) as one:
        want, _ = asyncio.run(replica_outputs(one, path, prompts, params, speculate=0))
    with WorkerProcesses(2) as two:
        got, stats = asyncio.run(replica_outputs(two, path, prompts, params, speculate=4))
    assert got == want
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


# ngram: prompt lookup. model: the bundled SmolLM2 GGUF drafting for itself, the
# draft its 4-bit weights in bfloat16 on the first worker. The target runs on exact
# kernels, as the plain engine does: the default CPU kernels round matmul inputs to
# bf16, where a verification's attention, 1e-7 off a decode's, can flip a near-tie.
@pytest.fixture(scope="module", params=["ngram", "model"])
def spec_server(request, smollm2):
    import ray

    from folio.cluster.entrypoints.options import build_config
    from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background

    if not ray.is_initialized():
        from folio.cluster.placement import start_local_ray

        start_local_ray()
    draft = smollm2 if request.param == "model" else None
    cfg = build_config(
        ServeConfig,
        port=0,
        max_model_len=MAX_MODEL_LEN,
        num_kv_blocks=NUM_KV_BLOCKS,
        num_speculative_tokens=5,
        speculative_model=draft,
        cpus_per_worker=WORKER_THREADS,
        kernels="reference",
    )
    with serve_in_background(cfg) as bg:
        yield bg


GREEDY = SamplingParams(temperature=0, max_tokens=40)
SEEDED = SamplingParams(temperature=0.8, seed=5, max_tokens=30, logprobs=1)


@pytest.fixture(scope="module")
def plain():
    """The texts of the engine that does not speculate, in this process: once for both kinds of drafts."""
    llm = reference_llm(kernels="reference")
    prompt = llm.chat_token_ids([{"role": "user", "content": COPY}])
    return [llm.generate([prompt], params)[0].outputs[0].text for params in (GREEDY, SEEDED)]


def _metric(base_url: str, name: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_served_outputs_equal_the_plain_engine(spec_server, plain):
    client = openai.OpenAI(base_url=spec_server.base_url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    chat = [{"role": "user", "content": COPY}]
    greedy, seeded = plain

    reply = client.chat.completions.create(model=model, messages=chat, temperature=0, max_tokens=GREEDY.max_tokens)
    assert reply.choices[0].message.content == greedy
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in client.chat.completions.create(
            model=model, messages=chat, temperature=0, max_tokens=GREEDY.max_tokens, stream=True
        )
        if ch.choices
    )
    assert streamed == greedy

    # Seeded sampling with logprobs: the same tokens, and a logprob for each.
    reply = client.chat.completions.create(
        model=model,
        messages=chat,
        temperature=SEEDED.temperature,
        seed=SEEDED.seed,
        max_tokens=SEEDED.max_tokens,
        logprobs=True,
        top_logprobs=1,
    )
    assert reply.choices[0].message.content == seeded
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens

    drafts = _metric(spec_server.base_url, "folio_spec_decode_draft_tokens_total")
    accepted = _metric(spec_server.base_url, "folio_spec_decode_accepted_tokens_total")
    assert 0 < accepted <= drafts
    for r in spec_server.deployment.frontend.replicas:  # on the server's loop, where it lives
        asyncio.run_coroutine_threadsafe(_check_integrity(r), spec_server.loop).result(30)


async def _check_integrity(replica) -> None:
    replica.scheduler.check_integrity()
