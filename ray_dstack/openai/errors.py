"""OpenAI-shaped errors: one exception type, and the one place where failures become status codes.

Every failure the gateway can meet (a bad request body, a template that does not render, an upstream that
is down, slow, or answers garbage, a TGI error payload) ends up as an `OpenAIError`, whose `to_body()` is
OpenAI's `{"error": {"message", "type", "param", "code"}}`. `to_openai_error(exc)` is the mapping table:

| exception                                              | status | type / code                        |
|--------------------------------------------------------|--------|------------------------------------|
| `OpenAIError`                                          | itself | itself                             |
| `pydantic.ValidationError`                             | 400    | invalid_request_error, param=path  |
| `json.JSONDecodeError` / `UnicodeDecodeError`          | 400    | invalid_request_error              |
| `templates.TemplateError`                              | 400    | invalid_request_error / template_error |
| `text_generation.errors.ValidationError`/`BadRequestError` | 400 | invalid_request_error              |
| `text_generation.errors.NotFoundError`                 | 404    | not_found_error                    |
| `text_generation.errors.OverloadedError`/`RateLimitExceededError` | 429 | rate_limit_error / overloaded |
| `text_generation.errors.GenerationError`/`IncompleteGenerationError`/`UnknownError` | 502 | upstream_error |
| `text_generation.errors.ShardNotReadyError`            | 503    | upstream_unavailable               |
| `text_generation.errors.ShardTimeoutError`             | 504    | upstream_timeout                   |
| `httpx.ConnectError` / `httpx.ConnectTimeout` / `httpx.PoolTimeout` | 503 | upstream_unavailable  |
| `httpx.TimeoutException` (read/write)                  | 504    | upstream_timeout                   |
| `httpx.NetworkError` / `httpx.RemoteProtocolError` (reset, closed) | 502 | upstream_disconnected   |
| any other `httpx.HTTPError`                            | 502    | upstream_error                     |

`retryable(status, body)` says which answers the `/v1` gateway may retry on another replica when nothing
reached the client yet: 503 (the backend is unavailable) and 502 `upstream_disconnected` (it reset or closed
the connection before answering), never a backend's own 502 about a bad answer (that would fail again).
| anything else                                          | 500    | server_error                       |
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pydantic
from text_generation import errors as tgi_errors

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
PERMISSION = "permission_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UPSTREAM_ERROR = "upstream_error"
UPSTREAM_DISCONNECTED = "upstream_disconnected"  # the `code` of a 502 whose backend reset/closed the connection


class OpenAIError(Exception):
    """An error answered to the client as `{"error": {...}}` with `status_code`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = INVALID_REQUEST,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_body()).encode()

    def __repr__(self) -> str:
        return f"OpenAIError({self.status_code}, {self.message!r}, type={self.type!r}, param={self.param!r}, code={self.code!r})"


# --- helpers -------------------------------------------------------------------------------------------


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, INVALID_REQUEST, param, code)


def unauthorized(message: str = "Missing or invalid bearer token (Authorization: Bearer <token>).") -> OpenAIError:
    return OpenAIError(401, message, AUTHENTICATION, None, "invalid_api_key")


def model_not_found(model: str | None) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", INVALID_REQUEST, "model", "model_not_found")


def not_found(message: str) -> OpenAIError:
    return OpenAIError(404, message, NOT_FOUND, None, "not_found")


def path_not_allowed(path: str) -> OpenAIError:
    """dstack's answer for a path a router service does not publish (its admin API, `/health`, ...)."""
    return OpenAIError(403, f"Path is not allowed for this service: {path}", PERMISSION, None, "path_not_allowed")


def method_not_allowed(method: str, path: str) -> OpenAIError:
    return OpenAIError(405, f"Method {method} is not allowed on {path}.", INVALID_REQUEST, None, "method_not_allowed")


def upstream_bad_response(message: str) -> OpenAIError:
    return OpenAIError(502, message, UPSTREAM_ERROR, None, "upstream_error")


def upstream_unavailable(message: str = "The model backend is unavailable.") -> OpenAIError:
    return OpenAIError(503, message, UPSTREAM_ERROR, None, "upstream_unavailable")


def upstream_timeout(message: str = "The model backend did not answer in time.") -> OpenAIError:
    return OpenAIError(504, message, UPSTREAM_ERROR, None, "upstream_timeout")


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    # pydantic adds union-member / function-validator tags to `loc` ("str", "list[...]", "function-after[...]");
    # keep only the parts that name a field or an index in the client's JSON.
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif isinstance(item, str) and not any(c in item for c in "[]()-") and item not in {"str", "int", "float", "bool", "list", "dict", "none"}:
            parts.append(item)
    return ".".join(parts)


