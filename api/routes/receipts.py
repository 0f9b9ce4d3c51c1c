"""``POST /v1/receipts``: a device's signed statement of the head it applied."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger.messages import MAX_MESSAGE

from . import _common as c


async def post_receipt(request: Request) -> Response:
    """Accept a receipt (docs/protocol.md, "Receipts") from an unrevoked device grant for a head
    of this ledger."""
    svc = c.service(request)
    lim = c.config(request).limits
    c.rate_limit(request, request.app.state.receipt_buckets)
    c.require_msgpack(request)
    body = await c.read_body(request, MAX_MESSAGE, lim.request_timeout)
    return c.json_response(await svc.accept_receipt(body))


ROUTES = [Route("/v1/receipts", post_receipt, methods=["POST"])]
