"""deploy/ works as written: Ray's own cluster-config checks pass, every folio command
in it parses with folio's own CLI, the KubeRay manifest has the shape the operator
needs, and the README's cluster walkthrough names files that exist."""

from __future__ import annotations

import copy
import os
import re
import shlex

import jsonschema
import pytest
import yaml

from tests import REPO_ROOT

ROOT = str(REPO_ROOT)
RAY_UP_CONFIGS = ["deploy/aws-gpu.yaml", "deploy/local-cluster.yaml"]


def _load(path: str):
    with open(os.path.join(ROOT, path)) as f:
        return list(yaml.safe_load_all(f))


def _ray_prepare_and_validate(config: dict) -> dict:
    """What `ray up` does with a config before it touches any machine."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_ray_up_config_passes_ray_validation(path):
    [config] = _load(path)
    prepared = _ray_prepare_and_validate(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    head_cmds = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head_cmds and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
    assert head_cmds.index("ray start --head") < head_cmds.index("folio serve")
    # CPU workers at Ray's default niceness 15 stall behind any busy process (cluster/placement.py)
    for cmds in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        assert all("RAY_worker_niceness=0 ray start" in c for c in cmds if "ray start" in c)
    assert any("pip install" in c and "folio" in c for c in prepared["setup_commands"])


def test_validation_rejects_a_broken_config():
    """The check above can fail: a misspelled field and a missing head type are refused."""
    [config] = _load("deploy/aws-gpu.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_1x"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _ray_prepare_and_validate(bad)
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError):
        _ray_prepare_and_validate(bad)


def test_aws_node_types():
    [config] = _load("deploy/aws-gpu.yaml")
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpus = sorted(t["resources"]["GPU"] for name, t in types.items() if name != config["head_node_type"])
    assert gpus == [1, 4, 8]
    assert all(t.get("min_workers", 0) == 0 for t in types.values())  # GPUs only on demand


def test_local_config_lists_machines():
    [config] = _load("deploy/local-cluster.yaml")
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and len(provider["worker_ips"]) >= 1
    prepared = _ray_prepare_and_validate(config)
    [node_type] = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(provider["worker_ips"])


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _folio_commands(docs) -> list[list[str]]:
    """Every `folio ...` invocation in the shell commands of a config, as argv
    without the redirections (comments are not values, so they are not included)."""
    found = []
    for text in _strings(docs):
        for m in re.finditer(r"\bfolio ((?:serve|batch)\b[^>&;]*)", " ".join(text.split())):
            found.append(shlex.split(m.group(1)))
    return found


@pytest.mark.parametrize("path", RAY_UP_CONFIGS + ["deploy/kuberay-raycluster.yaml"])
def test_folio_commands_in_deploy_files_parse(path):
    from cluster.entrypoints.cli import build_parser

    commands = _folio_commands(_load(path))
    assert commands, f"{path} starts no folio command"
    for argv in commands:
        args = build_parser().parse_args(argv)  # SystemExit on an unknown flag
        if argv[0] == "serve":
            assert args.ray_address == "auto" and args.host == "0.0.0.0"
            assert args.max_replicas > args.min_replicas  # autoscaling is on


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_ray_up_serves_with_an_api_key_and_a_local_dashboard(path):
    [config] = _load(path)
    head = " ".join(" ".join(c.split()) for c in config["head_start_ray_commands"])
    serve = head[head.index("folio serve") - 60 :]
    assert "folio serve --api-key-file ~/.folio/api_key" in serve
    assert "--dashboard-host=127.0.0.1" in head
    assert any("~/.folio/api_key" in c and "umask 077" in c for c in config["head_setup_commands"])


def test_kuberay_manifest_shape():
    docs = {d["kind"]: d for d in _load("deploy/kuberay-raycluster.yaml")}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    [head_container] = head["template"]["spec"]["containers"]
    assert 8000 in [p["containerPort"] for p in head_container["ports"]]
    [key] = [e for e in head_container["env"] if e["name"] == "FOLIO_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "folio-api-key", "key": "api-key"}
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    gpus = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        [c] = group["template"]["spec"]["containers"]
        assert c["image"] == head_container["image"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        gpus.append(c["resources"]["limits"]["nvidia.com/gpu"])
    assert sorted(gpus) == [1, 4, 8]
    service = docs["Service"]
    assert service["spec"]["selector"]["ray.io/cluster"] == rc["metadata"]["name"]
    assert service["spec"]["ports"][0]["targetPort"] == 8000


def test_dockerfile_installs_folio_and_copies_what_exists():
    with open(os.path.join(ROOT, "deploy/Dockerfile")) as f:
        text = f.read()
    assert re.search(r"^FROM \S+", text, re.M)
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in src.split():
            assert os.path.exists(os.path.join(ROOT, name)), name
    assert "pip install" in text and re.search(r"CMD \[\"folio\", \"serve\"", text)


def test_readme_cluster_section_names_files_that_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for verb in ("ray up", "ray down", "folio batch submit", "folio batch status"):
        assert verb in section, verb
    paths = set(re.findall(r"\bdeploy/[\w.\-]+", section))
    assert {
        "deploy/aws-gpu.yaml",
        "deploy/local-cluster.yaml",
        "deploy/kuberay-raycluster.yaml",
        "deploy/Dockerfile",
    } <= paths
    for p in paths | set(re.findall(r"\b(?:cluster|tests)/\w+\.py", section)):
        assert os.path.exists(os.path.join(ROOT, p)), p
