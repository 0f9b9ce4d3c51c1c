"""Bounded load against the real server on loopback: idle SSE clients, checkpoint polling, writers.

One client process (asyncio) against one ``writ serve`` process:

- ``--sse N`` idle ``GET /v1/events`` streams (raw sockets, so 10,000 are
  cheap), each recording when every checkpoint event arrives;
- ``--pollers P`` tasks polling ``GET /checkpoint`` every ``--poll-interval``;
- ``--writers W`` tasks appending signed grants (one record or a small
  batch, ``--write-pause`` between), racing for the head (409s re-sync).

Everything stops by itself after ``--duration`` seconds (and every loop is
bounded in count too). Then: every SSE client must have received the last
checkpoint, every acknowledged record must be served byte for byte, the
checkpoint must verify and name the served tree, and after SIGTERM
``writ audit --data`` must pass. Reported: latency percentiles (SSE connect,
fan-out = ack of an append to the event at each client, polls, writes),
status counts, the server's peak RSS.

    python -m reliability.load --sse 10000 --duration 30
    python -m reliability.load --sse 80 --max-sse-clients 50 --write-rate 5 --write-burst 5   # shedding
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import post_records
from device_sim.measure import peak_rss_kib, percentiles
from device_sim.server_process import ServerProcess, start_server, stop_server
from ledger import encoding
from ledger.crypto import SeedSigner, sha256
from ledger.fileio import raise_open_files_limit
from ledger.state import LedgerState
from ledger.tree import leaf_hash, mth

from .common import (
    base_ledger,
    fetch_records,
    grant_batch,
    init_server,
    machine,
    verify_checkpoint,
    writ_audit_data,
)

ORIGIN = "load.writ.example/ledger"
MSGPACK = {"content-type": "application/msgpack"}


@dataclass
class LoadConfig:
    sse: int = 1000
    pollers: int = 10
    writers: int = 2
    duration: float = 10.0
    poll_interval: float = 0.1
    write_pause: float = 0.02
    checkpoint_interval: float = 2.0
    max_sse_clients: int | None = None
    write_rate: float | None = None
    write_burst: int | None = None
    #: SSE connections opened at once (each batch waits for its answers before the next).
    connect_batch: int = 250
    seed: int = 1

    def server_flags(self) -> dict[str, Any]:
        flags: dict[str, Any] = {"checkpoint_interval": self.checkpoint_interval, "log_level": "warning"}
        flags["write_rate"] = self.write_rate if self.write_rate is not None else 100000
        flags["write_burst"] = self.write_burst if self.write_burst is not None else 100000
        if self.max_sse_clients is not None:
            flags["max_sse_clients"] = self.max_sse_clients
        return flags


@dataclass
class SseClient:
    status: int | None = None
    retry_after: str | None = None
    problem: str | None = None
    connect_s: float | None = None
    events: list[tuple[int, float]] = field(default_factory=list)  # (id, arrival)
    dropped: bool = False
    error: str | None = None


@dataclass
class LoadReport:
    config: dict[str, Any]
    seconds: float = 0.0
    sse_connected: int = 0
    sse_refused: Counter[str] = field(default_factory=Counter)  # "503 overloaded" -> count
    sse_refused_retry_after: int = 0
    sse_errors: Counter[str] = field(default_factory=Counter)
    sse_dropped: int = 0
    sse_missing_last: int = 0
    sse_events: int = 0
    sse_connect: dict[str, float] = field(default_factory=dict)
    notify: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    polls: int = 0
    poll_status: Counter[str] = field(default_factory=Counter)
    poll_latency: dict[str, float] = field(default_factory=dict)
    writes: Counter[str] = field(default_factory=Counter)  # status -> count
    write_retry_after: int = 0
    write_latency: dict[str, float] = field(default_factory=dict)
    acked_records: int = 0
    final_size: int = 0
    server_peak_rss_mib: float = 0.0
    audit_ok: bool = False
    violations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def ms(d: dict[str, float]) -> dict[str, float]:
            return {k: round(v * 1000, 1) for k, v in d.items()}

        return {
            "config": self.config,
            "seconds": round(self.seconds, 1),
            "sse": {
                "connected": self.sse_connected,
                "refused": dict(self.sse_refused),
                "refused_with_retry_after": self.sse_refused_retry_after,
                "errors": dict(self.sse_errors),
                "dropped": self.sse_dropped,
                "missing_last_checkpoint": self.sse_missing_last,
                "events_received": self.sse_events,
                "connect_ms": ms(self.sse_connect),
                "append_to_event_ms": ms(self.notify),
                "spread_ms": ms(self.spread),
            },
            "polls": {
                "count": self.polls,
                "status": dict(self.poll_status),
                "latency_ms": ms(self.poll_latency),
            },
            "writes": {
                "status": dict(self.writes),
                "429_with_retry_after": self.write_retry_after,
                "latency_ms": ms(self.write_latency),
                "acked_records": self.acked_records,
            },
            "final_size": self.final_size,
            "server_peak_rss_mib": round(self.server_peak_rss_mib, 1),
            "audit_ok": self.audit_ok,
            "violations": self.violations,
        }


class LoadRun:
    def __init__(self, work_dir: Path, config: LoadConfig) -> None:
        self.work_dir = work_dir
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.root = SeedSigner(sha256(b"writ-load-root/" + str(config.seed).encode()))
        self.report = LoadReport(config=dict(vars(config)))
        self.acks: list[tuple[int, float]] = []  # (size after the append, loop time the POST was sent)
        self.acked: dict[int, bytes] = {}
        self.clients: list[SseClient] = []
        self.poll_times: list[float] = []
        self.write_times: list[float] = []
        self.data_dir = work_dir / "data"
        self.log_key = b""
        self.base: list[bytes] = []

    # -- clients -------------------------------------------------------------

    async def sse(self, host: str, port: int, c: SseClient, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        except (OSError, TimeoutError) as exc:
            c.error = f"connect: {type(exc).__name__}"
            return
        try:
            writer.write(b"GET /v1/events HTTP/1.1\r\nHost: load\r\nAccept: text/event-stream\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 30)
            c.connect_s = loop.time() - t0
            parts = line.split()
            c.status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
            length = 0
            while True:
                h = await asyncio.wait_for(reader.readline(), 30)
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                if name.lower() == "retry-after":
                    c.retry_after = value.strip()
                elif name.lower() == "content-length":
                    length = int(value.strip())
            if c.status != 200:
                body = await asyncio.wait_for(reader.readexactly(length), 30) if length else b""
                with contextlib.suppress(ValueError):
                    c.problem = str(json.loads(body).get("type", "")).rsplit(":", 1)[-1]
                return
            reading = asyncio.ensure_future(self._events(reader, c, loop))
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                c.dropped = True
                failure = reading.exception()
                if failure is not None:
                    c.error = type(failure).__name__
            for t in (reading, stopping):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            c.error = type(exc).__name__
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _events(reader: asyncio.StreamReader, c: SseClient, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return  # the server ended the stream
            if line.startswith(b"id: "):
                c.events.append((int(line[4:].strip()), loop.time()))

    async def poller(self, url: str, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=30.0) as client:
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                t = loop.time()
                try:
                    r = await client.get(url + "/checkpoint")
                    self.report.poll_status[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    self.report.poll_status[type(exc).__name__] += 1
                self.poll_times.append(loop.time() - t)
                self.report.polls += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.cfg.poll_interval)

    async def writer(self, url: str, wid: int, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(self.rng.getrandbits(32))
        async with httpx.AsyncClient(timeout=60.0) as client:
            state = LedgerState(self.root.public_key, origin=ORIGIN)
            state.apply_all(await self._records(url, 0))
            n = 0
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                k = 1 if rng.random() < 0.7 else rng.randint(2, 20)
                work, raws = grant_batch(state, self.root, [f"l{wid}-{n + i}" for i in range(k)])
                n += k
                t0 = loop.time()
                try:
                    r = await client.post(
                        url + "/v1/records", content=encoding.pack_records(raws), headers=MSGPACK
                    )
                except httpx.HTTPError as exc:
                    self.report.writes[type(exc).__name__] += 1
                    return
                self.write_times.append(loop.time() - t0)
                self.report.writes[str(r.status_code)] += 1
                if r.status_code == 200:
                    doc = r.json()
                    self.acks.append((doc["size"], t0))
                    for i, raw in enumerate(raws):
                        self.acked[doc["first_seq"] + i] = raw
                    state = work
                elif r.status_code == 429:
                    if r.headers.get("retry-after"):
                        self.report.write_retry_after += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), float(r.headers.get("retry-after", "1")))
                    continue
                else:
                    state.apply_all(await self._records(url, state.size))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.cfg.write_pause)

    @staticmethod
    async def _records(url: str, start: int) -> list[bytes]:
        """The records from ``start`` on (a writer catching up), off the event loop."""

        def fetch() -> list[bytes]:
            with httpx.Client(timeout=60.0) as client:
                return fetch_records(client, url, start)

        return await asyncio.to_thread(fetch)

    # -- the run -------------------------------------------------------------

    async def _drive(self, srv: ServerProcess) -> None:
        cfg = self.cfg
        host, port = "127.0.0.1", int(srv.url.rsplit(":", 1)[1])
        stop = asyncio.Event()
        self.clients = [SseClient() for _ in range(cfg.sse)]
        sse_tasks: list[asyncio.Task[None]] = []
        for i in range(0, cfg.sse, cfg.connect_batch):
            batch = [
                asyncio.ensure_future(self.sse(host, port, c, stop))
                for c in self.clients[i : i + cfg.connect_batch]
            ]
            sse_tasks += batch
            # wait until this batch has its answers before the next (bounded)
            for _ in range(600):
                if all(
                    c.status is not None or c.error is not None
                    for c in self.clients[i : i + cfg.connect_batch]
                ):
                    break
                await asyncio.sleep(0.005)
        load = asyncio.Event()
        others = [asyncio.ensure_future(self.poller(srv.url, load)) for _ in range(cfg.pollers)]
        others += [asyncio.ensure_future(self.writer(srv.url, w, load)) for w in range(cfg.writers)]
        await asyncio.sleep(cfg.duration)
        load.set()
        await asyncio.gather(*others, return_exceptions=True)
        # the last append's checkpoint must reach every open stream (bounded wait)
        last = max((s for s, _ in self.acks), default=len(self.base))
        for _ in range(600):
            waiting = [
                c
                for c in self.clients
                if c.status == 200 and not c.dropped and (not c.events or c.events[-1][0] < last)
            ]
            if not waiting:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*sse_tasks, return_exceptions=True)

    def run(self) -> LoadReport:
        t0 = time.monotonic()
        raise_open_files_limit(self.cfg.sse + 1024)
        self.log_key = init_server(self.data_dir, self.root, ORIGIN)
        srv = start_server(self.data_dir, ready_timeout=60.0, **self.cfg.server_flags())
        try:
            self.base = base_ledger(self.root, ORIGIN, self.log_key)
            post_records(srv.url, self.base)
            self.acked.update(enumerate(self.base))
            self._run_loop(srv)
            self._check(srv)
            self.report.server_peak_rss_mib = peak_rss_kib(srv.process.pid) / 1024
        finally:
            code_stop = stop_server(srv.process)
        if code_stop != 0:
            self.report.violations.append(f"writ serve exited {code_stop} on SIGTERM")
        audit = writ_audit_data(self.data_dir, self.root.public_key)
        self.report.audit_ok = bool(audit["ok"]) and audit["size"] == self.report.final_size
        if not self.report.audit_ok:
            self.report.violations.append(f"writ audit --data: {audit}")
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _run_loop(self, srv: ServerProcess) -> None:
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(self._drive(srv))

    def _check(self, srv: ServerProcess) -> None:
        rep = self.report
        with httpx.Client(timeout=60.0) as client:
            served = fetch_records(client, srv.url)
            root = mth([leaf_hash(r) for r in served])
            try:
                verify_checkpoint(client, srv.url, ORIGIN, self.log_key, len(served), root)
            except (AssertionError, Exception) as exc:
                rep.violations.append(f"checkpoint: {exc!r}")
        rep.final_size = len(served)
        rep.acked_records = len(self.acked) - len(self.base)
        for seq, raw in self.acked.items():
            if seq >= len(served) or served[seq] != raw:
                rep.violations.append(f"acknowledged record {seq} is not served")
                break
        last_ack = max((s for s, _ in self.acks), default=len(self.base))
        notify: list[float] = []
        connects: list[float] = []
        acks = sorted(self.acks)
        first_seen: dict[int, float] = {}
        last_seen: dict[int, float] = {}
        for c in self.clients:
            if c.error is not None and c.status is None:
                rep.sse_errors[c.error] += 1
                continue
            if c.status != 200:
                rep.sse_refused[f"{c.status} {c.problem}"] += 1
                if c.retry_after:
                    rep.sse_refused_retry_after += 1
                continue
            rep.sse_connected += 1
            if c.connect_s is not None:
                connects.append(c.connect_s)
            if c.dropped:
                rep.sse_dropped += 1
                rep.sse_errors[c.error or "ended-by-server"] += 1
            rep.sse_events += len(c.events)
            if not c.events or max(i for i, _ in c.events) < last_ack:
                rep.sse_missing_last += 1
            for ident, t in c.events:
                first_seen[ident] = min(t, first_seen.get(ident, t))
                last_seen[ident] = max(t, last_seen.get(ident, t))
            # append to event: from the POST going out to the first event at this client naming its size
            ev = c.events
            j = 0
            for size, t_sent in acks:
                while j < len(ev) and ev[j][0] < size:
                    j += 1
                if j == len(ev):
                    break
                notify.append(max(0.0, ev[j][1] - t_sent))
        spread = [last_seen[i] - first_seen[i] for i in first_seen if i > len(self.base)]
        rep.sse_connect = percentiles(connects)
        rep.notify = percentiles(notify)
        rep.spread = percentiles(spread)
        rep.poll_latency = percentiles(self.poll_times)
        rep.write_latency = percentiles(self.write_times)
        if rep.sse_dropped:
            rep.violations.append(f"{rep.sse_dropped} event streams ended before the run did")
        if rep.sse_missing_last:
            rep.violations.append(f"{rep.sse_missing_last} event streams never got the last checkpoint")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reliability.load", description=__doc__.split("\n\n")[0])
    d = LoadConfig()
    ap.add_argument("--sse", type=int, default=d.sse)
    ap.add_argument("--pollers", type=int, default=d.pollers)
    ap.add_argument("--writers", type=int, default=d.writers)
    ap.add_argument("--duration", type=float, default=d.duration)
    ap.add_argument("--poll-interval", type=float, default=d.poll_interval)
    ap.add_argument("--write-pause", type=float, default=d.write_pause)
    ap.add_argument("--checkpoint-interval", type=float, default=d.checkpoint_interval)
    ap.add_argument("--max-sse-clients", type=int)
    ap.add_argument("--write-rate", type=float)
    ap.add_argument("--write-burst", type=int)
    ap.add_argument("--connect-batch", type=int, default=d.connect_batch)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work-dir", type=Path)
    args = ap.parse_args(argv)
    cfg = LoadConfig(
        sse=args.sse,
        pollers=args.pollers,
        writers=args.writers,
        duration=args.duration,
        poll_interval=args.poll_interval,
        write_pause=args.write_pause,
        checkpoint_interval=args.checkpoint_interval,
        max_sse_clients=args.max_sse_clients,
        write_rate=args.write_rate,
        write_burst=args.write_burst,
        connect_batch=args.connect_batch,
        seed=args.seed,
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="writ-load-"))
    work.mkdir(parents=True, exist_ok=True)
    report = LoadRun(work, cfg).run()
    out = report.to_json()
    out["machine"] = machine()
    print(json.dumps(out, indent=1))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
