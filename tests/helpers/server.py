"""Test helpers for anything that needs a Writ ledger server.

Stable API (other test modules use it):

``make_ledger(root, origin, log_key, n_grants=0, *, time=None) -> list[bytes]``
    Record bytes of a new ledger: a genesis signed by ``root`` (a
    :class:`~ledger.crypto.SeedSigner` whose public key is the anchor), a grant
    of role ``log`` to ``log_key`` (32 bytes; the server's log public key),
    then ``n_grants`` operator grants named ``grant-0``, ``grant-1``, ... to
    fresh random keys. ``prev``/``seq`` come from a
    :class:`~ledger.state.LedgerState` that applies each record.

``Mirror(root, origin, *, time=None)``
    Builds further records on top of a ledger: ``genesis()``, ``grant(subject,
    role, name, scope="", not_before=0, not_after=0)``, ``revoke(target,
    reason=0, signer=None)`` each sign, apply to the mirror's state and return
    the record bytes; ``extend(raws)`` applies records made elsewhere;
    ``.state``, ``.records``.

``async with inprocess_server(tmp_path, anchor, origin, storage=None, *, clock=None,
        limits=None, checkpoint_interval=10.0, data_dir=None) as (client, app):``
    A server app (``api.app.create_app``) with its lifespan running, and an
    ``httpx.AsyncClient`` on it through ``httpx.ASGITransport`` (base URL
    ``http://writ.test``). ``storage`` defaults to SQLite in a new data
    directory under ``tmp_path``; pass a :class:`~ledger.storage.MemoryStorage`
    (it is initialised for you if new). ``data_dir`` reuses a directory from
    an earlier call (a restart). ``app.state.service`` is the
    :class:`api.service.LedgerService`.

``Clock(t)``, ``service(app)``, ``await post_records(client, raws)``
    A settable clock for ``clock=``; the app's :class:`api.service.LedgerService`;
    ``POST /v1/records`` of ``raws`` (returns the response).

``async with sse_stream(app, "/v1/events?records=1", headers={...}) as stream:``
    ``await stream.next_event(timeout=2.0)`` -> ``SSEEvent(event, id, data, comment)``
    (httpx's ASGITransport buffers whole responses, so SSE goes through this).

``with running_server(tmp_path, anchor, origin, **flags) as srv:``
    Runs ``writ server init`` and the real ``writ serve`` process on a free
    port, waits until ``GET /checkpoint`` is 200, yields ``srv`` =
    ``RunningServer(url, log_public_key, data_dir, process)`` (a NamedTuple:
    unpack it or use the names), and stops it with SIGTERM, asserting it exits
    within 10 s. ``flags`` become ``writ serve`` options
    (``checkpoint_interval=1`` -> ``--checkpoint-interval 1``).
    ``start_server(data_dir, **flags)`` / ``stop_server(srv)`` restart one on
    an existing data directory. The process itself is started and stopped by
    :mod:`device_sim.server_process` (shipped: ``writ demo`` uses it too), which
    also provides ``writ_command()``, ``run_writ(*args)`` and ``free_port()``,
    re-exported here.

``served_records(url, start=0) -> list[bytes]``
    Every record a real server serves from ``start`` on (``GET /v1/records``,
    page by page, through :func:`reliability.common.fetch_records`).

``backup_data_dir(data_dir, dest) -> dest``
    A consistent online copy of a server's data directory (SQLite's backup
    API for ``ledger.db``, and ``server.json``) into a new directory ``dest``:
    what the backup script in docs/operations.md makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time as _time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from starlette.applications import Starlette

from api.app import create_app
from api.cli import create_data_dir
from api.config import Limits, ServerConfig, read_identity
from api.service import LedgerService
from device_sim import server_process
from device_sim.server_process import free_port as free_port
from device_sim.server_process import run_writ as run_writ
from device_sim.server_process import wait_ready as wait_ready
from device_sim.server_process import writ_command as writ_command
from ledger import encoding, records
from ledger.crypto import SeedSigner
from ledger.errors import LedgerMissing
from ledger.records import Genesis, Grant, Revoke
from ledger.state import LedgerState
from ledger.storage import Storage

BASE_URL = "http://writ.test"
MSGPACK = {"content-type": "application/msgpack"}

# --- building ledgers -----------------------------------------------------------


class Mirror:
    """A signing tool's mirror: builds records on top of ``state`` with ``root``."""

    def __init__(self, root: SeedSigner, origin: str, *, time: int | None = None) -> None:
        self.root = root
        self.origin = origin
        self.time = time
        self.state = LedgerState(root.public_key, origin=origin)
        self.records: list[bytes] = []

    def _now(self) -> int:
        return self.time if self.time is not None else int(_time.time())

    def _head(self) -> tuple[int, bytes, int]:
        return self.state.size, self.state.root, max(self._now(), self.state.last_time)

    def _add(self, raw: bytes) -> bytes:
        self.state.apply(raw)
        self.records.append(raw)
        return raw

    def extend(self, raws: Sequence[bytes]) -> None:
        for raw in raws:
            self._add(raw)

    def genesis(self, next_root_digest: bytes | None = None) -> bytes:
        seq, prev, t = self._head()
        body = Genesis(seq, prev, t, self.origin, self.root.public_key, next_root_digest)
        return self._add(records.sign(body, self.root))

    def grant(
        self,
        subject: bytes,
        role: str,
        name: str,
        scope: str = "",
        not_before: int = 0,
        not_after: int = 0,
    ) -> bytes:
        seq, prev, t = self._head()
        body = Grant(seq, prev, t, subject, role, scope, name, not_before, not_after)
        return self._add(records.sign(body, self.root))

    def revoke(
        self, target: int | bytes, reason: int = 0, signer: tuple[int, SeedSigner] | None = None
    ) -> bytes:
        """Revoke ``target`` (a grant seq or a subject key); ``signer`` = (revoker grant seq, its key)."""
        seq, prev, t = self._head()
        body = Revoke(seq, prev, t, signer[0] if signer else 0, target, reason)
        return self._add(records.sign(body, signer[1] if signer else self.root))


