"""``/v1/ledger``, ``/healthz``, ``/metrics`` and ``/openapi.json``."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..metrics import Metrics
from ..openapi import openapi_document
from . import _common as c


async def get_ledger(request: Request) -> Response:
    """The ledger's identity and head, and the log's keys."""
    svc = c.service(request)
    cp = svc.checkpoint
    return c.json_response(
        {
            "origin": svc.origin,
            "anchor": svc.anchor.hex(),
            "size": cp.size,
            "root": cp.root.hex(),
            "log_public_key": svc.signer.public_key.hex(),
            "log_vkey": svc.log_vkey,
            "cosig_vkey": svc.cosig_vkey,
            "checkpoint_time": cp.timestamp,
            # (witness) each witness of `writ serve --witness URL`: its latest cosigned size and age
            "witnesses": svc.witnessing.status() if svc.witnessing is not None else [],
        },
        headers={"Cache-Control": "no-cache"},
    )


async def healthz(request: Request) -> Response:
    """Liveness: the ledger is loaded."""
    svc = c.service(request)
    return c.json_response({"ok": True, "size": svc.size})


async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    m = request.app.state.metrics
    assert isinstance(m, Metrics)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """This API, as OpenAPI 3.1."""
    return c.json_response(openapi_document())


ROUTES = [
    Route("/v1/ledger", get_ledger, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
