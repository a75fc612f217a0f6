"""Every scheduler default has one home, SchedulerConfig: `folio serve`, ServeConfig,
the offline LLM and the CLI commands that build an engine all read it from there."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from cluster.config import SchedulerConfig
from cluster.entrypoints import cli
from cluster.entrypoints.llm import LLM
from cluster.entrypoints.serve import ServeConfig

SHARED = [
    f.name for f in dataclasses.fields(SchedulerConfig) if f.name not in ("eos_token_ids", "max_model_len")
]  # the model's own, not a default


def _defaults(argv: list[str]) -> argparse.Namespace:
    parser = cli.build_parser()
    required = {"generate": ["--input", "i", "--output", "o"]}
    return parser.parse_args(argv + required.get(argv[0], []))


@pytest.mark.parametrize("name", SHARED)
def test_serve_config_and_llm_take_the_scheduler_default(name):
    want = getattr(SchedulerConfig(), name)
    assert getattr(ServeConfig(), name) == want
    assert inspect.signature(LLM).parameters[name].default == want
    assert getattr(_defaults(["serve"]), name) == want


@pytest.mark.parametrize("argv", [["generate"], ["bench", "throughput"], ["bench", "serve"]])
def test_commands_that_build_an_engine_take_the_scheduler_defaults(argv):
    args = _defaults(argv)
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        assert getattr(args, name) == getattr(SchedulerConfig(), name), (argv, name)


def test_llm_and_worker_pick_the_device_dtype_as_the_cli_does():
    """LLM(device="cuda") gets bf16 like `folio generate --device cuda`: dtype None means the
    device's default, in the Worker, so no entry point can drift from it."""
    from worker.worker import Worker

    assert inspect.signature(LLM).parameters["dtype"].default is None
    assert inspect.signature(Worker).parameters["dtype"].default is None
    assert _defaults(["generate"]).dtype is None  # resolved by default_dtype(--device)
