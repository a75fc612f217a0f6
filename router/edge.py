"""The HTTP edge: who may call, and how much they may send, before any route runs.

One pure-ASGI middleware (streaming and disconnects pass through untouched)
does, for every request, in this order:

1. x-request-id: longer than MAX_REQUEST_ID_BYTES is a 400; otherwise it is
   echoed on the response (any bytes; only its printable-ASCII form is used
   elsewhere, and never on the wire to workers).
2. API keys: when the operator set any, every route but /health (and /metrics
   and /health/replicas when made public) needs `Authorization: Bearer KEY`.
   The key is compared in constant time against every configured key; a
   missing or wrong key is a 401. The matching key's settings (may it set
   priority, its prefix-cache salt) travel to the route in the ASGI scope.
3. Bodies: a body whose Content-Type is not JSON is a 415; one over
   max_body_bytes is a 413, refused from Content-Length before a byte is read,
   or while a chunked body streams in, before it is ever parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from folio.router.errors import ApiError
from folio.router.limits import MAX_REQUEST_ID_BYTES

REQUEST_ID_HEADER = b"x-request-id"
SCOPE_KEY = "folio.api_key"
ALWAYS_PUBLIC = frozenset({"/health"})
OPERATOR_PATHS = frozenset({"/metrics", "/health/replicas"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiKey:
    """One client credential and what it may do."""

    key: str
    name: str = ""  # for logs; never the key itself
    allow_priority: bool = False  # its requests' `priority` is honoured
    cache_salt: Optional[str] = None  # its prefix-cache entries are kept apart from others'

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.key.encode()).digest()


@dataclass(frozen=True)
class AccessConfig:
    """Who may call: what the operator sets (folio serve flags)."""

    api_keys: tuple[str, ...] = field(
        default=(),
        metadata={"help": "require 'Authorization: Bearer KEY' (repeatable; also FOLIO_API_KEY)", "flag": "--api-key"},
    )
    api_key_file: Optional[str] = field(
        default=None,
        metadata={
            "help": 'keys, one per line, or a JSON list of {"key", "name", "allow_priority", "cache_salt"} objects'
        },
    )
    no_api_key: bool = field(
        default=False, metadata={"help": "serve beyond loopback without API keys (a proxy in front authenticates)"}
    )
    prefix_cache_per_key: bool = field(
        default=False, metadata={"help": "keep each API key's prefix-cache entries apart from every other key's"}
    )
    public_metrics: bool = field(default=False, metadata={"help": "serve /metrics and /health/replicas without a key"})
    enable_priority: bool = field(
        default=False,
        metadata={
            "help": "honour the request field `priority` from every client (default: only keys with allow_priority)"
        },
    )


@dataclass(frozen=True)
class AccessPolicy:
    """The keys (none: open) and the operator's access settings."""

    keys: tuple[ApiKey, ...] = ()
    config: AccessConfig = field(default_factory=AccessConfig)
    _digests: tuple[bytes, ...] = field(default=(), init=False, repr=False, compare=False)

    @property
    def public_metrics(self) -> bool:
        return self.config.public_metrics

    @property
    def enable_priority(self) -> bool:
        return self.config.enable_priority

    def __post_init__(self) -> None:
        object.__setattr__(self, "_digests", tuple(k.digest for k in self.keys))

    def match(self, presented: Optional[str]) -> Optional[ApiKey]:
        """The key that `presented` is, comparing against every key (no early exit)."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key, d in zip(self.keys, self._digests):
            if hmac.compare_digest(digest, d):
                found = key
        return found

    def honours_priority(self, key: Optional[ApiKey]) -> bool:
        return self.enable_priority or (key is not None and key.allow_priority)


def load_api_keys(
    keys: list[str], key_file: Optional[str] = None, env: str = "FOLIO_API_KEY", salt_per_key: bool = False
) -> tuple[ApiKey, ...]:
    """Keys from --api-key (repeatable), the FOLIO_API_KEY variable and --api-key-file.

    The file holds either one key per line, or JSON: a list of {"key": ..., "name": ...,
    "allow_priority": bool, "cache_salt": str}. With salt_per_key, every key without
    its own cache_salt gets one, so no tenant's prompts can hit another's prefix cache.
    """
    out = [ApiKey(k, name=f"key{i}") for i, k in enumerate(keys)]
    if os.environ.get(env):
        out.append(ApiKey(os.environ[env].strip(), name="env"))
    if key_file:
        with open(key_file) as f:
            text = f.read()
        if not text.lstrip().startswith(("[", "{")):
            out.extend(
                ApiKey(line.strip(), name=f"file{i}") for i, line in enumerate(text.splitlines()) if line.strip()
            )
            text = "[]"
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ValueError(f"{key_file}: expected a JSON list of key objects")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not e["key"]:
                raise ValueError(f"{key_file}: entry {i} needs a non-empty string 'key'")
            salt = e.get("cache_salt")
            if salt is not None and not (isinstance(salt, str) and salt):
                raise ValueError(f"{key_file}: entry {i}: cache_salt must be a non-empty string")
            out.append(
                ApiKey(
                    e["key"],
                    name=str(e.get("name", f"file{i}")),
                    allow_priority=e.get("allow_priority") is True,
                    cache_salt=salt,
                )
            )
    for k in out:  # what a Bearer header can carry
        if not k.key or not (k.key.isascii() and k.key.isprintable()) or " " in k.key:
            raise ValueError(f"API key {k.name!r} must be non-empty printable ASCII without spaces")
    if salt_per_key:
        out = [
            k if k.cache_salt else ApiKey(k.key, k.name, k.allow_priority, cache_salt=f"key:{k.digest.hex()[:32]}")
            for k in out
        ]
    return tuple(out)


def access_policy(config: AccessConfig, host: str) -> AccessPolicy:
    """The keys and rules for serving on host. Listening beyond loopback without a key is
    refused unless the operator says so (no_api_key: an authenticating proxy in front)."""
    keys = load_api_keys(list(config.api_keys), config.api_key_file, salt_per_key=config.prefix_cache_per_key)
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        if not config.no_api_key:
            raise ValueError(
                f"folio serve: --host {host} is reachable from other machines; set "
                "an API key (--api-key, FOLIO_API_KEY or --api-key-file), or pass "
                "--no-api-key if a proxy in front authenticates clients"
            )
        log.warning("serving on %s without API keys (--no-api-key): anyone who reaches it can use it", host)
    return AccessPolicy(keys=keys, config=config)


class EdgeMiddleware:
    def __init__(self, app, policy: AccessPolicy, max_body_bytes: int):
        self.app = app
        self.policy = policy
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # later duplicates win; fine for these three
        request_id = headers.get(REQUEST_ID_HEADER)
        if request_id is not None and len(request_id) > MAX_REQUEST_ID_BYTES:
            return await _refuse(
                send,
                ApiError(
                    400, f"the x-request-id header is longer than {MAX_REQUEST_ID_BYTES} bytes", param="x-request-id"
                ),
            )
        if request_id is not None:
            send = _echoing(send, request_id)

        path = scope["path"]
        if (
            self.policy.keys
            and path not in ALWAYS_PUBLIC
            and not (self.policy.public_metrics and path in OPERATOR_PATHS)
        ):
            key = self.policy.match(_bearer(headers.get(b"authorization")))
            if key is None:
                return await _refuse(
                    send,
                    ApiError(
                        401,
                        "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
            scope[SCOPE_KEY] = key

        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype and ctype != b"application/json" and not ctype.endswith(b"+json"):
                return await _refuse(send, ApiError(415, "send the body as JSON with 'Content-Type: application/json'"))
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                return await _refuse(send, self._too_large())
            receive = self._bounded(receive)
        await self.app(scope, receive, send)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than {self.max_body_bytes} bytes "
            "(the operator sets this with --max-request-body)",
        )

    def _bounded(self, receive):
        """receive() that raises the 413 once the body passes the limit (chunked bodies too);
        the route reading the body turns it into the response."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._too_large()
            return message

        return wrapped


def _echoing(send, request_id: bytes):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message["headers"] = list(message.get("headers", [])) + [(REQUEST_ID_HEADER, request_id)]
        await send(message)

    return wrapped


def _bearer(value: Optional[bytes]) -> Optional[str]:
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _refuse(send, error: ApiError) -> None:
    body = error.json_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def request_key(scope) -> Optional[ApiKey]:
    """The API key the edge matched for this request (None when keys are off)."""
    return scope.get(SCOPE_KEY)
