"""OpenAI-shaped errors: the exception type, FastAPI handlers and a body-size limit.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` with the
status OpenAI would use, including FastAPI's own validation errors (400 here, not 422).
"""
from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "server_overloaded",
}
_JSON_ERROR = "could not parse the request body as JSON"
_INTERNAL_ERROR = "internal server error; the server log has the details"
# Location entries pydantic adds for union members ("str", "list[int]", "function-after[...]").
_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}
_BODY_SHAPE_ERRORS = {"missing", "model_attributes_type", "dict_type", "model_type"}


def error_type_for(status_code: int) -> str:
    if status_code in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status_code]
    return "internal_error" if status_code >= 500 else "invalid_request_error"


def error_body(message: str, type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIError(Exception):
    """An error to send to the client as an OpenAI error object."""

    def __init__(self, status_code: int, message: str, type: str | None = None,
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or error_type_for(status_code)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def not_found_model(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{name}` does not exist; GET /v1/models lists the served models.",
                       param="model", code="model_not_found")


def unauthorized(message: str = "missing or invalid API key") -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key")


def overloaded(message: str, status_code: int = 503, retry_after_s: float | None = None) -> OpenAIError:
    """429 (this client sends too much) or 503 (the server is full); both may carry Retry-After."""
    if status_code not in (429, 503):
        raise ValueError(f"overloaded() takes status 429 or 503, got {status_code}")
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    return OpenAIError(status_code, message, headers=headers)


def payload_too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"request body exceeds the {max_bytes}-byte limit; send a smaller request",
                       code="payload_too_large")


def internal_error(message: str = _INTERNAL_ERROR) -> OpenAIError:
    return OpenAIError(500, message)


# ---- validation errors -> one readable message ----

def _param_path(loc: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part.startswith("function-") or part in _UNION_TAGS:
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def _error_message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for a list of pydantic errors: the first one, and how many more."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _param_path(first.get("loc", ()))
    msg = _error_message(first)
    if param is not None:
        message = f"{param}: {msg}"
    elif first.get("type") in _BODY_SHAPE_ERRORS:
        if isinstance(first.get("input"), (bytes, str)):
            message = "the request body must be a JSON object sent with Content-Type: application/json"
        else:
            message = f"request body: {msg}"
    else:
        message = msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


# ---- FastAPI handlers ----

async def _handle_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return exc.to_response()


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    json_error = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if json_error is not None:
        detail = (json_error.get("ctx") or {}).get("error")
        return bad_request(f"{_JSON_ERROR} ({detail})" if detail else _JSON_ERROR).to_response()
    message, param = describe_validation_errors(errors)
    return bad_request(message, param=param).to_response()


async def _handle_json_error(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return bad_request(f"{_JSON_ERROR} ({exc.msg} at position {exc.pos})").to_response()


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, BodyTooLargeError):
        return payload_too_large(exc.max_bytes).to_response()
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if message == HTTPStatus(status).phrase:  # starlette's own 404/405: say which route
        if status == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed for {request.url.path}"
    err = OpenAIError(status, message, headers=dict(exc.headers) if exc.headers else None)
    return err.to_response()


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return internal_error().to_response()


def install_error_handlers(app: FastAPI) -> None:
    """Make every error `app` sends an OpenAI error object.

    The catch-all runs in Starlette's ServerErrorMiddleware, which re-raises after
    responding: servers log the exception once more and TestClient needs
    `raise_server_exceptions=False` to see the 500.
    """
    app.add_exception_handler(OpenAIError, _handle_openai_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(json.JSONDecodeError, _handle_json_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)


# ---- body size limit ----

class BodyTooLargeError(StarletteHTTPException):
    """Raised from `receive` once a streamed body passes the limit.

    An HTTPException so FastAPI's body parsing re-raises it unchanged (it turns other
    errors into a 400) and `install_error_handlers` renders it as a 413.
    """

    def __init__(self, max_bytes: int):
        super().__init__(413, payload_too_large(max_bytes).message)
        self.max_bytes = max_bytes


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over `max_bytes`.

    A declared Content-Length over the limit is refused before the body is read; a
    chunked body is counted as it streams and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await payload_too_large(self.max_bytes).to_response()(scope, receive, send)
            return

        num_received = 0
        is_response_started = False

        async def limited_receive() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal is_response_started
            if message["type"] == "http.response.start":
                is_response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            if is_response_started:
                raise
            await payload_too_large(self.max_bytes).to_response()(scope, receive, send)
