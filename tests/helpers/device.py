"""Test ledgers and a hostile test log for the device tests.

:class:`World` signs a small ledger with deterministic keys (root, log,
revoker, an operator tablet) and checkpoints over any prefix of it.
:class:`FakeLog` serves ``/checkpoint``, ``/tile/entries/...``,
``/v1/events`` and ``/v1/receipts`` from memory and can be told to misbehave;
it plugs into httpx as a ``MockTransport`` (in-process, streaming) or runs as
a real uvicorn server in a background thread (:func:`serve_in_thread`, for
subprocess tests of the CLI).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from ledger import checkpoints, compact, messages, notes, records, tiles
from ledger.crypto import SeedSigner, sha256
from ledger.errors import WritError
from ledger.records import Genesis, Grant, Revoke
from ledger.state import LedgerState
from ledger.tree import MerkleLevels, leaf_hash

T0 = 1_700_000_000
ORIGIN = "ledger.test.example/plant-1"


def signer(name: str) -> SeedSigner:
    return SeedSigner(sha256(b"writ-device-tests/" + name.encode()))


class World:
    """A ledger being written by an integrator: genesis, the log grant and a revoker."""

    def __init__(self, origin: str = ORIGIN, *, log: SeedSigner | None = None, tag: str = "") -> None:
        self.origin = origin
        self.root = signer("root")
        self.log = log if log is not None else signer("log")
        self.revoker = signer("revoker")
        self.tablet = signer("tablet" + tag)
        self.state = LedgerState(self.root.public_key, origin=origin)
        self.records: list[bytes] = []
        self.levels = MerkleLevels()
        self.time = T0
        self.add(Genesis(0, self.state.root, self._tick(), origin, self.root.public_key, None))
        self.log_seq = self.grant(self.log.public_key, "log", "log")
        self.revoker_seq = self.grant(self.revoker.public_key, "revoker", "revoker")

    def _tick(self) -> int:
        self.time += 1
        return self.time

    @property
    def size(self) -> int:
        return len(self.records)

    def add(self, body: records.Body, key: SeedSigner | None = None) -> int:
        raw = records.sign(body, key if key is not None else self.root)
        self.state.apply(raw)
        self.records.append(raw)
        self.levels.append(leaf_hash(raw))
        return body.seq

    def grant_body(
        self,
        subject: bytes,
        role: str,
        name: str,
        *,
        scope: str = "",
        not_before: int = 0,
        not_after: int = 0,
        seq: int | None = None,
        prev: bytes | None = None,
    ) -> Grant:
        return Grant(
            self.size if seq is None else seq,
            self.state.root if prev is None else prev,
            self._tick(),
            subject,
            role,
            scope,
            name,
            not_before,
            not_after,
        )

    def grant(self, subject: bytes, role: str, name: str, **kw: Any) -> int:
        return self.add(self.grant_body(subject, role, name, **kw))

    def grant_record(self, subject: bytes, role: str, name: str, **kw: Any) -> bytes:
        """A root-signed grant that is NOT published."""
        return records.sign(self.grant_body(subject, role, name, **kw), self.root)

    def revoke(self, target: int | bytes, reason: int = 2, *, by_revoker: bool = False) -> int:
        signer_seq = self.revoker_seq if by_revoker else 0
        body = Revoke(self.size, self.state.root, self._tick(), signer_seq, target, reason)
        return self.add(body, self.revoker if by_revoker else self.root)

    def root_at(self, size: int | None = None) -> bytes:
        return self.levels.root(self.size if size is None else size)

    def checkpoint(
        self,
        ts: int,
        size: int | None = None,
        *,
        key: SeedSigner | None = None,
        root: bytes | None = None,
        origin: str | None = None,
    ) -> str:
        n = self.size if size is None else size
        cp = checkpoints.Checkpoint(origin or self.origin, n, root if root is not None else self.root_at(n))
        return checkpoints.sign_checkpoint(
            cp, origin or self.origin, key if key is not None else self.log, ts
        )

    def plain_checkpoint(self, size: int | None = None) -> str:
        """Signed 0x01 only (no timestamp)."""
        n = self.size if size is None else size
        cp = checkpoints.Checkpoint(self.origin, n, self.root_at(n))
        return notes.sign_note(cp.body(), [(self.origin, self.log)])

    def bundle(self, start: int, ts: int, size: int | None = None) -> bytes:
        n = self.size if size is None else size
        return messages.make_bundle(start, self.records[start:n], self.checkpoint(ts, n))

    def auth(
        self, grant_record: bytes, key: SeedSigner, device_key: bytes, challenge: bytes, at: int
    ) -> bytes:
        return messages.make_auth(grant_record, key, device_key, challenge, at)


# --- the fake log -------------------------------------------------------------

Tamper = Callable[[str, bytes], bytes]


@dataclass
class Reply:
    status: int
    body: bytes | AsyncIterator[bytes]
    content_type: str = "application/octet-stream"


@dataclass
class FakeLog:
    """An in-memory log server that can be told to misbehave.

    ``records`` and ``note`` are what it serves; ``tamper(path, body)`` rewrites
    any body; ``slow`` trickles a byte a second forever; ``endless`` streams
    an endless body; ``status`` answers every request with that HTTP status.
    """

    records: list[bytes] = field(default_factory=list)
    note: str = ""
    tamper: Tamper | None = None
    slow: bool = False
    endless: bool = False
    status: int | None = None
    drop_partial: bool = False
    events_records: bool = True
    #: events in the compact format (``?format=compact``, :mod:`ledger.compact`) whatever was asked
    events_compact: bool = False
    events_per_connection: int | None = None
    receipts: list[messages.Receipt] = field(default_factory=list)
    device_keys: dict[int, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    closing: bool = False

    def __post_init__(self) -> None:
        self._version = 0
        self._changed: asyncio.Event | None = None

    def publish(self, world: World, ts: int, size: int | None = None) -> None:
        n = world.size if size is None else size
        self.records = list(world.records[:n])
        self.note = world.checkpoint(ts, n)
        self.notify()

    def notify(self) -> None:
        self._version += 1
        old, self._changed = self._changed, None
        if old is not None:
            old.set()

    # -- routes ----------------------------------------------------------------

    async def _slow(self) -> AsyncIterator[bytes]:
        while not self.closing:
            yield b"x"
            await asyncio.sleep(0.2)

    async def _endless(self) -> AsyncIterator[bytes]:
        chunk = b"\x00\x10" + bytes(16)
        for _ in range(10_000_000):
            if self.closing:
                return
            yield chunk * 256
            await asyncio.sleep(0)

    def _body(self, path: str, body: bytes) -> bytes:
        return self.tamper(path, body) if self.tamper is not None else body

    async def reply(self, method: str, path: str, headers: httpx.Headers, content: bytes) -> Reply:
        self.requests.append(path)
        if self.status is not None:
            return Reply(self.status, b'{"type": "urn:writ:problem:overloaded"}', "application/problem+json")
        if self.slow:
            return Reply(200, self._slow())
        if self.endless:
            return Reply(200, self._endless())
        p = path.lstrip("/")
        if p == "checkpoint":
            return Reply(200, self._body(p, self.note.encode()), "text/plain; charset=utf-8")
        if p.startswith("tile/entries/"):
            try:
                tile = tiles.parse_tile_path(p)
            except WritError:
                return Reply(404, b"not found")
            first = tile.index * tiles.TILE_WIDTH
            gone = self.drop_partial and tile.is_partial and first + tile.width != len(self.records)
            if first + tile.width > len(self.records) or gone:
                return Reply(404, b"not found")
            body = tiles.encode_entry_bundle(self.records[first : first + tile.width])
            return Reply(200, self._body(p, body))
        if p == "v1/events":
            return Reply(200, self._events(headers), "text/event-stream")
        if p == "v1/receipts" and method == "POST":
            return self._receipt(content)
        return Reply(404, b"not found")

    def _receipt(self, content: bytes) -> Reply:
        try:
            r = messages.parse_receipt(content)
            key = self.device_keys[r.device_grant_seq]
            r.verify(key)
        except (WritError, KeyError):
            return Reply(
                422,
                json.dumps({"type": "urn:writ:problem:unknown-device", "status": 422}).encode(),
                "application/problem+json",
            )
        self.receipts.append(r)
        body = {"accepted": True, "device_grant_seq": r.device_grant_seq, "size": r.size}
        return Reply(200, json.dumps(body).encode(), "application/json")

    async def _events(self, headers: httpx.Headers) -> AsyncIterator[bytes]:
        last_id = headers.get("last-event-id")
        last = int(last_id) if last_id is not None and last_id.isdigit() else None
        sent = 0
        prev: str | None = None
        while not self.closing:
            version = self._version
            size = len(self.records)
            if self.events_compact:
                fits = self.events_records and last is not None and 0 < size - last <= compact.MAX_RECORDS
                data = compact.encode(prev, self.note, size, self.records[last:size] if fits else [])
                yield f"id: {size}\ndata: {data}\n\n".encode()
                prev = self.note
            else:
                if self.events_records and last is not None and size > last:
                    recs = [base64.b64encode(r).decode() for r in self.records[last:size]]
                    yield (
                        "event: records\ndata: " + json.dumps({"start": last, "records": recs}) + "\n\n"
                    ).encode()
                lines = "".join(f"data: {line}\n" for line in self.note.rstrip("\n").split("\n"))
                yield f": hb\nid: {size}\nevent: checkpoint\n{lines}\n".encode()
            last = size
            sent += 1
            if self.events_per_connection is not None and sent >= self.events_per_connection:
                return
            if self._version == version and not self.closing:
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    # -- adapters --------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """For ``httpx.MockTransport``: the response body streams."""
        r = await self.reply(request.method, request.url.path, request.headers, request.content)
        return httpx.Response(r.status, content=r.body, headers={"content-type": r.content_type})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport())

    async def asgi(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = httpx.Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]])
        r = await self.reply(scope["method"], scope["path"], headers, body)
        out_headers = [(b"content-type", r.content_type.encode())]
        if isinstance(r.body, bytes):
            out_headers.append((b"content-length", str(len(r.body)).encode()))
        await send({"type": "http.response.start", "status": r.status, "headers": out_headers})
        if isinstance(r.body, bytes):
            await send({"type": "http.response.body", "body": r.body})
            return
        async for chunk in r.body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """A real uvicorn server on a free 127.0.0.1 port, in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="off",
        interface="asgi3",
        log_level="error",
        access_log=False,
        loop="asyncio",
        ws="none",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
