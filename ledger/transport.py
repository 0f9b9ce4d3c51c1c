"""Reading HTTP bodies without trusting their size or their encoding.

Pure helpers shared by every Writ HTTP client (devices, the integrator's CLI):
they take bytes and return bytes, the clients do the I/O. A body is read raw
and inflated here, through at most two ``gzip``/``deflate`` layers, never
producing more than the caller's limit: a few kilobytes of nested gzip cannot
make a client allocate gigabytes. Clients ask for ``identity`` anyway.
"""

from __future__ import annotations

import zlib

from .errors import ResponseTooLarge, TransportError

#: request headers every Writ client sends: no compression, please.
IDENTITY = {"Accept-Encoding": "identity"}
MAX_LAYERS = 2


class BoundedBody:
    """Accumulates a raw body, decoding its Content-Encoding, up to ``limit`` bytes."""

    def __init__(self, content_encoding: str | None, limit: int, what: str) -> None:
        layers = [e.strip().lower() for e in (content_encoding or "").split(",")]
        layers = [e for e in layers if e and e != "identity"]
        if len(layers) > MAX_LAYERS:
            raise TransportError(f"{what} is encoded {len(layers)} times over; refused")
        self._decoders = []
        for name in reversed(layers):  # the last encoding applied is undone first
            if name in ("gzip", "x-gzip"):
                self._decoders.append(zlib.decompressobj(16 + zlib.MAX_WBITS))
            elif name == "deflate":
                self._decoders.append(zlib.decompressobj())
            else:
                raise TransportError(f"{what} has an unsupported Content-Encoding {name[:32]!r}")
        self.limit = limit
        self.what = what
        self._out = bytearray()

    def _too_large(self) -> ResponseTooLarge:
        return ResponseTooLarge(
            f"{self.what} is larger than the {self.limit} bytes allowed", limit=self.limit
        )

    def decoded(self, body: bytes) -> bytes:
        """A body some transport already read and decoded in memory: only the cap applies."""
        if len(body) > self.limit:
            raise self._too_large()
        return body

    def feed(self, chunk: bytes) -> None:
        data = chunk
        for d in self._decoders:
            try:
                data = d.decompress(data, self.limit + 1)
            except zlib.error:
                raise TransportError(f"{self.what} is not validly compressed") from None
            if d.unconsumed_tail or len(data) > self.limit:
                raise self._too_large()
        self._out += data
        if len(self._out) > self.limit:
            raise self._too_large()

    def finish(self) -> bytes:
        """The whole decoded body (each layer's buffered rest is passed on)."""
        data = b""
        for d in self._decoders:
            try:
                out = d.decompress(data, self.limit + 1)
                if d.unconsumed_tail or len(out) > self.limit:
                    raise self._too_large()
                data = out + d.flush()
            except zlib.error:
                raise TransportError(f"{self.what} is not validly compressed") from None
            if len(data) > self.limit:
                raise self._too_large()
        self._out += data
        if len(self._out) > self.limit:
            raise self._too_large()
        return bytes(self._out)
