"""``GET /``: the operator's dashboard, server-rendered (``api/templates/dashboard.html``).

Shows the head and checkpoint age, the root key in force (after a rotation,
not the anchor), the log key as hex (what ``writ server init`` printed) and as
a vkey, the recent records in words, the credentials (searchable by name with
``?q=``) and, per revocation, how many devices have applied it with the count
of stragglers, the first few by name and their last receipt, and a link to
the whole list (``/v1/fleet/revocations/{seq}``). Every value from the ledger
is HTML-escaped. A report: rate-limited per client address like ``/v1/fleet``.
"""

from __future__ import annotations

import importlib.resources
import time
from functools import cache
from html import escape
from string import Template

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ledger import records
from ledger.credential_status import credential
from ledger.errors import WritError

from .. import fleet_report
from ..service import LedgerService
from . import _common as c
from . import fleet as fleet_routes

RECENT = 30
MAX_CREDENTIALS = 200
#: revocations shown, and straggler names per revocation (the rest: a count and a link).
REVOCATIONS = 20
STRAGGLERS = 5


@cache
def _template() -> Template:
    text = importlib.resources.files("api").joinpath("templates/dashboard.html").read_text(encoding="utf-8")
    return Template(text)


def _when(t: int | None) -> str:
    if t is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


async def _recent(svc: LedgerService) -> str:
    size = svc.size
    raws = await svc.read_records(max(0, size - RECENT), size)
    rows = []
    for raw in reversed(raws):
        try:
            rec = records.decode_unverified(raw)
        except WritError:  # cannot happen for stored (verified) records
            continue
        body = rec.body
        rows.append(
            f"<tr><td>{body.seq}</td><td>{escape(body.KIND.name.lower())}</td><td>{escape(_when(body.time))}</td>"
            f"<td>{escape(fleet_report.describe_record(body, svc.state))}</td></tr>"
        )
    if not rows:
        return '<p class="muted">The ledger is empty.</p>'
    return "<table><tr><th>seq</th><th>kind</th><th>time</th><th>what</th></tr>" + "".join(rows) + "</table>"


def _grant_name(svc: LedgerService, seq: int) -> str:
    g = svc.state.grants.get(seq)
    return f"{g.name} (#{seq}, {g.role})" if g is not None else f"grant #{seq}"


def _credentials(svc: LedgerService, q: str) -> str:
    state = svc.state
    now = int(svc.clock())
    needle = q.casefold()
    grants = sorted(
        (g for g in state.grants.values() if needle in g.name.casefold()), key=lambda g: g.seq, reverse=True
    )
    rows = []
    for g in grants[:MAX_CREDENTIALS]:
        cred = credential(state, g, now, None)
        status = str(cred["status"])
        rev = cred["revocation"]
        why = ""
        if isinstance(rev, dict):
            signer = int(rev["signer"])
            who = "the root" if signer == 0 else _grant_name(svc, signer)
            why = (
                f"#{rev['seq']}: {escape(str(rev['reason']))}, revoked by {escape(str(rev['by']))}, "
                f"signed by {escape(who)}"
            )
        css = "revoked" if status == "revoked" else "active"
        rows.append(
            f"<tr><td>{g.seq}</td><td>{escape(g.name)}</td><td>{escape(g.role)}</td><td>{escape(g.scope)}</td>"
            f'<td class="mono">{g.subject.hex()[:16]}…</td>'
            f'<td class="{css}">{escape(status)}</td><td>{why}</td></tr>'
        )
    more = (
        f'<p class="muted">{len(grants) - MAX_CREDENTIALS} more not shown: refine the search.</p>'
        if len(grants) > MAX_CREDENTIALS
        else ""
    )
    if not rows:
        return '<p class="muted">No credentials match.</p>'
    return (
        "<table><tr><th>seq</th><th>name</th><th>role</th><th>scope</th><th>subject</th><th>status</th>"
        "<th>revocation</th></tr>" + "".join(rows) + "</table>" + more
    )


