"""What the router needs of the engine behind it, and nothing more.

The head's Frontend (cluster/frontend.py) implements EngineClient and the
head hands it to folio.router.app.build_app at startup: the router never imports
the head, so the HTTP layer can be read, tested and changed on its own. The
exceptions are the engine's answers the router turns into HTTP statuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Literal, Optional, Protocol

from folio.protos.messages import EngineRequest, RequestOutput


class QueueFull(RuntimeError):
    """The admission queue is full; retry after `retry_after` seconds (429)."""

    def __init__(self, retry_after: int):
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after


class NotReady(RuntimeError):
    """No live replica can take requests; one is likely serving in `retry_after` seconds (503)."""

    def __init__(self, retry_after: int):
        super().__init__("no replica is ready; retry later")
        self.retry_after = retry_after


class RequestFailed(RuntimeError):
    """A request cannot finish; what the router turns into an error for its client.

    retryable=True: not the request's fault. Its replica failed (or no replica
    is left); the frontend resumes it on another replica when it can, and only
    what it cannot resume reaches the client (503: try again later).
    retryable=False: the request's own fault. It cannot be encoded for the wire
    or a worker refused it (StepResult.errors); it is never resumed, and sent
    again it fails again (400, with `str(e)` as the message).
    suspect: it was running on a worker of the replica that failed, so it may be
    what broke it; the frontend counts such resumes against max_request_retries.
    """

    def __init__(self, message: str, *, retryable: bool = True, suspect: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.suspect = suspect


ReplicaStateName = Literal["starting", "ready", "overdue", "failed", "draining"]


@dataclass(frozen=True)
class ReplicaState:
    """One replica as operators see it (readiness detail, logs).

    starting: being launched (or waiting out a backoff before its launch);
    ready: takes requests; overdue: alive, but its current step has run far
    longer than usual, so it takes nothing new for now; failed: dead, about to
    be released and replaced; draining: finishing what it holds, then removed.
    `error` says why it failed: for the log, never for clients (it holds addresses).
    """

    index: int
    state: ReplicaStateName
    num_requests: int = 0
    error: Optional[str] = None


class RequestStream(Protocol):
    """One request's outputs, ending after the finished one; raises RequestFailed.
    cancel() (idempotent) aborts the request wherever it is."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def cancel(self) -> None: ...


class EngineClient(Protocol):
    """The engine as the router sees it. Every method runs on the router's event loop."""

    @property
    def ready(self) -> bool:
        """At least one replica takes requests."""

    @property
    def max_model_len(self) -> int:
        """Prompt plus output tokens one request may hold."""

    @property
    def max_request_tokens(self) -> int:
        """Tokens (prompt plus output) a request can be given now: max_model_len, or less
        when the KV pool holds fewer."""

    def ready_in(self) -> int:
        """Seconds until a replica is likely to serve (Retry-After while none does)."""

    def replica_states(self) -> list[ReplicaState]: ...

    def metrics_text(self) -> str:
        """Prometheus exposition of the engine's metrics."""

    def generate(self, request: EngineRequest) -> RequestStream:
        """Admit the request (QueueFull, NotReady) and stream its outputs."""
