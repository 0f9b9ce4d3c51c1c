"""Where a device's records and checkpoints come from.

Every source yields :class:`Update` ``(start, records, note)`` values that go,
unchanged, to :meth:`device_sim.device.Device.apply_update`: a source only
fetches and frames bytes, it never decides what is valid.

- :class:`HttpSource`: ``GET /checkpoint``, then the missing records: a gap
  smaller than a tile from ``GET /v1/records?start=S&limit=L`` (just what is
  new), a larger one (catch-up) through tlog-tiles entry bundles
  (``/tile/entries/<N>[.p/<W>]``, full or partial by the checkpoint's size,
  so any HTTP cache can serve them).
- :class:`SseSource`: ``GET /v1/events?format=compact`` (Server-Sent Events,
  one event per checkpoint carrying the records the device lacks; the
  standard ``?records=1`` events are read too), the records fetched as above
  when an event does not carry them; the event stream's framing and payloads
  are decoded by :mod:`device_sim.sse`.
- :class:`BundleSource`: a sync bundle file (docs/protocol.md, "Sync bundles").

Every request goes through the one fetch layer, the async face of
:mod:`ledger.client`, so a hostile server gets nothing for free: every
response is read with a byte cap (:class:`~ledger.errors.ResponseTooLarge`)
and a total deadline per request (a slow-loris server raises
:class:`~ledger.errors.TransportError` instead of hanging the device),
redirects are refused, and an error answer raises what the one problem+json
table says (:func:`ledger.client.problem_error`: an HTTP-level refusal is
:class:`~ledger.errors.HTTPStatusError`); malformed data raises the
verification error of the format (``bad-note``, ``bad-message``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import NamedTuple, Protocol

import httpx

from ledger import acceptance, encoding, messages, tiles
from ledger.acceptance import Evidence
from ledger.client import AsyncClient
from ledger.errors import (
    BadMessage,
    BadNote,
    HTTPStatusError,
    TransportError,
    UsageError,
    VerificationError,
    WritError,
)
from ledger.records import parse as parse_record

from .device import Device, PendingUpdate, SyncResult
from .sse import MAX_SSE_EVENT, compact_event, records_event, sse_events

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_BUNDLE_FILE",
    "MAX_CHECKPOINT",
    "MAX_ENTRY_BUNDLE",
    "MAX_REPLY",
    "MAX_SSE_EVENT",
    "BundleSource",
    "HttpSource",
    "Source",
    "SseSource",
    "Update",
    "sync",
]

#: per-request deadline, connect to last byte (seconds).
DEFAULT_TIMEOUT = 10.0
MAX_CHECKPOINT = 64 * 1024
#: a full entry bundle: 256 records of at most 600 bytes, each with a 2-byte length.
MAX_ENTRY_BUNDLE = tiles.TILE_WIDTH * (2 + 600)
#: one record in a ``GET /v1/records`` answer: the record and its MessagePack ``bin`` header.
_MAX_RECORD_ITEM = 3 + encoding.MAX_RECORD
MAX_BUNDLE_FILE = messages.MAX_BUNDLE_RECORDS * 700 + 65536
MAX_REPLY = 64 * 1024


class Update(NamedTuple):
    """Records ``start .. start+len(records)`` and the checkpoint note that covers them;
    ``bundle``: from a sync bundle (an older one is "nothing new", not a rollback)."""

    start: int
    records: list[bytes]
    note: str
    bundle: bool = False


class Source(Protocol):
    """Fetches updates. After a failed :meth:`fetch`, ``last_note`` is the
    checkpoint it got (if any) and ``last_bad`` the bytes that failed to
    decode (if any): the evidence :func:`sync` keeps."""

    last_note: str | None
    last_bad: bytes | None

    async def fetch(self, have: int) -> Update:
        """What a device holding ``have`` records needs to reach the source's checkpoint."""
        ...


async def sync(device: Device, source: Source, now: int) -> SyncResult:
    """Fetch from ``source`` and apply to ``device``, all or nothing.

    An :class:`HttpSource` streams: the device verifies each tile's records
    as they arrive and the fetching stops at the first invalid one
    (:meth:`HttpSource.sync`). Data that fails verification, whether the
    source could not even decode it (a bad tile, a garbage checkpoint) or the
    device refused it, leaves the device's state as it was and adds an
    :class:`~ledger.acceptance.Evidence`; transport failures are raised and leave
    no evidence.
    """
    if isinstance(source, HttpSource):
        return await source.sync(device, now)
    try:
        update = await source.fetch(device.size)
    except VerificationError as exc:
        _source_evidence(device, source, exc, now)
        raise
    return device.apply(update, now)


