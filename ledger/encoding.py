"""The wire format: the only module that imports msgpack.

Writ bytes are MessagePack in the one canonical form that
``msgpack.packb(value, use_bin_type=True)`` produces (docs/protocol.md, "Records"): the
smallest form for every integer, ``bin`` for bytes, ``str`` for text, arrays
only, no maps, floats, ext types, booleans or negative integers. A reader
accepts bytes only when decoding them and encoding the result again gives back
the very same bytes; everything else raises :class:`~ledger.errors.NotCanonical`
(or the error class the caller names). Decoded values are plain Python values;
the typed views live in :mod:`ledger.records` and :mod:`ledger.messages`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import NotCanonical, TooLarge, VerificationError

MAX_RECORD = 600
MAX_BODY = 512

Value = int | bytes | str | None | list["Value"]


_Packer = msgpack.Packer
_unpackb = msgpack.unpackb


def pack(value: Any) -> bytes:
    """Encode ``value`` canonically (what ``msgpack.packb(value, use_bin_type=True)`` does,
    without its keyword-argument wrapper)."""
    out = _Packer(use_bin_type=True).pack(value)
    assert type(out) is bytes
    return out


def _flat_ok(value: Any) -> bool:
    """True when ``value`` is a flat array of allowed scalars (the common case,
    checked without recursion); False sends it through :func:`_check_types`,
    which names what is wrong."""
    if type(value) is not list:
        return False
    for v in value:
        t = type(v)
        if t is int:
            if v < 0:
                return False
        elif not (t is bytes or t is str or v is None):
            return False
    return True


def _check_types(value: Any, depth: int, max_depth: int, error: type[VerificationError]) -> None:
    t = type(value)
    if t is list:
        if depth >= max_depth:
            raise error("nested arrays are not allowed here")
        for item in value:  # scalars inline: a device's state holds ~100,000 of them
            ti = type(item)
            if ti is int:
                if item < 0:
                    raise error("negative integers are not allowed")
            elif ti is list:
                _check_types(item, depth + 1, max_depth, error)
            elif not (ti is bytes or ti is str or item is None):
                raise error(f"a {ti.__name__} is not allowed in Writ MessagePack")
        return
    if t is int:
        if value < 0:
            raise error("negative integers are not allowed")
        return
    if t is bytes or t is str or value is None:
        return
    raise error(f"a {t.__name__} is not allowed in Writ MessagePack")


def unpack(
    data: bytes,
    *,
    max_depth: int = 1,
    error: type[VerificationError] = NotCanonical,
) -> Any:
    """Decode canonical MessagePack, or raise ``error``.

    ``max_depth`` is how deep arrays may nest (1: a flat array of scalars).
    """

    if type(data) is not bytes:
        raise error("expected bytes")
    try:
        value = _unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
        )
    except Exception as exc:  # msgpack raises many unrelated types on hostile input
        raise error(f"not valid MessagePack ({type(exc).__name__})") from None
    if max_depth < 1 or not _flat_ok(value):
        _check_types(value, 0, max_depth, error)
    try:
        again = pack(value)
    except Exception:
        raise error("value does not re-encode") from None
    if again != data:
        raise error("not the canonical (minimal) MessagePack encoding")
    return value


def unpack_array(
    data: bytes,
    *,
    min_len: int,
    max_len: int | None = None,
    max_depth: int = 1,
    error: type[VerificationError] = NotCanonical,
) -> list[Any]:
    """Decode a canonical array with ``min_len`` to ``max_len`` elements."""

    value = unpack(data, max_depth=max_depth, error=error)
    if type(value) is not list:
        raise error("expected an array")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise error(f"expected an array of {min_len}..{max_len if max_len is not None else ''} elements")
    return value


def _flat_fast(data: bytes) -> list[Any] | None:
    """The flat array of scalars that ``data`` encodes canonically, or None.

    The same steps as :func:`unpack` with ``max_depth=1`` (decode, the flat
    type check, re-encode and compare), without its layers; None sends the
    bytes to the strict path, which decides and names what is wrong."""
    try:
        value = _unpackb(data, raw=False, use_list=True, strict_map_key=True, timestamp=0)
        if _flat_ok(value) and _Packer(use_bin_type=True).pack(value) == data:
            return value  # type: ignore[no-any-return]
    except Exception:  # any failure takes the strict path, which names it
        return None
    return None


def _frame(raw: bytes) -> tuple[bytes, bytes] | None:
    """The (body, signature) of a record whose outer array is framed exactly as
    the canonical encoder frames it: ``0x92``, the body as bin8 (under 256
    bytes) or bin16 (256..512), the signature as bin8 of 64 bytes, nothing
    after. Those bytes decode to ``[body, signature]`` and re-encode to
    themselves, so they need no MessagePack round trip; anything else returns
    None and takes the strict path, which names what is wrong."""
    n = len(raw)
    if n < 69 or raw[0] != 0x92:
        return None
    tag = raw[1]
    if tag == 0xC4:
        length, start = raw[2], 3
    elif tag == 0xC5:
        length, start = (raw[2] << 8) | raw[3], 4
        if length < 256 or length > MAX_BODY:
            return None
    else:
        return None
    end = start + length
    if n != end + 66 or raw[end] != 0xC4 or raw[end + 1] != 64:
        return None
    return raw[start:end], raw[end + 2 :]


def split_record(raw: bytes, *, fast: bool = True) -> tuple[bytes, bytes, list[Any]]:
    """Steps 1 and 2 of the validity table: sizes, then canonical decoding.

    Returns (body bytes, signature, decoded body array). ``fast=False`` skips
    the fast paths (:func:`_frame`, :func:`_flat_fast`), for the tests that
    show both agree.
    """

    if type(raw) is not bytes:
        raise NotCanonical("a record is bytes")
    if len(raw) > MAX_RECORD:
        raise TooLarge(f"record is {len(raw)} bytes, the limit is {MAX_RECORD}")
    framed = _frame(raw) if fast else None
    if framed is not None:
        body, sig = framed
    else:
        outer = unpack(raw, max_depth=1)
        if type(outer) is not list or len(outer) != 2:
            raise NotCanonical("a record is a 2-element array [body, signature]")
        body, sig = outer
        if type(body) is bytes and len(body) > MAX_BODY:  # step 1 comes before step 2's shape check
            raise TooLarge(f"body is {len(body)} bytes, the limit is {MAX_BODY}")
        if type(body) is not bytes or type(sig) is not bytes or len(sig) != 64:
            raise NotCanonical("a record is [body: bin, signature: bin(64)]")
    fields = _flat_fast(body) if fast else None
    if fields is None or len(fields) < 6:
        fields = unpack_array(body, min_len=6, max_depth=1)
    return body, sig, fields


def join_record(body: bytes, signature: bytes) -> bytes:
    raw = pack([body, signature])
    if len(body) > MAX_BODY or len(raw) > MAX_RECORD:
        raise TooLarge("record would exceed the size limits")
    return raw


def pack_records(records: list[bytes]) -> bytes:
    """A MessagePack array of record ``bin`` values (``POST /v1/records``, ``GET /v1/records``)."""
    return pack(records)


def unpack_records(
    data: bytes, *, max_count: int, error: type[VerificationError] = NotCanonical
) -> list[bytes]:
    """Strictly decode a MessagePack array of 1..max_count ``bin`` values."""
    value = unpack_array(data, min_len=0, max_len=max_count, max_depth=1, error=error)
    for item in value:
        if type(item) is not bytes:
            raise error("expected an array of bin values")
    return value
