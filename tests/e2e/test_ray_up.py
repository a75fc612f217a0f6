"""`ray up` of deploy/local-cluster.yaml, for real, over SSH to this machine.

sshd runs in a throwaway configuration (its own host key and authorized key under the
test's directory, 127.0.0.1:22) inside new PID and mount namespaces together with
everything else the test starts: `ray stop`, which the config runs, sees only this
test's processes; ~ (a bind mount) and /tmp (a tmpfs) are the test's own, so the
machine's SSH setup, Ray sessions and ~/.ray/auth_token are never touched. The cluster
config is the shipped file with only addresses, user, key and CPU settings changed.
The phases (tests/e2e/ray_up_driver.py): ray up; an OpenAI chat request; a batch
through the job API with Ray's token authentication on, checked line by line against
the in-process engine's greedy output; ray up --restart-only, serving again on the
same port; ray down, leaving no Ray or folio process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from tests import REPO_ROOT
from tests.e2e.test_autoscaling import MAX_TOKENS, _greedy_reference, _requests

pytestmark = pytest.mark.slow
ROOT = str(REPO_ROOT)
SSHD = "/usr/sbin/sshd"
# sshd, the config's own Ray and folio ports, and the port a Ray node's dashboard agent
# takes by default: without it the head has no job agent, and job submission fails.
PORTS = (22, 6379, 8265, 8000, 52365)
# PID 1 of the test's namespace: runs the command given and reaps every process that
# ends, its own children and the orphans reparented to it.
REAPER = """
import os, sys
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
while True:
    pid, status = os.wait()
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status))
"""


def _sshd_or_skip() -> None:
    if not os.path.exists(SSHD) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server", "rsync"], capture_output=True)
    if not os.path.exists(SSHD) or not shutil.which("rsync"):
        pytest.skip("sshd (openssh-server) and rsync are not installed and could not be installed")


def _derive_config(path: str, key: str) -> dict:
    """The shipped config with addresses, user, key and CPU settings substituted."""
    with open(os.path.join(ROOT, "deploy/local-cluster.yaml")) as f:
        config = yaml.safe_load(f)
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["max_workers"] = 0
    config["auth"] = {"ssh_user": "root", "ssh_private_key": key}

    def cpu(cmd: str) -> str:
        cmd = cmd.replace("--max-replicas 3", "--max-replicas 1")
        # Exact kernels, as the reference answers are computed: the default CPU kernels'
        # wide-batch path rounds differently, so a near-tie can follow how prompts batched.
        cmd = cmd.replace("--device cuda", "--device cpu --kernels reference")
        if "pip install -e" in cmd:  # the CPU build of torch, as .ci/setup installs it
            cmd = cmd.replace("pip install -e ~/folio", "pip install -c ~/folio/.ci/constraints-cpu.txt -e ~/folio")
        return cmd

    for k in ("setup_commands", "head_start_ray_commands"):
        config[k] = [cpu(c) for c in config[k]]
    config["file_mounts"]["~/folio/.ci/constraints-cpu.txt"] = "./.ci/constraints-cpu.txt"
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return config


def _sshd_config(work: str) -> str:
    # The machine's pip settings (a local wheel folder for the CPU torch build) reach the
    # nodes' setup commands as they would through a login's environment.
    env = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("PIP_") or k.startswith("SSL_CERT")]
    # Byte-compiling every installed file was 60 of the 160 s the node's fresh pip install
    # took; Python compiles what the node imports when it imports it.
    env.append("PIP_COMPILE=0")  # pip reads PIP_NO_COMPILE=1 as "compile"
    lines = [
        "Port 22",
        "ListenAddress 127.0.0.1",
        f"HostKey {work}/host_key",
        f"AuthorizedKeysFile {work}/authorized_keys",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        f"PidFile {work}/sshd.pid",
        "SetEnv " + " ".join(env),
    ]
    with open(f"{work}/sshd_config", "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"{work}/sshd_config"


def _ports_free(timeout: float) -> None:
    """The cluster's ports, free as on a machine of its own. Tests before this one leave
    this process's own Ray up for the session (start_local_ray): it holds a node's ports,
    so it is stopped first; the next test that wants it starts it again."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    deadline = time.monotonic() + timeout
    for port in PORTS:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"127.0.0.1:{port} is taken; the config's ports must be free for this test")
            time.sleep(0.5)


