"""A light HTTP/1.1 transport for the fleet, under the ``httpx.AsyncClient`` API.

httpcore's connection pool costs milliseconds of CPU per request, which the
single fleet process would otherwise report as propagation time
(:mod:`device_sim.fleet`, step 4); :class:`FastTransport` does what the fleet
needs and no more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx

__all__ = ["FastTransport"]

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