def from_validation_error(exc: pydantic.ValidationError, status_code: int = 400) -> OpenAIError:
    """A pydantic error → 400 naming the first offending field path (`messages.0.role`)."""
    errs = exc.errors(include_url=False)
    if not errs:
        return invalid_request(str(exc))
    messages = []
    first_param = None
    for err in errs:
        param = _loc_to_param(tuple(err.get("loc", ())))
        if first_param is None:
            first_param = param or None
        msg = err.get("msg", "invalid value")
        messages.append(f"{param}: {msg}" if param else msg)
    # Unions produce one error per member; keep the message short and de-duplicated.
    seen: list[str] = []
    for m in messages:
        if m not in seen:
            seen.append(m)
    return OpenAIError(status_code, "Invalid request: " + "; ".join(seen[:5]), INVALID_REQUEST, first_param, "invalid_value")


_TGI_MAP: list[tuple[type[BaseException], int, str, str]] = [
    (tgi_errors.ValidationError, 400, INVALID_REQUEST, "invalid_value"),
    (tgi_errors.BadRequestError, 400, INVALID_REQUEST, "invalid_value"),
    (tgi_errors.NotFoundError, 404, NOT_FOUND, "not_found"),
    (tgi_errors.OverloadedError, 429, RATE_LIMIT, "overloaded"),
    (tgi_errors.RateLimitExceededError, 429, RATE_LIMIT, "rate_limit_exceeded"),
    (tgi_errors.GenerationError, 502, UPSTREAM_ERROR, "generation_error"),
    (tgi_errors.IncompleteGenerationError, 502, UPSTREAM_ERROR, "incomplete_generation"),
    (tgi_errors.ShardNotReadyError, 503, UPSTREAM_ERROR, "upstream_unavailable"),
    (tgi_errors.ShardTimeoutError, 504, UPSTREAM_ERROR, "upstream_timeout"),
    (tgi_errors.UnknownError, 502, UPSTREAM_ERROR, "upstream_error"),
]


def _template_error_type() -> type[BaseException] | None:
    try:
        from ray_dstack.openai.templates import TemplateError
    except Exception:  # the module is written separately; absent → nothing to match
        return None
    return TemplateError


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map any exception to the `OpenAIError` the client sees (see the module docstring's table)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return invalid_request(f"We could not parse the JSON body of your request: {exc}", code="invalid_json")
    template_error = _template_error_type()
    if template_error is not None and isinstance(exc, template_error):
        return invalid_request(f"Chat template error: {exc}", param="messages", code="template_error")
    for cls, status, type_, code in _TGI_MAP:
        if isinstance(exc, cls):
            return OpenAIError(status, str(exc) or cls.__name__, type_, None, code)
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return upstream_unavailable(f"The model backend is unavailable: {type(exc).__name__}: {exc}".rstrip(": "))
    if isinstance(exc, httpx.TimeoutException):
        return upstream_timeout(f"The model backend did not answer in time ({type(exc).__name__}).")
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
        return OpenAIError(502, f"Bad response from the model backend (connection closed): {type(exc).__name__}: {exc}".rstrip(": "),
                           UPSTREAM_ERROR, None, UPSTREAM_DISCONNECTED)
    if isinstance(exc, httpx.HTTPError):
        return upstream_bad_response(f"Bad response from the model backend: {type(exc).__name__}: {exc}".rstrip(": "))
    return OpenAIError(500, f"Internal error: {type(exc).__name__}: {exc}", SERVER_ERROR, None, "internal_error")


def from_upstream_status(status_code: int, body: bytes) -> OpenAIError:
    """An upstream (OpenAI-format) non-2xx answer → `OpenAIError`, keeping its message.

    4xx keep their status (the client's request was at fault); 5xx become 502 (the backend failed).
    """
    message = None
    type_ = INVALID_REQUEST if 400 <= status_code < 500 else UPSTREAM_ERROR
    param = code = None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(err, dict):
            message = err.get("message") or json.dumps(err)
            type_ = err.get("type") or type_
            param = err.get("param")
            code = err.get("code")
        elif err is not None:
            message = err if isinstance(err, str) else json.dumps(err)
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = text[:2000] or f"Upstream answered HTTP {status_code}"
    status = status_code if 400 <= status_code < 500 else (503 if status_code == 503 else 502)
    return OpenAIError(status, message, type_, param, code if code is None or isinstance(code, str) else str(code))


def retryable(status: int, body: bytes) -> bool:
    """Whether an error answer means "this replica could not serve it, another may" (see the module docstring)."""
    if status == 503:
        return True
    if status != 502:
        return False
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    err = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(err, dict) and err.get("code") == UPSTREAM_DISCONNECTED


def is_openai_error_body(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict) and "message" in payload["error"]


def sse_error_event(exc: BaseException) -> bytes:
    """`data: {"error": {...}}\\n\\n` — the last event of a stream that failed after it started."""
    err = to_openai_error(exc)
    return b"data: " + err.to_json_bytes() + b"\n\n"
