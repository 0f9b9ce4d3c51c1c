"""Every C2SP tlog-tiles path and format, in one place (docs/protocol.md, "HTTP").

Paths (relative to the log's prefix)::

    tile/<L>/<N>[.p/<W>]          hash tile: level L holds tree height 8L
    tile/entries/<N>[.p/<W>]      entry bundle: the record bytes themselves

``<N>`` is written in 3-digit groups, all but the last prefixed with ``x``
(1234067 -> ``x001/x234/067``); ``<L>`` and ``<W>`` are decimal with no
leading zeros, ``W`` in 1..255 (a full tile has no ``.p/`` suffix and is 256
wide). Tile N of level L holds the height-8L nodes ``N*256 .. N*256+W-1``.
An entry bundle is its entries back to back, each with a uint16 big-endian
length prefix.

Parsing is strict: a path has exactly one spelling, and one that could
not name a tile of a uint64-sized tree is refused; both raise
:class:`~ledger.errors.BadTilePath` (HTTP 404). A malformed entry bundle
raises :class:`~ledger.errors.BadMessage`, a malformed hash tile
:class:`~ledger.errors.BadProof`. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from .errors import BadMessage, BadProof, BadTilePath

TILE_HEIGHT: Final = 8
TILE_WIDTH: Final = 256
HASH_SIZE: Final = 32
#: the spec allows levels 0..63; with uint64 sizes only 0..7 can hold a node.
MAX_LEVEL: Final = 63
MAX_TREE_SIZE: Final = (1 << 64) - 1
MAX_ENTRY_SIZE: Final = 0xFFFF

_LEVEL_RE: Final = re.compile(r"0|[1-9][0-9]?")
_WIDTH_RE: Final = re.compile(r"[1-9][0-9]{0,2}")
_GROUP_RE: Final = re.compile(r"x[0-9]{3}")
_LAST_RE: Final = re.compile(r"[0-9]{3}")
#: 2**64 has 20 decimal digits: 7 groups are more than any valid index needs.
_MAX_GROUPS: Final = 7
_MAX_PATH: Final = 128


@dataclass(frozen=True, slots=True)
class TilePath:
    """A tile: ``level`` None for an entry bundle; ``width`` 256 for a full tile.

    Unpacks as ``level, index, width = tile``.
    """

    level: int | None
    index: int
    width: int = TILE_WIDTH

    def __iter__(self) -> Iterator[int | None]:
        return iter((self.level, self.index, self.width))

    @property
    def is_entries(self) -> bool:
        return self.level is None

    @property
    def is_partial(self) -> bool:
        return self.width < TILE_WIDTH

    @property
    def path(self) -> str:
        if self.level is None:
            return entries_path(self.index, self.width)
        return tile_path(self.level, self.index, self.width)


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(level: int | None, index: int, width: int) -> None:
    if level is not None and (not _is_uint(level) or level > MAX_LEVEL):
        raise BadTilePath(f"tile level must be 0..{MAX_LEVEL}, not {level!r}")
    if not _is_uint(index):
        raise BadTilePath(f"tile index must be a non-negative integer, not {index!r}")
    if not _is_uint(width) or not 1 <= width <= TILE_WIDTH:
        raise BadTilePath(f"tile width must be 1..{TILE_WIDTH}, not {width!r}")
    # Leaves needed before the tile's last node exists: must fit a uint64 tree.
    needed = (index * TILE_WIDTH + width) << (TILE_HEIGHT * (level or 0))
    if needed > MAX_TREE_SIZE:
        raise BadTilePath(f"tile {index} of level {level} would need {needed} leaves, more than 2**64-1")


def _encode_index(n: int) -> str:
    groups = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        groups.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(groups))


def _suffix(width: int) -> str:
    return "" if width == TILE_WIDTH else f".p/{width}"


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """``tile/<L>/<N>[.p/<W>]``: e.g. ``tile_path(0, 1234067) == "tile/0/x001/x234/067"``."""
    _check(level, index, width)
    return f"tile/{level}/{_encode_index(index)}{_suffix(width)}"


def entries_path(index: int, width: int = TILE_WIDTH) -> str:
    """``tile/entries/<N>[.p/<W>]``: the entry bundle of records ``N*256 .. N*256+W-1``."""
    _check(None, index, width)
    return f"tile/entries/{_encode_index(index)}{_suffix(width)}"


def parse_tile_path(path: str) -> TilePath:
    """The tile a canonical tlog-tiles path names; anything else raises :class:`BadTilePath`."""
    if not isinstance(path, str) or len(path) > _MAX_PATH or not path.isascii():
        raise BadTilePath("not a tile path")
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise BadTilePath("a tile path is tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>]")
    level: int | None
    if parts[1] == "entries":
        level = None
    elif _LEVEL_RE.fullmatch(parts[1]):
        level = int(parts[1])
    else:
        raise BadTilePath(f"bad tile level {parts[1]!r}")
    groups = parts[2:]
    width = TILE_WIDTH
    if len(groups) >= 2 and groups[-2].endswith(".p"):
        if not _WIDTH_RE.fullmatch(groups[-1]) or int(groups[-1]) >= TILE_WIDTH:
            raise BadTilePath(f"bad partial tile width {groups[-1]!r}")
        width = int(groups[-1])
        groups = [*groups[:-2], groups[-2][:-2]]
    if len(groups) > _MAX_GROUPS:
        raise BadTilePath("tile index too large")
    if not _LAST_RE.fullmatch(groups[-1]) or not all(_GROUP_RE.fullmatch(g) for g in groups[:-1]):
        raise BadTilePath("a tile index is 3-digit groups, all but the last prefixed with x")
    if len(groups) > 1 and groups[0] == "x000":
        raise BadTilePath("a tile index has no leading zero groups")
    index = int("".join(g.lstrip("x") for g in groups))
    _check(level, index, width)
    return TilePath(level, index, width)


# --- which tiles exist --------------------------------------------------------


def _nodes_at(size: int, level: int | None) -> int:
    """How many complete nodes of the tile level's height a tree of ``size`` has."""
    if not _is_uint(size) or size > MAX_TREE_SIZE:
        raise BadTilePath(f"tree size must be 0..2**64-1, not {size!r}")
    if level is None:
        return size
    if not _is_uint(level):
        raise BadTilePath(f"tile level must be a non-negative integer, not {level!r}")
    height = TILE_HEIGHT * level
    return size >> height if height < 64 else 0


