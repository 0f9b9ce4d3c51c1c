"""Fuzz the tlog-tiles path parser and the tile formats (docs/protocol.md, "Receipts").

Every input is read both as a path (one character per byte, as an HTTP router
could hand it over after percent-decoding) and as a tile body. Oracles:

- ``parse_tile_path`` raises only :class:`~ledger.errors.BadTilePath`, and a
  path it accepts is the canonical spelling of the tile it names
  (``TilePath.path`` gives the input back);
- ``decode_entry_bundle`` raises only :class:`~ledger.errors.BadMessage`, and
  ``encode_entry_bundle`` of what it decoded gives the input back; a width
  other than the entry count is refused;
- ``decode_hash_tile`` raises only :class:`~ledger.errors.BadProof` and
  concatenating the hashes gives the input back;
- for an accepted path, ``tile_width`` answers (or raises ``BadTilePath``)
  for a tree whose size is read from the input.

Run: ``python fuzz/fuzz_tiles.py -runs=100000`` (libFuzzer flags).
"""

from __future__ import annotations

import _common as common

atheris = common.require_atheris("tiles")

with atheris.instrument_imports(include=["ledger"]):
    from ledger import tiles
    from ledger.errors import BadMessage, BadProof, BadTilePath


def _path(data: bytes) -> None:
    text = data.decode("latin-1")
    try:
        tp = tiles.parse_tile_path(text)
    except BadTilePath:
        return
    if tp.path != text:
        raise AssertionError(f"{text!r} is not the canonical spelling {tp.path!r}")
    size = int.from_bytes(data[-8:], "big")
    try:
        w = tiles.tile_width(size, tp.level, tp.index)
    except BadTilePath:
        return
    if not 0 <= w <= tiles.TILE_WIDTH:
        raise AssertionError(f"tile width {w}")


def _entries(data: bytes) -> None:
    try:
        entries = tiles.decode_entry_bundle(data)
    except BadMessage:
        return
    if tiles.encode_entry_bundle(entries) != data:
        raise AssertionError("an entry bundle does not encode back to its bytes")
    try:
        tiles.decode_entry_bundle(data, width=len(entries) + 1)
    except BadMessage:
        return
    raise AssertionError("an entry bundle was accepted with the wrong width")


def _hashes(data: bytes) -> None:
    try:
        hashes = tiles.decode_hash_tile(data)
    except BadProof:
        return
    if b"".join(hashes) != data or any(len(h) != tiles.HASH_SIZE for h in hashes):
        raise AssertionError("a hash tile does not join back to its bytes")


def test_one_input(data: bytes) -> None:
    _path(data)
    _entries(data)
    _hashes(data)


if __name__ == "__main__":
    common.main("tiles", test_one_input)
