"""The `ray up` walkthrough, run by tests/e2e/test_ray_up.py inside its own PID and mount
namespaces (so `ray stop`, which the configs run, sees only this test's processes, and
~ and /tmp are the test's own). Usage: python ray_up_driver.py WORKDIR; writes
WORKDIR/result.json with each phase's time and what was observed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

WORK = sys.argv[1]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
result: dict = {"phases": {}}


def save() -> None:
    with open(os.path.join(WORK, "result.json"), "w") as f:
        json.dump(result, f, indent=2)


def sh(name: str, *argv: str, timeout: float = 900) -> None:
    t = time.monotonic()
    with open(os.path.join(WORK, f"{name}.log"), "w") as log:
        code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
    result["phases"][name] = round(time.monotonic() - t, 1)
    save()
    if code != 0:
        raise SystemExit(f"{name} exited {code}")


def chat(key: str, timeout: float) -> float:
    """Seconds until the endpoint answers a chat request."""
    t, deadline = time.monotonic(), time.monotonic() + timeout
    while True:
        try:
            r = httpx.post(
                "http://127.0.0.1:8000/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8},
                timeout=60,
            )
            if r.status_code == 200:
                result.setdefault("chat", []).append(r.json()["choices"][0]["message"]["content"])
                return round(time.monotonic() - t, 1)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the endpoint never answered")
        time.sleep(1)


def folio_batch(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # as an operator's shell
    out = subprocess.run(
        [sys.executable, "-m", "folio.cluster.entrypoints.cli", "batch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise SystemExit(f"folio batch {args[0]}: {out.stderr[-2000:]}")
    return out.stdout


def main() -> None:
    config = os.path.join(WORK, "cluster.yaml")
    ray = os.path.join(BIN, "ray")
    sh("ray_up", ray, "up", "-y", config)
    key = open(os.path.expanduser("~/.folio/api_key")).read().strip()
    result["phases"]["first_answer"] = chat(key, 600)
    save()

    t = time.monotonic()
    job = (
        folio_batch(
            "submit",
            os.path.join(WORK, "batch.jsonl"),
            "--output",
            os.path.join(WORK, "batch_out.jsonl"),
            "--api-key-file",
            os.path.expanduser("~/.folio/api_key"),
        )
        .strip()
        .splitlines()[-1]
    )
    while True:
        status = json.loads(folio_batch("status", job))
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    result["batch_status"] = status
    result["phases"]["batch"] = round(time.monotonic() - t, 1)
    save()

    pid_before = open(os.path.expanduser("~/.folio/serve.pid")).read().strip()
    sh("restart", ray, "up", "-y", "--restart-only", config)
    result["phases"]["answer_after_restart"] = chat(key, 600)
    result["serve_pids"] = [pid_before, open(os.path.expanduser("~/.folio/serve.pid")).read().strip()]
    save()

    state = "/tmp/ray/cluster-folio-local.state"  # the local provider's node tags, for a failing down
    result["provider_state_before_down"] = open(state).read() if os.path.exists(state) else None
    sh("ray_down", ray, "down", "-y", config)
    # `ray down` runs `ray stop` on the head; folio serve then notices its cluster is
    # gone (cluster/ray_watch.py, within ~15 s) and exits.
    t, deadline = time.monotonic(), time.monotonic() + 60
    while (left := _ray_or_folio_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    result["phases"]["down_to_no_process"] = round(time.monotonic() - t, 1)
    result["left_after_down"] = left
    save()


def _ray_or_folio_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    markers = ("raylet", "gcs_server", "ray::", "dashboard", "folio serve", "monitor.py", "log_monitor")
    return [ln for ln in ps.splitlines()[1:] if any(m in ln for m in markers)]


if __name__ == "__main__":
    try:
        main()
    finally:
        save()
