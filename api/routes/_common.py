"""Helpers shared by the route modules."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ledger.errors import HttpProblem

from ..config import ServerConfig
from ..problems import Problem, bad_request
from ..ratelimit import TokenBuckets
from ..service import LedgerService

MSGPACK = "application/msgpack"
_MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
U64_MAX = (1 << 64) - 1


def service(request: Request) -> LedgerService:
    svc = getattr(request.app.state, "service", None)
    if not isinstance(svc, LedgerService):
        raise Problem(
            HttpProblem.OVERLOADED, 503, "the ledger is not loaded yet", headers={"Retry-After": "1"}
        )
    return svc


def config(request: Request) -> ServerConfig:
    c = request.app.state.config
    assert isinstance(c, ServerConfig)
    return c


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def query_int(
    request: Request, name: str, default: int | None = None, *, lo: int = 0, hi: int = U64_MAX
) -> int:
    """A decimal query parameter in ``lo..hi``, or ``400 bad-request``."""
    values = request.query_params.getlist(name)
    if not values:
        if default is None:
            raise bad_request(f"query parameter {name!r} is required")
        return default
    if len(values) > 1:
        raise bad_request(f"query parameter {name!r} is given more than once")
    text = values[0]
    if not text.isascii() or not text.isdigit() or len(text) > 20 or (len(text) > 1 and text[0] == "0"):
        raise bad_request(f"query parameter {name!r} must be a decimal integer")
    value = int(text)
    if not lo <= value <= hi:
        raise bad_request(f"query parameter {name!r} must be in {lo}..{hi}")
    return value


def query_str(request: Request, name: str, *, max_len: int = 256) -> str | None:
    values = request.query_params.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise bad_request(f"query parameter {name!r} is given more than once")
    if len(values[0]) > max_len:
        raise bad_request(f"query parameter {name!r} is too long")
    return values[0]


def require_msgpack(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media not in _MSGPACK_TYPES:
        raise Problem(
            HttpProblem.UNSUPPORTED_MEDIA_TYPE,
            415,
            f"the body must be {MSGPACK}, not {media or 'unspecified'!r}",
        )


def rate_limit(request: Request, buckets: TokenBuckets) -> None:
    host = request.client.host if request.client is not None else "unknown"
    take_or_429(buckets, host, f"too many requests from {host}")


def take_or_429(buckets: TokenBuckets, key: str, what: str) -> None:
    """A token from ``key``'s bucket, or ``429 rate-limited`` with ``Retry-After``."""
    wait = buckets.take(key)
    if wait > 0:
        retry = TokenBuckets.retry_after(wait)
        raise Problem(
            HttpProblem.RATE_LIMITED, 429, f"{what}; retry in {retry} s", headers={"Retry-After": retry}
        )


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it when announced)."""
    announced = request.headers.get("content-length")
    if announced is not None:
        if not announced.isascii() or not announced.isdigit():
            raise bad_request("bad Content-Length")
        if int(announced) > limit:
            raise Problem(
                HttpProblem.PAYLOAD_TOO_LARGE, 413, f"the body is larger than {limit} bytes", limit=limit
            )
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise Problem(
                        HttpProblem.PAYLOAD_TOO_LARGE,
                        413,
                        f"the body is larger than {limit} bytes",
                        limit=limit,
                    )
    except TimeoutError:
        raise Problem(HttpProblem.REQUEST_TIMEOUT, 408, "the body did not arrive in time") from None
    except ClientDisconnect:
        raise bad_request("the client went away") from None
    return bytes(buf)
