"""A simulated fleet in one asyncio process, and the lost-tablet measurement.

``python -m device_sim fleet --server URL --devices N --key FILE --passphrase-env VAR``
(CONFORMANCE.md, "Device") plays the story the ledger exists for: an
operator's tablet is lost, the integrator revokes it, and we measure how long
each of N field devices keeps honouring it.

1. The :class:`Integrator` (the root key holder) syncs and verifies the whole
   ledger with only the anchor, makes the log grant when it is missing, and
   grants every device (from its own enrollment request) and one operator
   tablet, in batches of at most 1000 records whose ``seq``/``prev`` come from
   its verified :class:`~ledger.state.LedgerState`, never from the server.
2. The :class:`Fleet` boots the devices. **Bootstrap model ("template")**: a
   device cannot afford to apply the whole ledger N times over in one
   simulation process, so ONE template device syncs and verifies the whole
   ledger from genesis through the tiles, and every other device starts from
   a copy of that verified state. This models N devices having done the same
   deterministic computation. Each device still verifies its OWN grant
   (``own_grant="leaf"``: the record bytes it was handed, signed by the root
   and equal to the leaf the verified computation found at that seq; or
   ``own_grant="proof"``: an inclusion proof from ``GET /v1/proof/inclusion``
   checked against its own accepted checkpoint), and from then on verifies
   every record and checkpoint it receives by itself: that is the real
   per-device cost, and what the measurement times. Late starters (an
   option) skip the template and sync from genesis themselves.
3. Every device must accept the tablet through a real challenge-response
   (the tablet signs an auth message for each device's fresh challenge).
4. Push: ``sse`` (``GET /v1/events?records=1``) or ``poll`` (``GET
   /checkpoint`` and tiles every ``poll_interval``). One socket per device is
   the realistic model, but tens of thousands of sockets and SSE parsers in
   one Python process cost more than the devices themselves, so by default
   ``connections = min(N, 500)`` streams each fan their events out to a group
   of devices, like an edge relay or an HTTP cache would (``connections = N``
   is the one-socket-per-device model). Each device in a group still applies
   and verifies the update itself. The output names the model that ran.
   The tiles go through a shared single-flight :class:`TileCache`, as they
   would through any HTTP cache in front of the origin (tiles are
   immutable), and every request through :class:`FastTransport`, a small
   HTTP/1.1 transport under the same ``httpx.AsyncClient`` API: httpcore's
   pool costs milliseconds of CPU per request, which this single process
   would otherwise report as propagation time.
5. Each device is given an auth the tablet signed, before the revoke, for an
   outstanding challenge. The integrator revokes the tablet (from a thread,
   so that the acknowledgement time is taken when the ``200`` arrives, not
   when the busy event loop gets round to it); each device, once it has
   applied an update that covers the revoke, runs ``check`` on that auth;
   the refusal time minus the acknowledgement time is its propagation time.
   A refusal that beats the acknowledgement (the push can overtake the HTTP
   answer) counts as 0 and is reported in ``refused_before_ack``.
6. Every device that applied the revoke posts its signed receipt (after the
   propagation phase by default, so that the simulator's own HTTP client
   does not slow down the devices being timed; ``receipts="during"`` posts
   each right after its refusal).

The lower bound: one revocation costs each device 5 Ed25519 verifications
(the revoke record, the checkpoint's 0x01 and 0x04 signatures, and in the
check the tablet's grant record and its auth signature). The fleet reports
``5 N / rate``, with the raw single-thread verify rate measured in the same
run: no propagation in this single process can beat it.

Options a :class:`Fleet` offers beyond the command line's: devices offline
at the revoke that come back later (they catch up through the tiles), late
starters, clock drift, a fixed clock, bundle-only sites
(:meth:`Fleet.apply_bundle`) and per-device syncs against any server
(:meth:`Fleet.sync_all`, the hostile-server tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import random
import secrets
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ledger import crypto, messages, records, tree, view
from ledger.crypto import SeedSigner, Signer
from ledger.errors import (
    BadMessage,
    BadProof,
    InvalidField,
    StaleHead,
    TransportError,
    UsageError,
    VerificationError,
    WritError,
)
from ledger.progress import Stage, stage
from ledger.records import Genesis, Grant, Kind, Revoke
from ledger.state import LedgerState
from ledger.view import AcceptedView, Evidence

from . import scenarios
from .cli import _seconds
from .device import DEFAULT_MAX_STALENESS, Device, OwnGrant, PendingUpdate
from .sources import (
    DEFAULT_TIMEOUT,
    BundleSource,
    HttpSource,
    SseSource,
    Update,
    fetch_bytes,
    post_bytes,
    sync,
)

__all__ = [
    "DEFAULT_CONNECTIONS",
    "HTTP_CLIENTS",
    "VERIFIES_PER_DEVICE",
    "FastTransport",
    "Fleet",
    "FleetOptions",
    "FleetResult",
    "Integrator",
    "Member",
    "Pushed",
    "TileCache",
    "percentile",
    "plot_refusals",
    "raise_open_files_limit",
    "register",
    "run_lost_tablet",
]

#: push connections when not given: min(N, this).
DEFAULT_CONNECTIONS = 500
#: Ed25519 verifications one revocation costs a device: the revoke record, the
#: checkpoint's 0x01 and 0x04 signatures, the tablet's grant record and its auth.
VERIFIES_PER_DEVICE = 5
#: records per POST /v1/records (the server's limit).
BATCH = 1000
PUSH_MODES = ("sse", "poll")
OWN_GRANT_MODES = ("leaf", "proof")
RECEIPT_MODES = ("after", "during")
HTTP_CLIENTS = ("fast", "httpx")

Clock = Callable[[], float]
#: builds a record body from the head it goes on: (seq, prev, time) -> body.
BodyMaker = Callable[[int, bytes, int], records.Body]


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; returns the soft limit now in force."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft == resource.RLIM_INFINITY or soft >= want:
            return int(soft)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return int(want)
    except (ImportError, ValueError, OSError):
        return -1


def _rss_kib() -> int:
    """This process's resident set size (KiB), 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return float(sorted_values[min(k, len(sorted_values)) - 1])


# --- the integrator -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pushed:
    """Records a push appended, and when the server acknowledged the last batch
    (``time.monotonic()`` taken as its 200 arrived)."""

    records: list[bytes]
    seqs: list[int]
    acked_at: float
    post_seconds: float

    @property
    def posted_at(self) -> float:
        """When the last batch's POST was sent (``time.monotonic()``)."""
        return self.acked_at - self.post_seconds