def make_ledger(
    root: SeedSigner, origin: str, log_key: bytes, n_grants: int = 0, *, time: int | None = None
) -> list[bytes]:
    """Genesis, the log grant, then ``n_grants`` operator grants (see the module docstring)."""
    m = Mirror(root, origin, time=time)
    m.genesis()
    m.grant(log_key, records.ROLE_LOG, "log")
    for i in range(n_grants):
        m.grant(secrets.token_bytes(32), records.ROLE_OPERATOR, f"grant-{i}")
    return m.records


# --- in process -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def inprocess_server(
    tmp_path: Path,
    anchor: bytes,
    origin: str,
    storage: Storage | None = None,
    *,
    clock: Any = None,
    limits: Limits | None = None,
    checkpoint_interval: float = 10.0,
    data_dir: Path | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette]]:
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="server-", dir=tmp_path)) / "data"
    if not (data_dir / "server.json").exists():
        await create_data_dir(data_dir, anchor, origin, storage=storage)
    elif storage is not None:
        try:
            await storage.meta()
        except LedgerMissing:
            await storage.init(origin, anchor, read_identity(data_dir).log_public_key)
    config = ServerConfig(
        data_dir=data_dir, checkpoint_interval=checkpoint_interval, limits=limits or Limits()
    )
    kwargs: dict[str, Any] = {"storage": storage}
    if clock is not None:
        kwargs["clock"] = clock
    app = create_app(config, **kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield client, app


class Clock:
    """A settable clock for ``inprocess_server(clock=...)``: ``clock.t = ...`` moves it."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def service(app: Starlette) -> LedgerService:
    """The app's single writer."""
    svc = app.state.service
    assert isinstance(svc, LedgerService)
    return svc


async def post_records(client: httpx.AsyncClient, raws: Sequence[bytes]) -> httpx.Response:
    """``POST /v1/records`` with ``raws`` (the reply is the caller's to check)."""
    return await client.post("/v1/records", content=encoding.pack_records(list(raws)), headers=MSGPACK)


@dataclass(frozen=True)
class SSEEvent:
    event: str | None
    id: str | None
    data: str
    comment: str | None = None


class SSEStream:
    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._buf = b""

    async def next_event(self, timeout: float = 2.0, *, comments: bool = False) -> SSEEvent:
        """The next event (or comment, with ``comments``); TimeoutError when none comes."""
        async with asyncio.timeout(timeout):
            while True:
                while b"\n\n" in self._buf:
                    block, self._buf = self._buf.split(b"\n\n", 1)
                    ev = _parse_block(block.decode("utf-8"))
                    if ev is None:
                        continue
                    if ev.comment is not None and not comments:
                        continue
                    return ev
                chunk = await self.chunks.get()
                if chunk is None:
                    raise EOFError("the stream ended")
                self._buf += chunk


def _parse_block(block: str) -> SSEEvent | None:
    event = ident = comment = None
    data: list[str] = []
    for line in block.split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            ident = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith("retry: "):
            return None
    if event is None and ident is None and not data and comment is None:
        return None
    return SSEEvent(event, ident, "\n".join(data), comment if event is None and not data else None)


@contextlib.asynccontextmanager
async def sse_stream(
    app: Starlette, path: str, headers: Mapping[str, str] | None = None
) -> AsyncIterator[SSEStream]:
    """Run one GET on ``app`` directly over ASGI and stream its body (see the module docstring)."""
    raw_path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "server": ("writ.test", 80),
        "client": ("127.0.0.1", 12345),
        "root_path": "",
        "app": app,
    }
    stream = SSEStream()
    started = asyncio.Event()
    disconnect = asyncio.Event()
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            stream.status = message["status"]
            stream.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            started.set()
        elif message["type"] == "http.response.body":
            if message.get("body"):
                stream.chunks.put_nowait(message["body"])
            if not message.get("more_body", False):
                stream.chunks.put_nowait(None)

    task = asyncio.create_task(app(scope, receive, send))
    try:
        async with asyncio.timeout(5):
            await started.wait()
        yield stream
    finally:
        disconnect.set()
        try:
            async with asyncio.timeout(5):
                await task
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- a real process (device_sim.server_process: what the demo starts too) ---------


