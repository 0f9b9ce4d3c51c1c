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

With ``?format=compact`` (a Writ extension, docs/protocol.md section "HTTP";
the codec is :mod:`ledger.compact`) each checkpoint is one unnamed event,
``id: <size>`` and one ``data:`` line: the records from the client's last
known size (up to one entry bundle, else none: the client reads tiles) and
the note, or only what changed since the note the stream sent before. Every
format is encoded once per checkpoint for all the streams (the compact one
once per start and previous note: once for all the streams in sync), not
once per client.
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

from ledger import compact
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


#: the ``format`` values of ``GET /v1/events``.
FORMATS = ("standard", "compact")


def _sendable(start: int | None, end: int, cap: int) -> int | None:
    """``start`` if records ``[start, end)`` go in an event (1 to ``cap`` of them), else None."""
    return start if start is not None and 0 <= start < end and end - start <= cap else None


async def _records(svc: LedgerService, start: int | None, end: int, cap: int) -> list[bytes] | None:
    """Records ``[start, end)``, or None: nothing to send, too many, or not all readable."""
    start = _sendable(start, end, cap)
    if start is None:
        return None
    raws = await svc.read_records(start, end)
    return raws if len(raws) == end - start else None


async def compact_event(
    svc: LedgerService, hub: Broadcaster, ev: CheckpointEvent, start: int | None, prev: CheckpointEvent | None
) -> bytes:
    """The compact event of ``ev`` for a stream that knows ``start`` records and
    was last sent ``prev``: encoded once for all the streams in that position."""
    cap = compact.MAX_RECORDS

    async def encode() -> bytes:
        recs = await _records(svc, start, ev.size, cap)
        data = compact.encode(prev.note if prev is not None else None, ev.note, ev.size, recs or [])
        return f"id: {ev.size}\ndata: {data}\n\n".encode()

    key = ("compact", _sendable(start, ev.size, cap), prev.note if prev is not None else None)
    return await hub.encoded(ev, key, encode)


async def records_event(svc: LedgerService, hub: Broadcaster, start: int, end: int, cap: int) -> bytes | None:
    if _sendable(start, end, cap) is None:
        return None
    cached = hub.cached_records((start, end))
    if cached is not None:
        return cached
    raws = await _records(svc, start, end, cap)
    if raws is None:
        return None
    recs = [base64.b64encode(r).decode("ascii") for r in raws]
    data = json.dumps({"start": start, "records": recs}, separators=(",", ":"))
    out = f"event: records\ndata: {data}\n\n".encode()
    hub.cache_records((start, end), out)
    return out


async def standard_event(hub: Broadcaster, ev: CheckpointEvent) -> bytes:
    """The standard checkpoint event of ``ev``, encoded once."""

    async def encode() -> bytes:
        return checkpoint_event(ev)

    return await hub.encoded(ev, "standard", encode)


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
    fmt = c.query_str(request, "format") or "standard"
    if fmt not in FORMATS:
        raise bad_request("format is standard or compact")
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
        sent: CheckpointEvent | None = None  # the last event this stream sent (compact deltas)
        yield b"retry: 2000\n\n"
        while True:
            changed = hub.changed  # taken before reading latest: no publication is missed
            if hub.closed:
                break
            ev = hub.latest
            if fmt == "compact":
                yield await compact_event(svc, hub, ev, known, sent)
                known, sent = ev.size, ev
            elif want_records and known is not None and ev.size > known:
                rec = await records_event(svc, hub, known, ev.size, lim.max_page)
                if rec is not None:
                    yield rec
            if fmt == "standard":
                yield await standard_event(hub, ev)
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