def _source_evidence(device: Device, source: Source, exc: VerificationError, now: int) -> None:
    device.add_evidence(
        Evidence.from_error(exc, observed_at=now, notes=(source.last_note,), data=source.last_bad)
    )


def _in_place(raw: bytes, seq: int) -> bool:
    """A record that parses and says it is at ``seq`` (a cheap check, not verification)."""
    try:
        return parse_record(raw).seq == seq
    except WritError:
        return False


def _decode_note(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadNote("the checkpoint is not UTF-8 text") from None


class HttpSource:
    """The read paths of a Writ server (C2SP tlog-tiles)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_checkpoint: int = MAX_CHECKPOINT,
        parallel: int = 4,
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.http = AsyncClient(base_url, http=client, timeout=timeout)
        self.timeout = timeout
        self.max_checkpoint = max_checkpoint
        self.parallel = max(1, parallel)
        #: bytes received (bodies only): the fleet reports it per device.
        self.bytes_received = 0
        self.last_note: str | None = None
        self.last_bad: bytes | None = None
        #: the last record stream ended early: the server had no such tile (404).
        self.ran_out = False
        #: small gaps are read from ``GET /v1/records`` (until the server answers 404).
        self.records_api = True

    async def _get(self, path: str, limit: int) -> bytes:
        body = await self.http.get(path, cap=limit, timeout=self.timeout)
        self.bytes_received += len(body)
        return body

    async def checkpoint(self) -> str:
        data = await self._get("checkpoint", self.max_checkpoint)
        try:
            self.last_note = _decode_note(data)
        except BadNote:
            self.last_bad = data
            raise
        return self.last_note

    def _decode(self, path: str, data: bytes, width: int) -> list[bytes]:
        try:
            return tiles.decode_entry_bundle(data, width)
        except BadMessage as exc:
            self.last_bad = data
            raise BadMessage(f"{path}: {exc.message}", path=path) from None

    async def _bundle(self, index: int, width: int) -> list[bytes]:
        try:
            data = await self._get(tiles.entries_path(index, width), MAX_ENTRY_BUNDLE)
        except HTTPStatusError as exc:
            # tlog-tiles: a partial tile may be gone once the tile is full.
            if width == tiles.TILE_WIDTH or exc.detail.get("status") != 404:
                raise
            full = tiles.entries_path(index)
            return self._decode(full, await self._get(full, MAX_ENTRY_BUNDLE), tiles.TILE_WIDTH)[:width]
        return self._decode(tiles.entries_path(index, width), data, width)

    async def _records_page(self, start: int, count: int) -> list[bytes] | None:
        """Records ``start .. start+count-1`` from ``GET /v1/records`` (fewer: the
        server has no more), or None when the server does not serve that path
        (a plain tlog-tiles server: remembered, tiles from then on)."""
        path = f"v1/records?start={start}&limit={count}"
        try:
            data = await self._get(path, count * _MAX_RECORD_ITEM + 5)
        except HTTPStatusError as exc:
            if exc.detail.get("status") not in (404, 405):
                raise
            self.records_api = False
            return None
        try:
            return encoding.unpack_records(data, max_count=count, error=BadMessage)
        except BadMessage as exc:
            self.last_bad = data
            raise BadMessage(f"/{path}: {exc.message}", path=path) from None

    async def _chunks(
        self, start: int, end: int, tree_size: int, window: Callable[[], int]
    ) -> AsyncGenerator[list[bytes], None]:
        """Records ``[start, end)`` of a tree of ``tree_size``, one entry bundle
        at a time, in order and lazily: at most ``window()`` tiles in flight
        (asked again before each request) and nothing allocated by ``end`` (a
        size no one has verified yet). A tile
        the server does not have (404) ends the stream early and sets
        ``ran_out``: the checkpoint named records the server cannot serve,
        which the verifier then judges against what it did get."""
        self.ran_out = False
        w = tiles.TILE_WIDTH
        if not 0 <= start < end <= tree_size:
            return
        if end - start < w and self.records_api:  # a small gap: just the new records
            page = await self._records_page(start, end - start)
            if page is not None:
                self.ran_out = len(page) < end - start
                if page:
                    yield page
                return
        index, last = start // w, (end - 1) // w
        flight: deque[tuple[int, asyncio.Task[list[bytes]]]] = deque()
        try:
            while True:
                while len(flight) < max(1, window()) and index <= last:
                    width = min(w, tree_size - index * w)
                    flight.append((index, asyncio.ensure_future(self._bundle(index, width))))
                    index += 1
                if not flight:
                    return
                n, task = flight.popleft()
                try:
                    entries = await task
                except HTTPStatusError as exc:
                    if exc.detail.get("status") == 404:
                        self.ran_out = True
                        return
                    raise
                first = n * w
                yield entries[max(start, first) - first : min(end, first + len(entries)) - first]
        finally:
            for _, t in flight:
                t.cancel()
            await asyncio.gather(*(t for _, t in flight), return_exceptions=True)

    async def records(
        self, start: int, end: int, tree_size: int | None = None, *, check: PendingUpdate | None = None
    ) -> list[bytes]:
        """Records ``[start, end)`` of a tree of ``tree_size`` (default ``end``), from entry bundles.

        Without ``check`` (the fleet's shared fetches) the list stops after the
        first record that does not even parse at its seq, and so does the
        downloading: the devices refuse that record, and nothing more is
        fetched for them. With ``check`` (a device's :class:`PendingUpdate`,
        a dry run) each tile is verified before the next is fetched."""
        tree_size = end if tree_size is None else tree_size
        if type(start) is not int or type(end) is not int or not 0 <= start <= end <= tree_size:
            raise BadMessage(f"entry range [{start}, {end}) is not inside a tree of size {tree_size}")

        def window() -> int:
            return self.parallel if check is None or check.note_verified else 1

        out: list[bytes] = []
        async with contextlib.aclosing(self._chunks(start, end, tree_size, window)) as chunks:
            async for chunk in chunks:
                if check is not None:
                    check.feed(chunk)
                    check.check_note()
                    out.extend(chunk)
                    continue
                for raw in chunk:
                    out.append(raw)
                    if not _in_place(raw, start + len(out) - 1):
                        return out
        return out

    async def _note(self) -> str:
        """The checkpoint, with its size parsed (a garbage note is refused here, with its bytes)."""
        note = await self.checkpoint()
        try:
            acceptance.checkpoint_size(note)
        except BadNote:
            self.last_bad = note.encode()
            raise
        return note

    async def fetch(self, have: int) -> Update:
        self.last_note = self.last_bad = None
        note = await self._note()
        size = acceptance.checkpoint_size(note)
        if size <= have:
            return Update(have, [], note)
        return Update(have, await self.records(have, size, size), note)

    async def sync(self, device: Device, now: int) -> SyncResult:
        """Fetch and verify in one pass: the checkpoint, then the entry bundles
        one after another, each tile's records applied (to a copy of the
        device's state) before the next is fetched; the first invalid record
        stops the fetching. Only when the checkpoint already verifies under a
        log key the device knows (or one the records applied so far granted)
        are up to ``parallel`` tiles fetched ahead.
        What is downloaded is thus bounded by what was verified plus a tile or
        a few, whatever size the checkpoint claims."""
        self.last_note = self.last_bad = None
        try:
            note = await self._note()
        except VerificationError as exc:
            _source_evidence(device, self, exc, now)
            raise
        pending = device.begin(device.size, note, now)
        if pending.wanted == 0:
            return pending.finish()

        def window() -> int:  # a few tiles ahead once a known log key vouches for the size
            return self.parallel if pending.note_verified else 1

        async with contextlib.aclosing(
            self._chunks(pending.next, pending.size, pending.size, window)
        ) as chunks:
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except VerificationError as exc:
                    _source_evidence(device, self, exc, now)
                    raise
                pending.feed(chunk)
                pending.check_note()
        return pending.finish(complete=not self.ran_out)


class BundleSource:
    """A sync bundle file (docs/protocol.md, "Sync bundles"): applied with exactly the HTTP rules."""

    def __init__(self, path: Path | str, *, max_bytes: int = MAX_BUNDLE_FILE) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.last_note: str | None = None
        self.last_bad: bytes | None = None

    def read(self) -> Update:
        try:
            with open(self.path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except OSError as exc:
            raise UsageError(f"cannot read the bundle {self.path}: {exc.strerror}") from None
        self.last_bad = data
        if len(data) > self.max_bytes:
            raise BadMessage(f"the bundle is larger than {self.max_bytes} bytes")
        update = self.parse(data)
        self.last_bad = None
        return update

    @staticmethod
    def parse(data: bytes) -> Update:
        b = messages.parse_bundle(data)
        return Update(b.start, list(b.records), b.checkpoint, bundle=True)

    async def fetch(self, have: int) -> Update:
        return self.read()


# --- Server-Sent Events -------------------------------------------------------


class SseSource:
    """Push: ``/v1/events?format=compact`` (or ``?records=1`` with ``compact=False``),
    reconnecting with jittered backoff.

    :meth:`updates` yields one :class:`Update` per checkpoint event, computed
    for the device's size at that moment (``have()``), which is also sent as
    ``Last-Event-ID`` on every (re)connection so the server's catch-up covers
    exactly the gap. When the records event does not cover it, the records
    come from tiles (``tiles``), verified tile by tile by ``verifier(have,
    note)`` (a dry-run :class:`~device_sim.device.PendingUpdate` of a device
    at ``have``) when one is given, so an unverified size never drives the
    download. Any event that fails to decode is hostile input: the
    connection is dropped, ``on_error`` told, and the client reconnects with
    backoff; nothing an event holds ends the loop. Both event formats are
    read whichever was asked for (a server without the compact format sends
    the standard one): a compact event is the records event and the
    checkpoint event in one.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        tiles_source: HttpSource | None = None,
        records: bool = True,
        compact: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        idle_timeout: float = 45.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        max_event: int = MAX_SSE_EVENT,
        on_error: Callable[[Exception], None] | None = None,
        verifier: Callable[[int, str], PendingUpdate | None] | None = None,
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.tiles = (
            tiles_source if tiles_source is not None else HttpSource(client, base_url, timeout=timeout)
        )
        self.records = records
        self.compact = compact
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.backoff = backoff
        self.max_event = max_event
        self.on_error = on_error
        self.verifier = verifier
        self.connections = 0
        self.bytes_received = 0

    async def updates(self, have: Callable[[], int]) -> AsyncGenerator[Update, None]:
        delay = self.backoff[0]
        while True:
            try:
                async for upd in self._connect(have):
                    delay = self.backoff[0]
                    yield upd
                err: Exception = TransportError("the event stream ended")
            except (TransportError, VerificationError) as exc:
                err = exc
            except UsageError:
                raise  # a bad URL: no reconnection fixes it
            except Exception as exc:  # anything else an event caused: hostile input, never fatal
                err = BadMessage(f"the event stream failed: {type(exc).__name__}")
            if self.on_error is not None:
                self.on_error(err)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff[1])

    async def _connect(self, have: Callable[[], int]) -> AsyncIterator[Update]:
        query = "?format=compact" if self.compact else "?records=1" if self.records else ""
        path = "v1/events" + query
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(have())}
        http = AsyncClient(self.base_url, http=self.client, timeout=self.timeout)
        self.connections += 1
        async with http.stream(path, headers=headers, idle=self.idle_timeout) as resp:
            pending: tuple[int, list[bytes]] | None = None
            prev: str | None = None  # the note of this connection's last compact event
            async for ev in sse_events(resp, self.max_event):
                self.bytes_received += sum(len(d) + 6 for d in ev.data)
                if ev.event == "records":  # an undecodable one drops the connection (BadMessage)
                    pending = records_event(ev.data) if self.records else None
                elif ev.event == "checkpoint":
                    note = "\n".join(ev.data) + "\n"
                    yield await self._update(have(), note, pending)
                    pending = None
                elif ev.event == "message":  # compact: records and checkpoint in one event
                    recs, prev = compact_event(ev, prev)
                    yield await self._update(have(), prev, recs if self.records else None)
                    pending = None

    async def _update(self, have: int, note: str, pending: tuple[int, list[bytes]] | None) -> Update:
        try:
            size = acceptance.checkpoint_size(note)
        except BadNote:
            return Update(have, [], note)  # the device refuses it and keeps the evidence
        if size <= have:
            return Update(have, [], note)
        if pending is not None:
            start, recs = pending
            if start <= have and start + len(recs) >= size:
                return Update(have, recs[have - start : size - start], note)
        check = self.verifier(have, note) if self.verifier is not None else None
        return Update(have, await self.tiles.records(have, size, size, check=check), note)
