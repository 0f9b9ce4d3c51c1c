"""The RFC 6962 / RFC 9162 Merkle tree of the ledger (docs/protocol.md, "The tree and `prev` chaining").

SHA-256, leaf hashes ``SHA-256(0x00 || data)``, interior nodes
``SHA-256(0x01 || left || right)``, and the tree of size 0 hashes to
``SHA-256("")``. Pure: bytes in, values out, no I/O.

Three pieces:

- :class:`CompactRange`: the O(log n) frontier (the roots of the perfect
  subtrees that make up a tree of size n). It is all a device needs to keep
  the root of the records it applied, and it serialises to a few hundred
  bytes.
- :class:`MerkleLevels`: the server's in-memory node store. Level 0 holds the
  leaf hashes and level h every complete, aligned subtree of 2**h leaves, so
  the root at any earlier size, any inclusion or consistency proof, and any
  C2SP tlog-tiles hash tile come out in O(log n) lookups.
- :func:`verify_inclusion`, :func:`root_from_inclusion` and
  :func:`verify_consistency` (RFC 9162 sections 2.1.3.2 and 2.1.4.2). They
  raise :class:`~ledger.errors.BadProof`, never return a bool. Policy, as in
  the transparency-dev/merkle vectors: a consistency proof from size 0 proves
  nothing and is refused; equal sizes need an empty proof and equal roots;
  every proof must have exactly the number of hashes its sizes call for.

Out-of-range questions to :class:`MerkleLevels` (a root, subtree or proof at a
size the tree does not have) raise :class:`~ledger.errors.BadProof`; a tile it
does not have raises :class:`~ledger.errors.BadTilePath` (HTTP 404).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from hashlib import sha256 as _sha256
from typing import Final

from .errors import BadProof, BadTilePath

HASH_SIZE: Final = 32
#: SHA-256 of the empty string: the root of the tree of size 0.
EMPTY_ROOT: Final = _sha256(b"").digest()
#: tree sizes and indices are uint64 (as in checkpoints and tlog-tiles).
MAX_TREE_SIZE: Final = (1 << 64) - 1

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
#: fresh SHA-256s already fed the leaf and interior-node prefixes: copying one is cheaper
#: than starting one and concatenating ``0x01 || left || right`` first
_leaf_ctx: Final = _sha256(_LEAF_PREFIX).copy
_node_ctx: Final = _sha256(_NODE_PREFIX).copy
#: tlog-tiles: a tile is 2**8 hashes wide and spans 8 tree levels.
_TILE_HEIGHT: Final = 8
_TILE_WIDTH: Final = 1 << _TILE_HEIGHT


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf (one record)."""
    c = _leaf_ctx()
    c.update(data)
    return c.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def mth(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of a list of leaf hashes (RFC 9162 section 2.1.1).

    Computed through a :class:`CompactRange`, so it needs O(log n) memory.
    """
    cr = CompactRange()
    cr.extend(leaf_hashes)
    return cr.root()


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        got = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise BadProof(f"{what} must be a {HASH_SIZE}-byte hash (got {got})")
    return bytes(value)


def _check_size(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TREE_SIZE:
        raise BadProof(f"{what} must be an integer in 0..2**64-1 (got {value!r})")
    return value


def _check_proof(proof: object) -> list[bytes]:
    if proof is None:
        return []
    if not isinstance(proof, list | tuple):
        raise BadProof(f"a proof is a list of hashes (got {type(proof).__name__})")
    return [_check_hash(h, f"proof hash {i}") for i, h in enumerate(proof)]


# --- the frontier -------------------------------------------------------------


class CompactRange:
    """The roots of the perfect subtrees of a tree of ``size`` leaves.

    ``hashes[0]`` covers the leftmost (largest) subtree, one hash per set bit
    of ``size``. Appending is amortised O(1), :meth:`root` is O(log n).
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        size = _check_size(size, "compact range size")
        checked = [_check_hash(h, "compact range hash") for h in hashes]
        if len(checked) != size.bit_count():
            raise BadProof(
                f"a compact range of size {size} has {size.bit_count()} hashes, not {len(checked)}"
            )
        self._size = size
        self._hashes = checked

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> list[bytes]:
        """The subtree roots, largest (leftmost) first; a copy."""
        return list(self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf hash (not the leaf data: hash it with :func:`leaf_hash`)."""
        h = leaf_hash
        if type(h) is not bytes or len(h) != HASH_SIZE:
            h = _check_hash(h, "leaf hash")
        if self._size >= MAX_TREE_SIZE:
            raise BadProof("the tree is full")
        n = self._size
        stack = self._hashes
        while n & 1:
            c = _node_ctx()
            c.update(stack.pop())
            c.update(h)
            h = c.digest()
            n >>= 1
        stack.append(h)
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    def root(self) -> bytes:
        """The Merkle Tree Hash of the leaves appended so far."""
        hashes = self._hashes
        if not hashes:
            return EMPTY_ROOT
        r = hashes[-1]
        new = _node_ctx
        for h in hashes[-2::-1]:  # right to left: the fold nests to the right
            c = new()
            c.update(h)
            c.update(r)
            r = c.digest()
        return r

    def copy(self) -> CompactRange:
        out = CompactRange.__new__(CompactRange)
        out._size = self._size
        out._hashes = list(self._hashes)
        return out

    def to_bytes(self) -> bytes:
        """8-byte big-endian size, then the hashes (32 bytes each), largest first."""
        return self._size.to_bytes(8, "big") + b"".join(self._hashes)

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactRange:
        """Inverse of :meth:`to_bytes`; anything else raises :class:`BadProof`."""
        if not isinstance(data, bytes | bytearray) or len(data) < 8:
            raise BadProof("a serialised compact range starts with an 8-byte size")
        size = int.from_bytes(data[:8], "big")
        want = 8 + HASH_SIZE * size.bit_count()
        if len(data) != want:
            raise BadProof(f"a serialised compact range of size {size} is {want} bytes, not {len(data)}")
        body = bytes(data[8:])
        return cls(size, [body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE)])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


# --- the server's node store ------------------------------------------------


class MerkleLevels:
    """Every complete, aligned subtree hash of an append-only tree.

    ``_levels[h]`` is one ``bytearray`` holding, back to back, the 32-byte
    hashes of the nodes at height ``h`` (level 0: the leaf hashes; node ``i``
    of level ``h`` covers leaves ``i*2**h .. (i+1)*2**h - 1``). Only complete
    nodes are stored, so nothing is ever rewritten: memory is about twice the
    leaf hashes, append is amortised O(1).
    """

    __slots__ = ("_levels", "_size")

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        if type(leaf_hash) is not bytes or len(leaf_hash) != HASH_SIZE:
            leaf_hash = _check_hash(leaf_hash, "leaf hash")
        levels = self._levels
        levels[0] += leaf_hash
        n = self._size
        self._size = n + 1
        if n & 1:
            node = leaf_hash
            h = 0
            while n & 1:
                node = _sha256(_NODE_PREFIX + levels[h][-64:-32] + node).digest()  # left sibling
                h += 1
                if h == len(levels):
                    levels.append(bytearray())
                levels[h] += node
                n >>= 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    # -- lookups

    def _node(self, height: int, index: int) -> bytes:
        """The stored hash of complete node ``index`` at ``height`` (caller checked it exists)."""
        off = index * HASH_SIZE
        return bytes(self._levels[height][off : off + HASH_SIZE])

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        _check_size(index, "leaf index")
        if index >= self._size:
            raise BadProof(f"leaf index {index} is beyond the tree (size {self._size})")
        return self._node(0, index)

    def _mth(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end); O(log n) when ``start`` is aligned as in proofs."""
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            return self._node(n.bit_length() - 1, start // n)
        k = _split(n)
        return node_hash(self._mth(start, start + k), self._mth(start + k, end))

    def _check_range(self, size: int, what: str) -> int:
        _check_size(size, what)
        if size > self._size:
            raise BadProof(f"{what} {size} is beyond the tree (size {self._size})")
        return size

    def root(self, size: int | None = None) -> bytes:
        """The tree root at ``size`` (default: the current size), any size up to now."""
        size = self._size if size is None else self._check_range(size, "tree size")
        return self.compact_range(size).root()

    def compact_range(self, size: int | None = None) -> CompactRange:
        """The frontier of the tree at ``size`` (default: now), e.g. to bootstrap a device."""
        size = self._size if size is None else self._check_range(size, "tree size")
        hashes = [
            self._node(h, (size >> h) - 1) for h in range(size.bit_length() - 1, -1, -1) if (size >> h) & 1
        ]
        return CompactRange(size, hashes)

    def subtree(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end) (any range; O(log n) for the aligned ones proofs use)."""
        self._check_range(end, "subtree end")
        _check_size(start, "subtree start")
        if start > end:
            raise BadProof(f"subtree start {start} is after its end {end}")
        return self._mth(start, end)

    # -- proofs (RFC 9162 section 2.1.3.1 and 2.1.4.1)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` leaves, leaf end first."""
        self._check_range(size, "tree size")
        _check_size(index, "leaf index")
        if index >= size:
            raise BadProof(f"leaf index {index} is not in a tree of size {size}")
        top_down: list[bytes] = []
        offset, n, m = 0, size, index
        while n > 1:
            k = _split(n)
            if m < k:
                top_down.append(self._mth(offset + k, offset + n))
                n = k
            else:
                top_down.append(self._mth(offset, offset + k))
                offset, m, n = offset + k, m - k, n - k
        top_down.reverse()
        return top_down

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """The proof that the tree of ``old`` leaves is a prefix of the tree of ``new``.

        ``old == new`` gives ``[]``; ``old == 0`` is refused (nothing to prove,
        and :func:`verify_consistency` refuses it too).
        """
        self._check_range(new, "new size")
        _check_size(old, "old size")
        if old > new:
            raise BadProof(f"old size {old} is larger than new size {new}")
        if old == 0:
            raise BadProof("a consistency proof from the empty tree proves nothing")
        top_down: list[bytes] = []
        offset, m, n, whole = 0, old, new, True
        while m != n:
            k = _split(n)
            if m <= k:
                top_down.append(self._mth(offset + k, offset + n))
                n = k
            else:
                top_down.append(self._mth(offset, offset + k))
                offset, m, n, whole = offset + k, m - k, n - k, False
        if not whole:
            top_down.append(self._mth(offset, offset + n))
        top_down.reverse()
        return top_down

    # -- tlog-tiles

    def tile(self, level: int, index: int, width: int = _TILE_WIDTH) -> bytes:
        """The C2SP tlog-tiles hash tile ``tile/<level>/<index>[.p/<width>]``.

        Tile level L holds the nodes of tree height 8L; tile N holds nodes
        ``N*256 .. N*256+width-1``, concatenated. Any width whose nodes all
        exist is served (a partial tile's content never changes).
        """
        for value, what in ((level, "tile level"), (index, "tile index"), (width, "tile width")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadTilePath(f"{what} must be a non-negative integer")
        if not 1 <= width <= _TILE_WIDTH:
            raise BadTilePath(f"tile width must be 1..{_TILE_WIDTH}, not {width}")
        height = level * _TILE_HEIGHT
        have = self._size >> height if height < 64 else 0
        first = index * _TILE_WIDTH
        if first + width > have:
            raise BadTilePath(
                f"tile {level}/{index} of width {width} is beyond the tree (size {self._size}, "
                f"{have} nodes at height {height})"
            )
        return bytes(self._levels[height][first * HASH_SIZE : (first + width) * HASH_SIZE])

    def __repr__(self) -> str:
        return f"MerkleLevels(size={self._size}, root={self.root().hex()})"


# --- verification (RFC 9162 section 2.1.3.2 and 2.1.4.2) ------------------------


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def _decomp_inclusion(index: int, size: int) -> tuple[int, int]:
    """(inner, border): the proof of ``index`` in ``size`` has inner + border hashes."""
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def root_from_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` puts leaf ``index`` of a tree of ``size`` under.

    Raises :class:`BadProof` when the proof cannot be one for that position
    (index outside the tree, the wrong number of hashes, a hash not 32 bytes).
    """
    index = _check_size(index, "leaf index")
    size = _check_size(size, "tree size")
    leaf = _check_hash(leaf_hash, "leaf hash")
    hashes = _check_proof(proof)
    if index >= size:
        raise BadProof(f"leaf index {index} is not in a tree of size {size}")
    inner, border = _decomp_inclusion(index, size)
    if len(hashes) != inner + border:
        raise BadProof(
            f"an inclusion proof for leaf {index} of a tree of size {size} has {inner + border} hashes, "
            f"not {len(hashes)}"
        )
    r = _chain_inner(leaf, hashes[:inner], index)
    return _chain_border_right(r, hashes[inner:])


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that leaf ``index`` of the tree of ``size`` with ``root`` is ``leaf_hash``."""
    computed = root_from_inclusion(leaf_hash, index, size, proof)
    if not isinstance(root, bytes | bytearray) or not hmac.compare_digest(computed, bytes(root)):
        raise BadProof(f"inclusion proof for leaf {index} of a tree of size {size} does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """Check that the tree (``old_size``, ``old_root``) is a prefix of (``new_size``, ``new_root``)."""
    old_size = _check_size(old_size, "old size")
    new_size = _check_size(new_size, "new size")
    hashes = _check_proof(proof)
    if not isinstance(old_root, bytes | bytearray) or not isinstance(new_root, bytes | bytearray):
        raise BadProof("roots must be bytes")
    if new_size < old_size:
        raise BadProof(f"new size {new_size} is smaller than old size {old_size}")
    if old_size == 0:
        raise BadProof("a consistency proof from the empty tree proves nothing; compare the roots instead")
    if old_size == new_size:
        if hashes:
            raise BadProof("equal sizes need an empty consistency proof")
        if not hmac.compare_digest(bytes(old_root), bytes(new_root)):
            raise BadProof(f"two different roots for the same size {old_size}")
        return
    if not hashes:
        raise BadProof(f"an empty consistency proof cannot prove {old_size} -> {new_size}")
    _check_hash(old_root, "old root")
    _check_hash(new_root, "new root")

    inner, border = _decomp_inclusion(old_size - 1, new_size)
    shift = (old_size & -old_size).bit_length() - 1  # trailing zero bits of old_size
    inner -= shift
    # When old_size is a power of two its root is itself a node of the path
    # and is not repeated in the proof; otherwise the proof starts with it.
    if old_size == 1 << shift:
        seed, rest = bytes(old_root), hashes
    else:
        seed, rest = hashes[0], hashes[1:]
    want = inner + border
    if len(rest) != want:
        have = len(hashes)
        need = want + (len(hashes) - len(rest))
        raise BadProof(f"a consistency proof {old_size} -> {new_size} has {need} hashes, not {have}")
    mask = (old_size - 1) >> shift
    r1 = _chain_border_right(_chain_inner_right(seed, rest[:inner], mask), rest[inner:])
    if not hmac.compare_digest(r1, bytes(old_root)):
        raise BadProof(f"consistency proof {old_size} -> {new_size} does not lead to the old root")
    r2 = _chain_border_right(_chain_inner(seed, rest[:inner], mask), rest[inner:])
    if not hmac.compare_digest(r2, bytes(new_root)):
        raise BadProof(f"consistency proof {old_size} -> {new_size} does not lead to the new root")