def partial_width(size: int, level: int | None) -> int:
    """The width of the partial tile at ``level`` (None: entry bundles) of a tree of ``size``; 0 if none."""
    return _nodes_at(size, level) % TILE_WIDTH


def tile_width(size: int, level: int | None, index: int) -> int:
    """The width tile ``index`` of ``level`` has in a tree of ``size``: 256, 1..255, or 0 (none yet)."""
    nodes = _nodes_at(size, level)
    if not _is_uint(index):
        raise BadTilePath(f"tile index must be a non-negative integer, not {index!r}")
    return max(0, min(TILE_WIDTH, nodes - index * TILE_WIDTH))


def tiles_for_size(size: int) -> list[TilePath]:
    """Every hash tile of a tree of ``size``: all full tiles and the one partial per level, bottom up."""
    out: list[TilePath] = []
    level = 0
    while (nodes := _nodes_at(size, level)) > 0:
        full, rest = divmod(nodes, TILE_WIDTH)
        out.extend(TilePath(level, n, TILE_WIDTH) for n in range(full))
        if rest:
            out.append(TilePath(level, full, rest))
        level += 1
    return out


def entries_for_range(start: int, end: int, tree_size: int) -> list[tuple[int, int]]:
    """The entry bundles ``(index, width)`` to fetch for records [start, end) of a tree of ``tree_size``."""
    _nodes_at(tree_size, None)
    if not _is_uint(start) or not _is_uint(end) or not start <= end <= tree_size:
        raise BadTilePath(f"entry range [{start}, {end}) is not inside a tree of size {tree_size}")
    if start == end:
        return []
    first, last = start // TILE_WIDTH, (end - 1) // TILE_WIDTH
    return [(n, min(TILE_WIDTH, tree_size - n * TILE_WIDTH)) for n in range(first, last + 1)]


# --- formats ------------------------------------------------------------------


def encode_entry_bundle(entries: Sequence[bytes]) -> bytes:
    """1 to 256 entries, each prefixed with its uint16 big-endian length."""
    if not 1 <= len(entries) <= TILE_WIDTH:
        raise BadMessage(f"an entry bundle holds 1..{TILE_WIDTH} entries, not {len(entries)}")
    out = bytearray()
    for i, entry in enumerate(entries):
        if not isinstance(entry, bytes | bytearray):
            raise BadMessage(f"entry {i} is not bytes")
        if len(entry) > MAX_ENTRY_SIZE:
            raise BadMessage(f"entry {i} is {len(entry)} bytes; a bundle entry is at most {MAX_ENTRY_SIZE}")
        out += len(entry).to_bytes(2, "big")
        out += entry
    return bytes(out)


def decode_entry_bundle(data: bytes, width: int | None = None) -> list[bytes]:
    """The entries of a bundle; truncation, excess or (when given) a count other than ``width`` is refused."""
    if not isinstance(data, bytes | bytearray):
        raise BadMessage("an entry bundle is bytes")
    view = memoryview(data)
    entries: list[bytes] = []
    pos = 0
    while pos < len(view):
        if len(entries) == TILE_WIDTH:
            raise BadMessage(f"an entry bundle holds at most {TILE_WIDTH} entries; bytes follow the last")
        if pos + 2 > len(view):
            raise BadMessage(f"entry bundle truncated in the length of entry {len(entries)}")
        n = int.from_bytes(view[pos : pos + 2], "big")
        pos += 2
        if pos + n > len(view):
            raise BadMessage(f"entry bundle truncated in entry {len(entries)} ({n} bytes announced)")
        entries.append(bytes(view[pos : pos + n]))
        pos += n
    if not entries:
        raise BadMessage("an entry bundle is not empty")
    if width is not None and len(entries) != width:
        raise BadMessage(f"an entry bundle of width {width} holds {len(entries)} entries")
    return entries


def decode_hash_tile(data: bytes, width: int | None = None) -> list[bytes]:
    """The 32-byte hashes of a hash tile (1..256 of them; exactly ``width`` when given)."""
    if not isinstance(data, bytes | bytearray):
        raise BadProof("a hash tile is bytes")
    count, rest = divmod(len(data), HASH_SIZE)
    if rest or not 1 <= count <= TILE_WIDTH:
        raise BadProof(f"a hash tile is 1..{TILE_WIDTH} hashes of {HASH_SIZE} bytes, not {len(data)} bytes")
    if width is not None and count != width:
        raise BadProof(f"a hash tile of width {width} holds {count} hashes")
    return [bytes(data[i : i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]