class Integrator:
    """The root key holder's side: a verified local state and strict pushes.

    Talks to the server with the CLI's synchronous :class:`ledger.cli.common.Client`
    from worker threads (``asyncio.to_thread``): the POST of a revoke is then
    timed by a thread that is not waiting behind thousands of simulated devices.
    """

    def __init__(self, server: str, root: Signer, *, client: Any = None) -> None:
        from ledger.cli.common import Client

        self.server = server
        self.root = root
        self.client = client if client is not None else Client(server)
        self._owns = client is None
        self.info: dict[str, Any] = {}
        self.state: LedgerState | None = None
        self.view: AcceptedView | None = None

    def close(self) -> None:
        if self._owns:
            self.client.close()

    @property
    def origin(self) -> str:
        return str(self.info["origin"])

    @property
    def anchor(self) -> bytes:
        return self.root.public_key

    @property
    def log_key(self) -> bytes:
        lk = self.info.get("log_public_key")
        try:
            key = bytes.fromhex(lk) if isinstance(lk, str) else b""
        except ValueError:
            key = b""
        if len(key) != 32:
            raise UsageError("the server reports no valid log_public_key in GET /v1/ledger")
        return key

    def _state(self) -> LedgerState:
        if self.state is None:
            raise UsageError("sync the integrator first")
        return self.state

    # -- sync ------------------------------------------------------------------

    async def sync(self) -> None:
        await asyncio.to_thread(self._sync)

    def _sync(self) -> None:
        if self.state is None:
            info = self.client.ledger()
            anchor = info.get("anchor")
            if anchor != self.anchor.hex():
                raise UsageError(
                    f"the server's ledger is anchored on {str(anchor)[:16]}…, not on this key"
                    f" ({self.anchor.hex()[:16]}…): give the root key of that ledger"
                )
            origin = info.get("origin")
            try:
                records.check_origin(origin)
            except InvalidField:
                raise UsageError("GET /v1/ledger reports no valid origin") from None
            self.info = info
            self.state = LedgerState(self.anchor, origin=str(origin))
        note = self.client.checkpoint()
        size = view.checkpoint_size(note)
        new = self._state().copy()
        while new.size < size:
            raws = self.client.records(new.size, min(BATCH, size - new.size))
            if not raws:
                raise BadMessage(f"GET /v1/records gave nothing at {new.size} below the checkpoint's {size}")
            new.apply_all(raws[: size - new.size])
        if new.active_keys(records.ROLE_LOG):
            self.view = view.accept(self.view, note, new, now=int(time.time()))
        self.state = new

    # -- writing ---------------------------------------------------------------

    async def push(self, makers: Sequence[tuple[BodyMaker, Signer]]) -> Pushed:
        """Sign and append ``makers`` in order, in batches of at most 1000.

        Each record is checked on a copy of the verified state before it is
        sent; on ``stale-head`` (another writer) the integrator re-syncs and
        re-signs what is left, up to three times."""
        return await asyncio.to_thread(self._push, list(makers))

    def _push(self, makers: list[tuple[BodyMaker, Signer]]) -> Pushed:
        out: list[bytes] = []
        seqs: list[int] = []
        acked = time.monotonic()
        post_s = 0.0
        i, retries = 0, 0
        while i < len(makers):
            chunk = makers[i : i + BATCH]
            st = self._state().copy()
            first = st.size
            raws = []
            for make, signer in chunk:
                t = max(int(time.time()), st.last_time)
                raw = records.sign(make(st.size, st.root, t), signer)
                st.apply(raw)
                raws.append(raw)
            t0 = time.monotonic()
            try:
                answer = self.client.post_records(raws)
            except StaleHead:
                retries += 1
                if retries > 3:
                    raise
                self._sync()
                continue
            acked = time.monotonic()
            post_s = acked - t0
            if answer.get("size") != st.size or answer.get("root") != st.root.hex():
                raise StaleHead(
                    "the server's head after our records is not the one computed from them",
                    size=answer.get("size"),
                )
            self.state = st
            out.extend(raws)
            seqs.extend(range(first, first + len(raws)))
            i += len(chunk)
        return Pushed(out, seqs, acked, post_s)

    async def ensure_ready(
        self, *, genesis: bool = False, next_root_digest: bytes | None = None
    ) -> list[str]:
        """Sync; make the genesis (only with ``genesis``) and the log grant when
        missing, using ``GET /v1/ledger``'s log key. Returns what it did."""
        await self.sync()
        did: list[str] = []
        st = self._state()
        makers: list[tuple[BodyMaker, Signer]] = []
        if st.size == 0:
            if not genesis:
                raise UsageError(
                    "the ledger is empty: push its genesis first (writ genesis --key FILE --origin"
                    f" {self.origin} --server {self.server})"
                )
            origin, anchor = self.origin, self.anchor
            makers.append((lambda s, p, t: Genesis(s, p, t, origin, anchor, next_root_digest), self.root))
            did.append("genesis")
        log_key = self.log_key
        if log_key not in st.active_keys(records.ROLE_LOG):
            makers.append((_grant_maker(log_key, records.ROLE_LOG, "log"), self.root))
            did.append("log-grant")
        if makers:
            await self.push(makers)
            await self.sync()
        if self.view is None:
            raise UsageError("the server's checkpoint could not be verified after the log grant")
        return did


def _grant_maker(subject: bytes, role: str, name: str, scope: str = "") -> BodyMaker:
    return lambda s, p, t: Grant(s, p, t, subject, role, scope, name, 0, 0)


def _revoke_maker(target: int | bytes, reason: int, signer_seq: int = 0) -> BodyMaker:
    return lambda s, p, t: Revoke(s, p, t, signer_seq, target, reason)


# --- a light HTTP/1.1 transport -------------------------------------------------------

_MAX_HEAD = 64 * 1024
_Key = tuple[str, str, int]


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _deadline(timeouts: dict[str, Any], name: str) -> float | None:
    v = timeouts.get(name)
    return float(v) if isinstance(v, int | float) else None


