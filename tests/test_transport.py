"""ledger.transport: bodies are decoded within their cap, whatever their encoding claims."""

from __future__ import annotations

import gzip
import zlib

import pytest

from ledger.errors import ResponseTooLarge, TransportError
from ledger.transport import BoundedBody


def feed_all(enc: str | None, data: bytes, limit: int, chunk: int = 1000) -> bytes:
    body = BoundedBody(enc, limit, "test body")
    for i in range(0, len(data), chunk):
        body.feed(data[i : i + chunk])
    return body.finish()


def test_plain_and_identity_bodies_pass_within_the_cap() -> None:
    assert feed_all(None, b"x" * 500, 500) == b"x" * 500
    assert feed_all("identity", b"abc", 10) == b"abc"
    with pytest.raises(ResponseTooLarge):
        feed_all(None, b"x" * 501, 500)


def test_honest_gzip_and_deflate_are_decoded() -> None:
    data = bytes(range(256)) * 20
    assert feed_all("gzip", gzip.compress(data), len(data)) == data
    assert feed_all("deflate", zlib.compress(data), len(data)) == data
    assert feed_all("gzip, gzip", gzip.compress(gzip.compress(data)), len(data), chunk=7) == data


@pytest.mark.parametrize("layers", [1, 2])
def test_gzip_bomb_is_stopped_at_the_cap(layers: int) -> None:
    """64 MiB of zeros (or a bomb of a bomb) never inflates past the 1 MiB cap."""
    data = gzip.compress(bytes(64 << 20))
    if layers == 2:
        data = gzip.compress(data)
    with pytest.raises(ResponseTooLarge):
        feed_all(", ".join(["gzip"] * layers), data, 1 << 20, chunk=65536)


@pytest.mark.parametrize(
    ("encoding", "why"),
    [("br", "unsupported"), ("gzip, gzip, gzip", "too deep"), ("compress", "unsupported")],
)
def test_unsupported_or_deep_encodings_are_refused(encoding: str, why: str) -> None:
    with pytest.raises(TransportError):
        BoundedBody(encoding, 1000, why)


def test_corrupt_compressed_body_is_a_transport_error() -> None:
    with pytest.raises(TransportError):
        feed_all("gzip", b"\x1f\x8b not really gzip", 1000)


def test_in_memory_bodies_only_get_the_cap() -> None:
    body = BoundedBody("gzip", 4, "test body")
    assert body.decoded(b"abcd") == b"abcd"
    with pytest.raises(ResponseTooLarge):
        body.decoded(b"abcde")
