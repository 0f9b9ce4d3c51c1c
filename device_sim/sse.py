"""Server-Sent Events as a device reads them: the ``text/event-stream``
framing with a cap on each event (:func:`sse_events`), and the one decoder
of event payloads (:func:`decode_event_json`), with the records event
(``?records=1``) and the compact event (``?format=compact``) on top of it.
Events come from the network: every failure is a ``bad-message`` (or
``response-too-large``), never a crash; :class:`device_sim.sources.SseSource`
drops the connection and reconnects with backoff."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any, NamedTuple

import httpx

from ledger import compact, messages
from ledger.errors import BadMessage, ResponseTooLarge, TransportError

__all__ = [
    "MAX_EVENT_DEPTH",
    "MAX_SSE_EVENT",
    "Event",
    "compact_event",
    "decode_event_json",
    "records_event",
    "sse_events",
]

#: the largest event accepted, in bytes.
MAX_SSE_EVENT = 2 * 1024 * 1024

_LINE = re.compile(rb"\r\n|\r|\n")


class Event(NamedTuple):
    id: str | None
    event: str
    data: list[str]


async def sse_events(resp: httpx.Response, max_event: int) -> AsyncIterator[Event]:
    """Parse a text/event-stream with a cap on each event's size."""
    buf = b""
    ev_id: str | None = None
    ev_type = ""
    data: list[str] = []
    size = 0
    if resp.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise TransportError("the event stream is compressed; Writ reads event streams only uncompressed")
    chunks = resp.aiter_bytes() if resp.is_stream_consumed else resp.aiter_raw()
    async for chunk in chunks:
        buf += chunk
        while True:
            m = _LINE.search(buf)
            if m is None or (m.group() == b"\r" and m.end() == len(buf)):  # maybe half of \r\n
                break
            raw, buf = buf[: m.start()], buf[m.end() :]
            size += len(raw) + 1
            if size > max_event:
                raise ResponseTooLarge(f"an event is larger than {max_event} bytes", limit=max_event)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadMessage("the event stream is not UTF-8") from None
            if line == "":
                if data or ev_type:
                    yield Event(ev_id, ev_type or "message", data)
                ev_type, data, size = "", [], 0
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                ev_type = value
            elif name == "id" and "\x00" not in value:
                ev_id = value
        if len(buf) > max_event:
            raise ResponseTooLarge(f"an event line is larger than {max_event} bytes", limit=max_event)


#: the deepest JSON nesting an event may have (a records event has 2).
MAX_EVENT_DEPTH = 8
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def decode_event_json(
    data: list[str] | str, *, max_bytes: int = MAX_SSE_EVENT, max_depth: int = MAX_EVENT_DEPTH
) -> Any:
    """The JSON payload of one Server-Sent Event, or :class:`~ledger.errors.BadMessage`.

    The one decoder of event payloads (the device's push client and the
    fleet's relays both read events through
    :class:`~device_sim.sources.SseSource`). Events
    come from the network, so they are hostile input: the size is checked
    first, then the nesting depth (brackets outside strings, counted without
    recursion), and only then is the text parsed, so a deeply nested payload
    never reaches the recursive parser (``RecursionError``). Any failure is a
    ``bad-message``: the caller drops the connection, reports it and
    reconnects with backoff."""
    text = "\n".join(data) if isinstance(data, list) else data
    if len(text) > max_bytes:
        raise BadMessage(f"an event payload is larger than {max_bytes} bytes", limit=max_bytes)
    depth = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > max_depth:
            raise BadMessage(f"an event payload is nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"an event payload is not JSON ({type(exc).__name__})") from None


def _b64_records(recs: Any) -> list[bytes]:
    """A JSON list of at most MAX_BUNDLE_RECORDS base64 strings, decoded (TypeError, binascii.Error)."""
    if type(recs) is not list or len(recs) > messages.MAX_BUNDLE_RECORDS:
        raise TypeError
    if not all(type(r) is str for r in recs):
        raise TypeError
    return [base64.b64decode(r, validate=True) for r in recs]


def records_event(data: list[str]) -> tuple[int, list[bytes]]:
    """``{"start": S, "records": [base64, ...]}``, or BadMessage."""
    obj = decode_event_json(data)
    try:
        start = obj["start"]
        if type(start) is not int or start < 0:
            raise TypeError
        return start, _b64_records(obj["records"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BadMessage('a records event is not {"start": uint, "records": [base64, ...]}') from None


_SIZE = re.compile(r"[0-9]{1,20}")


#: compact events whose decoding is kept, and the largest kept (bytes of data).
DECODED_EVENTS = 8
_MAX_KEPT_EVENT = 64 * 1024


def compact_event(ev: Event, prev: str | None) -> tuple[tuple[int, list[bytes]], str]:
    """A compact event (``?format=compact``, :mod:`ledger.compact`) after one that
    carried the note ``prev``: ((start, records), note), or BadMessage.

    The decoding of the last :data:`DECODED_EVENTS` small events is kept,
    keyed by the exact input (``prev``, id, data lines): every stream of a
    relay fleet (or a device reconnecting) receives the same bytes. Only the
    framing is shared; what the records and the note say is verified by
    each device that applies them."""
    if sum(len(d) for d in ev.data) > _MAX_KEPT_EVENT:
        return _compact_event(ev.id, tuple(ev.data), prev)
    (start, recs), note = _compact_event_kept(ev.id, tuple(ev.data), prev)
    return (start, list(recs)), note


@lru_cache(maxsize=DECODED_EVENTS)
def _compact_event_kept(
    ev_id: str | None, data: tuple[str, ...], prev: str | None
) -> tuple[tuple[int, tuple[bytes, ...]], str]:
    (start, recs), note = _compact_event(ev_id, data, prev)
    return (start, tuple(recs)), note


def _compact_event(
    ev_id: str | None, data: tuple[str, ...], prev: str | None
) -> tuple[tuple[int, list[bytes]], str]:
    if ev_id is None or _SIZE.fullmatch(ev_id) is None:
        raise BadMessage("a compact event's id is not a tree size")
    size = int(ev_id)
    recs, note = compact.decode(prev, size, decode_event_json(list(data)))
    if len(recs) > size:
        raise BadMessage(f"a compact event of size {size} carries {len(recs)} records")
    return (size - len(recs), recs), note
