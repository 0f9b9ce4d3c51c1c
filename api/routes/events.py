"""``GET /v1/events``: Server-Sent Events, one ``checkpoint`` event per new checkpoint.

Each event is ``id: <size>``, ``event: checkpoint`` and one ``data:`` line per
line of the note (the client joins them with ``\\n`` and adds the final
newline). On connect the current checkpoint is sent at once (a client that
sends ``Last-Event-ID`` or ``?since=N`` catches up; one that does not learns
the head it may have missed between its own fetch and the connection).

With ``?records=1``, a checkpoint whose size grew is preceded by an ``event:
records`` whose data is ``{"start": S, "records": [base64, ...]}``: the
records from the client's last known size (``Last-Event-ID``/``since``, then
each event sent) to the new size, when there are at most 1000 of them (a
client further behind falls back to tiles). A ``: hb`` comment is sent every
heartbeat interval. Over the connection cap, or over the per-address cap
(``Limits.max_sse_per_address``, counted per client address: the forwarded one
behind a trusted proxy; the trusted proxies' own addresses are not capped),
``503 overloaded``: one client cannot hold every slot.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ledger.errors import HttpProblem

from ..broadcast import Broadcaster, CheckpointEvent
from ..problems import Problem, bad_request
from ..ratelimit import AddressCounts
from ..service import LedgerService
from . import _common as c


def checkpoint_event(ev: CheckpointEvent) -> bytes:
    lines = ev.note.removesuffix("\n").split("\n")
    out = [f"id: {ev.size}", "event: checkpoint", *(f"data: {line}" for line in lines)]
    return ("\n".join(out) + "\n\n").encode("utf-8")


async def records_event(svc: LedgerService, hub: Broadcaster, start: int, end: int, cap: int) -> bytes | None:
    if end <= start or end - start > cap:
        return None
    cached = hub.cached_records((start, end))
    if cached is not None:
        return cached
    raws = await svc.read_records(start, end)
    if len(raws) != end - start:
        return None
    data = json.dumps(
        {"start": start, "records": [base64.b64encode(r).decode("ascii") for r in raws]},
        separators=(",", ":"),
    )
    out = f"event: records\ndata: {data}\n\n".encode()
    hub.cache_records((start, end), out)
    return out


def _since(request: Request) -> int | None:
    header = request.headers.get("last-event-id")
    if header is not None:
        h = header.strip()
        if not h.isascii() or not h.isdigit() or len(h) > 20:
            raise bad_request("Last-Event-ID must be a tree size")
        return int(h)
    if "since" in request.query_params:
        return c.query_int(request, "since")
    return None


class _SlotStream(StreamingResponse):
    """A streaming response that gives its connection slot back when it ends."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release: Callable[[], None] | None = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


async def get_events(request: Request) -> Response:
    """Server-Sent Events of new checkpoints."""
    svc = c.service(request)
    lim = c.config(request).limits
    since = _since(request)
    flag = c.query_str(request, "records")
    if flag not in (None, "0", "1", "true", "false"):
        raise bad_request("records is 0 or 1")
    want_records = flag in ("1", "true")
    hub = svc.broadcaster
    assert hub is not None
    if hub.closed:
        raise Problem(HttpProblem.SHUTTING_DOWN, 503, "the server is shutting down")
    if hub.clients >= lim.max_sse_clients:
        raise Problem(HttpProblem.OVERLOADED, 503, "too many event streams", headers={"Retry-After": "10"})
    per_address: AddressCounts = request.app.state.sse_per_address
    address = request.client.host if request.client is not None else "unknown"
    # a trusted proxy's own address (the operator's nginx, tools on its host) is not
    # capped; the clients behind it arrive with their forwarded address, which is
    exempt = address in request.app.state.trusted_proxies
    if not exempt and not per_address.acquire(address):
        raise Problem(
            HttpProblem.OVERLOADED,
            503,
            f"{address} already holds {per_address.cap} event streams",
            headers={"Retry-After": "10"},
        )
    metrics = svc.metrics
    # the slots are taken here, with no await since the checks, and given back when
    # the response ends however it ends (even before its first byte)
    hub.clients += 1
    metrics.sse_clients.set(hub.clients)

    def release() -> None:
        hub.clients -= 1
        if not exempt:
            per_address.release(address)
        metrics.sse_clients.set(hub.clients)

    async def stream() -> AsyncIterator[bytes]:
        known = since
        yield b"retry: 2000\n\n"
        while True:
            changed = hub.changed  # taken before reading latest: no publication is missed
            if hub.closed:
                break
            ev = hub.latest
            if want_records and known is not None and ev.size > known:
                rec = await records_event(svc, hub, known, ev.size, lim.max_page)
                if rec is not None:
                    yield rec
            yield hub.encoded(ev, checkpoint_event)
            known = ev.size
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), lim.sse_heartbeat)
                    break
                except TimeoutError:
                    yield b": hb\n\n"

    return _SlotStream(
        release,
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


ROUTES = [Route("/v1/events", get_events, methods=["GET"])]
