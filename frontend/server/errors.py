"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal in the server is an :class:`APIError`; the app turns it into this shape with the
matching HTTP status. ``code`` repeats the HTTP status (as vLLM does) and ``param`` names the
offending request field where one is to blame, so a client can tell *which* value was wrong.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import msgspec
from starlette.responses import Response

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}

# msgspec's messages end with "- at `$.path`" (or "- at `key` in `$.path`" for dict keys).
_MSGSPEC_PATH = re.compile(r"at `(?:key` in `)?\$\.?([^`]*)`")
_MSGSPEC_FIELD = re.compile(r"(?:unknown|required) field `([^`]+)`")
_LEADING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ErrorInfo(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorInfo


class APIError(Exception):
    """A request refused with an HTTP status and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> ErrorResponse:
        error_type = _TYPES.get(
            self.status, "BadRequestError" if self.status < 500 else "InternalServerError"
        )
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=error_type, param=self.param, code=self.status)
        )

    def to_response(self) -> Response:
        return Response(msgspec.json.encode(self.body()), self.status, media_type="application/json")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def from_value_error(exc: ValueError, fields: Iterable[str] = ()) -> APIError:
    """A 400 from a ValueError raised by validation (SamplingParams, the processor, chat messages).

    Those messages start with the field they are about ("temperature must be ...",
    "messages[0].role must be ..."); when that name is a request field it becomes ``param``.
    """
    message = str(exc) or type(exc).__name__
    first = message.split(" ", 1)[0]
    match = _LEADING_NAME.match(first)
    param = first.rstrip(".,:") if match is not None and match.group(0) in set(fields) else None
    return APIError(400, message, param)


def from_decode_error(exc: msgspec.DecodeError) -> APIError:
    """A 400 for a body msgspec could not decode: malformed JSON, a wrong type, a missing or
    unknown field. The JSON path msgspec reports becomes ``param``."""
    message = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return APIError(400, f"The request body is not valid JSON: {message}")
    param = None
    path = _MSGSPEC_PATH.search(message)
    if path is not None and path.group(1):
        param = path.group(1)
    field = _MSGSPEC_FIELD.search(message)
    if field is not None:
        param = f"{param}.{field.group(1)}" if param else field.group(1)
    if message.startswith("Object contains unknown field"):
        message = f"{message}: this server does not support that parameter"
    return APIError(400, f"Invalid request: {message}", param)