def test_ray_up_local_cluster():
    _sshd_or_skip()
    _ports_free(timeout=30)
    work = tempfile.mkdtemp(prefix="folio-rayup-", dir="/var/tmp")  # /tmp is replaced in the namespace
    try:
        os.makedirs(f"{work}/home")
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{work}/{name}"], check=True)
        shutil.copy(f"{work}/client_key.pub", f"{work}/authorized_keys")
        config = _derive_config(f"{work}/cluster.yaml", f"{work}/client_key")
        assert "--device cpu" in " ".join(config["head_start_ray_commands"])
        with open(f"{work}/batch.jsonl", "w") as f:
            for row in _requests()[:8]:
                f.write(json.dumps(row) + "\n")
        sshd_config = _sshd_config(work)
        home = os.path.expanduser("~")
        stash, restore = _keep_visible(work, home)
        script = (
            f"set -e; {stash}mount -t tmpfs tmpfs /tmp; mount --rbind {work}/home {home}; {restore}"
            f"mkdir -p /run/sshd; {SSHD} -f {sshd_config} -E {work}/sshd.log; "
            f"PYTHONPATH={ROOT} {sys.executable} {ROOT}/tests/e2e/ray_up_driver.py {work}"
        )
        # Everything started in the namespace dies with its first process, which reaps
        # whatever is orphaned to it, as a machine's init does: `ray stop` and
        # serve-ctl.sh wait for their processes to be gone, and a zombie looks alive.
        namespace = ["unshare", "--pid", "--mount", "--fork", "--mount-proc", "--propagation", "private"]
        run = subprocess.run(
            [*namespace, sys.executable, "-c", REAPER, "bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        result = json.load(open(f"{work}/result.json")) if os.path.exists(f"{work}/result.json") else {}
        print(json.dumps(result, indent=2))
        assert run.returncode == 0, (run.stderr[-3000:], result, _tail(work))
        assert result["batch_status"]["status"] == "SUCCEEDED", result
        expected = _greedy_reference()
        lines = [json.loads(ln) for ln in open(f"{work}/batch_out.jsonl")]
        assert sorted(r["custom_id"] for r in lines) == sorted(r["custom_id"] for r in _requests()[:8])
        for r in lines:
            choice = r["response"]["body"]["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert text == expected[r["custom_id"]], (r["custom_id"], text, MAX_TOKENS)
        old, new = result["serve_pids"]
        assert old != new  # a new folio serve took the port
        assert result["left_after_down"] == [], result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keep_visible(work: str, home: str) -> tuple[str, str]:
    """Shell commands that keep the repository and this Python visible in the namespace
    when they live under /tmp or ~ (a CI clone, a pyenv), which the namespace replaces:
    each is bind-mounted aside under `work` first and back in place afterwards."""
    base = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    hidden = {p for p in (ROOT, sys.prefix, base) if p == "/tmp" or p.startswith(("/tmp/", home + "/"))}
    outer = sorted(p for p in hidden if not any(p.startswith(q + "/") for q in hidden))
    stash = restore = ""
    for i, path in enumerate(outer):
        aside = f"{work}/visible{i}"
        os.makedirs(aside)
        stash += f"mount --bind {path} {aside}; "
        restore += f"mkdir -p {path}; mount --bind {aside} {path}; "
    return stash, restore


def _tail(work: str) -> dict:
    out = {}
    for name in ("ray_up.log", "restart.log", "ray_down.log", "sshd.log"):
        p = os.path.join(work, name)
        if os.path.exists(p):
            out[name] = open(p).read()[-2500:]
    return out
