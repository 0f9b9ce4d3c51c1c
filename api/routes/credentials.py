"""``GET /v1/credentials/{seq}`` and ``GET /v1/credentials?name=&subject=&role=``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger.credential_status import credential
from ledger.errors import HttpProblem
from ledger.state import GrantInfo

from ..problems import Problem, bad_request
from ..service import LedgerService
from . import _common as c


async def _one(svc: LedgerService, g: GrantInfo, now: int) -> dict[str, object]:
    raws = await svc.read_records(g.seq, g.seq + 1)
    return credential(svc.state, g, now, raws[0] if raws else None)


async def get_credential(request: Request) -> Response:
    """The credential granted by record ``seq`` and its status now."""
    svc = c.service(request)
    text = str(request.path_params["seq"])
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise bad_request("a credential is named by the seq of its grant record")
    g = svc.state.grants.get(int(text))
    if g is None:
        raise Problem(HttpProblem.NOT_FOUND, 404, f"record {text} is not a grant")
    return c.json_response(await _one(svc, g, int(svc.clock())))


async def list_credentials(request: Request) -> Response:
    """Credentials by name, subject key and/or role (all filters apply)."""
    svc = c.service(request)
    lim = c.config(request).limits
    name = c.query_str(request, "name")
    subject_hex = c.query_str(request, "subject")
    role = c.query_str(request, "role")
    limit = c.query_int(request, "limit", lim.max_page, lo=1, hi=lim.max_page)
    state = svc.state
    if subject_hex is not None:
        try:
            subject = bytes.fromhex(subject_hex)
        except ValueError:
            raise bad_request("subject is 64 hex digits") from None
        if len(subject) != 32:
            raise bad_request("subject is 64 hex digits")
        grants = state.grants_of(subject)
    elif name is not None:
        grants = state.grants_named(name)
    else:
        grants = list(state.grants.values())
    grants = [g for g in grants if (name is None or g.name == name) and (role is None or g.role == role)]
    grants.sort(key=lambda g: g.seq)
    now = int(svc.clock())
    out = [await _one(svc, g, now) for g in grants[:limit]]
    return c.json_response({"credentials": out, "total": len(grants)})


ROUTES = [
    Route("/v1/credentials", list_credentials, methods=["GET"]),
    Route("/v1/credentials/{seq}", get_credential, methods=["GET"]),
]
