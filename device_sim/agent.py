"""The device agent: ``python -m device_sim device run``, a long-running follower.

It keeps one device directory current with the ledger so that anything
reading the device's state (``device check``, ``device authorized-keys``
for sshd) judges credentials against the newest verified view:

- it follows ``/v1/events?format=compact`` (Server-Sent Events), resuming with
  ``Last-Event-ID`` = the device's size, so the server's catch-up covers
  exactly the gap; each event's records and checkpoint are applied through
  :meth:`~device_sim.device.Device.apply` (verify, then commit atomically);
- before each (re)connection it polls once (``/checkpoint`` and tiles, via
  :func:`device_sim.sources.sync`), so a missed push is caught up by pull;
  after :data:`SSE_FAILURES_BEFORE_POLLING` failed streams while polling
  works (a proxy that buffers event streams), it polls every
  ``poll_interval`` for :data:`POLL_FALLBACK_PERIOD` before trying SSE again;
- failures (server down, network lost, bad data) are retried with jittered
  exponential backoff; data that fails verification is refused, kept as
  evidence, and never applied;
- after each update that brought records it posts the device's signed
  receipt (a separate task, so a slow receipt never delays the next update);
- it logs one JSON object per line on stderr: ``applied`` for each update
  that brought records, ``refused``, ``disconnected``, ``receipt``, ... (a
  re-signed checkpoint at the same size only keeps the view fresh: silent,
  but ``fresh`` when it ends a stale spell);
- :func:`run_until_signal` stops it on SIGTERM or SIGINT: the tasks are
  cancelled between atomic writes, so the state is always whole.

Only one agent may follow a directory at a time (``agent.lock``, an
advisory ``flock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from ledger.acceptance import Evidence
from ledger.client import AsyncClient
from ledger.errors import HTTPStatusError, TransportError, UsageError, VerificationError, WritError

from .device import Device, SyncResult
from .sources import DEFAULT_TIMEOUT, MAX_REPLY, HttpSource, SseSource, Update, sync

__all__ = [
    "POLL_FALLBACK_PERIOD",
    "SSE_FAILURES_BEFORE_POLLING",
    "Agent",
    "agent_lock",
    "run_until_signal",
]

Push = Literal["sse", "poll"]

SSE_FAILURES_BEFORE_POLLING = 3
POLL_FALLBACK_PERIOD = 300.0
LOCK_FILE = "agent.lock"


class _StreamDown(Exception):
    """Raised from the SSE source's error hook to leave its own retry loop:
    the agent decides when and how to reconnect (poll first, then backoff)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _jitter(seconds: float) -> float:
    return seconds * (0.5 + random.random())


