"""Every setting has one home, its configuration dataclass field: the CLI's flags,
ServeConfig, LLM(**options) and the worker all take their defaults from there."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import pathlib

import pytest

from folio.cluster.entrypoints import cli
from folio.cluster.entrypoints.options import build_config, config_fields, config_from_args
from folio.cluster.entrypoints.serve import ServeConfig
from folio.protos.config import EngineConfig, SchedulerConfig, WorkerConfig
from tests import REPO_ROOT

SERVE = config_fields(ServeConfig)
ENGINE = config_fields(EngineConfig)


def _parse(argv: list[str]) -> argparse.Namespace:
    required = {"generate": ["--input", "i", "--output", "o"]}
    return cli.build_parser().parse_args(argv + required.get(argv[0], []))


def _config_classes(root: type) -> set[type]:
    out = {root}
    for f in dataclasses.fields(root):
        kind = inspect.get_annotations(root, eval_str=True)[f.name]
        if dataclasses.is_dataclass(kind):
            out |= _config_classes(kind)
    return out


def test_option_names_are_unique_across_the_tree():
    """A flat name (a flag, an LLM keyword) finds exactly one field: config_fields refuses
    a tree with two fields of one name, so building the tables above is the check."""
    assert set(ENGINE) <= set(SERVE)
    assert {o.path[0] for o in SERVE.values()} >= {"worker", "scheduler", "admission", "autoscaler", "access", "limits"}


def test_every_field_of_every_config_has_exactly_one_default():
    """A config field gets its default where it is declared; no module assigns another
    (a literal copy of 16 or 512 elsewhere is what drifted before)."""
    for cls in _config_classes(ServeConfig):
        for f in dataclasses.fields(cls):
            if f.init:
                assert (f.default is dataclasses.MISSING) != (f.default_factory is dataclasses.MISSING), (cls, f.name)
    # No head, entry point or worker module gives a setting a literal default of its own.
    names = {o.name for o in SERVE.values()}
    offenders = []
    for path in [*REPO_ROOT.glob("cluster/**/*.py"), REPO_ROOT / "worker/worker.py", REPO_ROOT / "worker/server.py"]:
        tree = ast.parse(pathlib.Path(path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                args = node.args.args[len(node.args.args) - len(node.args.defaults) :] + node.args.kwonlyargs
                defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
                for a, d in zip(args, defaults):
                    if a.arg in names and isinstance(d, ast.Constant) and d.value not in (None, "", 0, False):
                        offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.name}({a.arg}={d.value!r})")
    assert not offenders, offenders


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["bench", "throughput"]])
def test_flags_default_to_the_fields(command):
    args = _parse(command)
    table = SERVE if command == ["serve"] else ENGINE
    for name, opt in table.items():
        if opt.is_user_option:
            assert getattr(args, name) == (list(opt.default) if isinstance(opt.default, tuple) else opt.default), name
    root = ServeConfig if command == ["serve"] else EngineConfig
    assert config_from_args(root, args) == root()


def test_serve_generate_and_llm_take_the_same_engine_options():
    """`folio serve`, `folio generate` and LLM(**options) name every engine setting alike."""
    serve, generate = vars(_parse(["serve"])), vars(_parse(["generate"]))
    engine_options = {name for name, opt in ENGINE.items() if opt.is_user_option}
    assert engine_options <= set(serve) and engine_options <= set(generate)
    # LLM takes them as keywords: each builds the config a flag would.
    for name in engine_options:
        assert build_config(EngineConfig, **{name: generate[name]}) == EngineConfig(), name


def test_flags_set_nested_fields():
    args = _parse(["serve", "--max-num-seqs", "3", "--kv-cache-memory", "2GiB", "--api-key", "k1", "--api-key", "k2"])
    cfg = config_from_args(ServeConfig, args)
    assert cfg.scheduler.max_num_seqs == 3
    assert cfg.worker.kv_cache_memory == 2 << 30
    assert cfg.access.api_keys == ("k1", "k2")
    assert cfg.scheduler.block_size == SchedulerConfig().block_size


def test_out_of_range_settings_fail_when_the_config_is_built():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        config_from_args(ServeConfig, _parse(["serve", "--gpu-memory-utilization", "1.5"]))
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        build_config(EngineConfig, prompt_lookup_min=5, prompt_lookup_max=2)
    with pytest.raises(TypeError, match="no option 'num_blocks'"):
        build_config(EngineConfig, num_blocks=8)


def test_the_worker_and_llm_resolve_dtype_by_device_as_the_cli_does():
    """dtype None means the device's default, decided in one place (the Worker), so
    LLM(device="cuda") and `folio generate --device cuda` cannot drift apart."""
    import torch

    from folio.worker.worker import Worker

    assert WorkerConfig().dtype is None and _parse(["generate"]).dtype is None
    assert WorkerConfig(dtype=torch.bfloat16).dtype == "bfloat16"
    assert list(inspect.signature(Worker).parameters)[:2] == ["config", "scheduler"]
