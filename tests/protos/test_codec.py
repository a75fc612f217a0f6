"""The protobuf wire format: lossless round trips and generated code in sync with the .proto."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from folio.protos import codec
from folio.protos import worker_pb2 as pb
from folio.protos.config import SchedulerConfig, WorkerConfig
from folio.protos.grammar import Grammar
from folio.protos.messages import (
    CachedRequest,
    NewRequest,
    RequestError,
    SampledRequest,
    SamplingParams,
    StepRequest,
    StepResult,
    TokenLogprob,
)
from tests import REPO_ROOT

REPO = REPO_ROOT


def _wire(msg):
    """Serialize and parse again, as the far side of a gRPC call would."""
    return type(msg).FromString(msg.SerializeToString())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(
            n=3,
            temperature=0.0,
            top_p=0.9,
            top_k=-1,
            min_p=0.05,
            seed=0,
            presence_penalty=-2.0,
            frequency_penalty=1.5,
            repetition_penalty=1.1,
            logit_bias={0: -100.0, 49151: 7.25},
            logprobs=0,
            prompt_logprobs=20,
            max_tokens=1,
            min_tokens=1,
            stop=["\n", "é😀"],
            stop_token_ids=[2, 0],
            ignore_eos=True,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
        ),
        SamplingParams(seed=2**62, logprobs=5, temperature=1e-300),
        SamplingParams(grammar=Grammar("json_schema", '{"type": "object", "title": "é"}')),
        SamplingParams(grammar=Grammar("json_object")),
    ],
)
def test_sampling_params_round_trip(params):
    m = _wire(codec.encode_sampling_params(params))
    # Stop strings and text options stay on the head: they arrive as defaults.
    head_only = dict(stop=[], include_stop_str_in_output=False, skip_special_tokens=True)
    assert codec.decode_sampling_params(m) == replace(params, **head_only)
    assert "é😀" not in m.SerializeToString().decode("utf-8", "replace")


def test_unset_optionals_stay_none():
    m = _wire(codec.encode_sampling_params(SamplingParams()))
    assert not m.HasField("seed") and not m.HasField("logprobs")
    back = codec.decode_sampling_params(m)
    assert back.seed is None and back.logprobs is None and back.prompt_logprobs is None
    assert not m.HasField("grammar") and back.grammar is None


def test_a_bad_grammar_on_the_wire_is_a_value_error():
    m = _wire(codec.encode_sampling_params(SamplingParams(grammar=Grammar("regex", "a+"))))
    m.grammar.kind = "yaml"
    with pytest.raises(ValueError, match="grammar kind"):
        codec.decode_sampling_params(m)


def test_step_request_round_trip():
    step = StepRequest(
        step_id=2**40,
        new_requests=[
            NewRequest("a", [1, 2, 3, 49151], 3, SamplingParams(seed=7), [0, 5], 0, 4, 1),
            NewRequest("b-0", list(range(300)), 300, SamplingParams(logprobs=2), [], 256, 44),
        ],
        cached_requests=[
            CachedRequest("c", [], 17, 1),
            CachedRequest("d", [9, 10], 32, 16),
            CachedRequest("e", [11], 40, 4, draft_token_ids=[3, 0, 49151]),
        ],
        finished_ids=["x", "y"],
    )
    assert codec.decode_step_request(_wire(codec.encode_step_request(step))) == step
    assert codec.decode_step_request(_wire(codec.encode_step_request(StepRequest(0)))) == StepRequest(0)


def test_step_result_round_trip():
    lp = TokenLogprob(
        token_id=5, logprob=-0.123456789012345, rank=3, top=[(1, -0.01), (7, -0.5), (5, -0.123456789012345)]
    )
    result = StepResult(
        step_id=9,
        outputs=[
            SampledRequest("a", prompt_logprobs=[lp, TokenLogprob(0, 0.0, 1)]),
            SampledRequest("b", token_ids=[0], logprobs=[TokenLogprob(0, -float("inf"), 49152)]),
            SampledRequest("c", token_ids=[49151], logprobs=[lp]),
            SampledRequest("d", token_ids=[4, 5, 6], logprobs=[lp, lp, TokenLogprob(6, -1.5, 2)]),
            SampledRequest("e", token_ids=[7, 8]),
        ],
        errors=[RequestError("f", "logit_bias token id 99999 is outside the vocabulary")],
    )
    assert codec.decode_step_result(_wire(codec.encode_step_result(result))) == result


def test_load_request_round_trip_and_a_bad_value_refused():
    """The worker's settings cross to the worker whole; a value out of range (a hostile
    head's or a typo) is refused there before anything loads."""
    worker = WorkerConfig(
        model="/m.gguf",
        device="cpu",
        dtype="float32",
        kernels="reference",
        quantization="none",
        kv_cache_dtype="bfloat16",
        compile="off",
        kv_cache_memory=1 << 28,
        num_kv_blocks=100,
        gpu_memory_utilization=0.5,
    )
    scheduler = SchedulerConfig(block_size=32, max_num_batched_tokens=256)
    got_worker, got_scheduler = codec.decode_load_request(_wire(codec.encode_load_request(worker, scheduler)))
    assert got_worker == worker
    assert (got_scheduler.block_size, got_scheduler.max_num_batched_tokens) == (32, 256)
    assert codec.decode_load_request(pb.LoadModelRequest())[0] == WorkerConfig()  # unset fields: the defaults
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        codec.decode_load_request(pb.LoadModelRequest(kv_cache_dtype="float64"))
    with pytest.raises(ValueError, match="compile must be one of"):
        codec.decode_load_request(pb.LoadModelRequest(compile="max-autotune"))


def test_generated_code_matches_proto(tmp_path):
    """The committed *_pb2*.py files are exactly what protoc makes from worker.proto."""
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Ifolio/protos={REPO / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "folio/protos/worker.proto",
        ],
        check=True,
    )
    for name in ("worker_pb2.py", "worker_pb2_grpc.py"):
        fresh = (tmp_path / "folio" / "protos" / name).read_text()
        committed = (REPO / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale; regenerate it (see the header of protos/worker.proto)"