class RunningServer(NamedTuple):
    url: str
    log_public_key: bytes
    data_dir: Path
    process: subprocess.Popen[bytes]


def start_server(
    data_dir: Path, *, port: int | None = None, ready_timeout: float = 20.0, **flags: Any
) -> RunningServer:
    """Start ``writ serve`` on ``data_dir`` and wait until it answers ``GET /checkpoint``."""
    srv = server_process.start_server(data_dir, port=port, ready_timeout=ready_timeout, **flags)
    return RunningServer(srv.url, read_identity(data_dir).log_public_key, data_dir, srv.process)


def stop_server(srv: RunningServer, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Signal the server and wait; asserts it exits within ``timeout`` seconds. Returns its exit code."""
    return stop_process(srv.process, sig, timeout, "writ serve")


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float, what: str) -> int:
    """Signal ``proc`` and wait; asserts it exits within ``timeout`` seconds. Returns its exit code."""
    alive = proc.poll() is None
    code = server_process.stop_server(proc, sig, timeout)
    if alive and code == -signal.SIGKILL and sig != signal.SIGKILL:
        raise AssertionError(f"{what} did not exit within {timeout} s of {signal.Signals(sig).name}")
    return code


@contextlib.contextmanager
def running_server(tmp_path: Path, anchor: bytes, origin: str, **flags: Any) -> Iterator[RunningServer]:
    data_dir = Path(tempfile.mkdtemp(prefix="serve-", dir=tmp_path)) / "data"
    code, doc, err = run_writ(
        "server", "init", "--data", str(data_dir), "--anchor", anchor.hex(), "--origin", origin
    )
    assert code == 0, (doc, err)
    srv = start_server(data_dir, **flags)
    assert srv.log_public_key.hex() == doc["log_public_key"]
    try:
        yield srv
    finally:
        stop_server(srv)


def backup_data_dir(data_dir: Path, dest: Path) -> Path:
    """A consistent copy of ``data_dir``'s ledger and identity in the new directory ``dest``."""
    dest.mkdir()
    src, dst = sqlite3.connect(data_dir / "ledger.db"), sqlite3.connect(dest / "ledger.db")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    shutil.copy(data_dir / "server.json", dest / "server.json")
    return dest


def served_records(url: str, start: int = 0) -> list[bytes]:
    """Every record the server at ``url`` serves from ``start`` on."""
    from reliability.common import fetch_records

    with httpx.Client(timeout=30) as client:
        return fetch_records(client, url, start)
