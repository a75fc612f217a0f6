"""deploy/ works as written: Ray's own cluster-config checks pass, every folio command
in it parses with folio's own CLI, the KubeRay manifest has the shape the operator
needs, and the README's cluster walkthrough names files that exist."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import tempfile

import jsonschema
import pytest
import yaml

from tests import PYPROJECT, REPO_ROOT

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


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_setup_installs_only_from_the_package_registry(path):
    """No installer fetched from the web and piped to a shell: pip and the registry (or
    the mirror PIP_INDEX_URL names) are all a node needs."""
    [config] = _load(path)
    for cmd in config["setup_commands"] + config["head_setup_commands"]:
        assert not re.search(r"\b(curl|wget)\b|\|\s*(ba)?sh\b|https?://|\buv\b", cmd), cmd
        if "install" in cmd:
            assert re.search(r"-m pip install (-e |--no-deps )", cmd), cmd


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_file_mounts_carry_what_a_node_installs_and_no_ignored_file_counts(path, tmp_path):
    """A node gets what `pip install -e` reads (pyproject, its readme, every package
    folder) and deploy/, each at its place under one folio folder. Ray hashes every file
    under a mount, ignored ones included, and a new hash redeploys the nodes: a file
    appearing in an ignored top-level folder (a local .venv, a cache) must not change it."""
    from ray.autoscaler._private.util import hash_runtime_conf

    [config] = _load(path)
    mounts = config["file_mounts"]
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "deploy"}
    needed |= set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    sources = {os.path.normpath(src) for src in mounts.values()}
    assert sources == needed, sources ^ needed
    [home] = {remote[: -len(os.path.normpath(src)) - 1] for remote, src in mounts.items()}
    assert all(remote == f"{home}/{os.path.normpath(src)}" for remote, src in mounts.items())
    assert f"{home}/deploy/serve-ctl.sh" in " ".join(config["head_start_ray_commands"])

    local = {remote: os.path.join(ROOT, src) for remote, src in mounts.items()}
    _, before = hash_runtime_conf(local, [], {}, generate_file_mounts_contents_hash=True)
    os.makedirs(os.path.join(ROOT, ".pytest_cache"), exist_ok=True)
    ignored = tempfile.mkdtemp(dir=os.path.join(ROOT, ".pytest_cache"))  # .gitignore'd, as .venv is
    try:
        with open(os.path.join(ignored, "wheel.bin"), "wb") as f:
            f.write(os.urandom(64))
        _, after = hash_runtime_conf(local, [], {}, generate_file_mounts_contents_hash=True)
    finally:
        shutil.rmtree(ignored)
    assert after == before


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_start_commands_replace_folio_serve_cleanly(path):
    """`folio serve` is stopped before `ray stop` (while it can release its replicas) and
    started detached through deploy/serve-ctl.sh; no start command relies on ~/.bashrc;
    Ray on the head carries FOLIO_PYTHON for batch jobs."""
    [config] = _load(path)
    head = [" ".join(c.split()) for c in config["head_start_ray_commands"]]
    ctl = next(c for c in head if c.endswith("deploy/serve-ctl.sh stop"))
    stop = next(c for c in head if c.endswith("ray stop"))
    start = next(c for c in head if "folio serve" in c)
    assert head.index(ctl) < head.index(stop) < head.index(start)
    assert "deploy/serve-ctl.sh start folio serve" in start
    assert os.access(os.path.join(ROOT, "deploy/serve-ctl.sh"), os.X_OK)
    [ray_head] = [c for c in head if "ray start --head" in c]
    assert "FOLIO_PYTHON=$HOME/folio-env/bin/python" in ray_head
    for c in [c for c in head if c != ctl] + config["worker_start_ray_commands"]:
        assert "~/folio-env/bin/ray stop" in c or "export PATH=$HOME/folio-env/bin:$PATH" in c, c


def test_serve_ctl_replaces_and_stops_the_previous_server(tmp_path):
    """serve-ctl.sh start stops the server its pid file names before starting another;
    stop ends it; a pid file naming some other process leaves that process alone."""
    import subprocess
    import sys
    import time

    ctl = os.path.join(ROOT, "deploy/serve-ctl.sh")
    env = dict(os.environ, FOLIO_SERVE_PIDFILE=str(tmp_path / "serve.pid"), FOLIO_SERVE_LOG=str(tmp_path / "log"))
    server = [sys.executable, "-c", "import time; time.sleep(600)", "folio"]  # "folio" in its cmdline

    def run(*args):
        subprocess.run([ctl, *args], env=env, check=True, timeout=90)
        return int((tmp_path / "serve.pid").read_text()) if (tmp_path / "serve.pid").exists() else None

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    first = run("start", *server)
    time.sleep(0.5)
    second = run("start", *server)
    try:
        assert first != second and not alive(first) and alive(second)
        assert run("stop") is None and not alive(second)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            (tmp_path / "serve.pid").write_text(str(other.pid))
            run("stop")
            assert other.poll() is None  # not folio's: left running
        finally:
            other.kill()
            other.wait()
    finally:
        for pid in (first, second):
            if alive(pid):
                os.kill(pid, 9)


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
    from folio.cluster.entrypoints.cli import build_parser

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
    # The dashboard and job API answer only with Ray's token, and only on the pod's loopback.
    assert spec["authOptions"] == {"mode": "token", "secretName": "folio-ray-token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    containers = {c["name"]: c for c in head["template"]["spec"]["containers"]}
    ray_head, serve = containers["ray-head"], containers["folio-serve"]
    assert list(containers)[0] == "ray-head"  # KubeRay runs Ray in the first container
    # folio serve is its own container's process (exec): when it exits on losing Ray, the
    # kubelet restarts it; a postStart hook's background process would stay dead.
    assert "exec folio serve" in " ".join(serve["command"][-1].split())
    assert head["template"]["spec"].get("restartPolicy", "Always") == "Always"
    assert 8000 in [p["containerPort"] for p in serve["ports"]]
    assert 8265 not in [p["containerPort"] for c in containers.values() for p in c["ports"]]
    env = {e["name"]: e for e in serve["env"]}
    assert env["FOLIO_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "folio-api-key", "key": "api-key"}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "folio-ray-token", "key": "auth_token"}
    assert {e["name"]: e["value"] for e in ray_head["env"]}["FOLIO_PYTHON"] == "/usr/local/bin/python"
    mounts = [{m["mountPath"] for m in c["volumeMounts"]} for c in (ray_head, serve)]
    assert all("/tmp/ray" in m for m in mounts)  # Ray's session files, for --ray-address auto
    gpus = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        [c] = group["template"]["spec"]["containers"]
        assert c["image"] == ray_head["image"] == serve["image"]
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


def test_serve_ctl_stop_does_not_wait_for_an_exited_server_nobody_reaped(tmp_path):
    """A server that exited on SIGTERM but whose parent has not collected it (an init
    that does not reap, as a container's shell can be) is a zombie: kill -0 still
    succeeds on it, and stop waited its full 60 s before a restart could go on."""
    import subprocess
    import sys
    import time

    env = dict(os.environ, FOLIO_SERVE_PIDFILE=str(tmp_path / "serve.pid"), FOLIO_SERVE_LOG=str(tmp_path / "log"))
    # This test's own child, never waited for until the end: a zombie once it exits.
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "folio"])
    try:
        time.sleep(0.5)
        (tmp_path / "serve.pid").write_text(str(server.pid))
        t = time.monotonic()
        subprocess.run([os.path.join(ROOT, "deploy/serve-ctl.sh"), "stop"], env=env, check=True, timeout=90)
        assert time.monotonic() - t < 10
        with open(f"/proc/{server.pid}/stat") as f:
            assert f.read().split(")")[1].split()[0] == "Z"  # exited, not yet reaped
        assert "SIGTERM" in (tmp_path / "log").read_text()
    finally:
        server.kill()
        server.wait()