class _Body(httpx.AsyncByteStream):
    """A response body read from the connection as it comes (Content-Length,
    chunked, or until the server closes); the connection goes back to the
    pool only when the body was read to its end."""

    def __init__(
        self,
        pool: FastTransport,
        key: _Key,
        conn: _Conn,
        request: httpx.Request,
        length: int | None,
        chunked: bool,
        reusable: bool,
        read_timeout: float | None,
    ) -> None:
        self.pool, self.key, self.conn, self.request = pool, key, conn, request
        self.length, self.chunked, self.reusable = length, chunked, reusable
        self.read_timeout = read_timeout
        self.done = length == 0
        self.closed = False

    async def _read(self, op: Awaitable[bytes]) -> bytes:
        try:
            async with asyncio.timeout(self.read_timeout):
                return await op
        except TimeoutError:
            raise httpx.ReadTimeout("read timed out", request=self.request) from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.ReadError(f"read failed: {type(exc).__name__}", request=self.request) from None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        r = self.conn.reader
        if self.length is not None:
            left = self.length
            while left > 0:
                chunk = await self._read(r.read(min(left, 65536)))
                if not chunk:
                    raise httpx.RemoteProtocolError("the body ended early", request=self.request)
                left -= len(chunk)
                yield chunk
        elif self.chunked:
            while True:
                line = await self._read(r.readuntil(b"\r\n"))
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise httpx.RemoteProtocolError("bad chunk size", request=self.request) from None
                if size == 0:
                    while (await self._read(r.readuntil(b"\r\n"))) != b"\r\n":
                        pass  # trailers
                    break
                data = await self._read(r.readexactly(size + 2))
                yield data[:-2]
        else:
            self.reusable = False
            while chunk := await self._read(r.read(65536)):
                yield chunk
        self.done = True

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool._release(self.key, self.conn, self.done and self.reusable)


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams with a keep-alive pool, for ``httpx.AsyncClient``.

    httpcore's pool costs this fleet milliseconds of CPU per request (about
    20 times the server's own cost for a checkpoint), which would be measured
    as propagation time; this transport does what the fleet needs and no
    more: GET and POST, Content-Length, chunked and close-delimited bodies,
    streaming (event streams), timeouts, stale keep-alive retries, TLS.
    ``max_connections`` None: no limit (one event stream per device).
    """

    def __init__(self, *, max_connections: int | None = 64, ssl_context: Any = None) -> None:
        self.max_connections = max_connections
        self._ssl = ssl_context
        self._idle: dict[_Key, list[_Conn]] = {}
        self._sem: asyncio.Semaphore | None = None
        self._open: set[_Conn] = set()

    def _semaphore(self) -> asyncio.Semaphore | None:
        if self.max_connections is not None and self._sem is None:
            self._sem = asyncio.Semaphore(self.max_connections)
        return self._sem

    def _release(self, key: _Key, conn: _Conn, reuse: bool) -> None:
        if reuse and not conn.writer.is_closing():
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
            self._open.discard(conn)
        sem = self._semaphore()
        if sem is not None:
            sem.release()

    def _take_idle(self, key: _Key) -> _Conn | None:
        """A kept-alive connection the server has not closed meanwhile, if any."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
            self._open.discard(conn)
        return None

    async def _connect(self, key: _Key, request: httpx.Request, timeouts: dict[str, Any]) -> _Conn:
        scheme, host, port = key
        ssl_ctx: Any = None
        if scheme == "https":
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            async with asyncio.timeout(_deadline(timeouts, "connect")):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl_ctx, server_hostname=host if ssl_ctx else None, limit=_MAX_HEAD
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {exc.strerror}", request=request
            ) from None
        conn = _Conn(reader, writer)
        self._open.add(conn)
        return conn

    async def _exchange(
        self, conn: _Conn, request: httpx.Request, head: bytes, body: bytes, timeouts: dict[str, Any]
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        try:
            async with asyncio.timeout(_deadline(timeouts, "write")):
                conn.writer.write(head + body)
                await conn.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("write timed out", request=request) from None
        except OSError as exc:
            raise httpx.WriteError(f"write failed: {type(exc).__name__}", request=request) from None
        while True:
            try:
                async with asyncio.timeout(_deadline(timeouts, "read")):
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                raise httpx.ReadTimeout("read timed out", request=request) from None
            except asyncio.LimitOverrunError:
                raise httpx.RemoteProtocolError("the response head is too large", request=request) from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise httpx.RemoteProtocolError(
                    f"the server closed the connection ({type(exc).__name__})", request=request
                ) from None
            lines = raw[:-4].split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise httpx.RemoteProtocolError("not an HTTP/1.1 response", request=request)
            status = int(parts[1])
            headers = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    raise httpx.RemoteProtocolError("bad header line", request=request)
                headers.append((name.strip(), value.strip()))
            if 100 <= status < 200:
                continue  # 100 Continue and friends: the real answer follows
            return status, headers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"no {scheme!r} here", request=request)
        key = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        body = await request.aread()
        target = url.raw_path.decode("ascii")
        head = [f"{request.method} {target} HTTP/1.1".encode("ascii")]
        head += [k + b": " + v for k, v in request.headers.raw]
        if body and "content-length" not in request.headers:
            head.append(b"Content-Length: " + str(len(body)).encode())
        head_bytes = b"\r\n".join(head) + b"\r\n\r\n"
        sem = self._semaphore()
        if sem is not None:
            try:
                async with asyncio.timeout(_deadline(timeouts, "pool")):
                    await sem.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no connection free in time", request=request) from None
        conn: _Conn | None = None
        try:
            for attempt in (0, 1):
                conn = self._take_idle(key)
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(key, request, timeouts)
                try:
                    status, headers = await self._exchange(conn, request, head_bytes, body, timeouts)
                    break
                except (httpx.RemoteProtocolError, httpx.WriteError):
                    conn.close()
                    self._open.discard(conn)
                    conn = None
                    if not reused or attempt or request.method not in ("GET", "HEAD"):
                        raise
            assert conn is not None
        except BaseException:
            if conn is not None:
                conn.close()
                self._open.discard(conn)
            if sem is not None:
                sem.release()
            raise
        h = {k.lower(): v for k, v in headers}
        chunked = b"chunked" in h.get(b"transfer-encoding", b"").lower()
        length: int | None = None
        if request.method == "HEAD" or status in (204, 304):
            length = 0
        elif not chunked and b"content-length" in h:
            cl = h[b"content-length"]
            if not cl.isdigit():
                conn.close()
                self._release(key, conn, False)
                raise httpx.RemoteProtocolError("bad Content-Length", request=request)
            length = int(cl)
        reusable = h.get(b"connection", b"").lower() != b"close" and (chunked or length is not None)
        stream = _Body(self, key, conn, request, length, chunked, reusable, _deadline(timeouts, "read"))
        return httpx.Response(
            status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"}
        )

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()


# --- an edge cache for the tiles ----------------------------------------------------


