"""One push connection (an SSE stream or a poller) feeding a group of devices.

The push model of :mod:`device_sim.fleet` (step 4): by default
``min(N, 500)`` connections each fan their updates out to a group of
devices, like an edge relay would; each device still applies and verifies
every update itself (:meth:`~device_sim.fleet.devices.Fleet.deliver`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ledger.errors import TransportError, VerificationError

from ..device import PendingUpdate
from ..sources import HttpSource, SseSource
from .model import Member

if TYPE_CHECKING:
    from .devices import Fleet

__all__ = ["Relay"]


class Relay:
    """One push connection (an SSE stream or a poller) and the devices it feeds."""

    def __init__(self, fleet: Fleet, index: int, members: list[Member]) -> None:
        self.fleet = fleet
        self.index = index
        self.members = members
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.tiles = HttpSource(fleet.client, fleet.url, timeout=fleet.options.timeout)
        self.sse: SseSource | None = None
        self.errors = 0
        self.events = 0

    @property
    def bytes_received(self) -> int:
        return self.tiles.bytes_received + (self.sse.bytes_received if self.sse is not None else 0)

    @property
    def online(self) -> int:
        return sum(1 for m in self.members if m.online)

    def have(self) -> int:
        sizes = [m.device.size for m in self.members if m.online]
        if sizes:
            return min(sizes)
        return max((m.device.size for m in self.members), default=0)

    def _on_error(self, exc: Exception) -> None:
        self.errors += 1
        self.ready.clear()  # set again by the next update delivered
        if isinstance(exc, VerificationError):
            self.fleet.evidence_from_source(self.members, exc, self.tiles)

    def _verifier(self, have: int, note: str) -> PendingUpdate | None:
        """A dry run on an online member at ``have``: the records a stream did
        not carry are verified tile by tile before more are fetched."""
        for m in self.members:
            if m.online and m.device.size == have:
                return m.device.begin(have, note, self.fleet.now(m), evidence=False)
        return None

    async def run_sse(self) -> None:
        opts = self.fleet.options
        self.sse = SseSource(
            self.fleet.sse_client,
            self.fleet.url,
            tiles_source=self.tiles,
            timeout=opts.timeout,
            backoff=opts.backoff,
            on_error=self._on_error,
            verifier=self._verifier,
        )
        async for upd in self.sse.updates(self.have):
            self.events += 1
            self.fleet.deliver(self.members, upd)
            self.ready.set()

    async def run_poll(self) -> None:
        interval = self.fleet.options.poll_interval
        await asyncio.sleep(self.fleet.rng.uniform(0, interval))  # pollers spread over the period
        while True:
            started = time.monotonic()
            try:
                upd = await self.tiles.fetch(self.have())
            except VerificationError as exc:
                self._on_error(exc)
            except TransportError:
                self.errors += 1
            else:
                self.events += 1
                self.fleet.deliver(self.members, upd)
                self.ready.set()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
