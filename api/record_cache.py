"""The record bytes the server serves, read through a cache of entry bundles.

Readers (``/tile/entries``, ``/v1/records``, the event streams' catch-up)
ask for seqs by range; full entry bundles (256 records) are kept in memory,
up to :data:`BUNDLE_CACHE` of them, least recently used first out, and the
current partial bundle (the *tail*) is always held. The bytes are the stored
ones, verbatim. Only the single writer (:class:`api.service.LedgerService`)
adds records, after they are durable.
"""

from __future__ import annotations

from collections import OrderedDict

from ledger.storage import Storage
from ledger.tiles import TILE_WIDTH

__all__ = ["BUNDLE_CACHE", "RecordCache"]

#: full entry bundles kept in memory (256 records each).
BUNDLE_CACHE = 256


class RecordCache:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._bundles: OrderedDict[int, list[bytes]] = OrderedDict()
        self._tail: list[bytes] = []  # records of the current partial entry bundle
        self._tail_start = 0

    async def reset(self, size: int) -> None:
        """Hold the partial bundle of a ledger of ``size`` records (read from storage)."""
        self._tail_start = size - size % TILE_WIDTH
        self._tail = await self.storage.read(self._tail_start, size)

    def clear(self) -> None:
        """Forget the full bundles (after a reload: storage is the truth)."""
        self._bundles.clear()

    def add(self, raws: list[bytes]) -> None:
        """Records just committed, in order after the ones held."""
        for raw in raws:
            self._tail.append(raw)
            if len(self._tail) == TILE_WIDTH:
                self._cache_bundle(self._tail_start // TILE_WIDTH, self._tail)
                self._tail_start += TILE_WIDTH
                self._tail = []

    def _cache_bundle(self, index: int, raws: list[bytes]) -> None:
        self._bundles[index] = raws
        self._bundles.move_to_end(index)
        while len(self._bundles) > BUNDLE_CACHE:
            self._bundles.popitem(last=False)

    async def read(self, start: int, end: int) -> list[bytes]:
        """Record bytes of seqs ``start .. end-1`` (``end`` at most the ledger's size), verbatim."""
        out: list[bytes] = []
        pos = start
        while pos < end:
            index = pos // TILE_WIDTH
            lo = index * TILE_WIDTH
            hi = min(end, lo + TILE_WIDTH)
            if lo == self._tail_start:
                chunk = self._tail[pos - lo : hi - lo]
            else:
                bundle = self._bundles.get(index)
                if bundle is None:
                    bundle = await self.storage.read(lo, lo + TILE_WIDTH)
                    if len(bundle) == TILE_WIDTH:
                        self._cache_bundle(index, bundle)
                chunk = bundle[pos - lo : hi - lo]
            if not chunk:
                break
            out.extend(chunk)
            pos += len(chunk)
        return out
