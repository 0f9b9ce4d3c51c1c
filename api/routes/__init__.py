"""The server's routes, one module per concern (see docs/protocol.md, "HTTP")."""

from __future__ import annotations

from starlette.routing import BaseRoute

from . import credentials, dashboard, events, fleet, meta, proofs, receipts, records, tiles

ROUTES: list[BaseRoute] = [
    *tiles.ROUTES,
    *records.ROUTES,
    *events.ROUTES,
    *receipts.ROUTES,
    *credentials.ROUTES,
    *fleet.ROUTES,
    *proofs.ROUTES,
    *meta.ROUTES,
    *dashboard.ROUTES,
]
