"""The fleet shared among several processes (``FleetOptions.processes``).

One Python process verifies on one core, and a fleet of N devices is N
devices verifying at once: with ``processes = P > 1`` the booted fleet is
split into P contiguous shares once the setup is done (the template and the
copies, every device's own grant, the tablet accepted: nothing timed), and
P - 1 child processes are forked, each taking one share with its devices'
state (copy-on-write). A child opens its own push connections and runs its
own event loop with its own HTTP clients and tile cache (an edge cache per
process), so every device still receives, verifies and applies every update
by itself, P devices at a time. The parent keeps the first share and drives
the phases of :func:`~device_sim.fleet.lost_tablet.run_lost_tablet`; each
child answers each command over a socket pair (one JSON document a line):

- ``start``: open the push connections (their count shared in proportion);
- ``arm``: take the devices named offline off the network, give every
  device the tablet's auth for a fresh challenge (the tablet's key was
  forked with the child, like the fleet's devices), start counting bytes;
- ``wait``: bring the offline and late devices back when due, wait until
  every device of the share has checked the tablet (at most ``deadline`` s);
- ``receipts``: every device that applied the revoke posts its receipt;
- ``report``: each device's refusal time, reason and receipt, the share's
  bytes, connections and errors; then the child closes and exits.

A refusal time is a ``time.monotonic()`` reading, one clock for every
process of the machine (Linux: CLOCK_MONOTONIC), so the parent compares the
children's readings with its own acknowledgement time directly. A child
that fails answers ``{"error": TYPE, "message": TEXT}`` (the parent raises
the error of that type), and exits when the parent closes the socket or
goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, NoReturn

from ledger.crypto import Signer
from ledger.errors import TransportError, UsageError, WritError, by_type

from ..measure import rss_kib
from .model import DEFAULT_CONNECTIONS, Member

if TYPE_CHECKING:
    from .devices import Fleet

__all__ = ["Shards", "connections_for"]

#: the largest answer a child sends (a report: about 200 bytes a device).
_MAX_LINE = 64 * 1024 * 1024
#: seconds a child has to exit once it reported (or was told to stop).
_EXIT_WAIT = 10.0


def connections_for(total_devices: int, share: int, connections: int | None) -> int:
    """A share's push connections: its part of ``connections`` (default
    ``min(N, DEFAULT_CONNECTIONS)``), so that P processes open as many as one would."""
    k = connections or min(total_devices, DEFAULT_CONNECTIONS)
    return max(1, min(share, round(k * share / total_devices)))


class _Child:
    """The parent's end of one child process."""

    def __init__(self, pid: int, sock: socket.socket, members: list[Member]) -> None:
        self.pid = pid
        self.sock = sock
        self.members = members
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.exited = False

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            if self.writer is None or self.reader is None:
                self.reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=_MAX_LINE)
            self.writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
            await self.writer.drain()
            line = await self.reader.readline()
        except OSError:  # the connection to it was reset
            line = b""
        if not line.endswith(b"\n"):
            raise TransportError(f"the fleet's process {self.pid} went away during {op!r}")
        doc: dict[str, Any] = json.loads(line)
        if "error" in doc:
            raise _error(str(doc["error"]), f"fleet process {self.pid}: {doc.get('message', '')}")
        return doc

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self.writer.wait_closed()
        else:
            self.sock.close()
        if self.exited:
            return
        deadline = time.monotonic() + _EXIT_WAIT
        with contextlib.suppress(ChildProcessError):  # reaped already
            while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:  # still busy (a long wait): stopped
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                await asyncio.sleep(0.02)
        self.exited = True


def _error(type_: str, message: str) -> WritError:
    """The error a child reported, as the class of that type (else a usage error)."""
    cls = by_type(type_)
    if cls is not None:
        with contextlib.suppress(TypeError):
            return cls(message)
    return UsageError(message)