class TileCache(httpx.AsyncBaseTransport):
    """An HTTP cache in front of the origin, for the tiles only.

    Tiles (``/tile/...``) are immutable (tlog-tiles), so any cache may keep
    them: this one keeps the last ``capacity`` 200 answers and makes
    concurrent requests for the same tile wait for one origin fetch
    (single-flight), as a CDN or an nginx ``proxy_cache_lock`` would. Every
    device still receives, and verifies, every byte; only the origin is
    spared. ``/checkpoint`` and everything else go straight to the origin.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, capacity: int = 128) -> None:
        self.inner = inner
        self.capacity = capacity
        self._cache: OrderedDict[str, tuple[int, list[tuple[bytes, bytes]], bytes]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _response(
        hit: tuple[int, list[tuple[bytes, bytes]], bytes], request: httpx.Request
    ) -> httpx.Response:
        status, headers, body = hit
        return httpx.Response(status, headers=headers, content=body, request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET" or "/tile/" not in request.url.path:
            return await self.inner.handle_async_request(request)
        key = str(request.url)
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return self._response(hit, request)
        waiting = self._inflight.get(key)
        if waiting is not None:
            self.hits += 1
            return self._response(await asyncio.shield(waiting), request)
        fut: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self._inflight[key] = fut
        self.misses += 1
        try:
            resp = await self.inner.handle_async_request(request)
            try:
                body = await resp.aread()
            finally:
                await resp.aclose()
            keep = [
                (k, v) for k, v in resp.headers.raw if k.lower() not in (b"transfer-encoding", b"connection")
            ]
            entry = (resp.status_code, keep, body)
            if resp.status_code == 200:
                self._cache[key] = entry
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            fut.set_result(entry)
            return self._response(entry, request)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[key]

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- the fleet ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetOptions:
    """How a fleet runs. Shares are of the devices, the template (device 0) excepted."""

    push: str = "sse"
    poll_interval: float = 2.0
    #: push connections; None: min(N, DEFAULT_CONNECTIONS). N: one per device.
    connections: int | None = None
    seed: int | None = None
    max_staleness: int = DEFAULT_MAX_STALENESS
    #: each device's clock is off by a uniform integer in [-drift, drift] seconds.
    drift: int = 0
    #: share of the booted devices (after the late ones are drawn) offline at the
    #: revoke, back ``offline_for`` s after the ack (they catch up through the tiles).
    offline: float = 0.0
    offline_for: float = 1.0
    #: share of devices that boot ``late_after`` s after the ack and sync from genesis.
    late: float = 0.0
    late_after: float = 1.0
    own_grant: str = "leaf"
    receipts: str = "after"
    #: seconds to wait, after the ack, for every device to refuse.
    deadline: float = 60.0
    timeout: float = DEFAULT_TIMEOUT
    backoff: tuple[float, float] = (0.5, 5.0)
    #: HTTP connections of the shared client (tiles, proofs, receipts).
    http_connections: int = 64
    #: serve the (immutable) tiles through a shared edge cache (:class:`TileCache`).
    tile_cache: bool = True
    #: "fast": :class:`FastTransport` under httpx; "httpx": httpx's own (httpcore) transport.
    http_client: str = "fast"

    def __post_init__(self) -> None:
        if self.push not in PUSH_MODES:
            raise UsageError(f"push is one of {', '.join(PUSH_MODES)}")
        if self.own_grant not in OWN_GRANT_MODES:
            raise UsageError(f"own_grant is one of {', '.join(OWN_GRANT_MODES)}")
        if self.http_client not in HTTP_CLIENTS:
            raise UsageError(f"http_client is one of {', '.join(HTTP_CLIENTS)}")
        if self.receipts not in RECEIPT_MODES:
            raise UsageError(f"receipts is one of {', '.join(RECEIPT_MODES)}")
        if not 0 <= self.offline <= 1 or not 0 <= self.late <= 1 or self.offline + self.late > 1:
            raise UsageError("offline and late are shares between 0 and 1 (together at most 1)")
        if self.connections is not None and self.connections < 1:
            raise UsageError("connections is at least 1")
        if not self.poll_interval > 0 or not self.deadline > 0:
            raise UsageError("poll_interval and deadline are positive")


@dataclass(slots=True, eq=False)
class Member:
    """One simulated device and what the harness knows about it."""

    index: int
    device: Device
    drift: int = 0
    online: bool = True
    late: bool = False
    grant_seq: int | None = None
    grant_record: bytes | None = None
    #: the auth the tablet signed, before the revoke, for this device's outstanding challenge.
    pending: bytes | None = None
    refused_at: float | None = None
    reason: str | None = None
    receipt_size: int | None = None
    receipt_error: str | None = None
    #: bytes this device fetched by itself (catch-up, late boot, own proofs).
    own_bytes: int = 0

    @property
    def public_key(self) -> bytes:
        return self.device.public_key


@dataclass
class FleetResult:
    """The measurement (see :meth:`to_json` for the keys printed)."""

    devices: int
    latencies: list[float]
    reasons: dict[str, int]
    refused_before_ack: int
    bytes_per_device: float
    receipts: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_refused(self) -> bool:
        return len(self.latencies) == self.devices and self.reasons.get("revoked", 0) == self.devices

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def r(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 4)

        out: dict[str, Any] = {
            "devices": self.devices,
            "all_refused": self.all_refused,
            "refused_p50_s": r(percentile(lat, 50)),
            "refused_p99_s": r(percentile(lat, 99)),
            "refused_max_s": r(lat[-1]) if lat else None,
            "bytes_per_device": round(self.bytes_per_device),
            "receipts": self.receipts,
            "refused": len(lat),
            "refusal_reasons": dict(sorted(self.reasons.items())),
            "refused_before_ack": self.refused_before_ack,
        }
        out.update(self.extra)
        return out


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


class Fleet:
    """N simulated devices in this process (see the module docstring).

    Typical use: :meth:`create_devices`, grant them (:func:`run_lost_tablet`
    does it with an :class:`Integrator`), :meth:`bootstrap`,
    :meth:`accept_tablet`, :meth:`start_push`, then :meth:`arm` the tablet's
    auths and revoke; :meth:`wait_refused`, :meth:`post_receipts`,
    :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        anchor: bytes,
        origin: str,
        options: FleetOptions | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        sse_client: httpx.AsyncClient | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.anchor = anchor
        self.origin = origin
        self.options = options if options is not None else FleetOptions()
        self.clock = clock
        self.rng = random.Random(self.options.seed)
        lim = httpx.Limits(
            max_connections=self.options.http_connections,
            max_keepalive_connections=self.options.http_connections,
        )
        self._owned: list[httpx.AsyncClient] = []
        self.tile_cache: TileCache | None = None
        if client is None:
            transport: httpx.AsyncBaseTransport = (
                FastTransport(max_connections=self.options.http_connections)
                if self.options.http_client == "fast"
                else httpx.AsyncHTTPTransport(limits=lim)
            )
            if self.options.tile_cache:
                transport = self.tile_cache = TileCache(transport)
            client = httpx.AsyncClient(transport=transport, trust_env=False)
            self._owned.append(client)
        self.client = client
        self._sse_client = sse_client
        self.members: list[Member] = []
        self.relays: list[Relay] = []
        self.template: Member | None = None
        self.bootstrap_bytes = 0
        self.source_errors = 0
        self._revoke_seq: int | None = None
        self._armed = 0
        self._done = asyncio.Event()
        self._receipt_tasks: set[asyncio.Task[bool]] = set()
        self._push_bytes0: dict[int, int] = {}
        self._listening0: dict[int, int] = {}
        self._own_bytes0: dict[int, int] = {}
        self._late_tasks: set[asyncio.Task[None]] = set()
        self.timings: dict[str, float] = {}

    @property
    def sse_client(self) -> httpx.AsyncClient:
        """The client of the event streams: one connection per stream, no pool limit to wait on."""
        if self._sse_client is None:
            n = len(self.relays) + 16
            transport: httpx.AsyncBaseTransport = (
                FastTransport(max_connections=None)
                if self.options.http_client == "fast"
                else httpx.AsyncHTTPTransport(
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)
                )
            )
            self._sse_client = httpx.AsyncClient(transport=transport, trust_env=False)
            self._owned.append(self._sse_client)
        return self._sse_client

    def now(self, m: Member | None = None) -> int:
        return int(self.clock()) + (m.drift if m is not None else 0)

    async def close(self) -> None:
        await self.stop_push()
        for t in [*self._receipt_tasks, *self._late_tasks]:
            t.cancel()
        for t in [*self._receipt_tasks, *self._late_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in self._owned:
            await c.aclose()
        self._owned.clear()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- devices -----------------------------------------------------------------

    def create_devices(self, n: int, *, name_prefix: str = "sim") -> list[Member]:
        """``n`` new devices, each with its own key and enrollment request.
        Device 0 of the fleet is the template; the shares of late and offline
        devices are drawn among the others."""
        if n < 1:
            raise UsageError("a fleet has at least one device")
        now = self.now()
        opts = self.options
        first = len(self.members)
        new = []
        for i in range(first, first + n):
            dev = Device.create(
                self.anchor,
                self.origin,
                name=f"{name_prefix}-{i:05d}",
                now=now,
                max_staleness=opts.max_staleness,
                keep_roles={records.ROLE_OPERATOR},
            )
            drift = self.rng.randint(-opts.drift, opts.drift) if opts.drift else 0
            new.append(Member(i, dev, drift))
        self.members.extend(new)
        if self.template is None:
            self.template = self.members[0]
        others = [m for m in new if m is not self.template]
        n_late = round(opts.late * len(others))
        for m in self.rng.sample(others, n_late):
            m.late, m.online = True, False
        return new

    def enrollments(self, members: Iterable[Member] | None = None) -> list[bytes]:
        return [m.device.enroll_request for m in (self.members if members is None else members)]

    def set_grant(self, m: Member, seq: int, record: bytes) -> None:
        """What the integrator hands the device with its grant (the enrollment answer)."""
        m.grant_seq, m.grant_record = seq, record

    # -- bootstrap ---------------------------------------------------------------

    async def bootstrap(self) -> dict[str, Any]:
        """The template syncs the whole ledger from genesis and verifies it; the
        other devices (late starters excepted) start from a copy of its state
        and verify their own grant. Raises what the template refused."""
        tpl = self.template
        if tpl is None:
            raise UsageError("create devices first")
        t0 = time.monotonic()
        src = HttpSource(self.client, self.url, timeout=self.options.timeout, parallel=8)
        now = self.now(tpl)
        try:
            upd = await src.fetch(tpl.device.size)
        except VerificationError as exc:
            tpl.device.add_evidence(Evidence.from_error(exc, observed_at=now, notes=(src.last_note,)))
            raise
        tpl.device.apply(upd, now)
        self.bootstrap_bytes = src.bytes_received
        found = _device_grants(upd)  # the same scan each device's own sync makes for its key
        del upd
        t1 = time.monotonic()
        st, accepted = tpl.device.state, tpl.device.view
        rest = [m for m in self.members if m is not tpl and not m.late]
        for k, m in enumerate(rest):
            m.device.state = st.copy()
            m.device.view = accepted
            if k % 256 == 255:
                await asyncio.sleep(0)
        failed: Counter[str] = Counter()
        if self.options.own_grant == "proof":
            sem = asyncio.Semaphore(self.options.http_connections)

            async def one(m: Member) -> None:
                async with sem:
                    try:
                        await self._verify_own_by_proof(m, found)
                    except WritError as exc:
                        failed[exc.type] += 1

            await asyncio.gather(*(one(m) for m in rest))
        else:
            for k, m in enumerate(rest):
                try:
                    self._verify_own_by_leaf(m, found)
                except WritError as exc:
                    failed[exc.type] += 1
                if k % 256 == 255:
                    await asyncio.sleep(0)
        for m in rest:
            m.grant_record = None  # verified; the device keeps only its OwnGrant
        self.timings["template_s"] = t1 - t0
        self.timings["copies_s"] = time.monotonic() - t1
        if failed:
            raise BadMessage(
                f"{sum(failed.values())} devices could not verify their own grant: {dict(failed)}",
                failures=dict(failed),
            )
        return {"size": st.size, "template_bytes": self.bootstrap_bytes, "device_grants": len(found)}

    def _own_record(self, m: Member, found: dict[bytes, _Found]) -> tuple[bytes, _Found]:
        f = found.get(m.public_key)
        if f is None:
            raise BadMessage(f"the ledger holds no device grant of {m.public_key.hex()[:16]}…")
        raw = m.grant_record
        if raw is None:  # no record handed over (tests with a prepared ledger): the scan is the check
            return b"", f
        env = records.parse(raw)
        body = env.typed()
        st = m.device.state
        root = st.root_for(body.seq)
        if (
            not isinstance(body, Grant)
            or body.role != records.ROLE_DEVICE
            or body.subject != m.public_key
            or env.signer != 0
            or root is None
        ):
            raise BadMessage("the grant handed to the device is not a device grant of its key")
        crypto.verify(root, crypto.RECORD_DOMAIN, env.body_bytes, env.signature, what="own grant")
        if body.seq != f.seq:
            raise BadMessage(f"the grant handed to the device says seq {body.seq}, the ledger has {f.seq}")
        return raw, f

    def _verify_own_by_leaf(self, m: Member, found: dict[bytes, _Found]) -> None:
        raw, f = self._own_record(m, found)
        if raw and tree.leaf_hash(raw) != f.leaf_hash:
            raise BadMessage(f"the grant handed to the device is not the record at seq {f.seq}")
        m.device.own_grants = [OwnGrant(f.seq, f.scope, f.name)]

    async def _verify_own_by_proof(self, m: Member, found: dict[bytes, _Found]) -> None:
        raw, f = self._own_record(m, found)
        leaf = tree.leaf_hash(raw) if raw else f.leaf_hash
        accepted = m.device.view
        if accepted is None:
            raise BadMessage("no accepted checkpoint to check an inclusion proof against")
        url = f"{self.url}/v1/proof/inclusion?index={f.seq}&size={accepted.size}"
        body = await fetch_bytes(
            self.client,
            url,
            limit=65536,
            timeout=self.options.timeout,
            headers={"Accept": "application/json"},
        )
        m.own_bytes += len(body)
        try:
            doc = json.loads(body)
            proof = [bytes.fromhex(h) for h in doc["proof"]]
        except (ValueError, KeyError, TypeError):
            raise BadProof("the inclusion proof is not the JSON expected") from None
        tree.verify_inclusion(leaf, f.seq, accepted.size, proof, accepted.root)
        m.device.own_grants = [OwnGrant(f.seq, f.scope, f.name)]

    # -- the tablet ----------------------------------------------------------------

    async def accept_tablet(self, grant_record: bytes, tablet: Signer) -> Counter[str]:
        """Challenge-response with every booted device; the verdicts' reasons
        (``accepted`` when accepted)."""
        out: Counter[str] = Counter()
        for k, m in enumerate(self.members):
            if m.late:
                continue
            dev = m.device
            ch = dev.challenge()
            auth = messages.make_auth(grant_record, tablet, dev.public_key, ch, self.now())
            v = dev.check(auth, self.now(m))
            out["accepted" if v.accepted else str(v.reason)] += 1
            if k % 256 == 255:
                await asyncio.sleep(0)
        return out

    def arm(self, grant_record: bytes, tablet: Signer, revoke_seq: int) -> None:
        """Give every device an auth the tablet signs now for a fresh
        challenge; each device checks it once it has applied record
        ``revoke_seq`` (the revoke about to be pushed)."""
        self._revoke_seq = revoke_seq
        self._done.clear()
        self._armed = 0
        for m in self.members:
            dev = m.device
            ch = dev.challenge()
            m.pending = messages.make_auth(grant_record, tablet, dev.public_key, ch, self.now())
            m.refused_at = m.reason = None
            self._armed += 1
        for m in self.members:
            self._after_apply(m)  # a device that is somehow there already

    def _after_apply(self, m: Member) -> None:
        if m.pending is None or self._revoke_seq is None or m.device.size <= self._revoke_seq:
            return
        auth, m.pending = m.pending, None
        verdict = m.device.check(auth, self.now(m))
        m.refused_at = time.monotonic()
        m.reason = "accepted" if verdict.accepted else str(verdict.reason)
        self._armed -= 1
        if self._armed == 0:
            self._done.set()
        if self.options.receipts == "during":
            task = asyncio.get_running_loop().create_task(self._post_receipt(m))
            self._receipt_tasks.add(task)
            task.add_done_callback(self._receipt_tasks.discard)

    # -- updates -------------------------------------------------------------------

    def deliver(self, members: Iterable[Member], upd: Update) -> int:
        """Each online member applies ``upd`` itself (all or nothing; a refusal
        keeps its evidence). Returns how many applied it."""
        n = 0
        for m in members:
            dev = m.device
            if not m.online or dev.size < upd.start:
                continue  # not listening, or behind this update: the next one (or a catch-up) covers it
            if dev.view is not None and dev.view.note == upd.note:
                continue  # byte for byte the checkpoint it accepted already
            try:
                dev.apply(upd, self.now(m))
            except VerificationError:
                self.source_errors += 1
                continue
            n += 1
            self._after_apply(m)
        return n

    def evidence_from_source(
        self, members: Iterable[Member], exc: VerificationError, src: HttpSource
    ) -> None:
        """Data a relay could not even decode: each online device keeps the evidence."""
        for m in members:
            if m.online and not m.late:
                m.device.add_evidence(
                    Evidence.from_error(
                        exc, observed_at=self.now(m), notes=(src.last_note,), data=src.last_bad
                    )
                )

    async def sync_member(self, m: Member) -> Any:
        """One device syncs by itself through the tiles; returns its SyncResult,
        or the WritError it raised (evidence kept for verification failures)."""
        src = HttpSource(self.client, self.url, timeout=self.options.timeout)
        try:
            res = await sync(m.device, src, self.now(m))
        except WritError as exc:
            return exc
        finally:
            m.own_bytes += src.bytes_received
        self._after_apply(m)
        return res

    async def sync_all(self, members: Iterable[Member] | None = None, *, concurrency: int = 32) -> list[Any]:
        """:meth:`sync_member` for each member (default all), in order."""
        ms = list(self.members if members is None else members)
        sem = asyncio.Semaphore(concurrency)

        async def one(m: Member) -> Any:
            async with sem:
                return await self.sync_member(m)

        return list(await asyncio.gather(*(one(m) for m in ms)))

    def apply_bundle(self, data: bytes, members: Iterable[Member]) -> list[Any]:
        """A sync bundle (PROTOCOL 7) carried to a site: each device applies it
        with the rules of any other update. Returns results or errors."""
        out: list[Any] = []
        for m in members:
            try:
                upd = BundleSource.parse(data)
                res: Any = m.device.apply(upd, self.now(m))
            except VerificationError as exc:
                if exc.type == "bad-message":
                    m.device.add_evidence(Evidence.from_error(exc, observed_at=self.now(m), data=data))
                out.append(exc)
                continue
            self._after_apply(m)
            out.append(res)
        return out

    async def set_online(self, members: Iterable[Member], online: bool = True) -> None:
        """Take devices off the network, or bring them back: a device coming
        back (or booting late) catches up through the tiles by itself, then
        listens to its push connection again."""
        ms = list(members)
        if not online:
            for m in ms:
                m.online = False
            return
        sem = asyncio.Semaphore(self.options.http_connections)

        async def back(m: Member) -> None:
            async with sem:
                for attempt in range(20):
                    res = await self.sync_member(m)
                    if not isinstance(res, TransportError):
                        break
                    await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
                m.late = False
                m.online = True
                if m.device.own_grant is None and m.grant_seq is not None:
                    self.source_errors += 1

        await asyncio.gather(*(back(m) for m in ms))

    # -- push ------------------------------------------------------------------------

    @property
    def model(self) -> str:
        if not self.relays:
            return "none"
        return "per-device" if all(len(r.members) == 1 for r in self.relays) else "relay"

    async def start_push(self, members: Sequence[Member] | None = None, *, wait: float = 60.0) -> None:
        """One push connection per group of devices (see FleetOptions.connections);
        returns once each has delivered its first update (or ``wait`` s passed)."""
        ms = list(self.members if members is None else members)
        k = self.options.connections or min(len(ms), DEFAULT_CONNECTIONS)
        k = max(1, min(k, len(ms)))
        size = math.ceil(len(ms) / k)
        groups = [ms[i : i + size] for i in range(0, len(ms), size)]
        base = len(self.relays)
        new = [Relay(self, base + i, g) for i, g in enumerate(groups)]
        self.relays.extend(new)
        loop = asyncio.get_running_loop()
        for r in new:
            r.task = loop.create_task(r.run_sse() if self.options.push == "sse" else r.run_poll())
        waiting = [r for r in new if any(m.online and not m.late for m in r.members)]
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asyncio.gather(*(r.ready.wait() for r in waiting))

    async def stop_push(self) -> None:
        tasks = [r.task for r in self.relays if r.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for r in self.relays:
            r.task = None

    def push_bytes(self) -> dict[int, int]:
        return {r.index: r.bytes_received for r in self.relays}

    # -- the measurement ---------------------------------------------------------------

    def schedule_late(self, members: Sequence[Member], delay: float) -> None:
        """Bring ``members`` online (catch-up or first boot) ``delay`` s from now."""

        async def later() -> None:
            await asyncio.sleep(delay)
            await self.set_online(members)

        if members:
            task = asyncio.get_running_loop().create_task(later())
            self._late_tasks.add(task)
            task.add_done_callback(self._late_tasks.discard)

    async def wait_ready(self, timeout: float) -> bool:
        """Until every push connection with a listening device has delivered
        an update since its last error (a reconnection)."""
        waiting = [r for r in self.relays if r.task is not None and r.online]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(r.ready.wait() for r in waiting))
        except TimeoutError:
            return False
        return True

    @property
    def pending(self) -> int:
        """Armed devices that have not yet checked the tablet after the revoke."""
        return self._armed

    async def wait_refused(self, timeout: float) -> bool:
        """Until every armed device has checked the tablet after the revoke."""
        if self._armed == 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._done.wait()
        except TimeoutError:
            return False
        return True

    async def _post_receipt(self, m: Member) -> bool:
        try:
            body = m.device.receipt(self.now(m))
        except WritError as exc:
            m.receipt_error = exc.type
            return False
        url = self.url + "/v1/receipts"
        for attempt in range(8):
            try:
                status, answer = await post_bytes(
                    self.client, url, body, "application/msgpack", timeout=self.options.timeout
                )
            except TransportError as exc:
                m.receipt_error = exc.type
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            if status == 200 and isinstance(answer, dict) and answer.get("accepted") is True:
                m.receipt_size, m.receipt_error = m.device.size, None
                return True
            t = answer.get("type") if isinstance(answer, dict) else None
            m.receipt_error = t.rsplit(":", 1)[-1] if isinstance(t, str) else f"http-{status}"
            if status not in (429, 503):
                return False
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        return False

    async def post_receipts(self, members: Iterable[Member] | None = None, *, concurrency: int = 32) -> int:
        """Each member that applied the revoke (or every member, with no revoke
        armed) posts its signed receipt; returns how many the server accepted."""
        todo = [
            m
            for m in (self.members if members is None else members)
            if m.device.own_grant is not None
            and (self._revoke_seq is None or m.device.size > self._revoke_seq)
            and m.receipt_size != m.device.size
        ]
        if self._receipt_tasks:
            await asyncio.gather(*list(self._receipt_tasks), return_exceptions=True)
            todo = [m for m in todo if m.receipt_size != m.device.size]
        it = iter(todo)

        async def worker() -> None:
            for m in it:
                await self._post_receipt(m)

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(todo))))))
        return sum(1 for m in self.members if m.receipt_size is not None)

    def result(
        self,
        acked_at: float,
        *,
        posted_at: float | None = None,
        push_bytes: dict[int, int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> FleetResult:
        """The measurement since :meth:`mark_bytes`; ``push_bytes`` a
        :meth:`push_bytes` snapshot taken at the end of the propagation.
        With ``posted_at`` (when the revoke's POST left), the same
        percentiles measured from then are added (they include the time the
        server took to acknowledge, which a busy server may spend pushing
        the very update to the devices)."""
        lat: list[float] = []
        before = 0
        reasons: Counter[str] = Counter()
        for m in self.members:
            if m.refused_at is None:
                reasons["not-refused"] += 1
                continue
            reasons[str(m.reason)] += 1
            if m.reason == "accepted":
                continue
            dt = m.refused_at - acked_at
            if dt < 0:
                before += 1
            lat.append(max(0.0, dt))
        n = len(self.members)
        more = dict(extra or {})
        if posted_at is not None:
            since = sorted(m.refused_at - posted_at for m in self.members if m.refused_at is not None)
            for p in (50, 99):
                v = percentile(since, p)
                more[f"refused_since_post_p{p}_s"] = None if math.isnan(v) else round(v, 4)
            more["refused_since_post_max_s"] = round(since[-1], 4) if since else None
        total = 0.0
        now_bytes = push_bytes if push_bytes is not None else self.push_bytes()
        for r in self.relays:
            delta = now_bytes.get(r.index, 0) - self._push_bytes0.get(r.index, 0)
            total += delta * self._listening0.get(r.index, r.online)
        total += sum(m.own_bytes - self._own_bytes0.get(m.index, 0) for m in self.members)
        return FleetResult(
            n,
            lat,
            dict(reasons),
            before,
            total / n if n else 0.0,
            sum(1 for m in self.members if m.receipt_size is not None),
            more,
        )

    def mark_bytes(self) -> None:
        """Start counting the bytes of the propagation from here (a relay's
        bytes count once for each device listening to it now)."""
        self._push_bytes0 = self.push_bytes()
        self._listening0 = {r.index: r.online for r in self.relays}
        self._own_bytes0 = {m.index: m.own_bytes for m in self.members}

    def events_json(self, acked_at: float) -> list[dict[str, Any]]:
        return [
            {
                "index": m.index,
                "public_key": m.public_key.hex(),
                "grant_seq": m.device.own_grant.seq if m.device.own_grant else None,
                "refused_s": None if m.refused_at is None else round(m.refused_at - acked_at, 6),
                "reason": m.reason,
                "size": m.device.size,
                "receipt_size": m.receipt_size,
                "receipt_error": m.receipt_error,
                "evidence": [e.kind for e in m.device.evidence],
                "drift": m.drift,
            }
            for m in self.members
        ]


@dataclass(frozen=True, slots=True)
class _Found:
    seq: int
    leaf_hash: bytes
    scope: str
    name: str


def _device_grants(upd: Update) -> dict[bytes, _Found]:
    """Device grants among verified records: subject -> the newest grant."""
    out: dict[bytes, _Found] = {}
    for i, raw in enumerate(upd.records):
        env = records.parse(raw)
        if env.kind is not Kind.GRANT or env.extra[1] != records.ROLE_DEVICE:
            continue
        subject, scope, name = env.extra[0], env.extra[2], env.extra[3]
        if type(subject) is bytes and type(scope) is str and type(name) is str:
            out[subject] = _Found(upd.start + i, tree.leaf_hash(raw), scope, name)
    return out


# --- the lost-tablet run ------------------------------------------------------------------


def _verify_rate(seconds: float = 0.25) -> float:
    """Raw single-thread Ed25519 verifications per second on this machine, now
    (:func:`ledger.crypto.verify_rate`, the benchmarks' own measure)."""
    key = SeedSigner.generate()
    items = []
    for i in range(512):
        msg = b"fleet-lower-bound-%d" % i
        items.append((key.public_key, crypto.RECORD_DOMAIN, msg, crypto.sign(key, crypto.RECORD_DOMAIN, msg)))
    rates: list[float] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds or not rates:
        rates.append(crypto.verify_rate(items, 1))
    return max(rates)


def _phase(
    log: Callable[[str], None] | None, label: str, total: int | None = None, *, bar: bool = True
) -> contextlib.AbstractContextManager[Stage]:
    """A phase's progress on stderr (only when the run logs: the command line, not tests)."""
    if log is None:
        return contextlib.nullcontext(Stage())
    return stage(label, total, prefix="fleet: ", bar=bar)


async def run_lost_tablet(
    integrator: Integrator,
    n: int,
    options: FleetOptions | None = None,
    *,
    revoker: tuple[int, Signer] | None = None,
    before_revoke: Callable[[Fleet], Any] | None = None,
    json_events: str | Path | None = None,
    plot: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> FleetResult:
    """The whole story against ``integrator``'s server (see the module docstring).

    ``revoker`` = (seq of a ``revoker`` grant, its key) signs the revoke
    instead of the root. ``before_revoke(fleet)`` is called (and awaited when
    it returns a coroutine) once the push connections are up, just before
    the devices are armed and the tablet revoked (tests restart the server
    there).
    """
    opts = options if options is not None else FleetOptions()
    say = log if log is not None else (lambda s: None)
    t_start = time.monotonic()
    rss0 = _rss_kib()
    await integrator.ensure_ready()
    url = integrator.server
    fleet = Fleet(url, integrator.anchor, integrator.origin, opts)
    try:
        run_id = secrets.token_hex(3)
        t0 = time.monotonic()
        members = fleet.create_devices(n, name_prefix=f"sim-{run_id}")
        t_keys = time.monotonic() - t0
        say(f"{n} devices made their keys and enrollment requests in {t_keys:.1f} s")
        tablet = SeedSigner.generate()
        makers: list[tuple[BodyMaker, Signer]] = []
        for raw in fleet.enrollments(members):
            e = messages.parse_enroll(raw)  # verifies the proof of possession
            makers.append((_grant_maker(e.subject, records.ROLE_DEVICE, e.name), integrator.root))
        makers.append(
            (_grant_maker(tablet.public_key, records.ROLE_OPERATOR, f"tablet-{run_id}"), integrator.root)
        )
        t0 = time.monotonic()
        with _phase(log, f"granting {n} devices and the tablet", bar=False):
            pushed = await integrator.push(makers)
        t_grants = time.monotonic() - t0
        for i, m in enumerate(members):
            fleet.set_grant(m, pushed.seqs[i], pushed.records[i])
        tablet_seq = pushed.seqs[n]
        tablet_record = pushed.records[n]
        say(f"granted {n} devices and tablet-{run_id} (seq {tablet_seq}) in {t_grants:.1f} s")
        del pushed, makers

        t0 = time.monotonic()
        boot = await fleet.bootstrap()
        t_boot = time.monotonic() - t0
        rss1 = _rss_kib()
        say(f"template synced {boot['size']} records; {n} devices booted in {t_boot:.1f} s")

        t0 = time.monotonic()
        verdicts = await fleet.accept_tablet(tablet_record, tablet)
        t_accept = time.monotonic() - t0
        booted = sum(1 for m in members if not m.late)
        if verdicts.get("accepted", 0) != booted:
            raise UsageError(
                f"not every device accepts the tablet before the revoke: {dict(verdicts)}",
                verdicts=dict(verdicts),
            )
        say(f"every booted device accepted the tablet ({t_accept:.1f} s)")

        t0 = time.monotonic()
        await fleet.start_push()
        t_push = time.monotonic() - t0
        ready = sum(1 for r in fleet.relays if r.ready.is_set())
        say(f"{len(fleet.relays)} {opts.push} connections ({fleet.model}), {ready} ready in {t_push:.1f} s")
        await asyncio.sleep(0.2)  # the first checkpoint events settle
        rate0 = _verify_rate()
        if before_revoke is not None:
            res = before_revoke(fleet)
            if asyncio.iscoroutine(res):
                await res

        others = [m for m in members if m is not fleet.template and not m.late]
        offline = fleet.rng.sample(others, round(opts.offline * len(others))) if opts.offline else []
        await fleet.set_online(offline, False)
        late = [m for m in members if m.late]

        st = integrator.state
        assert st is not None
        revoke_seq = st.size
        fleet.arm(tablet_record, tablet, revoke_seq)
        fleet.mark_bytes()
        maker = _revoke_maker(tablet_seq, int(records.Reason.LOST), revoker[0] if revoker else 0)
        setup_s = time.monotonic() - t_start
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(0.001)  # the revoking thread gets the GIL back quickly
        # the fleet's long-lived objects (devices, sockets) leave the collector's
        # generations: a full collection over them would stall every device at once
        t0 = time.monotonic()
        gc.collect()
        gc.freeze()
        t_gc = time.monotonic() - t0
        try:
            with _phase(log, f"revoking the tablet (seq {tablet_seq})", bar=False):
                pushed = await integrator.push([(maker, revoker[1] if revoker else integrator.root)])
        finally:
            sys.setswitchinterval(old_switch)
        acked = pushed.acked_at
        say(f"tablet revoked at seq {revoke_seq}; acknowledged in {pushed.post_seconds * 1000:.0f} ms")
        fleet.schedule_late(offline, max(0.0, opts.offline_for - (time.monotonic() - acked)))
        fleet.schedule_late(late, max(0.0, opts.late_after - (time.monotonic() - acked)))
        with _phase(
            log, f"waiting until every device refuses the tablet (at most {opts.deadline:g} s)", bar=False
        ):
            done = await fleet.wait_refused(opts.deadline)
        t_prop = time.monotonic() - acked
        say(f"{'every' if done else 'NOT every'} device refused the tablet within {t_prop:.2f} s of the ack")
        pushed_bytes = fleet.push_bytes()
        rss2 = _rss_kib()
        t0 = time.monotonic()
        with _phase(log, f"posting receipts from {n} devices"):
            receipts = await fleet.post_receipts()
        say(f"{receipts} receipts accepted by the server")
        t_receipts = time.monotonic() - t0
        rate = max(rate0, _verify_rate())  # the best this machine did: a lower bound
        await fleet.stop_push()
        extra: dict[str, Any] = {
            "bootstrap": "template",
            "push": opts.push,
            "push_model": fleet.model,
            "connections": len(fleet.relays),
            "poll_interval_s": opts.poll_interval if opts.push == "poll" else None,
            "offline": len(offline),
            "late": len(late),
            "drift_s": opts.drift,
            "own_grant": opts.own_grant,
            "http_client": opts.http_client,
            "receipts_posted": opts.receipts,
            "revoke_seq": revoke_seq,
            "tablet_seq": tablet_seq,
            "ledger_size": revoke_seq + 1,
            "revoke_ack_ms": round(pushed.post_seconds * 1000, 1),
            "verifies_per_device": VERIFIES_PER_DEVICE,
            "verify_rate_per_s": round(rate),
            "lower_bound_s": round(VERIFIES_PER_DEVICE * n / rate, 3),
            "setup_s": round(setup_s, 2),
            "setup_detail_s": {
                "keys": round(t_keys, 2),
                "grants": round(t_grants, 2),
                "template": round(fleet.timings.get("template_s", 0.0), 2),
                "copies_and_own_grants": round(fleet.timings.get("copies_s", 0.0), 2),
                "accept_tablet": round(t_accept, 2),
                "push_connect": round(t_push, 2),
                "gc_freeze": round(t_gc, 2),
            },
            "template_bytes": fleet.bootstrap_bytes,
            "tile_cache": None
            if fleet.tile_cache is None
            else {"hits": fleet.tile_cache.hits, "origin_fetches": fleet.tile_cache.misses},
            "propagation_window_s": round(t_prop, 3),
            "receipts_s": round(t_receipts, 2),
            "rss_mib": round(_rss_kib() / 1024, 1),
            "rss_per_device_kib": round((rss1 - rss0) / n, 2) if rss0 and rss1 else None,
            "rss_per_device_with_push_kib": round((rss2 - rss0) / n, 2) if rss0 and rss2 else None,
            "refused_updates": fleet.source_errors,
            "push_errors": sum(r.errors for r in fleet.relays),
            "evidence": sum(len(m.device.evidence) for m in members),
        }
        result = fleet.result(acked, posted_at=pushed.posted_at, push_bytes=pushed_bytes, extra=extra)
        if json_events is not None:
            with open(json_events, "w", encoding="utf-8") as f:
                for ev in fleet.events_json(acked):
                    f.write(json.dumps(ev) + "\n")
        if plot is not None:
            plot_refusals(result, plot)
            result.extra["plot"] = str(plot)
        return result
    finally:
        gc.unfreeze()
        await fleet.close()


def plot_refusals(result: FleetResult, path: str | Path) -> None:
    """A PNG of the share of devices refusing the tablet over time since the ack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = sorted(result.latencies)
    n = max(1, result.devices)
    xs = [0.0, *lat]
    ys = [0.0, *((i + 1) / n * 100 for i in range(len(lat)))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.step(xs, ys, where="post", color="#b22222", linewidth=1.8, label="devices refusing the tablet")
    lb = result.extra.get("lower_bound_s")
    if isinstance(lb, int | float):
        ax.axvline(lb, color="#555555", linestyle="--", linewidth=1, label=f"lower bound {lb:.2f} s")
    p99 = percentile(lat, 99)
    if not math.isnan(p99):
        ax.axvline(p99, color="#1f77b4", linestyle=":", linewidth=1, label=f"p99 {p99:.2f} s")
    ax.set_xlabel("seconds since the server acknowledged the revoke")
    ax.set_ylabel("devices refusing (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    push = result.extra.get("push", "?")
    model = result.extra.get("push_model", "?")
    ax.set_title(f"Lost tablet: {result.devices} devices, {push} ({model}), receipts {result.receipts}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return int(text)


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a share between 0 and 1") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("expected a share between 0 and 1")
    return v


def _uint(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("expected a non-negative integer")
    return int(text)


def cmd_fleet(args: argparse.Namespace) -> dict[str, Any]:
    from ledger.cli.common import normalise_server, open_key
    from ledger.cli.main import EXIT_FAILED, CommandFailed

    server = normalise_server(args.server)
    if args.scenario == "stolen-log-key":  # (witness) device_sim/scenarios.py
        return _stolen_log_key(args, server)
    opts = FleetOptions(
        push=args.push,
        poll_interval=args.poll_interval,
        connections=args.sse_connections,
        seed=args.seed,
        offline=args.offline,
        offline_for=args.offline_for,
        late=args.late,
        late_after=args.late_after,
        drift=args.drift,
        own_grant=args.own_grant,
        receipts=args.receipts,
        deadline=args.deadline,
        timeout=args.timeout,
        tile_cache=not args.no_tile_cache,
        http_client=args.http_client,
    )
    nofile = raise_open_files_limit()

    def log(line: str) -> None:
        sys.stderr.write(f"fleet: {line}\n")
        sys.stderr.flush()

    with open_key(args) as root:
        integ = Integrator(server, root)
        try:
            result = asyncio.run(
                run_lost_tablet(
                    integ, args.devices, opts, json_events=args.json_events, plot=args.plot, log=log
                )
            )
        finally:
            integ.close()
    out = result.to_json()
    out["open_files_limit"] = nofile
    if not result.all_refused:
        raise CommandFailed(out, EXIT_FAILED)
    return out


def _stolen_log_key(args: argparse.Namespace, server: str) -> dict[str, Any]:
    """(witness) ``--scenario stolen-log-key``: see device_sim/scenarios.py."""
    from ledger.cli.common import open_key
    from ledger.cli.main import EXIT_FAILED, CommandFailed

    if args.log_key is None:
        raise UsageError("--scenario stolen-log-key needs --log-key FILE (the server's DIR/log.key)")
    stolen = scenarios.read_stolen_log_key(args.log_key)
    with open_key(args) as root:
        integ = Integrator(server, root)
        try:
            out = asyncio.run(
                scenarios.run_stolen_log_key(
                    integ,
                    args.devices,
                    log_key=stolen,
                    require_witnesses=args.require_witnesses,
                    max_staleness=args.max_staleness,
                    log=lambda line: print(f"fleet: {line}", file=sys.stderr, flush=True),
                )
            )
        finally:
            integ.close()
    if not out["all_refused"]:
        raise CommandFailed(out, EXIT_FAILED)
    return out


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``fleet`` command (CONFORMANCE.md)."""
    from ledger.cli.common import add_key_source

    p = subparsers.add_parser(
        "fleet",
        help="N simulated devices, a lost tablet: measure how fast its revocation reaches them",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--server", required=True, metavar="URL")
    p.add_argument("--devices", required=True, type=_positive_int, metavar="N")
    add_key_source(p)
    p.add_argument("--push", choices=PUSH_MODES, default="sse", help="how devices hear of updates (sse)")
    p.add_argument(
        "--poll-interval", type=_seconds, default=2.0, metavar="SECONDS", help="with --push poll (2)"
    )
    p.add_argument(
        "--sse-connections",
        "--connections",
        dest="sse_connections",
        type=_positive_int,
        metavar="K",
        help=f"push connections, each feeding a group of devices (default min(N, {DEFAULT_CONNECTIONS});"
        " N = one per device)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="a PNG of the devices refusing over time")
    p.add_argument("--json-events", metavar="FILE", help="one JSON line per device (refusal time, receipt)")
    p.add_argument("--seed", type=_uint, help="seed of the simulation's random choices (not of the keys)")
    p.add_argument(
        "--offline", type=_share, default=0.0, metavar="SHARE", help="devices offline at the revoke"
    )
    p.add_argument("--offline-for", type=_seconds, default=1.0, metavar="SECONDS")
    p.add_argument(
        "--late", type=_share, default=0.0, metavar="SHARE", help="devices booting after the revoke"
    )
    p.add_argument("--late-after", type=_seconds, default=1.0, metavar="SECONDS")
    p.add_argument("--drift", type=_uint, default=0, metavar="SECONDS", help="max clock offset of a device")
    p.add_argument(
        "--own-grant", choices=OWN_GRANT_MODES, default="leaf", help="how a device checks its grant"
    )
    p.add_argument("--receipts", choices=RECEIPT_MODES, default="after", help="when devices post receipts")
    p.add_argument(
        "--no-tile-cache", action="store_true", help="every tile request goes to the server (no edge cache)"
    )
    p.add_argument(
        "--http-client", choices=HTTP_CLIENTS, default="fast", help="the simulator's HTTP transport (fast)"
    )
    p.add_argument("--deadline", type=_seconds, default=120.0, metavar="SECONDS")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS")
    # (witness) device_sim/scenarios.py
    p.add_argument(
        "--scenario", choices=scenarios.SCENARIOS, default="lost-tablet", help="what to play (lost-tablet)"
    )
    p.add_argument("--log-key", metavar="FILE", help="stolen-log-key: the server's DIR/log.key")
    p.add_argument("--require-witnesses", type=_uint, default=1, metavar="K", help="stolen-log-key: K (1)")
    p.add_argument("--max-staleness", type=_positive_int, default=3, metavar="SECONDS", help="stolen-log-key")
    p.set_defaults(handler=cmd_fleet)
