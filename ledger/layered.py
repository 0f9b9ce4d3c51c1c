"""The state's containers: :class:`Bits` (a growable bitmap of seqs) and
:class:`Layered` (a dict whose copy is cheap), so a copy of a
:class:`~ledger.state.LedgerState` per commit group costs about O(sqrt(n)).
Pure code, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar, overload

__all__ = ["Bits", "Layered"]


class Bits:
    """A growable bitmap of seqs: one bit per record, the compact sorted
    structure a device keeps for 'is a grant' and 'is revoked'."""

    __slots__ = ("_b",)

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self._b = bytearray(data)

    def __contains__(self, i: int) -> bool:
        byte = i >> 3
        return byte < len(self._b) and bool(self._b[byte] & (1 << (i & 7)))

    def add(self, i: int) -> None:
        b = self._b
        byte = i >> 3
        if byte >= len(b):
            b.extend(bytes(byte + 1 - len(b)))
        b[byte] |= 1 << (i & 7)

    def __iter__(self) -> Iterator[int]:
        for byte, v in enumerate(self._b):
            if v:
                for bit in range(8):
                    if v & (1 << bit):
                        yield byte * 8 + bit

    def __len__(self) -> int:
        return sum(v.bit_count() for v in self._b)

    def to_bytes(self) -> bytes:
        return bytes(self._b).rstrip(b"\x00")

    def copy(self) -> Bits:
        return Bits(self._b)


K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")
_MISSING: Any = object()


class Layered(MutableMapping[K, V]):
    """A dict whose :meth:`copy` costs the entries added since the last full
    copy, not all of them: the entries live in a *base* dict, shared by the
    copies and never written again, plus a private *top* dict that takes every
    write. A key is in one of the two, never both, so iteration (base, then
    top) keeps a dict's insertion order. :meth:`copy` folds the top into a new
    base once it holds more than about ``8 * sqrt(len)`` entries; it never
    changes the mapping it copies (another thread may be reading it)."""

    __slots__ = ("_base", "_top")
    #: the top is never folded below this many entries
    FOLD_MIN = 1024

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._base: dict[K, V] = {}
        self._top: dict[K, V] = dict(data)

    def __getitem__(self, key: K) -> V:
        v = self._top.get(key, _MISSING)
        return self._base[key] if v is _MISSING else v

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, /, default: V | T) -> V | T: ...
    def get(self, key: K, /, default: Any = None) -> Any:
        v = self._top.get(key, _MISSING)
        return self._base.get(key, default) if v is _MISSING else v

    def __contains__(self, key: object) -> bool:
        return key in self._top or key in self._base

    def __setitem__(self, key: K, value: V) -> None:
        if key in self._base:  # never both: own a merged dict (rare: the rules only add)
            self._top, self._base = self._base | self._top, {}
        self._top[key] = value

    def __delitem__(self, key: K) -> None:
        if key in self._base:
            self._top, self._base = self._base | self._top, {}
        del self._top[key]

    def __iter__(self) -> Iterator[K]:
        yield from self._base
        yield from self._top

    def __reversed__(self) -> Iterator[K]:
        """Keys newest first (a dict's reversed insertion order)."""
        yield from reversed(self._top)
        yield from reversed(self._base)

    def __len__(self) -> int:
        return len(self._base) + len(self._top)

    def __repr__(self) -> str:
        return f"Layered({dict(self)!r})"

    def copy(self) -> Layered[K, V]:
        new: Layered[K, V] = Layered.__new__(Layered)
        if len(self._top) > max(self.FOLD_MIN, 8 * math.isqrt(len(self._base))):
            new._base, new._top = self._base | self._top, {}
        else:
            new._base, new._top = self._base, dict(self._top)
        return new
