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
from collections.abc import Callable
from dataclasses import dataclass

#: encoded ``records`` events kept for reuse: most streams ask for the same range.
RECORDS_CACHE = 64


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
        self._encoded: tuple[CheckpointEvent, bytes] | None = None
        self.records_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def publish(self, event: CheckpointEvent) -> None:
        self.latest = event
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def encoded(self, event: CheckpointEvent, encode: Callable[[CheckpointEvent], bytes]) -> bytes:
        """``encode(event)``, computed once per event for all the streams."""
        cached = self._encoded
        if cached is None or cached[0] is not event:
            cached = (event, encode(event))
            self._encoded = cached
        return cached[1]

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
