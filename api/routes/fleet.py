"""``GET /v1/fleet`` and ``GET /v1/fleet/revocations/{seq}``: devices, their latest
receipts, and how far each revocation has spread.

Both are reports (rate-limited per client address, ``Limits.report_rate``) whose
cost is bounded by their page sizes, which are capped: at most
:data:`~api.fleet_report.MAX_DEVICES_PAGE` devices (``?limit=``, paged with ``?after=SEQ``,
the answer's ``next``), :data:`~api.fleet_report.MAX_REVOCATIONS` revocations with
:data:`~api.fleet_report.MAX_FLEET_STRAGGLERS` stragglers each; the per-revocation route
pages all of them, :data:`~api.fleet_report.MAX_STRAGGLERS` at a time, with its
``stragglers_next`` cursor. The counts come from the service's
:class:`~api.fleet_report.FleetIndex`, kept as records and receipts arrive.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger.errors import HttpProblem

from .. import fleet_report
from ..problems import Problem, bad_request
from ..service import LedgerService
from . import _common as c


def synced_index(svc: LedgerService) -> fleet_report.FleetIndex:
    """The service's fleet index, with the records appended since its last use folded in."""
    svc.fleet.sync(svc.state, svc.receipts)
    return svc.fleet


async def get_fleet(request: Request) -> Response:
    """One page of devices with their latest receipts; the newest revocations' spread."""
    c.rate_limit(request, request.app.state.report_buckets)
    svc = c.service(request)
    limit = c.query_int(
        request, "limit", fleet_report.MAX_DEVICES_PAGE, lo=1, hi=fleet_report.MAX_DEVICES_PAGE
    )
    after = c.query_int(request, "after", -1, lo=0) if "after" in request.query_params else None
    max_revs = c.query_int(request, "revocations", 50, lo=0, hi=fleet_report.MAX_REVOCATIONS)
    max_stragglers = c.query_int(
        request, "stragglers", fleet_report.MAX_FLEET_STRAGGLERS, lo=0, hi=fleet_report.MAX_FLEET_STRAGGLERS
    )
    index = synced_index(svc)
    return c.json_response(
        fleet_report.fleet(
            svc.state,
            svc.receipts,
            index,
            limit=limit,
            after=after,
            max_revocations=max_revs,
            max_stragglers=max_stragglers,
        )
    )


async def get_revocation_spread(request: Request) -> Response:
    """One revocation's spread with a page of its stragglers (``?after=`` the previous page's cursor)."""
    c.rate_limit(request, request.app.state.report_buckets)
    svc = c.service(request)
    text = request.path_params["seq"]
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise bad_request("the revocation is named by its seq (a decimal integer)")
    max_stragglers = c.query_int(
        request, "stragglers", fleet_report.MAX_STRAGGLERS, lo=1, hi=fleet_report.MAX_STRAGGLERS
    )
    cursor = c.query_str(request, "after", max_len=42)
    after = None
    if cursor is not None:
        after = fleet_report.parse_straggler_cursor(cursor)
        if after is None:
            raise bad_request("after is the stragglers_next cursor of the previous page")
    index = synced_index(svc)
    rev = index.revocation(int(text))
    if rev is None:
        raise Problem(HttpProblem.NOT_FOUND, 404, f"no revocation at seq {text}")
    return c.json_response(
        fleet_report.revocation_spread(
            svc.state, svc.receipts, index, rev, max_stragglers=max_stragglers, after=after
        )
    )


ROUTES = [
    Route("/v1/fleet", get_fleet, methods=["GET"]),
    Route("/v1/fleet/revocations/{seq}", get_revocation_spread, methods=["GET"]),
]