class Shards:
    """The child processes of a fleet and what they reported (see the module docstring)."""

    def __init__(self, children: list[_Child], total: int) -> None:
        self.children = children
        self.total = total
        #: per child: its ``start`` and ``report`` answers
        self.started: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        #: what the children's resident memory grew by from the fork to the end of the
        #: propagation (a child's RSS counts the pages it shares with the parent too)
        self.rss_kib = 0
        #: the children's CPU seconds from their arming to their last device's refusal
        self.cpu_s = 0.0

    @classmethod
    def fork(cls, fleet: Fleet, processes: int, grant_record: bytes, tablet: Signer) -> Shards:
        """Split ``fleet.members`` into ``processes`` contiguous shares; fork a
        child for every share but the first, which the parent's ``fleet`` keeps."""
        members = fleet.members
        size = math.ceil(len(members) / processes)
        shares = [members[i : i + size] for i in range(0, len(members), size)]
        children: list[_Child] = []
        sys.stdout.flush()
        sys.stderr.flush()
        # the objects so far leave the collector's generations: a child's collections
        # then never walk (and so copy) the pages it shares with the parent
        gc.collect()
        gc.freeze()
        try:
            for share in shares[1:]:
                mine, theirs = socket.socketpair()
                pid = os.fork()
                if pid == 0:  # the child: never returns
                    mine.close()
                    for c in children:
                        c.sock.close()
                    _child_main(fleet, share, len(members), grant_record, tablet, theirs)
                theirs.close()
                children.append(_Child(pid, mine, share))
        except OSError as exc:  # no more processes: those forked already are stopped
            for c in children:
                c.sock.close()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(c.pid, 0)
            raise UsageError(f"cannot start the fleet's processes: {exc.strerror or exc}") from None
        fleet.members = shares[0]
        fleet.remote = [m for share in shares[1:] for m in share]
        return cls(children, len(members))

    async def _all(self, op: str, **args: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(c.call(op, **args) for c in self.children)))

    async def start(self) -> None:
        self.started = await self._all("start")

    @property
    def connections(self) -> int:
        return sum(int(s["connections"]) for s in self.started)

    @property
    def ready(self) -> int:
        return sum(int(s["ready"]) for s in self.started)

    @property
    def per_device(self) -> bool:
        return all(bool(s["per_device"]) for s in self.started)

    async def arm(self, revoke_seq: int, offline: list[Member]) -> None:
        names = {m.index for m in offline}
        await asyncio.gather(
            *(
                c.call("arm", revoke_seq=revoke_seq, offline=[m.index for m in c.members if m.index in names])
                for c in self.children
            )
        )

    async def wait(self, *, offline_at: float, late_at: float, deadline: float) -> bool:
        """Until every child's devices refused (each at most ``deadline`` s)."""
        done = await self._all("wait", offline_at=offline_at, late_at=late_at, deadline=deadline)
        self.rss_kib = sum(int(d["rss_grown_kib"]) for d in done)
        self.cpu_s = sum(float(d["cpu_s"]) for d in done)
        return all(bool(d["done"]) for d in done)

    async def receipts(self) -> int:
        """Every child's devices post their receipts; how many the server accepted."""
        return sum(int(r["accepted"]) for r in await self._all("receipts"))

    async def report(self, acked_at: float) -> None:
        """Each child's account, copied into the parent's :class:`Member` of each of its devices."""
        self.reports = await self._all("report", acked_at=acked_at)
        for c, rep in zip(self.children, self.reports, strict=True):
            by_index = {m.index: m for m in c.members}
            for index, refused_at, reason, receipt_size, receipt_error in rep["members"]:
                m = by_index[index]
                m.refused_at, m.reason = refused_at, reason
                m.receipt_size, m.receipt_error = receipt_size, receipt_error
        for c in self.children:
            await c.close()

    def total_of(self, key: str) -> float:
        """The sum of a reported figure over the children."""
        return sum(float(r[key]) for r in self.reports)

    def events(self) -> list[dict[str, Any]]:
        return [e for r in self.reports for e in r["events"]]

    async def close(self) -> None:
        for c in self.children:
            await c.close()


# --- the child ------------------------------------------------------------------------------


