"""Who may talk to a worker: the per-cluster secret and, when given, TLS.

The head makes one ClusterCredentials per deployment (ClusterCredentials.generate)
and hands it to its worker actors through Ray. Every gRPC call from the head
carries the secret in its metadata (SECRET_METADATA_KEY); each worker's server
checks it with SecretCheck before any handler runs, so a peer on the cluster
network that lacks it gets UNAUTHENTICATED and nothing else.

Without certificates the secret travels in clear text: fine on loopback or a
private network. With them the workers serve TLS (server_credentials) and the
head verifies each worker's certificate against the CA (channel), which also
keeps the secret confidential. Both sides import this module; it imports no
other folio package.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Optional, Sequence

import grpc

SECRET_METADATA_KEY = "folio-cluster-secret"  # gRPC metadata keys are lower case
SECRET_ENV = "FOLIO_CLUSTER_SECRET"  # the standalone `python -m folio.worker.server` reads it


@dataclass(frozen=True)
class ClusterCredentials:
    """What proves a call comes from this deployment's head, and how workers serve TLS.

    tls_cert / tls_key: the workers' certificate chain and private key (PEM paths
    as every worker node sees them); tls_ca: the CA the head checks them against
    (a path on the head). tls_server_name: the name the head expects in each
    worker certificate; None means the address it dials (then every worker's
    certificate must name its node's IP).
    """

    secret: str = field(repr=False)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None
    tls_server_name: Optional[str] = None

    def __post_init__(self) -> None:
        if len(self.secret) < 16 or not (self.secret.isascii() and self.secret.isprintable()):
            # gRPC metadata values are printable ASCII.
            raise ValueError("the cluster secret must be at least 16 printable ASCII characters")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("worker TLS needs both a certificate and its key")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("a worker TLS CA without a worker certificate and key")

    @staticmethod
    def generate(**tls: Optional[str]) -> "ClusterCredentials":
        """A fresh random secret (256 bits), plus the TLS paths given."""
        return ClusterCredentials(secrets.token_urlsafe(32), **tls)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SECRET_METADATA_KEY, self.secret),)


# ---------------------------------------------------------------- worker side


class SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that lacks the cluster secret.

    The refusal replaces the method's handler, so the request message is never
    parsed and no servicer code runs for it.
    """

    def __init__(self, secret: str):
        self._secret = secret.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._allowed(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusal(handler)

    def _allowed(self, metadata: Sequence[tuple[str, object]]) -> bool:
        sent = [v for k, v in metadata if k == SECRET_METADATA_KEY]
        if len(sent) != 1:
            return False
        value = sent[0].encode() if isinstance(sent[0], str) else bytes(sent[0])
        return hmac.compare_digest(value, self._secret)


async def _refuse(request_or_iterator, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that only refuses."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return make[(handler.request_streaming, handler.response_streaming)](_refuse)


def server_credentials(creds: ClusterCredentials) -> Optional[grpc.ServerCredentials]:
    """TLS credentials for a worker's port, or None to serve plain TCP."""
    if not creds.tls:
        return None
    return grpc.ssl_server_credentials([(_read(creds.tls_key), _read(creds.tls_cert))])


# ---------------------------------------------------------------- head side


def _with_secret(details: grpc.aio.ClientCallDetails, metadata) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*(details.metadata or ()), *metadata),
        details.credentials,
        details.wait_for_ready,
    )


# Interceptors, not call credentials: gRPC sends call credentials only over a
# secure channel, and plain TCP on loopback must work too. One class per call
# kind: an aio channel files each interceptor under the first kind it matches.
# The Worker service has only these two kinds; a call of another kind would go
# without the secret and be refused.


class _SecretOnUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_secret(client_call_details, self._metadata), request)


class _SecretOnStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_secret(client_call_details, self._metadata), request_iterator)


def channel(address: str, creds: ClusterCredentials, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """An aio channel to a worker whose every call carries the secret; over TLS
    (the worker's certificate checked against creds.tls_ca) when creds has TLS."""
    interceptors = [_SecretOnUnary(creds.call_metadata), _SecretOnStream(creds.call_metadata)]
    if not creds.tls:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    options = list(options)
    if creds.tls_server_name:
        options.append(("grpc.ssl_target_name_override", creds.tls_server_name))
    root = _read(creds.tls_ca) if creds.tls_ca else None  # None: the system's trust store
    return grpc.aio.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=root), options=options, interceptors=interceptors
    )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