def _revocations(svc: LedgerService) -> str:
    index = fleet_routes.synced_index(svc)
    report = fleet_report.fleet(
        svc.state, svc.receipts, index, limit=1, max_revocations=REVOCATIONS, max_stragglers=STRAGGLERS
    )
    blocks = []
    for r in report["revocations"]:
        applied, total = int(r["applied"]), int(r["total"])
        pct = 100 if total == 0 else round(100 * applied / total)
        stragglers = ", ".join(
            f"{escape(str(s['name']))} (last receipt: "
            + (f"size {s['size']} at {escape(_when(s['received_at']))}" if s["size"] is not None else "none")
            + ")"
            for s in r["stragglers"]
        )
        n = int(r["stragglers_total"])
        if n > len(r["stragglers"]):
            url = escape(str(r["stragglers_url"]), quote=True)
            stragglers += f' and {n - len(r["stragglers"])} more (<a href="{url}">all {n} stragglers</a>)'
        count = f'<span class="muted">{n} behind:</span> ' if n else ""
        blocks.append(
            f"<tr><td>{r['seq']}</td><td>{escape(str(r['name'] or r['target']))}</td>"
            f"<td>{escape(str(r['reason']))}</td>"
            f'<td><span class="bar"><span style="width:{pct}%"></span></span> {applied}/{total} devices</td>'
            f'<td class="stragglers">{count}{stragglers or "—"}</td></tr>'
        )
    if not blocks:
        return '<p class="muted">No revocations yet.</p>'
    more = int(report["revocations_total"]) - len(blocks)
    tail = (
        f'<p class="muted">{more} older revocations not shown: <a href="/v1/fleet?revocations='
        f'{fleet_report.MAX_REVOCATIONS}&amp;limit=1">/v1/fleet</a>.</p>'
        if more > 0
        else ""
    )
    return (
        "<table><tr><th>seq</th><th>revoked</th><th>reason</th><th>applied</th><th>stragglers</th></tr>"
        + "".join(blocks)
        + "</table>"
        + tail
    )


def _root_in_force(svc: LedgerService) -> str:
    """The root key that signs now, and since when (the anchor until the first rotation)."""
    roots = svc.state.roots
    if not roots:
        return '<span class="muted">none (no genesis yet)</span>'
    first, key = roots[-1]
    if len(roots) == 1:
        return f'<span class="mono">{key.hex()}</span> <span class="muted">(the anchor; never rotated)</span>'
    return (
        f'<span class="mono">{key.hex()}</span> <span class="muted">(since the rotation at seq {first}; '
        f"{len(roots) - 1} rotation{'s' if len(roots) > 2 else ''})</span>"
    )


def _witnesses(svc: LedgerService) -> str:
    """(witness) Each witness of `writ serve --witness URL`: state, latest cosigned size, age."""
    if svc.witnessing is None:
        return '<span class="muted">none (writ serve --witness URL; docs/witness.md)</span>'
    items = []
    for w in svc.witnessing.status():
        age = "never" if w["age"] is None else f"{w['age']} s ago"
        size = "—" if w["cosigned_size"] is None else str(w["cosigned_size"])
        items.append(
            f'<span class="mono">{escape(str(w["name"] or w["url"]))}</span>: {escape(str(w["state"]))},'
            f" cosigned size {escape(size)}, {escape(age)}"
        )
    return "<br>".join(items)


async def dashboard(request: Request) -> Response:
    """The HTML dashboard."""
    c.rate_limit(request, request.app.state.report_buckets)
    svc = c.service(request)
    q = c.query_str(request, "q", max_len=64) or ""
    cp = svc.checkpoint
    page = _template().substitute(
        origin=escape(svc.origin),
        size=cp.size,
        root=cp.root.hex(),
        checkpoint_time=escape(_when(cp.timestamp)),
        checkpoint_age=max(0, int(svc.clock()) - cp.timestamp),
        anchor=svc.anchor.hex(),
        root_in_force=_root_in_force(svc),
        log_key=svc.signer.public_key.hex(),
        log_vkey=escape(svc.log_vkey),
        witnesses=_witnesses(svc),  # (witness)
        revocations=_revocations(svc),
        q=escape(q, quote=True),
        credentials=_credentials(svc, q),
        recent=await _recent(svc),
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


ROUTES = [Route("/", dashboard, methods=["GET"])]
