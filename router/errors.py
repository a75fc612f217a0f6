"""Errors as the client sees them: OpenAI error objects, for every status.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Messages say what the client did wrong in its own terms. They never carry
exception text, addresses or anything else internal: that goes to the log.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

# The type OpenAI uses for each status folio answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error the client sees as an OpenAI error object with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer (for the OpenAPI schema)."""

    error: ErrorDetail


def invalid_body(e: ValidationError) -> ApiError:
    """A 400 naming the first fields that failed, without echoing the body back."""
    errors: list[Any] = e.errors(include_input=False, include_url=False)
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = next(err for err in errors if err.get("type") == "json_invalid")
        reason = str(detail.get("ctx", {}).get("error", "")) or "malformed"
        return ApiError(400, f"the request body is not valid JSON ({reason})")
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return ApiError(400, "; ".join(parts), param=param)
