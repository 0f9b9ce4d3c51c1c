"""ledger.tiles: C2SP tlog-tiles paths and formats, cross-checked against tlog-scales."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tlog_scales import tiles as scales_tiles
from tlog_scales.backend import LocalBackend
from tlog_scales.reader import TilesReader
from tlog_scales.tlog import ConsistencyProof, InclusionProof

from ledger.errors import BadMessage, BadProof, BadTilePath
from ledger.tiles import (
    MAX_TREE_SIZE,
    TILE_WIDTH,
    TilePath,
    decode_entry_bundle,
    decode_hash_tile,
    encode_entry_bundle,
    entries_for_range,
    entries_path,
    parse_tile_path,
    partial_width,
    tile_path,
    tile_width,
    tiles_for_size,
)
from ledger.tree import MerkleLevels, leaf_hash, verify_consistency, verify_inclusion

# --- paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile", "path"),
    [
        (TilePath(0, 0), "tile/0/000"),
        (TilePath(0, 1), "tile/0/001"),
        (TilePath(0, 999), "tile/0/999"),
        (TilePath(0, 1000), "tile/0/x001/000"),
        (TilePath(0, 1234067), "tile/0/x001/x234/067"),
        (TilePath(0, 1234067, 5), "tile/0/x001/x234/067.p/5"),
        (TilePath(3, 0, 255), "tile/3/000.p/255"),
        (TilePath(1, 42, 1), "tile/1/042.p/1"),
        (TilePath(None, 0), "tile/entries/000"),
        (TilePath(None, 1234067), "tile/entries/x001/x234/067"),
        (TilePath(None, 7, 200), "tile/entries/007.p/200"),
        (TilePath(None, 1_000_000), "tile/entries/x001/x000/000"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_path_examples(tile: TilePath, path: str) -> None:
    assert tile.path == path
    if tile.level is None:
        assert entries_path(tile.index, tile.width) == path
    else:
        assert tile_path(tile.level, tile.index, tile.width) == path
    assert parse_tile_path(path) == tile
    level, index, width = parse_tile_path(path)
    assert (level, index, width) == (tile.level, tile.index, tile.width)
    assert tile.is_entries == (tile.level is None)
    assert tile.is_partial == (tile.width < 256)


def _max_index(level: int | None, width: int) -> int:
    return ((MAX_TREE_SIZE >> (8 * (level or 0))) - width) // TILE_WIDTH


@st.composite
def tiles(draw: st.DrawFn) -> TilePath:
    level = draw(st.one_of(st.none(), st.integers(0, 7)))
    width = draw(st.one_of(st.just(TILE_WIDTH), st.integers(1, 255)))
    if level == 7:  # a full level-7 tile would need 2**64 leaves
        width = draw(st.integers(1, 255))
    top = _max_index(level, width)
    index = draw(st.one_of(st.integers(0, min(top, 5000)), st.integers(0, top)))
    return TilePath(level, index, width)


@settings(max_examples=500)
@given(tiles())
def test_parse_format_round_trip(tile: TilePath) -> None:
    path = tile.path
    assert parse_tile_path(path) == tile
    # tlog-scales spells every path the same way.
    scales = scales_tiles.tile_path(-1 if tile.level is None else tile.level, tile.index, tile.width % 256)
    assert "/".join(scales) == path


@pytest.mark.parametrize(
    ("attack", "path"),
    [
        ("empty", ""),
        ("no index", "tile/0"),
        ("no index after slash", "tile/0/"),
        ("other root", "tiles/0/000"),
        ("leading slash", "/tile/0/000"),
        ("trailing slash", "tile/0/000/"),
        ("double slash", "tile/0//000"),
        ("dot segment", "tile/0/./000"),
        ("dot-dot segment", "tile/0/../000"),
        ("unpadded index", "tile/0/1"),
        ("over-padded index", "tile/0/0001"),
        ("leading zero group", "tile/0/x000/001"),
        ("missing x prefix", "tile/0/001/234"),
        ("x on the last group", "tile/0/x001"),
        ("uppercase X", "tile/0/X001/234"),
        ("short group", "tile/0/x01/234"),
        ("negative index", "tile/0/-01"),
        ("plus sign", "tile/0/+01"),
        ("hex index", "tile/0/0x1"),
        ("space", "tile/0/000 "),
        ("unicode digits", "tile/0/\u0660\u0660\u0661"),
        ("fullwidth digits", "tile/0/\uff10\uff10\uff11"),
        ("leading zero level", "tile/00/000"),
        ("level 64", "tile/64/000"),
        ("level with sign", "tile/+1/000"),
        ("negative level", "tile/-1/000"),
        ("level beyond a uint64 tree", "tile/8/000"),
        ("full level-7 tile needs 2**64 leaves", "tile/7/000"),
        ("index beyond a uint64 tree", "tile/0/x072/x057/x594/x037/x927/936"),
        ("absurd index", "tile/0/x999/x999/x999/x999/x999/x999/999"),
        ("many groups", "tile/0/" + "x001/" * 40 + "000"),
        ("huge digit string", "tile/0/" + "9" * 5000),
        ("width 0", "tile/0/000.p/0"),
        ("width 256", "tile/0/000.p/256"),
        ("width 999", "tile/0/000.p/999"),
        ("width leading zero", "tile/0/000.p/05"),
        ("width signed", "tile/0/000.p/+5"),
        ("width missing", "tile/0/000.p"),
        ("width empty", "tile/0/000.p/"),
        ("width then more", "tile/0/000.p/5/6"),
        ("partial marker mid-index", "tile/0/x001.p/5/234"),
        ("partial marker on level", "tile/0.p/5"),
        ("entries misspelled", "tile/entry/000"),
        ("entries capitalised", "tile/Entries/000"),
        ("entries without index", "tile/entries"),
        ("entries width 0", "tile/entries/000.p/0"),
        ("entries leading zero group", "tile/entries/x000/000"),
        ("backslash", "tile\\0\\000"),
        ("query string", "tile/0/000?x=1"),
        ("percent-encoded slash", "tile/0%2F000"),
    ],
)
def test_parse_refuses(attack: str, path: str) -> None:
    with pytest.raises(BadTilePath) as e:
        parse_tile_path(path)
    assert e.value.http_status == 404
    assert e.value.type == "bad-tile-path"


@pytest.mark.parametrize("value", [b"tile/0/000", None, 0])
def test_parse_refuses_non_strings(value: Any) -> None:
    with pytest.raises(BadTilePath):
        parse_tile_path(value)


@pytest.mark.parametrize(
    ("attack", "args"),
    [
        ("negative level", (-1, 0, 256)),
        ("level 64", (64, 0, 256)),
        ("negative index", (0, -1, 256)),
        ("width 0", (0, 0, 0)),
        ("width 257", (0, 0, 257)),
        ("bool level", (True, 0, 256)),
        ("float index", (0, 1.0, 256)),
        ("beyond a uint64 tree", (0, 2**56, 256)),
    ],
)
def test_tile_path_refuses(attack: str, args: tuple[Any, Any, Any]) -> None:
    with pytest.raises(BadTilePath):
        tile_path(*args)


def test_entries_path_refuses() -> None:
    for index, width in ((-1, 1), (0, 0), (0, 300), (2**56, 1)):
        with pytest.raises(BadTilePath):
            entries_path(index, width)
    assert entries_path(2**56 - 1, 255) == TilePath(None, 2**56 - 1, 255).path


# --- which tiles exist --------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, []),
        (1, [(0, 0, 1)]),
        (255, [(0, 0, 255)]),
        (256, [(0, 0, 256), (1, 0, 1)]),
        (257, [(0, 0, 256), (0, 1, 1), (1, 0, 1)]),
        (700, [(0, 0, 256), (0, 1, 256), (0, 2, 188), (1, 0, 2)]),
        (65536, [*((0, n, 256) for n in range(256)), (1, 0, 256), (2, 0, 1)]),
    ],
)
def test_tiles_for_size_examples(size: int, expected: list[tuple[int, int, int]]) -> None:
    assert [tuple(t) for t in tiles_for_size(size)] == expected


@settings(max_examples=300)
@given(st.integers(0, 2**40))
def test_tiles_for_size_agrees_with_tile_width(size: int) -> None:
    found = tiles_for_size(size) if size < 300_000 else []
    for t in found:
        assert t.level is not None
        assert tile_width(size, t.level, t.index) == t.width
    for level in range(6):
        nodes = size >> (8 * level)
        assert partial_width(size, level) == nodes % 256
        last = nodes // 256
        assert tile_width(size, level, last) == nodes % 256
        assert tile_width(size, level, last + 1) == 0
        if last:
            assert tile_width(size, level, last - 1) == 256
    assert partial_width(size, None) == size % 256


@pytest.mark.parametrize(
    ("start", "end", "size", "expected"),
    [
        (0, 0, 0, []),
        (0, 1, 1, [(0, 1)]),
        (0, 10, 10, [(0, 10)]),
        (3, 7, 10, [(0, 10)]),
        (0, 256, 256, [(0, 256)]),
        (0, 256, 300, [(0, 256)]),
        (255, 257, 300, [(0, 256), (1, 44)]),
        (256, 300, 300, [(1, 44)]),
        (100, 700, 700, [(0, 256), (1, 256), (2, 188)]),
        (600, 650, 1000, [(2, 256)]),
    ],
)
def test_entries_for_range(start: int, end: int, size: int, expected: list[tuple[int, int]]) -> None:
    assert entries_for_range(start, end, size) == expected


@settings(max_examples=300)
@given(st.data())
def test_entries_for_range_covers_exactly(data: st.DataObject) -> None:
    size = data.draw(st.integers(0, 5000))
    end = data.draw(st.integers(0, size))
    start = data.draw(st.integers(0, end))
    bundles = entries_for_range(start, end, size)
    covered = [i for n, w in bundles for i in range(n * 256, n * 256 + w)]
    assert set(range(start, end)) <= set(covered)
    assert all(w == 256 or n * 256 + w == size for n, w in bundles)  # only the last one is partial
    assert all(b - a == 1 for (a, _), (b, _) in itertools.pairwise(bundles))
    if bundles:
        assert bundles[0][0] == start // 256 and bundles[-1][0] == (end - 1) // 256


@pytest.mark.parametrize(
    ("start", "end", "size"),
    [(0, 11, 10), (5, 4, 10), (-1, 3, 10), (0, 1, -1), (0, 1, 2**64)],
)
def test_entries_for_range_refuses(start: int, end: int, size: int) -> None:
    with pytest.raises(BadTilePath):
        entries_for_range(start, end, size)


# --- formats ------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=700), min_size=1, max_size=256))
def test_entry_bundle_round_trip(entries: list[bytes]) -> None:
    data = encode_entry_bundle(entries)
    assert len(data) == sum(2 + len(e) for e in entries)
    assert decode_entry_bundle(data) == entries
    assert decode_entry_bundle(data, width=len(entries)) == entries


@settings(max_examples=100)
@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=20), st.data())
def test_entry_bundle_truncation_and_trailing_bytes_are_refused(
    entries: list[bytes], data: st.DataObject
) -> None:
    bundle = encode_entry_bundle(entries)
    cut = data.draw(st.integers(0, len(bundle) - 1))
    with pytest.raises(BadMessage):
        decode_entry_bundle(bundle[:cut], width=len(entries))
    with contextlib.suppress(BadMessage):  # without a width, a cut on an entry boundary is a shorter bundle
        shorter = decode_entry_bundle(bundle[:cut])
        assert shorter == entries[: len(shorter)]
    extra = data.draw(st.binary(min_size=1, max_size=10))
    with pytest.raises(BadMessage):
        decode_entry_bundle(bundle + extra, width=len(entries))


@pytest.mark.parametrize(
    ("attack", "data", "width"),
    [
        ("empty bundle", b"", None),
        ("one byte of length", b"\x00", None),
        ("length beyond the data", b"\x00\x05abcd", None),
        ("maximal length, no data", b"\xff\xff", None),
        ("half a second length", b"\x00\x01a\x00", None),
        ("fewer entries than the width", b"\x00\x01a", 2),
        ("more entries than the width", b"\x00\x01a\x00\x01b", 1),
        ("257 entries", b"\x00\x00" * 257, None),
        ("not bytes", "\x00\x01a", None),
    ],
)
def test_decode_entry_bundle_refuses(attack: str, data: Any, width: int | None) -> None:
    with pytest.raises(BadMessage):
        decode_entry_bundle(data, width)


def test_entry_bundle_limits() -> None:
    big = b"\xab" * 65535
    assert decode_entry_bundle(encode_entry_bundle([big, b""])) == [big, b""]
    with pytest.raises(BadMessage):
        encode_entry_bundle([b"\x00" * 65536])
    with pytest.raises(BadMessage):
        encode_entry_bundle([])
    with pytest.raises(BadMessage):
        encode_entry_bundle([b"x"] * 257)
    with pytest.raises(BadMessage):
        encode_entry_bundle(["text"])  # type: ignore[list-item]


def test_decode_hash_tile() -> None:
    hashes = [hashlib.sha256(bytes([i])).digest() for i in range(256)]
    assert decode_hash_tile(b"".join(hashes)) == hashes
    assert decode_hash_tile(b"".join(hashes[:5]), width=5) == hashes[:5]
    for data, width in ((b"", None), (b"\x00" * 33, None), (b"\x00" * 32 * 257, None), (b"\x00" * 64, 1)):
        with pytest.raises(BadProof):
            decode_hash_tile(data, width)


# --- an independent tlog-tiles client reads what we serve -----------------------------


def _records(n: int) -> list[bytes]:
    rng = random.Random(7)
    return [rng.randbytes(rng.randint(1, 600)) for _ in range(n)]


def _publish(base: Path, ml: MerkleLevels, records: list[bytes], size: int) -> None:
    """Write the tiles and entry bundles of the tree at ``size`` as static files."""
    for t in tiles_for_size(size):
        assert t.level is not None
        _write(base / t.path, ml.tile(t.level, t.index, t.width))
    for n, w in entries_for_range(0, size, size):
        _write(base / entries_path(n, w), encode_entry_bundle(records[n * 256 : n * 256 + w]))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_tlog_scales_reads_our_tiles(tmp_path: Path) -> None:
    records = _records(700)
    ml = MerkleLevels(leaf_hash(r) for r in records)
    sizes = (1, 255, 256, 300, 512, 513, 700)
    for size in sizes:  # a real log leaves its earlier partial tiles in place
        _publish(tmp_path, ml, records, size)
    assert (tmp_path / "tile/0/002.p/188").is_file() and (tmp_path / "tile/1/000.p/2").is_file()

    rng = random.Random(1)
    for size in sizes:
        reader = TilesReader(LocalBackend(tmp_path))
        reader.set_size(size)
        assert reader.calculate_root_hash() == ml.root(size)
        for index in {0, size - 1, size // 2, rng.randrange(size)}:
            theirs = reader.get_inclusion_proof(index, size)
            assert theirs.node_hashes == ml.inclusion_proof(index, size)
            verify_inclusion(leaf_hash(records[index]), index, size, theirs.node_hashes, ml.root(size))
            assert reader.get_entry(index) == records[index]
        for old in {1, size // 3 or 1, size - 1 or 1, size}:
            theirs_c = reader.get_consistency_proof(old, size)
            assert theirs_c.node_hashes == ml.consistency_proof(old, size)
            verify_consistency(old, size, theirs_c.node_hashes, ml.root(old), ml.root(size))


def test_tlog_scales_verifies_our_proofs() -> None:
    records = _records(700)
    ml = MerkleLevels(leaf_hash(r) for r in records)
    rng = random.Random(2)
    for _ in range(200):
        size = rng.randint(1, 700)
        index = rng.randrange(size)
        InclusionProof(index, size, ml.inclusion_proof(index, size)).check(ml.leaf(index), ml.root(size))
        old = rng.randint(1, size)
        ConsistencyProof(old, size, ml.consistency_proof(old, size)).check(ml.root(old), ml.root(size))
