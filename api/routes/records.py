"""``POST /v1/records`` (append) and ``GET /v1/records`` (read back, verbatim)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger import encoding
from ledger.errors import HttpProblem, NotCanonical

from ..problems import Problem, bad_request
from . import _common as c


def _announced_count(body: bytes) -> int | None:
    """The element count a MessagePack array header announces (None: not an array)."""
    if not body:
        return None
    b = body[0]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F
    if b == 0xDC and len(body) >= 3:
        return int.from_bytes(body[1:3], "big")
    if b == 0xDD and len(body) >= 5:
        return int.from_bytes(body[1:5], "big")
    return None


async def post_records(request: Request) -> Response:
    """Append 1..1000 records, all or nothing, durably before the reply."""
    svc = c.service(request)
    conf = c.config(request)
    lim = conf.limits
    c.rate_limit(request, request.app.state.write_buckets)
    c.require_msgpack(request)
    body = await c.read_body(request, lim.max_body, lim.request_timeout)
    count = _announced_count(body)
    if count is not None and count > lim.max_batch:
        raise Problem(
            HttpProblem.PAYLOAD_TOO_LARGE,
            413,
            f"{count} records in one request; the limit is {lim.max_batch}",
            limit=lim.max_batch,
        )
    raws = encoding.unpack_records(body, max_count=lim.max_batch, error=NotCanonical)
    if not raws:
        raise bad_request("the body is an empty array: send 1 to 1000 records")
    try:
        async with asyncio.timeout(lim.request_timeout):  # no task of its own, unlike wait_for
            result = await svc.submit(raws)
    except TimeoutError:
        raise Problem(
            HttpProblem.OVERLOADED,
            503,
            "the append is still queued; it may yet commit: check the head before retrying",
        ) from None
    return c.json_response(result.to_json())


async def get_records(request: Request) -> Response:
    """Record bytes ``start .. start+limit-1`` as a MessagePack array of ``bin``."""
    svc = c.service(request)
    lim = c.config(request).limits
    start = c.query_int(request, "start", 0)
    limit = c.query_int(request, "limit", lim.max_page, lo=1, hi=lim.max_page)
    raws = await svc.read_records(start, start + limit) if start < svc.size else []
    return Response(encoding.pack_records(raws), media_type=c.MSGPACK, headers={"Cache-Control": "no-cache"})


ROUTES = [
    Route("/v1/records", post_records, methods=["POST"]),
    Route("/v1/records", get_records, methods=["GET"]),
]
