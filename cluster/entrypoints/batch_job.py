"""A batch as a Ray job: `folio batch submit` and `folio batch status` over Ray's job API.

The job API is Ray's dashboard (port 8265 on the head). Whoever can reach it can
run any command on the head, so it is an operator's door: the dashboard listens
on the head's 127.0.0.1 (reached through `ray dashboard CONFIG`, an SSH tunnel)
or, on a cluster Ray started with token authentication (Ray 2.60 does that by
default), every call carries Ray's cluster token. This module finds that token
where Ray keeps it (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
~/.ray/auth_token) and presents it on every call, whether or not RAY_AUTH_MODE
is set here: Ray's own client sends it only when RAY_AUTH_MODE=token.

Nothing secret goes into a submission. Ray keeps a job's entrypoint,
runtime_env (env_vars included) and metadata and shows them to every job API
caller (`ray job list`, the dashboard), so the endpoint's API key reaches the
job as a file path on the head (`--api-key-file`) or through the head's own
FOLIO_API_KEY environment, never as a value.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional
from urllib.parse import urlsplit

TOKEN_PLACES = "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
# Ray's job API answers 500 with this until the head's job agent is up, which on a
# busy head is seconds after the dashboard itself answers: right after `ray up`.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 120


class JobApiError(RuntimeError):
    """The job API refused or could not be reached; the message says what to do."""


def ray_auth_token() -> Optional[str]:
    """Ray's cluster token, looked up the way Ray itself does (TOKEN_PLACES); None if absent."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication (before 2.5x)
        return None
    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return None
    return loader.get_raw_token(ignore_auth_mode=True).strip() or None


@contextmanager
def job_client(address: str) -> Iterator["JobSubmissionClient"]:  # noqa: F821
    """A JobSubmissionClient that presents Ray's token when there is one; Ray's
    authentication errors inside the block become a JobApiError that says what to do."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = ray_auth_token()
    if token is None and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        raise JobApiError(f"RAY_AUTH_MODE=token but no Ray token found in {TOKEN_PLACES}")
    if token is not None and _cleartext_remote(address):
        print(
            f"warning: sending Ray's token to {address} without TLS; use `ray dashboard CONFIG` "
            "(an SSH tunnel to the head's 127.0.0.1) or https",
            file=sys.stderr,
        )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        yield JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        if token is None:
            raise JobApiError(
                f"the Ray job API at {address} requires Ray's token and none was found in "
                f"{TOKEN_PLACES}; copy it from the head (`ray get-auth-token` there) into "
                "~/.ray/auth_token"
            ) from e
        raise JobApiError(
            f"the Ray job API at {address} refused the Ray token found in "
            f"{TOKEN_PLACES}: it is not this cluster's token"
        ) from e


def _cleartext_remote(address: str) -> bool:
    url = urlsplit(address if "://" in address else f"http://{address}")
    return url.scheme == "http" and url.hostname not in ("127.0.0.1", "localhost", "::1")


def entrypoint(
    input_path: str,
    output_path: str,
    *,
    endpoint: str,
    concurrency: int,
    max_line_attempts: int,
    api_key_file: Optional[str],
    python: Optional[str],
) -> str:
    """The job's shell command. `python` is the head's Python with folio installed, as
    the job's shell (Ray's environment on the head) finds it: not this machine's. None:
    FOLIO_PYTHON in the head's Ray environment (the deploy configs set it on `ray start`,
    so the job runs in folio's environment whatever the job's PATH is), else `python`."""
    args = [
        "-m",
        "folio.cluster.entrypoints.batch",
        "run",
        input_path,
        "--output",
        output_path,
        "--endpoint",
        endpoint,
        "--concurrency",
        str(concurrency),
        "--max-line-attempts",
        str(max_line_attempts),
    ]
    if api_key_file:
        args += ["--api-key-file", api_key_file]
    # Expanded by the job's shell on the head, not here.
    head_python = shlex.quote(python) if python else '"${FOLIO_PYTHON:-python}"'
    return " ".join([head_python] + [shlex.quote(a) for a in args])


def submit(
    input_path: str,
    output_path: str,
    *,
    address: str,
    endpoint: str,
    concurrency: int,
    max_line_attempts: int,
    api_key_file: Optional[str] = None,
    python: Optional[str] = None,
    submission_id: Optional[str] = None,
    agent_wait_s: float = AGENT_WAIT_S,
) -> str:
    """Submit the batch as a Ray job; returns its id. Paths are as the head sees them:
    the job checks the input itself (this machine may not hold the file). A head whose
    job agent is not up yet is asked again, for up to agent_wait_s."""
    input_path, output_path = os.path.abspath(input_path), os.path.abspath(output_path)
    command = entrypoint(
        input_path,
        output_path,
        endpoint=endpoint,
        concurrency=concurrency,
        max_line_attempts=max_line_attempts,
        api_key_file=api_key_file,
        python=python,
    )
    # Our own id: a try whose answer was lost may still have been taken, and the next
    # try then finds the job by it instead of submitting the batch twice.
    submission_id = submission_id or f"raysubmit_folio_{secrets.token_hex(8)}"
    metadata = {"folio": "batch", "input": input_path, "output": output_path, "endpoint": endpoint}
    deadline, retried = time.monotonic() + agent_wait_s, False
    with job_client(address) as client:
        while True:
            try:
                return client.submit_job(entrypoint=command, submission_id=submission_id, metadata=metadata)
            except RuntimeError as e:
                if retried and "already exists" in str(e) and _is_ours(client, submission_id, command):
                    return submission_id
                if AGENT_NOT_READY not in str(e) or time.monotonic() > deadline:
                    raise
            print("folio batch submit: the head's job agent is not up yet; trying again", file=sys.stderr)
            retried = True
            time.sleep(1)


def _is_ours(client, submission_id: str, command: str) -> bool:
    """Whether the job of that id is this very submission (a retry after a lost answer)."""
    try:
        return client.get_job_info(submission_id).entrypoint == command
    except Exception:  # noqa: BLE001 - not ours to judge: the caller raises the original error
        return False


def status(job_id: str, *, address: str) -> dict:
    """The job's state, its metadata and its last progress line."""
    with job_client(address) as client:
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
    progress = [ln for ln in logs.splitlines() if ln.startswith("progress:")]
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,  # ms since the epoch
        "metadata": info.metadata,
        "progress": progress[-1] if progress else None,
    }
