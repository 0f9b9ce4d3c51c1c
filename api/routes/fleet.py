"""``GET /v1/fleet``: devices, their latest receipts, and how far each revocation spread."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import views
from . import _common as c


async def get_fleet(request: Request) -> Response:
    """Every device grant with its latest receipt; per revocation, applied/total and the stragglers."""
    svc = c.service(request)
    max_revs = c.query_int(request, "revocations", 50, lo=0, hi=10_000)
    max_stragglers = c.query_int(request, "stragglers", 100, lo=0, hi=100_000)
    return c.json_response(
        views.fleet(svc.state, svc.receipts, max_revocations=max_revs, max_stragglers=max_stragglers)
    )


ROUTES = [Route("/v1/fleet", get_fleet, methods=["GET"])]
