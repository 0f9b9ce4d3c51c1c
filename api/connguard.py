"""Connection-level guards for ``writ serve``: slow request heads and socket hoarding.

uvicorn times out idle keep-alive connections (``timeout_keep_alive``) but
not a request head that never completes: a client that sends half a request
line, or trickles a header a byte at a time, would hold its socket (and a
descriptor) for as long as it likes. :func:`guarded_protocol` returns
uvicorn's httptools protocol with two additions:

- a header deadline: from the moment the connection is ready for a request
  (accepted, or its previous response sent) the whole request head must
  arrive within ``header_timeout`` seconds, or the client gets ``408
  request-timeout`` (problem+json) and the socket is closed. Once the head is
  in, the route's own timeouts apply (bodies: ``Limits.request_timeout``);
  event streams are long-lived by design;
- a per-address socket cap: a peer address holding ``max_per_address``
  open sockets has each further one answered ``503 overloaded``
  (problem+json, ``Connection: close``) and closed at once, before anything is
  read, so one client cannot use up the server's descriptors. The trusted
  proxies (uvicorn's ``forwarded_allow_ips``: nginx in front) are not counted:
  their sockets carry many clients, which the proxy limits itself
  (deploy/nginx/writ.conf) and which the per-address event-stream cap and
  rate limits count by their forwarded address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any, cast

from ledger.errors import HttpProblem

from .ratelimit import AddressCounts

#: a write at most this long is held back to go out with the next one (a response head is).
HOLD_MAX = 4096
#: the next write is joined to a held one when it is at most this long (else both go as they are).
JOIN_MAX = 65536


class OneSend:
    """A connection's transport as the HTTP protocol writes to it: a short write
    (a response head) is held back and sent together with the next write (the
    body), so a small response costs one ``send`` (and wakes the client once)
    instead of two. A held write that no write follows goes out at the end of
    the event loop's current pass; ``close`` sends it first. Writes keep their
    order; everything else is the transport's own."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= JOIN_MAX:
                self._transport.write(held + bytes(data))
                return
            self._transport.write(held)
        if len(data) <= HOLD_MAX and not self._transport.is_closing():
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TrustedProxies:
    """uvicorn's ``forwarded_allow_ips``: ``*``, addresses and networks, comma-separated."""

    def __init__(self, spec: str | list[str]) -> None:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        self.everyone = False
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.names: set[str] = set()
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            if item == "*":
                self.everyone = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.names.add(item)  # a unix socket path or a host literal, compared as text

    def __contains__(self, host: str) -> bool:
        if self.everyone or host in self.names:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def _problem(status: int, reason: str, name: str, detail: str, extra: list[tuple[str, str]]) -> bytes:
    body = json.dumps(
        {"type": f"urn:writ:problem:{name}", "title": reason, "status": status, "detail": detail},
        separators=(",", ":"),
    ).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/problem+json"]
    head += [f"{k}: {v}" for k, v in extra]
    head += [f"content-length: {len(body)}", "connection: close", "", ""]
    return "\r\n".join(head).encode("ascii") + body


OVER_CAP = _problem(
    503,
    "Service Unavailable",
    HttpProblem.OVERLOADED,
    "too many open connections from this address",
    [("retry-after", "10")],
)
HEAD_TIMEOUT = _problem(
    408, "Request Timeout", HttpProblem.REQUEST_TIMEOUT, "the request head did not arrive in time", []
)


def guarded_protocol(
    *, header_timeout: float, max_per_address: int, trusted: TrustedProxies
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a header deadline and a per-address socket cap."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    counts = AddressCounts(max_per_address)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _held: str | None = None
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = cast(asyncio.Transport, OneSend(transport, self.loop))
            host = self.client[0] if self.client else None
            if host is not None and host not in trusted:
                if not counts.acquire(host):
                    transport.write(OVER_CAP)
                    transport.close()
                    return
                self._held = host
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            held, self._held = self._held, None
            if held is not None:
                counts.release(held)
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # the next head is already in
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # no request in flight
                self.transport.write(HEAD_TIMEOUT)
                self.transport.close()

    GuardedHttpToolsProtocol.counts = counts  # type: ignore[attr-defined]
    return GuardedHttpToolsProtocol
