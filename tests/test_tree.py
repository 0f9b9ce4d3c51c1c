"""ledger.tree: the RFC 6962 / 9162 Merkle tree, its proofs and their verification."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import BadProof, BadTilePath, WritError
from ledger.tree import (
    EMPTY_ROOT,
    CompactRange,
    MerkleLevels,
    leaf_hash,
    mth,
    node_hash,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors"
MERKLE = VECTORS / "merkle"


# --- an independent reference: RFC 9162 section 2.1.1, written out literally ---


def ref_mth(leaves: Sequence[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def h(i: int) -> bytes:
    return hashlib.sha256(b"leaf %d" % i).digest()


LEAVES = [h(i) for i in range(600)]
TREE = MerkleLevels(LEAVES)


@cache
def prefix_root(k: int) -> bytes:
    return ref_mth(LEAVES[:k])


def test_hash_primitives() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    # RFC 6962 test vector: the empty leaf.
    assert leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert mth([]) == EMPTY_ROOT
    assert MerkleLevels().root() == EMPTY_ROOT
    assert CompactRange().root() == EMPTY_ROOT


# --- transparency-dev/merkle vectors --------------------------------------------


def _vector_files(kind: str) -> list[Any]:
    files = sorted((MERKLE / kind).rglob("*.json"))
    return [pytest.param(f, id=str(f.relative_to(MERKLE / kind))) for f in files]


def _b64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


def _proof(values: list[str] | None) -> list[bytes]:
    return [base64.b64decode(v) for v in values or []]


INCLUSION_FILES = _vector_files("inclusion")
CONSISTENCY_FILES = _vector_files("consistency")


def test_all_merkle_vectors_are_collected() -> None:
    assert len(INCLUSION_FILES) + len(CONSISTENCY_FILES) == 196


@pytest.mark.parametrize("path", INCLUSION_FILES)
def test_inclusion_vector(path: Path) -> None:
    v = json.loads(path.read_text())

    def run() -> None:
        verify_inclusion(
            _b64(v["leafHash"]),  # type: ignore[arg-type]  # null is bad input too
            v["leafIdx"],
            v["treeSize"],
            _proof(v["proof"]),
            _b64(v["root"]),  # type: ignore[arg-type]
        )

    if v["wantErr"]:
        with pytest.raises(BadProof):
            run()
    else:
        run()


@pytest.mark.parametrize("path", CONSISTENCY_FILES)
def test_consistency_vector(path: Path) -> None:
    v = json.loads(path.read_text())

    def run() -> None:
        verify_consistency(
            v["size1"],
            v["size2"],
            _proof(v["proof"]),
            _b64(v["root1"]),  # type: ignore[arg-type]
            _b64(v["root2"]),  # type: ignore[arg-type]
        )

    if v["wantErr"]:
        with pytest.raises(BadProof):
            run()
    else:
        run()


# --- the Writ ledger vector -------------------------------------------------------


LEDGER = json.loads((VECTORS / "ledger-v1.json").read_text())


def _ledger_tree() -> MerkleLevels:
    return MerkleLevels(bytes.fromhex(e["leaf_hash"]) for e in LEDGER["ledger"])


def test_ledger_vector_roots() -> None:
    ml = MerkleLevels()
    cr = CompactRange()
    for e in LEDGER["ledger"]:
        assert ml.root().hex() == e["prev"]
        lh = leaf_hash(bytes.fromhex(e["record"]))
        assert lh.hex() == e["leaf_hash"]
        ml.append(lh)
        cr.append(lh)
        assert ml.size == cr.size == e["size_after"]
        assert ml.root().hex() == cr.root().hex() == e["root_after"]
    assert ml.size == LEDGER["final"]["size"]
    assert ml.root().hex() == LEDGER["final"]["root"]
    assert base64.b64encode(ml.root()).decode() == LEDGER["final"]["root_b64"]


@pytest.mark.parametrize("case", LEDGER["proofs"]["inclusion"], ids=lambda c: f"{c['index']}-in-{c['size']}")
def test_ledger_vector_inclusion(case: dict[str, Any]) -> None:
    ml = _ledger_tree()
    proof = ml.inclusion_proof(case["index"], case["size"])
    assert [p.hex() for p in proof] == case["proof"]
    leaf = bytes.fromhex(LEDGER["ledger"][case["index"]]["leaf_hash"])
    verify_inclusion(leaf, case["index"], case["size"], proof, ml.root(case["size"]))
    assert root_from_inclusion(leaf, case["index"], case["size"], proof) == ml.root(case["size"])


@pytest.mark.parametrize("case", LEDGER["proofs"]["consistency"], ids=lambda c: f"{c['old']}-to-{c['new']}")
def test_ledger_vector_consistency(case: dict[str, Any]) -> None:
    ml = _ledger_tree()
    assert ml.root(case["old"]).hex() == case["old_root"]
    proof = ml.consistency_proof(case["old"], case["new"])
    assert [p.hex() for p in proof] == case["proof"]
    verify_consistency(case["old"], case["new"], proof, bytes.fromhex(case["old_root"]), ml.root(case["new"]))


# --- properties -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 600))
def test_compact_range_root_is_mth(n: int) -> None:
    cr = CompactRange()
    cr.extend(LEAVES[:n])
    assert cr.size == n
    assert len(cr.hashes) == n.bit_count()
    assert cr.root() == prefix_root(n) == mth(LEAVES[:n])


def test_merkle_levels_root_at_every_size() -> None:
    ml = MerkleLevels()
    cr = CompactRange()
    for k, leaf in enumerate(LEAVES):
        assert ml.root() == cr.root() == prefix_root(k)
        ml.append(leaf)
        cr.append(leaf)
    for k in range(len(LEAVES) + 1):
        assert TREE.root(k) == prefix_root(k), k
        assert TREE.compact_range(k) == _compact(k)


def _compact(k: int) -> CompactRange:
    cr = CompactRange()
    cr.extend(LEAVES[:k])
    return cr


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_subtree_is_mth_of_the_range(data: st.DataObject) -> None:
    end = data.draw(st.integers(0, 600))
    start = data.draw(st.integers(0, end))
    assert TREE.subtree(start, end) == ref_mth(LEAVES[start:end])


@st.composite
def index_and_size(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, 600))
    return draw(st.integers(0, size - 1)), size


@st.composite
def old_and_new(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(st.integers(1, 600))
    return draw(st.integers(1, new)), new


def _flip(proof: list[bytes], j: int, bit: int) -> list[bytes]:
    out = list(proof)
    b = bytearray(out[j])
    b[bit // 8] ^= 1 << (bit % 8)
    out[j] = bytes(b)
    return out


def _mutations(proof: list[bytes], draw: Callable[[Any], Any]) -> list[tuple[str, list[bytes]]]:
    extra = draw(st.binary(min_size=32, max_size=32))
    out = [
        ("appended hash", [*proof, extra]),
        ("prepended hash", [extra, *proof]),
        ("duplicated last hash", [*proof, proof[-1]] if proof else [extra]),
    ]
    if proof:
        j = draw(st.integers(0, len(proof) - 1))
        out += [
            ("bit flip", _flip(proof, j, draw(st.integers(0, 255)))),
            ("dropped last hash", proof[:-1]),
            ("dropped first hash", proof[1:]),
            ("short hash", [*proof[:j], proof[j][:31], *proof[j + 1 :]]),
            ("long hash", [*proof[:j], proof[j] + b"\x00", *proof[j + 1 :]]),
        ]
    if len(proof) >= 2:
        out.append(("swapped hashes", [proof[1], proof[0], *proof[2:]]))
    return out


@settings(max_examples=300, deadline=None)
@given(index_and_size(), st.data())
def test_inclusion_proofs_verify_and_tampering_is_refused(pos: tuple[int, int], data: st.DataObject) -> None:
    index, size = pos
    proof = TREE.inclusion_proof(index, size)
    root = prefix_root(size)
    verify_inclusion(LEAVES[index], index, size, proof, root)
    assert len(proof) <= size.bit_length()
    for what, bad in _mutations(proof, data.draw):
        if bad == proof:
            continue  # e.g. swapping two equal hashes
        with pytest.raises(BadProof):
            verify_inclusion(LEAVES[index], index, size, bad, root)
        assert what
    with pytest.raises(BadProof):
        verify_inclusion(
            LEAVES[index], index, size, proof, _flip([root], 0, data.draw(st.integers(0, 255)))[0]
        )
    other = data.draw(st.integers(0, size - 1))
    if LEAVES[other] != LEAVES[index]:
        with pytest.raises(BadProof):
            verify_inclusion(LEAVES[other], index, size, proof, root)
    # The proof binds the leaf's position. (Not always the size: a proof for
    # leaf 0 of 3 is also one for leaf 0 of 4 under the same root. The signed
    # checkpoint binds size and root together.)
    for wrong_index in (index + 1, index - 1, index ^ 1, index ^ 2):
        if wrong_index != index:
            with pytest.raises(BadProof):
                verify_inclusion(LEAVES[index], wrong_index, size, proof, root)


@settings(max_examples=300, deadline=None)
@given(old_and_new(), st.data())
def test_consistency_proofs_verify_and_tampering_is_refused(
    sizes: tuple[int, int], data: st.DataObject
) -> None:
    old, new = sizes
    proof = TREE.consistency_proof(old, new)
    r_old, r_new = prefix_root(old), prefix_root(new)
    verify_consistency(old, new, proof, r_old, r_new)
    for _what, bad in _mutations(proof, data.draw):
        if bad == proof:
            continue
        with pytest.raises(BadProof):
            verify_consistency(old, new, bad, r_old, r_new)
    bit = data.draw(st.integers(0, 255))
    with pytest.raises(BadProof):
        verify_consistency(old, new, proof, _flip([r_old], 0, bit)[0], r_new)
    with pytest.raises(BadProof):
        verify_consistency(old, new, proof, r_old, _flip([r_new], 0, bit)[0])
    if old < new:
        with pytest.raises(BadProof):
            verify_consistency(old, new, proof, r_new, r_old)  # swapped roots
        with pytest.raises(BadProof):
            verify_consistency(new, old, proof, r_new, r_old)  # time travel


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 600))
def test_compact_range_serialisation_round_trip(n: int) -> None:
    cr = _compact(n)
    data = cr.to_bytes()
    assert len(data) == 8 + 32 * n.bit_count()
    assert data[:8] == n.to_bytes(8, "big")
    back = CompactRange.from_bytes(data)
    assert back == cr
    assert back.root() == cr.root()
    back.append(h(9999))
    cr2 = cr.copy()
    cr2.append(h(9999))
    assert back == cr2 != cr  # copy() is independent of the original


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 600), st.data())
def test_compact_range_corruption_is_refused(n: int, data: st.DataObject) -> None:
    good = _compact(n).to_bytes()
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(BadProof):
        CompactRange.from_bytes(good[:cut])
    with pytest.raises(BadProof):
        CompactRange.from_bytes(good + data.draw(st.binary(min_size=1, max_size=40)))


@pytest.mark.parametrize(
    ("attack", "data"),
    [
        ("empty", b""),
        ("short size", b"\x00" * 7),
        ("size 1 without its hash", (1).to_bytes(8, "big")),
        ("size 0 with a hash", bytes(8) + b"\x00" * 32),
        ("size 3 with one hash", (3).to_bytes(8, "big") + b"\x00" * 32),
        ("half a hash", (1).to_bytes(8, "big") + b"\x00" * 16),
        ("size 2**64-1 (64 hashes missing)", b"\xff" * 8),
        ("not bytes", "00" * 8),
    ],
)
def test_compact_range_from_bytes_refuses(attack: str, data: Any) -> None:
    with pytest.raises(BadProof):
        CompactRange.from_bytes(data)


def test_compact_range_constructor_checks() -> None:
    assert CompactRange(3, [h(0), h(1)]).size == 3
    for size, hashes in ((3, [h(0)]), (1, [b"short"]), (-1, []), (2**64, [])):
        with pytest.raises(BadProof):
            CompactRange(size, hashes)
    with pytest.raises(BadProof):
        CompactRange().append(b"\x00" * 31)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 600))
def test_tiles_are_the_subtree_roots(size: int) -> None:
    ml = MerkleLevels(LEAVES[:size])
    for level, span in ((0, 1), (1, 256)):
        nodes = size // span
        for n in range(0, (nodes + 255) // 256):
            width = min(256, nodes - n * 256)
            tile = ml.tile(level, n, width)
            assert len(tile) == 32 * width
            for i in range(width):
                start = (n * 256 + i) * span
                assert tile[32 * i : 32 * i + 32] == ref_mth(LEAVES[start : start + span])
            assert ml.tile(level, n, 1) == tile[:32]  # an older partial width is still served
            with pytest.raises(BadTilePath):
                ml.tile(level, n, width + 1)
    with pytest.raises(BadTilePath):
        ml.tile(0, (size + 255) // 256, 1)


# --- refusals of MerkleLevels ----------------------------------------------------


@pytest.mark.parametrize(
    ("attack", "call"),
    [
        ("root beyond the tree", lambda t: t.root(11)),
        ("negative root size", lambda t: t.root(-1)),
        ("leaf beyond the tree", lambda t: t.leaf(10)),
        ("inclusion index == size", lambda t: t.inclusion_proof(5, 5)),
        ("inclusion in size 0", lambda t: t.inclusion_proof(0, 0)),
        ("inclusion size beyond the tree", lambda t: t.inclusion_proof(0, 11)),
        ("negative index", lambda t: t.inclusion_proof(-1, 5)),
        ("consistency old > new", lambda t: t.consistency_proof(6, 5)),
        ("consistency from 0", lambda t: t.consistency_proof(0, 5)),
        ("consistency new beyond the tree", lambda t: t.consistency_proof(1, 11)),
        ("subtree end beyond the tree", lambda t: t.subtree(0, 11)),
        ("subtree backwards", lambda t: t.subtree(5, 4)),
        ("bool as a size", lambda t: t.root(True)),
        ("leaf hash too short", lambda t: t.append(b"\x00" * 31)),
        ("leaf hash not bytes", lambda t: t.append("00" * 16)),
    ],
)
def test_merkle_levels_refuses(attack: str, call: Callable[[MerkleLevels], object]) -> None:
    ml = MerkleLevels(LEAVES[:10])
    with pytest.raises(BadProof):
        call(ml)
    assert ml.size == 10 and ml.root() == prefix_root(10)  # unchanged


@pytest.mark.parametrize(
    ("attack", "args"),
    [
        ("level 0 beyond the tree", (0, 0, 11)),
        ("tile index beyond the tree", (0, 1, 1)),
        ("level 1 of a small tree", (1, 0, 1)),
        ("width 0", (0, 0, 0)),
        ("width 257", (0, 0, 257)),
        ("negative index", (0, -1, 1)),
        ("negative level", (-1, 0, 1)),
        ("absurd level", (100, 0, 1)),
    ],
)
def test_tile_refuses(attack: str, args: tuple[int, int, int]) -> None:
    with pytest.raises(BadTilePath) as e:
        MerkleLevels(LEAVES[:10]).tile(*args)
    assert e.value.http_status == 404


# the verifiers see decoded, untrusted input: wrong types must be refused too
untyped_inclusion: Any = verify_inclusion
untyped_consistency: Any = verify_consistency


@pytest.mark.parametrize(
    ("attack", "call"),
    [
        ("index == size", lambda: verify_inclusion(h(0), 1, 1, [], h(0))),
        ("size 0", lambda: verify_inclusion(h(0), 0, 0, [], EMPTY_ROOT)),
        ("negative index", lambda: verify_inclusion(h(0), -1, 1, [], h(0))),
        ("index over uint64", lambda: verify_inclusion(h(0), 2**64, 2**64 + 1, [], h(0))),
        ("float size", lambda: untyped_inclusion(h(0), 0, 1.0, [], h(0))),
        ("leaf not a hash", lambda: verify_inclusion(b"x", 0, 1, [], b"x")),
        ("proof not a list", lambda: untyped_inclusion(h(0), 0, 2, h(1), h(0))),
        ("proof element not bytes", lambda: untyped_inclusion(h(0), 0, 2, ["00" * 32], h(0))),
        ("root not bytes", lambda: untyped_inclusion(h(0), 0, 1, [], h(0).hex())),
        ("consistency from 0 with empty roots", lambda: verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)),
        ("consistency from 0", lambda: verify_consistency(0, 3, [], EMPTY_ROOT, prefix_root(3))),
        ("consistency roots not bytes", lambda: untyped_consistency(1, 1, [], "a", "a")),
        ("consistency short old root", lambda: verify_consistency(2, 4, [h(2)], b"", prefix_root(4))),
        ("consistency size over uint64", lambda: verify_consistency(1, 2**64, [h(1)], h(0), h(0))),
    ],
)
def test_verification_refuses(attack: str, call: Callable[[], object]) -> None:
    with pytest.raises(BadProof):
        call()


def test_errors_are_writ_errors_with_a_message() -> None:
    with pytest.raises(WritError) as e:
        verify_inclusion(h(0), 3, 4, [h(1)], prefix_root(4))
    assert e.value.type == "bad-proof"
    assert "3 hashes" in e.value.message or "hashes" in e.value.message


def test_equal_sizes_need_equal_roots_and_no_proof() -> None:
    verify_consistency(5, 5, [], prefix_root(5), prefix_root(5))
    with pytest.raises(BadProof):
        verify_consistency(5, 5, [], prefix_root(5), prefix_root(4))
    with pytest.raises(BadProof):
        verify_consistency(5, 5, [h(0)], prefix_root(5), prefix_root(5))
    assert TREE.consistency_proof(5, 5) == []


def test_many_appends_stay_consistent() -> None:
    n = 1 << 15
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n + 3)]
    ml = MerkleLevels()
    ml.extend(leaves)
    assert ml.root() == mth(leaves)
    assert ml.root(n) == ml.subtree(0, n)
    level1 = ml.tile(1, 0, n // 256)  # the roots of the 128 full level-0 tiles
    assert mth([level1[i : i + 32] for i in range(0, len(level1), 32)]) == ml.root(n)
    assert ml.root(n) == ref_mth(leaves[:n])
    proof = ml.inclusion_proof(12345, n + 3)
    assert len(proof) == 16
    verify_inclusion(leaves[12345], 12345, n + 3, proof, ml.root())


@pytest.mark.skipif(os.environ.get("WRIT_SLOW") != "1", reason="slow: set WRIT_SLOW=1")
@pytest.mark.slow
def test_a_million_appends_take_seconds() -> None:
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(1_000_000)]
    ml = MerkleLevels()
    t0 = time.perf_counter()
    for leaf in leaves:
        ml.append(leaf)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"1e6 appends took {elapsed:.1f} s"
    assert ml.root() == mth(leaves)
    t0 = time.perf_counter()
    for i in range(0, 1_000_000, 1000):
        verify_inclusion(leaves[i], i, ml.size, ml.inclusion_proof(i, ml.size), ml.root())
    assert time.perf_counter() - t0 < 2
