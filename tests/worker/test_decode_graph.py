"""The compiled decode step (worker/decode_graph.py) on the bundled model: the same
greedy tokens as the eager step, through its graphs, and no step left needing a
graph that warm-up did not build.

The suite runs with TORCH_COMPILE_DISABLE=1 (tests/conftest.py); this module turns
torch.compile back on for its own engine. Compiling takes 30-80 s on two cores.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from folio.cluster.entrypoints.llm import LLM
from folio.kernels.metadata import attention_metadata
from folio.protos.messages import SamplingParams

pytestmark = pytest.mark.slow

SMALL_POOL = dict(kv_cache_memory=64 << 20, enable_prefix_caching=False, max_num_seqs=8)
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


# torch's own config patch: pytest's monkeypatch, undoing, deletes a torch config entry.
@pytest.fixture(scope="module")
def compiled():
    with torch._dynamo.config.patch(disable=False):
        yield LLM(compile="auto", **SMALL_POOL)


@pytest.fixture(scope="module")
def eager():
    return LLM(compile="off", **SMALL_POOL)


def _prompts(llm) -> list[list[int]]:
    questions = ["What is the capital of France?", "Name three colours of the rainbow.", "Write a haiku about rain."]
    return [llm.chat_token_ids([{"role": "user", "content": q}]) for q in questions]


def test_compiled_decode_steps_give_the_eager_greedy_tokens(compiled, eager):
    graph = compiled.worker.runner.decode_graph
    assert graph is not None and graph.ready
    prompts = _prompts(eager)
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)]
    before = graph.steps
    together = [o.outputs[0].token_ids for o in compiled.generate(prompts, GREEDY)]  # the graph of 2+ rows
    alone = [compiled.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]  # the graph of one row
    assert together == want
    assert alone == want
    # every decode step went through a graph: 39 of each request's 40 tokens come from
    # decode steps (the first from its prefill), 3 requests at once and then one at a time
    assert graph.steps - before == 39 + 3 * 39
    assert graph.eager_steps == 0
    assert compiled.tokenizer.decode(alone[0]).startswith("The capital of France is Paris")


@torch.inference_mode()
def test_a_step_no_graph_fits_runs_eagerly_and_is_counted(compiled):
    """A step whose inputs fail the graphs' guards (int32 positions here) is not
    compiled for in the middle of serving: it runs eagerly, to the eager step's bits."""
    graph = compiled.worker.runner.decode_graph
    ids, positions, meta = graph._dummy_step(3)
    want = graph.model(ids, positions, meta, graph.caches)
    eager_steps, steps = graph.eager_steps, graph.steps
    got = graph(ids, positions.int(), meta)
    assert (graph.eager_steps, graph.steps) == (eager_steps + 1, steps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_pure_decode_steps_below_the_wide_path_take_the_graph(compiled):
    graph = compiled.worker.runner.decode_graph
    tables = torch.arange(8, dtype=torch.int32).view(2, 4)

    def meta(query_lens, context_lens):
        positions = torch.cat([torch.arange(c, c + n) for n, c in zip(query_lens, context_lens)])
        return attention_metadata(positions, query_lens, context_lens, tables, 16, "cpu")

    assert graph.takes(meta([1, 1], [20, 40]))
    assert not graph.takes(meta([1, 5], [20, 40]))  # a prompt chunk in the step
    graph_rows = graph.max_rows
    graph.max_rows = 1
    try:
        assert not graph.takes(meta([1, 1], [20, 40]))
    finally:
        graph.max_rows = graph_rows


def test_torch_compile_disable_keeps_every_step_eager():
    """TORCH_COMPILE_DISABLE=1 (torch's switch, which this suite sets) is honoured: no
    compile, no graph."""
    with torch._dynamo.config.patch(disable=True):
        llm = LLM(compile="auto", **SMALL_POOL)
    assert llm.worker.runner.decode_graph is None
    assert llm.generate(_prompts(llm)[:1], GREEDY)[0].outputs[0].token_ids


@torch.inference_mode()
def test_each_graph_attends_as_its_step_needs(compiled):
    """The graph of one row traces its attention inline (graph_ops.one_sequence_decode),
    fused by inductor: neither the op nor SDPA runs. A step of several rows about as long
    as each other attends as one padded batch (graph_ops.padded_batch_decode): two gathers
    a layer, no op, no SDPA. One whose rows differ too much in length calls the op
    folio::cpu_paged_attention once a layer, which groups them and calls SDPA. (What the
    one batch computes: tests/kernels/test_graph_ops.py; the greedy tokens through it:
    the first test here.)"""
    graph = compiled.worker.runner.decode_graph
    layers = compiled.worker.model_config.num_layers

    def calls(ids, positions, meta) -> tuple[int, int, int]:
        steps = graph.steps
        counts = _op_counts(graph, ids, positions, meta)
        assert graph.steps == steps + 1  # through a graph
        sdpa = sum(n for key, n in counts.items() if "scaled_dot_product" in key)
        return counts.get("folio::cpu_paged_attention", 0), sdpa, counts.get("folio::gather_blocks", 0)

    assert calls(*graph._dummy_step(1)) == (0, 0, 0)
    if graph.one_batch:
        assert calls(*graph._dummy_step(3)) == (0, 0, 2 * layers)
    else:  # AMX granted and a bf16 pool: torch's bf16 attention on its tiles serves every step
        op, sdpa, gathers = calls(*graph._dummy_step(3))
        assert op == layers and sdpa >= layers and gathers == 0
    # three rows, one 20 blocks long beside two of 3: padded, 63 blocks of keys for 26 real
    bs = graph.block_size
    context = [3 * bs, 3 * bs, 20 * bs]
    tables = torch.arange(3 * 21, dtype=torch.int32).view(3, 21)
    positions = torch.tensor(context, dtype=torch.long)
    meta = attention_metadata(positions, [1, 1, 1], context, tables, bs, "cpu")
    op, sdpa, gathers = calls(torch.full((3,), 1, dtype=torch.long), positions, meta)
    assert op == layers and sdpa >= layers and gathers == 0


@torch.inference_mode()
def test_a_graph_step_builds_no_tensor_from_the_models_floats(compiled):
    """The modules' floats (each norm's eps) are compiled in as constants: were they graph
    inputs, dynamo would build a tensor of each at every call (torch._as_tensor_fullprec,
    a lift_fresh each), about 0.2 ms of a one-stream step on this model."""
    graph = compiled.worker.runner.decode_graph
    for rows in (1, 3):
        counts = _op_counts(graph, *graph._dummy_step(rows))
        assert counts.get("aten::lift_fresh", 0) == 0, counts


def _op_counts(graph, ids, positions, meta) -> dict[str, int]:
    """Calls of each op, by torch.profiler, in one step through graph."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        graph(ids, positions, meta)
    return {e.key: e.count for e in prof.key_averages()}


# Run in a fresh interpreter: this one has loaded the compiler already.
_NEVER_COMPILING = """
import json, sys
from folio.cluster.entrypoints.llm import LLM
from folio.protos.messages import SamplingParams
llm = LLM(compile="off", kv_cache_memory=16 << 20)
assert llm.generate([[500, 501, 502]], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
print(json.dumps([m for m in ("torch._dynamo", "torch._inductor", "sympy", "triton") if m in sys.modules]))
"""


def test_an_engine_that_does_not_compile_never_loads_the_compiler():
    """With --compile off (and in any worker that does not compile: tensor-parallel ranks,
    the reference kernels) torch's compiler stays out of the process: dynamo, inductor,
    sympy and triton are 140 MiB of a CPU worker's memory and a second of its start."""
    run = subprocess.run([sys.executable, "-c", _NEVER_COMPILING], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.splitlines()[-1]) == []


# One engine on a tiny model in a fresh interpreter, compiling into the cache its
# environment names; prints whether its graphs were built, how many inductor took
# from that cache, and its greedy tokens.
_COMPILE_ONCE = """
import json, sys
from torch._dynamo.utils import counters
from folio.cluster.entrypoints.llm import LLM
from folio.protos.messages import SamplingParams
llm = LLM(sys.argv[1], compile="auto", kv_cache_memory=4 << 20, tokenizer=False)
graph = llm.worker.runner.decode_graph
out = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
print(json.dumps({
    "ready": graph is not None and graph.ready,
    "hits": counters["inductor"]["fxgraph_cache_hit"],
    "tokens": [o.outputs[0].token_ids for o in out],
}))
"""


FOREIGN_CAPABILITY = {"AVX512": "avx2", "AVX2": "default"}


def test_a_graph_compiled_for_one_vector_width_is_never_loaded_for_another(tmp_path):
    """inductor's on-disk cache did not key its C++ on the vector width it wrote it for:
    the bundled model's graphs compiled under ATEN_CPU_CAPABILITY=avx2 were loaded on the
    AVX-512 CPU beside them, rebuilt for 16 lanes where their loops stepped by 8, and the
    worker died of heap corruption on its first step. The width is now in the options.
    On an AVX2 CPU the other width is none (ATEN_CPU_CAPABILITY=default): no crash to
    provoke there, but a shared cache entry still shows as a hit."""
    from tests.model_fixtures import make_tiny_model

    # another width this CPU runs: AVX2's 8 lanes on AVX-512 (the crash), or none on AVX2
    foreign = FOREIGN_CAPABILITY.get(torch.backends.cpu.get_cpu_capability())
    if foreign is None:
        pytest.skip("an x86 CPU with AVX2 or AVX-512: two vector widths to compile for")
    model = make_tiny_model("llama", tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")

    def engine(**more: str) -> dict:
        run = subprocess.run(
            [sys.executable, "-c", _COMPILE_ONCE, model], env=env | more, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.splitlines()[-1])

    other = engine(ATEN_CPU_CAPABILITY=foreign)
    native = engine()
    again = engine()
    assert other["ready"] and native["ready"] and again["ready"]
    assert native["hits"] == 0  # the other width's graphs are not this CPU's
    assert again["hits"] > 0  # its own are taken from the cache
    assert other["tokens"] == native["tokens"] == again["tokens"]