def _child_main(
    parent: Fleet, share: list[Member], total: int, grant_record: bytes, tablet: Signer, sock: socket.socket
) -> NoReturn:
    """The forked child: a fresh event loop in a thread of its own (the parent's
    loop, copied mid-run, is never touched), then ``os._exit``: none of the
    parent's cleanups (its temporary directories, its clients) run here."""
    code = 70
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the whole fleet at once
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)  # the parent's loop's wake-up pipe is not ours to write

        def run() -> None:
            nonlocal code
            try:
                asyncio.run(_serve(parent, share, total, grant_record, tablet, sock))
                code = 0
            except BaseException as exc:  # reported, never a traceback
                sys.stderr.write(f"fleet: process {os.getpid()} failed: {type(exc).__name__}: {exc}\n")

        t = threading.Thread(target=run, name="fleet-shard")
        t.start()
        t.join()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


async def _serve(
    parent: Fleet, share: list[Member], total: int, grant_record: bytes, tablet: Signer, sock: socket.socket
) -> None:
    from .devices import Fleet

    rss0 = rss_kib()
    fleet = Fleet(parent.url, parent.anchor, parent.origin, parent.options, clock=parent.clock)
    fleet.adopt(share)
    fleet.timings["rss0_kib"] = rss0
    reader, writer = await asyncio.open_connection(sock=sock, limit=_MAX_LINE)
    try:
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                return  # the parent closed the socket or went away
            msg = json.loads(line)
            try:
                out = await _do(fleet, msg, total, grant_record, tablet)
            except WritError as exc:
                out = {"error": exc.type, "message": exc.message}
            writer.write(json.dumps(out).encode() + b"\n")
            await writer.drain()
            if msg["op"] == "report":
                return
    finally:
        await fleet.close()
        writer.close()


async def _do(fleet: Fleet, msg: dict[str, Any], total: int, grant_record: bytes, tablet: Signer) -> Any:
    op = msg["op"]
    opts = fleet.options
    if op == "start":
        k = connections_for(total, len(fleet.members), opts.connections)
        await fleet.start_push(connections=k)
        return {
            "connections": len(fleet.relays),
            "ready": sum(1 for r in fleet.relays if r.ready.is_set()),
            "per_device": all(len(r.members) == 1 for r in fleet.relays),
        }
    if op == "arm":
        names = set(msg["offline"])
        await fleet.set_online([m for m in fleet.members if m.index in names], False)
        gc.collect()
        gc.freeze()  # as the parent does: no full collection over the devices mid-propagation
        fleet.arm(grant_record, tablet, int(msg["revoke_seq"]))
        fleet.mark_bytes()
        fleet.timings["cpu0"] = time.process_time()
        return {}
    if op == "wait":
        offline = [m for m in fleet.members if not m.online and not m.late]
        late = [m for m in fleet.members if m.late]
        now = time.monotonic()
        fleet.schedule_late(offline, max(0.0, float(msg["offline_at"]) - now))
        fleet.schedule_late(late, max(0.0, float(msg["late_at"]) - now))
        done = await fleet.wait_refused(float(msg["deadline"]))
        fleet.freeze_bytes()
        return {
            "done": done,
            "rss_grown_kib": max(0, rss_kib() - int(fleet.timings.get("rss0_kib", 0))),
            "cpu_s": time.process_time() - fleet.timings.get("cpu0", 0.0),
        }
    if op == "receipts":
        return {"accepted": await fleet.post_receipts()}
    if op == "report":
        acked = float(msg["acked_at"])
        await fleet.stop_push()
        return {
            "members": [
                [m.index, m.refused_at, m.reason, m.receipt_size, m.receipt_error] for m in fleet.members
            ],
            "events": fleet.events_json(acked),
            "bytes": fleet.bytes_since_mark(),
            "push_errors": fleet.push_errors,
            "source_errors": fleet.source_errors,
            "evidence": fleet.evidence_count,
            "tile_hits": fleet.tile_cache.hits if fleet.tile_cache is not None else 0,
            "tile_misses": fleet.tile_cache.misses if fleet.tile_cache is not None else 0,
        }
    raise UsageError(f"unknown fleet process command {op!r}")
