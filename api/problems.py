"""Every error the server answers with, as RFC 9457 ``application/problem+json``.

One table: a :class:`~ledger.errors.WritError` becomes a problem whose
``type`` is ``urn:writ:problem:<exc.type>`` and whose status is
``exc.http_status``; the HTTP-level refusals that are not protocol errors are
:class:`Problem`, named by a member of :class:`ledger.errors.HttpProblem`
(``bad-request``, ``unsupported-media-type``, ``rate-limited``,
``not-found``, ``overloaded``, ``shutting-down``, ...).
Anything else is a bug: ``500 internal`` with no traceback text in the body
(the traceback goes to the log).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ledger.errors import HttpProblem, StaleHead, StorageError, TimeInFuture, WritError

from .metrics import Metrics

log = logging.getLogger("writ.api")

PROBLEM_PREFIX = "urn:writ:problem:"
PROBLEM_JSON = "application/problem+json"

#: HTTP status -> problem name, for Starlette's own HTTPExceptions.
_HTTP_NAMES: dict[int, HttpProblem] = {
    400: HttpProblem.BAD_REQUEST,
    404: HttpProblem.NOT_FOUND,
    405: HttpProblem.METHOD_NOT_ALLOWED,
    408: HttpProblem.REQUEST_TIMEOUT,
    413: HttpProblem.PAYLOAD_TOO_LARGE,
    415: HttpProblem.UNSUPPORTED_MEDIA_TYPE,
    429: HttpProblem.RATE_LIMITED,
    503: HttpProblem.OVERLOADED,
}

#: titles of the HTTP-level problems (every member has one) and of some protocol errors.
TITLES: dict[str, str] = {
    HttpProblem.BAD_REQUEST: "Bad request",
    HttpProblem.NOT_FOUND: "Not found",
    HttpProblem.METHOD_NOT_ALLOWED: "Method not allowed",
    HttpProblem.UNSUPPORTED_MEDIA_TYPE: "Unsupported media type",
    HttpProblem.PAYLOAD_TOO_LARGE: "Payload too large",
    HttpProblem.RATE_LIMITED: "Too many requests",
    HttpProblem.OVERLOADED: "Server overloaded",
    HttpProblem.REQUEST_TIMEOUT: "Request timeout",
    HttpProblem.SHUTTING_DOWN: "Server shutting down",
    HttpProblem.UNAVAILABLE: "Server unavailable",
    HttpProblem.INTERNAL: "Internal server error",
    StaleHead.type: "Stale head: the ledger has moved on",
    StorageError.type: "Storage failure: nothing was appended",
    TimeInFuture.type: "Record time is ahead of the server clock",
}


class Problem(Exception):
    """An HTTP-level refusal (not a protocol error of :mod:`ledger.errors`)."""

    def __init__(
        self,
        name: HttpProblem,
        status: int,
        detail: str = "",
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or name)
        self.name = name
        self.status = status
        self.detail = detail or TITLES.get(name, name)
        self.headers = dict(headers or {})
        self.extra = extra


def bad_request(detail: str) -> Problem:
    return Problem(HttpProblem.BAD_REQUEST, 400, detail)


def title_of(name: str) -> str:
    return TITLES.get(name, name.replace("-", " ").capitalize())


def problem_body(
    name: str, status: int, detail: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_PREFIX + name,
        "title": title_of(name),
        "status": status,
        "detail": detail,
    }
    for k, v in (extra or {}).items():
        if k not in body and _jsonable(v):
            body[k] = v
    return body


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def problem_response(
    name: str,
    status: int,
    detail: str,
    *,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = json.dumps(problem_body(name, status, detail, extra)).encode()
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=dict(headers or {}))


def status_of(exc: WritError) -> int:
    status = exc.http_status
    return status if 400 <= status <= 599 else 400


def from_writ_error(exc: WritError) -> Response:
    return problem_response(exc.type, status_of(exc), exc.message, extra=exc.detail)


def _metrics(request: Request) -> Metrics | None:
    m = getattr(request.app.state, "metrics", None)
    return m if isinstance(m, Metrics) else None


def _count(request: Request, name: str) -> None:
    m = _metrics(request)
    if m is not None:
        m.rejections.labels(type=name).inc()


async def writ_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WritError)
    _count(request, exc.type)
    return from_writ_error(exc)


async def problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    _count(request, exc.name)
    return problem_response(exc.name, exc.status, exc.detail, extra=exc.extra, headers=exc.headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    name = _HTTP_NAMES.get(
        exc.status_code, HttpProblem.BAD_REQUEST if exc.status_code < 500 else HttpProblem.INTERNAL
    )
    _count(request, name)
    detail = exc.detail if isinstance(exc.detail, str) else title_of(name)
    return problem_response(name, exc.status_code, detail, headers=exc.headers)


EXCEPTION_HANDLERS = {
    WritError: writ_error_handler,
    Problem: problem_handler,
    HTTPException: http_exception_handler,
}


class InternalErrorMiddleware:
    """The outermost layer: an exception no handler took becomes ``500 internal``
    (traceback logged, never sent), and is not re-raised to the server."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if self.metrics is not None:
                self.metrics.rejections.labels(type=HttpProblem.INTERNAL).inc()
            if started:
                return  # the response is under way: nothing more we can say
            resp = problem_response(HttpProblem.INTERNAL, 500, "internal server error (see the server log)")
            await resp(scope, receive, send)