@contextlib.contextmanager
def agent_lock(directory: Path) -> Iterator[None]:
    """Hold ``DIR/agent.lock`` exclusively, or refuse: one agent per device."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another device agent already follows {directory}") from None
        yield
    finally:
        os.close(fd)


class Agent:
    """Follows the ledger at ``server`` for ``device`` until cancelled."""

    def __init__(
        self,
        device: Device,
        server: str,
        *,
        push: Push = "sse",
        poll_interval: float = 30.0,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: tuple[float, float] = (0.5, 15.0),
        idle_timeout: float = 45.0,
        log: IO[str] | None = None,
        clock: Callable[[], float] = time.time,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if push not in ("sse", "poll"):
            raise UsageError("push is sse or poll")
        self.device = device
        self.server = server.rstrip("/")
        self.push: Push = push
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.backoff = backoff
        self.idle_timeout = idle_timeout
        self._log = log if log is not None else sys.stderr
        self.clock = clock
        self._client = client
        self._delay = backoff[0]
        self._sse_failures = 0
        self._poll_until = 0.0
        self._receipt_wanted = asyncio.Event()
        self._warned_no_grant = False
        self._stale = False
        #: counters (tests and the benchmark read them)
        self.applied = 0
        self.refused = 0
        self.receipts = 0

    # -- output --------------------------------------------------------------

    def log(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": round(self.clock(), 3), **fields}, separators=(",", ":"))
        with contextlib.suppress(OSError, ValueError):  # a closed stderr must not stop enforcement
            self._log.write(line + "\n")
            self._log.flush()

    def _now(self) -> int:
        return int(self.clock())

    # -- applying ------------------------------------------------------------

    def _applied(self, res: SyncResult, via: str) -> None:
        self._delay = self.backoff[0]
        if res.appended == 0:
            # the same head: nothing new to log or to receipt; a re-signed checkpoint
            # (every --checkpoint-interval) only keeps the view fresh, which is logged
            # when it ends a stale spell
            if self._stale and not res.stale:
                self.log("fresh", via=via, size=res.size, checkpoint_time=res.checkpoint_time)
            self._stale = res.stale
            return
        self._stale = res.stale
        self.applied += 1
        self.log("applied", via=via, **res.to_json())
        self._receipt_wanted.set()

    def _apply(self, upd: Update, via: str) -> None:
        try:
            res = self.device.apply(upd, self._now())
        except VerificationError as exc:
            self.refused += 1
            self.log("refused", via=via, error=exc.type, message=exc.message, size=self.device.size)
            raise
        self._applied(res, via)

    async def _poll_once(self, client: httpx.AsyncClient, tiles: HttpSource) -> None:
        try:
            res = await sync(self.device, tiles, self._now())
        except VerificationError as exc:
            self.refused += 1
            self.log("refused", via="poll", error=exc.type, message=exc.message, size=self.device.size)
            raise
        self._applied(res, "poll")

    def _stream_error(self, tiles: HttpSource) -> Callable[[Exception], None]:
        def on_error(exc: Exception) -> None:
            if isinstance(exc, VerificationError):
                # the source could not even frame the data: keep it as evidence, as sync() does
                self.device.add_evidence(
                    Evidence.from_error(
                        exc, observed_at=self._now(), notes=(tiles.last_note,), data=tiles.last_bad
                    )
                )
            raise _StreamDown(exc)

        return on_error

    async def _follow_sse(self, client: httpx.AsyncClient, tiles: HttpSource) -> None:
        sse = SseSource(
            client,
            self.server,
            tiles_source=tiles,
            timeout=self.timeout,
            idle_timeout=self.idle_timeout,
            on_error=self._stream_error(tiles),
        )
        connected = False
        async for upd in sse.updates(lambda: self.device.size):
            if not connected:
                connected = True
                self._sse_failures = 0
                self.log("connected", via="sse", size=self.device.size)
            try:
                self._apply(upd, "sse")
            except VerificationError as exc:
                raise _StreamDown(exc) from None

    # -- receipts ------------------------------------------------------------

    async def _receipts(self, http: AsyncClient) -> None:
        delay = self.backoff[0]
        while True:
            await self._receipt_wanted.wait()
            self._receipt_wanted.clear()
            if self.device.own_grant is None:
                if not self._warned_no_grant:
                    self._warned_no_grant = True
                    self.log("receipt-skipped", message="this device has no device grant yet (enroll.bin)")
                continue
            body = self.device.receipt(self._now())
            try:
                status, answer = await http.post("v1/receipts", body, "application/msgpack", cap=MAX_REPLY)
            except TransportError as exc:
                status, answer = 0, {"type": exc.type, "detail": exc.message}
            if status == 200:
                delay = self.backoff[0]
                self.receipts += 1
                self.log("receipt", size=self.device.size)
                continue
            problem = answer.get("type") if isinstance(answer, dict) else None
            self.log("receipt-failed", status=status, problem=problem)
            if status in (0, 429, 502, 503, 504):  # worth retrying: the head may still be current
                self._receipt_wanted.set()
                await asyncio.sleep(_jitter(delay))
                delay = min(delay * 2, self.backoff[1])

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        """Follow until cancelled. Only usage errors (a bad URL) end it."""
        async with contextlib.AsyncExitStack() as stack:
            # the one fetch layer's async face (its own httpx client unless one was given)
            http = await stack.enter_async_context(
                AsyncClient(self.server, http=self._client, timeout=self.timeout)
            )
            client = http.http
            tiles = HttpSource(client, self.server, timeout=self.timeout)
            receipts = asyncio.create_task(self._receipts(http))
            stack.callback(receipts.cancel)
            self._stale = self.device.is_stale(self._now())
            self.log("started", server=self.server, push=self.push, size=self.device.size)
            while True:
                polled = False
                try:
                    await self._poll_once(client, tiles)
                    polled = True
                    if self.push == "sse" and time.monotonic() >= self._poll_until:
                        await self._follow_sse(client, tiles)
                    else:
                        await asyncio.sleep(_jitter(self.poll_interval))
                        continue
                except _StreamDown as down:
                    self._stream_down(down.cause, polled)
                except (TransportError, VerificationError) as exc:
                    if isinstance(exc, TransportError):
                        self.log("unreachable", error=exc.type, message=exc.message)
                except OSError as exc:  # the state could not be written (disk full): it is unchanged
                    self.log("io-error", message=exc.strerror or type(exc).__name__)
                await asyncio.sleep(_jitter(self._delay))
                self._delay = min(self._delay * 2, self.backoff[1])

    def _stream_down(self, exc: Exception, polled: bool) -> None:
        err = exc if isinstance(exc, WritError) else TransportError(str(exc))
        if not isinstance(exc, VerificationError):
            self.log("disconnected", via="sse", error=err.type, message=err.message)
        self._sse_failures += 1
        status = exc.detail.get("status") if isinstance(exc, HTTPStatusError) else None
        if polled and (self._sse_failures >= SSE_FAILURES_BEFORE_POLLING or status in (404, 405, 501)):
            self._poll_until = time.monotonic() + POLL_FALLBACK_PERIOD
            self._sse_failures = 0
            self.log(
                "polling",
                message=f"the event stream keeps failing while polling works: polling every"
                f" {self.poll_interval:g} s for {POLL_FALLBACK_PERIOD:g} s",
            )


async def run_until_signal(agent: Agent, *, grace: float = 4.0) -> None:
    """Run ``agent`` until SIGTERM or SIGINT (then return) or a fatal error (raised)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    task = asyncio.create_task(agent.run())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, grace)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    agent.log("stopped", size=agent.device.size, root=agent.device.root.hex())
