"""Fan-out of new checkpoints to the Server-Sent Events streams.

A checkpoint supersedes every earlier one, so subscribers do not queue
events: each waits for the *next generation* and then reads the latest
checkpoint. A slow client can therefore never make the server hold more than
one checkpoint for it, and 20,000 clients cost one ``asyncio.Event`` per
publication.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

#: encoded ``records`` events kept for reuse: most streams ask for the same range.
RECORDS_CACHE = 64
#: encodings kept for the latest checkpoint: one per format, and for the compact
#: one per start the streams catch up from (the streams in sync share one).
ENCODINGS = 64


@dataclass(frozen=True, slots=True)
class CheckpointEvent:
    size: int
    root: bytes
    timestamp: int
    note: str


class Broadcaster:
    def __init__(self, first: CheckpointEvent) -> None:
        self.latest = first
        self._changed = asyncio.Event()
        self.closed = False
        self.clients = 0
        self._encoded_for: CheckpointEvent | None = None
        self._encodings: OrderedDict[Hashable, asyncio.Future[bytes]] = OrderedDict()
        self.records_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def publish(self, event: CheckpointEvent) -> None:
        self.latest = event
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def encoded(
        self, event: CheckpointEvent, key: Hashable, encode: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """``encode()``: ``event`` in the encoding ``key`` (a format, and what
        it depends on besides the event), computed once for all the streams:
        concurrent streams wait for the first one's result. Only the latest
        event's encodings are kept."""
        if self._encoded_for is not event:
            self._encoded_for, self._encodings = event, OrderedDict()
        fut = self._encodings.get(key)
        if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
            fut = asyncio.ensure_future(encode())
            self._encodings[key] = fut
            while len(self._encodings) > ENCODINGS:
                self._encodings.popitem(last=False)
        # shielded: a stream that goes away does not cancel the others' encoding
        return await asyncio.shield(fut)

    def cached_records(self, key: tuple[int, int]) -> bytes | None:
        return self.records_cache.get(key)

    def cache_records(self, key: tuple[int, int], data: bytes) -> None:
        self.records_cache[key] = data
        while len(self.records_cache) > RECORDS_CACHE:
            self.records_cache.popitem(last=False)

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next publication (or close). Take it *before* reading ``latest``."""
        return self._changed

    def close(self) -> None:
        """End every stream (server shutdown)."""
        self.closed = True
        self._changed.set()
