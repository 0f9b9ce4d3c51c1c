"""The compact event format of ``GET /v1/events?format=compact`` (a Writ extension).

docs/protocol.md, section "HTTP". Pure code, shared by the server that
encodes the events and the clients that decode them. One event per
checkpoint: ``id: <size>`` and one ``data:`` line holding JSON, either

- the full form ``["<records>", "<note>"]``: the checkpoint note verbatim, or
- the delta form ``"<blob>"``: only what changed since the previous note
  the same stream sent (the note's root, then each signature's payload, in
  the previous note's order and lengths), followed by the records.

The records are those that end at the event's size, as a tlog-tiles entry
bundle (each record prefixed with its uint16 length; empty when the event
carries none); every binary value is base85 (RFC 1924 alphabet, no
padding), whose characters need no JSON escaping. The note a client
rebuilds from a delta is exactly the note the server holds (the encoder
checks the round trip and sends the full form otherwise); it is then
verified like any other note: nothing here is trusted.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from . import notes, tiles
from .errors import BadMessage, BadNote

__all__ = ["MAX_RECORDS", "decode", "encode"]

#: the most records one compact event carries (one entry bundle); a client further behind reads tiles.
MAX_RECORDS = tiles.TILE_WIDTH

_Shape = tuple[str, tuple[tuple[str, bytes, int], ...]]


def _shape(note: str) -> _Shape | None:
    """(origin, (name, key ID, payload length) per signature) of a plain
    checkpoint (three body lines, no extension lines), or None."""
    try:
        parsed = notes.parse_note(note)
    except BadNote:
        return None
    lines = parsed.body.split("\n")
    if len(lines) != 4:
        return None
    return lines[0], tuple((s.name, s.key_id, len(s.payload)) for s in parsed.signatures)


def _rebuild(shape: _Shape, size: int, delta: bytes) -> tuple[str, bytes]:
    """The note of ``size`` with ``shape``, from ``delta``; (note, the bytes after the delta)."""
    origin, sigs = shape
    need = notes.HASH_SIZE + sum(n for _, _, n in sigs)
    if len(delta) < need:
        raise BadMessage(f"a compact event's delta is {len(delta)} bytes, less than the {need} it needs")
    root, pos = delta[: notes.HASH_SIZE], notes.HASH_SIZE
    lines = []
    for name, key_id, n in sigs:
        lines.append(notes.NoteSignature(name, key_id, delta[pos : pos + n]))
        pos += n
    body = f"{origin}\n{size}\n{base64.b64encode(root).decode('ascii')}\n"
    return notes.Note(body, tuple(lines)).serialize(), delta[need:]


def _delta(prev: str, note: str, size: int) -> bytes | None:
    shape, new = _shape(prev), _shape(note)
    if shape is None or new != shape:
        return None
    parsed = notes.parse_note(note)
    try:
        root = base64.b64decode(parsed.body.split("\n")[2], validate=True)
    except binascii.Error:
        return None
    delta = root + b"".join(s.payload for s in parsed.signatures)
    try:
        if _rebuild(shape, size, delta) != (note, b""):
            return None
    except BadMessage:
        return None
    return delta


def _b85(data: bytes) -> str:
    return base64.b85encode(data).decode("ascii")


def _unb85(text: Any) -> bytes:
    if type(text) is not str:
        raise BadMessage("a compact event's binary value is not a string")
    try:
        return base64.b85decode(text)
    except ValueError:
        raise BadMessage("a compact event's binary value is not base85") from None


def encode(prev: str | None, note: str, size: int, records: Sequence[bytes]) -> str:
    """The JSON data of the compact event of ``note`` (tree ``size``) carrying
    ``records`` (those ending at ``size``, at most :data:`MAX_RECORDS`) for a
    stream whose previous event carried ``prev``."""
    bundle = tiles.encode_entry_bundle(records) if records else b""
    delta = _delta(prev, note, size) if prev is not None else None
    if delta is None:
        return json.dumps([_b85(bundle), note], separators=(",", ":"), ensure_ascii=False)
    return json.dumps(_b85(delta + bundle))


def decode(prev: str | None, size: int, data: Any) -> tuple[list[bytes], str]:
    """(records, note) of a compact event of tree ``size`` whose decoded JSON is
    ``data``, after an event of this stream that carried ``prev``; or
    :class:`~ledger.errors.BadMessage`."""
    if type(data) is list and len(data) == 2 and type(data[1]) is str:
        rest, note = _unb85(data[0]), data[1]
    elif type(data) is str:
        shape = _shape(prev) if prev is not None else None
        if shape is None:
            raise BadMessage("a compact delta event without a previous checkpoint to apply it to")
        note, rest = _rebuild(shape, size, _unb85(data))
    else:
        raise BadMessage('a compact event is "<blob>" or ["<records>", "<note>"]')
    return (tiles.decode_entry_bundle(rest) if rest else []), note
