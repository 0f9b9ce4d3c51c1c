"""A hostile HTTP server speaking raw bytes on a socket (tuf-conformance style).

:class:`RawServer` answers every request with a *behaviour*: a function that
writes whatever it likes on the socket — a decompression bomb, a redirect to
another host, megabytes of headers, a chunked body that never ends, a status
line that never finishes. It runs in background threads on ``127.0.0.1`` and
is used by ``tests/test_reliability_hostile.py`` to drive the device CLI
(``python -m device_sim device sync``) as a subprocess.

The honest bytes (a checkpoint note, entry bundles) come from ``content``:
``{path: (content_type, body)}``; behaviours decide what to do with them.
Besides broken framing there are behaviours with honest framing and hostile
ledger data: :func:`garbage_entries` (tiles without end for a claimed tree)
and :func:`event_stream` (malformed Server-Sent Events, e.g. :func:`deep_json`).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "GZIP_HEAD",
    "GZIP_MIB",
    "RawRequest",
    "RawServer",
    "Reply",
    "chunked",
    "deep_json",
    "event_stream",
    "garbage_entries",
    "gzip_bytes",
    "gzip_zeros",
    "honest",
    "response_head",
    "sse_event",
]

#: request heads larger than this are cut off (the device never sends one).
MAX_REQUEST_HEAD = 64 * 1024


@dataclass(frozen=True)
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Reply:
    """Context a behaviour gets: the request, the socket, the server (for ``closing``)."""

    request: RawRequest
    sock: socket.socket
    server: RawServer

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    @property
    def closing(self) -> bool:
        return self.server.closing.is_set()

    def honest(self) -> tuple[int, str, bytes]:
        """(status, content type, body) of the honest answer for this path."""
        found = self.server.content.get(self.request.path.lstrip("/"))
        if found is None:
            return 404, "text/plain", b"not found"
        return 200, found[0], found[1]


Behaviour = Callable[[Reply], None]


def response_head(status: int, headers: list[tuple[str, str]], reason: str = "X") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def gzip_bytes(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def _gzip_segments() -> tuple[bytes, bytes]:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = c.compress(b"")
    first = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    seg = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    assert seg == first  # a full flush resets the window: every MiB of zeros compresses the same
    return head, seg


#: the gzip header, and one full-flushed deflate segment of 1 MiB of zeros (about 1 KiB).
GZIP_HEAD, GZIP_MIB = _gzip_segments()


def gzip_zeros(n_mib: int) -> bytes:
    """A gzip stream inflating to ``n_mib`` MiB of zeros, about 1 KiB per MiB on the wire.

    The stream has no end (no final block, no trailer): the reader is meant to
    give up long before. Built by repeating one segment, so 4 GiB costs nothing."""
    return GZIP_HEAD + GZIP_MIB * n_mib


def honest(reply: Reply) -> None:
    status, ctype, body = reply.honest()
    reply.send(response_head(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))]) + body)


@dataclass
class RawServer:
    """``with RawServer() as srv:`` a server on ``srv.url``; set ``srv.behaviour``."""

    behaviour: Behaviour = honest
    content: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    host: str = "127.0.0.1"
    requests: list[RawRequest] = field(default_factory=list)
    closing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(30)
                with contextlib.suppress(OSError):
                    while not outer.closing.is_set():
                        req = _read_request(sock)
                        if req is None:
                            return
                        outer.requests.append(req)
                        outer.behaviour(Reply(req, sock, outer))

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((self.host, 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


def _read_request(sock: socket.socket) -> RawRequest | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > MAX_REQUEST_HEAD:
            return None
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return RawRequest(parts[0], parts[1], headers)


# --- hostile ledger data behind honest framing ------------------------------------------


def garbage_entries(entry: bytes = b"\x92\xc4\x03abc\xc4\x40" + bytes(64)) -> Behaviour:
    """Any ``tile/entries/...`` path: 200 with a well-formed entry bundle of the
    width asked for, every entry ``entry`` (record-shaped, wrong in every way);
    other paths answer honestly. A log that claims a huge tree and would serve
    tiles forever: the device must stop at the first record it cannot verify."""

    def run(reply: Reply) -> None:
        path = reply.request.path.lstrip("/")
        if not path.startswith("tile/entries/"):
            honest(reply)
            return
        width = int(path.rsplit(".p/", 1)[1]) if ".p/" in path else 256
        body = b"".join(len(entry).to_bytes(2, "big") + entry for _ in range(width))
        reply.send(
            response_head(
                200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))]
            )
            + body
        )

    return run


def sse_event(event: str, data: str) -> bytes:
    """One Server-Sent Event (``data`` split into ``data:`` lines)."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n".encode("utf-8", "surrogateescape")


def deep_json(depth: int) -> str:
    """A JSON text nested ``depth`` levels deep (a recursive parser's stack overflow)."""
    return "[" * depth + "]" * depth


def event_stream(first: list[bytes], then: list[bytes]) -> Behaviour:
    """``/v1/events``: the first connection gets the events ``first``, every
    later one ``then``; each stream then ends. Other paths answer honestly."""
    served = {"n": 0}

    def run(reply: Reply) -> None:
        if not reply.request.path.startswith("/v1/events"):
            honest(reply)
            return
        events = first if served["n"] == 0 else then
        served["n"] += 1
        reply.send(
            response_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        )
        for ev in events:
            reply.send(chunked(ev))
        reply.send(b"0\r\n\r\n")

    return run
