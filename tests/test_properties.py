"""Hypothesis properties of every decoder: hostile bytes get a WritError, nothing else.

- a mutated vector record (bit flip, byte inserted, deleted or swapped,
  truncation, extension, a non-minimal integer or length header, bin turned
  into str and back, in the record or inside its signed body) is refused
  with a :class:`~ledger.errors.RecordRejected` by the ledger holding the
  records before it, and leaves that ledger exactly as it was;
- :mod:`ledger.encoding` round-trips every value of the allowed types and
  refuses every other encoding of the same value;
- every decoder (records, messages, notes, tiles, state snapshots) raises only
  its documented :class:`~ledger.errors.WritError` on arbitrary input, and the
  credential check only ever refuses;
- randomly generated well-formed grants, revokes and a rotation, signed with
  the vector keys, are accepted, stored verbatim and parse back to their body.

The sizes are bounded so the whole file runs in well under 40 s; the fuzz
harnesses in ``fuzz/`` run the same oracles coverage-guided.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ledger import checkpoints, credential, crypto, encoding, messages, notes, records, tiles
from ledger.errors import (
    BadMessage,
    BadNote,
    BadProof,
    BadTilePath,
    CheckpointRejected,
    InvalidField,
    NotCanonical,
    RecordRejected,
    WritError,
)
from ledger.layered import Layered
from ledger.records import Grant, Kind, Revoke, Rotate
from ledger.state import LedgerState
from tests.helpers.vectors import check_vector_auth, vector_credential
from tests.helpers.vectors_data import ledger_vectors

V = ledger_vectors()
RECORDS = V.records
FULL = len(RECORDS)
U64 = (1 << 64) - 1

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def prefix_states() -> tuple[LedgerState, ...]:
    """``[k]``: the state holding vector records 0..k-1 (never mutate these: copy)."""
    out = [LedgerState(V.anchor, origin=V.origin)]
    for raw in RECORDS:
        nxt = out[-1].copy()
        nxt.apply(raw)
        out.append(nxt)
    return tuple(out)


# --- a MessagePack item walker, for structural mutations -----------------------

_INT_HEADERS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_STR_HEADERS = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_ARRAY_HEADERS = {0xDC: 2, 0xDD: 4}
#: the header byte of each (kind, length-field width); width 0 = the "fix" form.
_WIDE = {
    "int": {1: 0xCC, 2: 0xCD, 4: 0xCE, 8: 0xCF},
    "bin": {1: 0xC4, 2: 0xC5, 4: 0xC6},
    "str": {1: 0xD9, 2: 0xDA, 4: 0xDB},
    "array": {2: 0xDC, 4: 0xDD},
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One MessagePack item of canonical data: where its header is and what it says."""

    offset: int
    header: int  # header length in bytes (for an int: the whole item)
    kind: str  # int, bin, str, nil, array
    width: int  # width of its value/length field (0: packed into the first byte)
    value: int  # the int, or the length / element count


def items(data: bytes) -> list[Item]:
    """Every item of ``data`` in order (array elements follow their header); stops at
    anything a Writ encoder never writes."""
    out: list[Item] = []
    pos = 0
    while pos < len(data):
        b = data[pos]
        if b <= 0x7F:
            out.append(Item(pos, 1, "int", 0, b))
            pos += 1
        elif 0x90 <= b <= 0x9F:
            out.append(Item(pos, 1, "array", 0, b & 0x0F))
            pos += 1
        elif 0xA0 <= b <= 0xBF:
            out.append(Item(pos, 1, "str", 0, b & 0x1F))
            pos += 1 + (b & 0x1F)
        elif b == 0xC0:
            out.append(Item(pos, 1, "nil", 0, 0))
            pos += 1
        elif b in _INT_HEADERS:
            w = _INT_HEADERS[b]
            out.append(Item(pos, 1 + w, "int", w, int.from_bytes(data[pos + 1 : pos + 1 + w], "big")))
            pos += 1 + w
        elif b in _BIN_HEADERS or b in _STR_HEADERS:
            w = _BIN_HEADERS.get(b) or _STR_HEADERS[b]
            n = int.from_bytes(data[pos + 1 : pos + 1 + w], "big")
            out.append(Item(pos, 1 + w, "bin" if b in _BIN_HEADERS else "str", w, n))
            pos += 1 + w + n
        elif b in _ARRAY_HEADERS:
            w = _ARRAY_HEADERS[b]
            out.append(Item(pos, 1 + w, "array", w, int.from_bytes(data[pos + 1 : pos + 1 + w], "big")))
            pos += 1 + w
        else:
            break
    return out


def _replace_header(data: bytes, it: Item, header: bytes) -> bytes:
    return data[: it.offset] + header + data[it.offset + it.header :]


def wider(it: Item) -> list[int]:
    """The widths of every non-minimal header that can hold item ``it``'s value."""
    if it.kind == "nil":
        return []
    return [w for w in _WIDE[it.kind] if w > it.width and it.value < 1 << (8 * w)]


def widen(data: bytes, it: Item, w: int) -> bytes:
    """Re-encode item ``it`` with a ``w``-byte (non-minimal) header, same value."""
    return _replace_header(data, it, bytes([_WIDE[it.kind][w]]) + it.value.to_bytes(w, "big"))


def flip_bin_str(data: bytes, it: Item) -> bytes:
    """Turn a bin header into the str header of the same length, and a str into a bin."""
    if it.kind == "bin":
        w = max(it.width, 1)
        return _replace_header(data, it, bytes([_WIDE["str"][w]]) + it.value.to_bytes(w, "big"))
    if it.kind == "str":
        w = max(it.width, 1)
        return _replace_header(data, it, bytes([_WIDE["bin"][w]]) + it.value.to_bytes(w, "big"))
    return data


# --- mutations ---------------------------------------------------------------------

MUTATIONS = (
    "bit-flip",
    "insert-byte",
    "delete-byte",
    "truncate",
    "extend",
    "swap-bytes",
    "non-minimal-header",
    "bin-str-swap",
)


def mutate(data: st.DataObject, raw: bytes, how: str) -> bytes:
    """One mutation of ``raw``, the random choices drawn from ``data``."""
    n = len(raw)
    if not n:
        return raw
    pos = data.draw(st.integers(0, n - 1), label="pos")
    if how == "bit-flip":
        return raw[:pos] + bytes([raw[pos] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[pos + 1 :]
    if how == "insert-byte":
        return raw[:pos] + bytes([data.draw(st.integers(0, 255))]) + raw[pos:]
    if how == "delete-byte":
        return raw[:pos] + raw[pos + 1 :]
    if how == "truncate":
        return raw[:pos]
    if how == "extend":
        return raw + data.draw(st.binary(min_size=1, max_size=8))
    if how == "swap-bytes":
        others = [i for i in range(n) if raw[i] != raw[pos]]
        if not others:
            return raw
        other = data.draw(st.sampled_from(others), label="other")
        b = bytearray(raw)
        b[pos], b[other] = b[other], b[pos]
        return bytes(b)
    if how == "non-minimal-header":
        its = [it for it in items(raw) if wider(it)]
    else:
        its = [it for it in items(raw) if it.kind in ("bin", "str")]
    if not its:
        return raw
    it = data.draw(st.sampled_from(its), label="item")
    if how == "non-minimal-header":
        return widen(raw, it, data.draw(st.sampled_from(wider(it))))
    return flip_bin_str(raw, it)


def mutate_record(data: st.DataObject, raw: bytes) -> bytes:
    """Mutate the record bytes, or the body inside it (kept under the same signature)."""
    how = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    if data.draw(st.booleans(), label="inside the body"):
        body, sig = encoding.unpack(raw)
        return encoding.pack([mutate(data, body, how), sig])
    return mutate(data, raw, how)


# --- 1. mutated records are refused, and change nothing ---------------------------


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(0, FULL - 1), data=st.data())
def test_mutated_record_is_refused_and_changes_nothing(k: int, data: st.DataObject) -> None:
    raw = RECORDS[k]
    bad = mutate_record(data, raw)
    state = prefix_states()[k].copy()
    before = state.snapshot()
    try:
        rec = state.apply(bad)
    except RecordRejected as exc:
        event(exc.type)
        assert state.snapshot() == before
        return
    assert bad == raw, f"a mutated record was accepted: {bad.hex()}"
    assert rec.raw == raw


@pytest.mark.parametrize("how", MUTATIONS)
def test_each_mutation_is_refused_on_every_record(how: str) -> None:
    """Every mutation kind, deterministically, at a few positions of every record."""
    for k, raw in enumerate(RECORDS):
        for target in (raw, encoding.unpack(raw)[0]):
            muts = _deterministic_mutations(target, how)
            for bad in muts:
                if target is not raw:
                    bad = encoding.pack([bad, encoding.unpack(raw)[1]])
                if bad == raw:
                    continue
                state = prefix_states()[k].copy()
                before = state.snapshot()
                with pytest.raises(RecordRejected):
                    state.apply(bad)
                assert state.snapshot() == before


def _deterministic_mutations(raw: bytes, how: str) -> list[bytes]:
    n = len(raw)
    positions = sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1})
    if how == "bit-flip":
        return [raw[:p] + bytes([raw[p] ^ 0x01]) + raw[p + 1 :] for p in positions]
    if how == "insert-byte":
        return [raw[:p] + b"\x00" + raw[p:] for p in positions]
    if how == "delete-byte":
        return [raw[:p] + raw[p + 1 :] for p in positions]
    if how == "truncate":
        return [raw[:p] for p in positions]
    if how == "extend":
        return [raw + b"\x00", raw + b"\xc0", raw + raw[:5]]
    if how == "swap-bytes":
        out = []
        for p in positions:
            b = bytearray(raw)
            b[p], b[(p + 7) % n] = b[(p + 7) % n], b[p]
            out.append(bytes(b))
        return out
    out = []
    for it in items(raw):
        if how == "non-minimal-header":
            out.extend(widen(raw, it, w) for w in wider(it))
        else:
            out.append(flip_bin_str(raw, it))
    return [m for m in out if m != raw]


# --- 2. the wire format ---------------------------------------------------------------

scalars = st.one_of(st.none(), st.integers(0, U64), st.binary(max_size=300), st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=20), max_leaves=40)


def depth(v: Any) -> int:
    return 1 + max((depth(x) for x in v), default=0) if type(v) is list else 0


#: bytes that look like MessagePack often enough to reach deep into the decoder.
MSGPACK_BYTES = [
    *(bytes([b]) for b in (0x00, 0x7F, 0x90, 0x92, 0x9F, 0xA1, 0xC0, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6)),
    *(bytes([b]) for b in (0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD3, 0xD4, 0xD8, 0xD9, 0xDA)),
    *(bytes([b]) for b in (0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x80, 0x81, 0xE0, 0xFF, 0xC7, 0xC1)),
    b"\x00\x01",
    b"\xff\xff\xff\xff",
]
msgpackish = st.one_of(
    st.binary(max_size=120),
    st.lists(st.one_of(st.sampled_from(MSGPACK_BYTES), st.binary(max_size=4)), max_size=30).map(b"".join),
)


@MEDIUM
@given(msgpackish, st.integers(0, 3))
def test_unpack_arbitrary_bytes_raises_only_not_canonical(data: bytes, max_depth: int) -> None:
    try:
        v = encoding.unpack(data, max_depth=max_depth)
    except NotCanonical:
        refused = True
    else:
        refused = False
        assert encoding.pack(v) == data
        assert depth(v) <= max_depth
    try:  # the caller's error class, for the same bytes, with the same verdict
        encoding.unpack(data, max_depth=max_depth, error=BadMessage)
    except BadMessage:
        assert refused
    else:
        assert not refused


@FAST
@given(values)
def test_pack_unpack_round_trip(v: Any) -> None:
    raw = encoding.pack(v)
    assert encoding.unpack(raw, max_depth=depth(v)) == v
    if depth(v) > 0:
        with pytest.raises(NotCanonical):
            encoding.unpack(raw, max_depth=depth(v) - 1)


def pack_wide(v: Any, choose: Callable[[list[int]], int]) -> bytes:
    """``v`` encoded with, for each item, a header of any width that fits (``choose`` picks)."""

    def header(kind: str, n: int, fix: int | None, fix_limit: int) -> bytes:
        options = [w for w in _WIDE[kind] if n < 1 << (8 * w)]
        if fix is not None and n < fix_limit:
            options = [0, *options]
        w = choose(options)
        return (
            bytes([fix + n]) if w == 0 and fix is not None else bytes([_WIDE[kind][w]]) + n.to_bytes(w, "big")
        )

    if v is None:
        return b"\xc0"
    if type(v) is int:
        return header("int", v, 0, 0x80)
    if type(v) is bytes:
        return header("bin", len(v), None, 0) + v
    if type(v) is str:
        raw = v.encode()
        return header("str", len(raw), 0xA0, 32) + raw
    return header("array", len(v), 0x90, 16) + b"".join(pack_wide(x, choose) for x in v)


@FAST
@given(values, st.data())
def test_every_other_encoding_of_a_value_is_refused(v: Any, data: st.DataObject) -> None:
    raw = pack_wide(v, lambda options: data.draw(st.sampled_from(options)))
    if raw == encoding.pack(v):
        assert encoding.unpack(raw, max_depth=depth(v)) == v
    else:
        with pytest.raises(NotCanonical):
            encoding.unpack(raw, max_depth=depth(v))


NON_CANONICAL = {
    "uint8 for a fixint": b"\xcc\x05",
    "uint16 for a uint8": b"\xcd\x00\xff",
    "uint32 for a uint16": b"\xce\x00\x00\xff\xff",
    "uint64 for a fixint": b"\xcf" + (1).to_bytes(8, "big"),
    "str8 for a short string": b"\xd9\x01a",
    "str16 for a short string": b"\xda\x00\x01a",
    "array16 for a short array": b"\xdc\x00\x01\x00",
    "array32 for a short array": b"\xdd\x00\x00\x00\x01\x00",
    "bin16 for short bytes": b"\xc5\x00\x01x",
    "bin32 for short bytes": b"\xc6\x00\x00\x00\x01x",
    "negative fixint": b"\xff",
    "int8": b"\xd0\x05",
    "float32": b"\xca\x00\x00\x00\x00",
    "float64": b"\xcb" + bytes(8),
    "true": b"\xc3",
    "false": b"\xc2",
    "map": b"\x81\x01\x02",
    "empty map": b"\x80",
    "ext": b"\xd4\x01\x00",
    "timestamp ext": b"\xd6\xff\x00\x00\x00\x00",
    "reserved 0xc1": b"\xc1",
    "trailing byte": b"\x00\x00",
    "truncated bin": b"\xc4\x05ab",
    "invalid UTF-8 str": b"\xa2\xff\xfe",
    "nested array at depth 1": b"\x91\x90",
}


@pytest.mark.parametrize("raw", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_encoding_is_refused(raw: bytes) -> None:
    with pytest.raises(NotCanonical):
        encoding.unpack(raw, max_depth=1)


# --- 3. every decoder: only its WritError --------------------------------------------


def _vector_bodies() -> list[bytes]:
    return [encoding.unpack(r)[0] for r in RECORDS]


record_like = st.one_of(
    msgpackish,
    st.builds(lambda data, k: mutate_record(data, RECORDS[k]), st.data(), st.integers(0, FULL - 1)),
    # an array of allowed scalars as the body, under a zero signature: steps 3-6 and 12
    st.builds(
        lambda kind, rest: encoding.pack([encoding.pack([1, kind, *rest]), bytes(64)]),
        st.integers(0, 5),
        st.lists(st.one_of(scalars, st.binary(min_size=32, max_size=32)), max_size=12),
    ),
)


@MEDIUM
@given(record_like)
def test_records_parse_raises_only_record_rejected(data: bytes) -> None:
    try:
        env = records.parse(data)
    except RecordRejected:
        return
    try:
        body = env.typed()
    except InvalidField:
        return
    assert body.encode() == env.body_bytes


@FAST
@given(record_like)
def test_apply_to_the_full_ledger_raises_only_record_rejected(data: bytes) -> None:
    state = prefix_states()[FULL].copy()
    before = state.snapshot()
    with pytest.raises(RecordRejected):
        state.apply(data)
    assert state.snapshot() == before


def _message_like() -> st.SearchStrategy[bytes]:
    vec = [bytes.fromhex(V.raw[k]["message"]) for k in ("auth", "receipt", "enroll")]
    bundle = messages.make_bundle(0, RECORDS[:2], V.raw["checkpoint"]["note"])

    def mutated(data: st.DataObject, raw: bytes) -> bytes:
        return mutate(data, raw, data.draw(st.sampled_from(MUTATIONS)))

    arrays = st.lists(st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=6)
    return st.one_of(
        msgpackish,
        st.builds(mutated, st.data(), st.sampled_from([*vec, bundle])),
        arrays.map(encoding.pack),
        st.builds(
            lambda f, sig: encoding.pack([encoding.pack(f), sig]), arrays, st.binary(min_size=64, max_size=64)
        ),
    )


message_like = _message_like()


@MEDIUM
@given(message_like)
def test_message_decoders_raise_only_bad_message(data: bytes) -> None:
    for parse in (messages.parse_auth, messages.parse_receipt, messages.parse_enroll, messages.parse_bundle):
        with contextlib.suppress(BadMessage):
            parse(data)


@MEDIUM
@given(message_like)
def test_credential_check_on_arbitrary_auth_only_refuses(data: bytes) -> None:
    verdict = check_vector_auth(data)
    assert verdict.accepted == (data == vector_credential()[1])
    if not verdict.accepted:
        assert verdict.reason in credential.REFUSALS


@FAST
@given(st.one_of(st.binary(max_size=400), st.text(max_size=200)), st.data())
def test_note_parsers_raise_only_bad_note(data: bytes | str, more: st.DataObject) -> None:
    note_text = V.raw["checkpoint"]["note"]
    if more.draw(st.booleans()):  # a mutation of the vector checkpoint instead
        data = mutate(more, note_text.encode(), more.draw(st.sampled_from(MUTATIONS[:6])))
    try:
        note = notes.parse_note(data)
    except BadNote:
        pass
    else:
        text = data if isinstance(data, str) else data.decode()
        assert note.serialize() == text
    try:
        vc = checkpoints.verify_checkpoint(data, V.origin, [V.public("log")])
    except (BadNote, CheckpointRejected):
        pass
    else:
        assert vc.checkpoint == checkpoints.parse_checkpoint_body(notes.parse_note(note_text).body)
    if isinstance(data, str):
        with contextlib.suppress(BadNote):
            notes.parse_vkey(data)


tile_paths = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.sampled_from(["tile", "entries", "0", "1", "63", "64", "00", "x001", "x000", "123", "999", "x999"])
        | st.sampled_from([".p", "000.p", "255", "256", "1", "0", "", "x", "-1", "+1", "١٢٣"]),
        min_size=1,
        max_size=10,
    ).map("/".join),
)


@MEDIUM
@given(tile_paths)
def test_tile_path_parser_raises_only_bad_tile_path(path: str) -> None:
    try:
        tp = tiles.parse_tile_path(path)
    except BadTilePath:
        return
    assert tp.path == path


@MEDIUM
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(st.binary(max_size=40), min_size=1, max_size=8).map(tiles.encode_entry_bundle),
    ),
    st.data(),
)
def test_tile_decoders_raise_only_their_errors(data: bytes, more: st.DataObject) -> None:
    if data and more.draw(st.booleans()):
        data = mutate(more, data, more.draw(st.sampled_from(MUTATIONS[:6])))
    try:
        entries = tiles.decode_entry_bundle(data)
    except BadMessage:
        pass
    else:
        assert tiles.encode_entry_bundle(entries) == data
    try:
        hashes = tiles.decode_hash_tile(data)
    except BadProof:
        pass
    else:
        assert b"".join(hashes) == data


#: ints for damaged snapshots: small ones, and a few that no bitmap could be allocated for.
snapshot_ints = st.one_of(st.integers(0, 4096), st.sampled_from([1 << 32, 1 << 40, 1 << 63, U64]))
snapshot_scalars = st.one_of(st.none(), snapshot_ints, st.binary(max_size=40), st.text(max_size=8))
snapshot_values = st.recursive(snapshot_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=10)
#: the table fields of a snapshot: roots, grants, revoked keys, revocations.
SNAPSHOT_TABLES = (9, 11, 14, 15)


def damaged_snapshot(data: st.DataObject, snap: bytes) -> bytes:
    """``snap`` with one field, one cell of a table, or some bytes changed."""
    choice = data.draw(st.sampled_from(["field", "cell", "mutation", "bytes"]))
    if choice in ("field", "cell"):
        f = encoding.unpack(snap, max_depth=3)
        if choice == "field":
            f[data.draw(st.integers(0, 16))] = data.draw(snapshot_values)
        else:
            table = f[data.draw(st.sampled_from(SNAPSHOT_TABLES))]
            row = table[data.draw(st.integers(0, len(table) - 1))] if table else table
            if row:
                row[data.draw(st.integers(0, len(row) - 1))] = data.draw(snapshot_scalars)
        return encoding.pack(f)
    if choice == "mutation":
        return mutate(data, snap, data.draw(st.sampled_from(MUTATIONS)))
    return data.draw(msgpackish)


@MEDIUM
@given(st.data())
def test_restore_refuses_damage_or_gives_a_working_state(data: st.DataObject) -> None:
    """``restore`` raises only BadMessage; a state it does return snapshots
    again, restores again to the same snapshot, and its ``apply`` raises only
    RecordRejected (here on the next vector record)."""
    damaged = damaged_snapshot(data, prefix_states()[FULL - 1].snapshot())
    try:
        state = LedgerState.restore(damaged)
    except BadMessage as exc:
        event(exc.message.split("(")[-1].rstrip(")"))
        return
    event("restored")
    again = state.snapshot()
    assert LedgerState.restore(again).snapshot() == again
    with contextlib.suppress(RecordRejected):
        state.apply(RECORDS[FULL - 1])


# --- 4. generated well-formed records are accepted and round trip -------------------

SIGNERS = {V.public(name): V.signer(name) for name in V.raw["keys"]}
REVOKER_SEQ = 2

texts = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=16)
roles = st.one_of(
    st.sampled_from(sorted(records.PROTOCOL_ROLES)), st.from_regex(records.ROLE_PATTERN, fullmatch=True)
)


def _grant(data: st.DataObject, state: LedgerState, time: int) -> Grant:
    nb = data.draw(st.integers(0, 1 << 40))
    na = data.draw(st.one_of(st.just(0), st.integers(nb + 1, U64)))
    return Grant(
        state.size,
        state.root,
        time,
        data.draw(st.binary(min_size=32, max_size=32)),
        data.draw(roles),
        data.draw(texts),
        data.draw(texts),
        nb,
        na,
    )


def _revoke(data: st.DataObject, state: LedgerState, time: int) -> Revoke | None:
    unrevoked = [s for s in range(state.size) if state.is_grant(s) and not state.is_revoked(s)]
    by_key = data.draw(st.booleans()) or not unrevoked
    target: int | bytes
    if by_key:
        known = [g.subject for g in state.grants.values() if not state.key_revoked(g.subject)]
        target = data.draw(st.sampled_from(known) | st.binary(min_size=32, max_size=32))
        if state.key_revoked(target) or state.is_root_key(target):
            return None
    else:
        target = data.draw(st.sampled_from(unrevoked))
    use_revoker = state.grant_active(REVOKER_SEQ, time) is not None and data.draw(st.booleans())
    return Revoke(
        state.size,
        state.root,
        time,
        REVOKER_SEQ if use_revoker else 0,
        target,
        data.draw(st.integers(0, U64)),
    )


def _signer(state: LedgerState, body: records.Body) -> crypto.SeedSigner:
    if isinstance(body, Rotate):
        return SIGNERS[body.new_root]
    if isinstance(body, Revoke) and body.signer:
        return SIGNERS[state.grants[body.signer].subject]
    key = state.root_key
    assert key is not None
    return SIGNERS[key]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_generated_records_are_accepted_and_round_trip(data: st.DataObject) -> None:
    state = prefix_states()[FULL].copy()
    next_root = V.public("root_next_2")
    for _ in range(data.draw(st.integers(1, 6), label="records")):
        time = state.last_time + data.draw(st.integers(0, 1 << 20))
        kind = data.draw(st.sampled_from([Kind.GRANT, Kind.REVOKE, Kind.ROTATE]))
        body: records.Body | None
        if kind is Kind.ROTATE:
            if state.pending_digest != crypto.sha256(next_root):
                continue
            digest = data.draw(st.none() | st.binary(min_size=32, max_size=32))
            body = Rotate(state.size, state.root, time, next_root, digest)
        elif kind is Kind.REVOKE:
            body = _revoke(data, state, time)
        else:
            body = _grant(data, state, time)
            if state.is_root_key(body.subject) or state.key_revoked(body.subject):
                continue
        if body is None:
            continue
        raw = records.sign(body, _signer(state, body))
        size = state.size
        rec = state.apply(raw)
        event(f"accepted a {body.KIND.name.lower()}")
        assert rec.raw == raw
        assert rec.body == body
        assert records.parse(raw).typed() == body
        assert records.parse(raw).body_bytes == body.encode()
        assert state.size == size + 1
    again = LedgerState.restore(state.snapshot())
    assert again.snapshot() == state.snapshot()


def test_every_decoder_error_is_a_writ_error() -> None:
    """The classes the properties above accept are all in the one tree."""
    for cls in (RecordRejected, NotCanonical, InvalidField, BadMessage, BadNote, BadProof, BadTilePath):
        assert issubclass(cls, WritError)
    assert issubclass(CheckpointRejected, WritError)


# --- the record framing fast path agrees with the strict decoder -------------------------------


def _split_outcome(raw: bytes, fast: bool) -> object:
    try:
        return encoding.split_record(raw, fast=fast)
    except WritError as exc:
        return (type(exc), exc.type, str(exc))


@given(st.data())
@settings(max_examples=3000, deadline=None)
def test_record_framing_fast_path_agrees_with_the_strict_decoder(data: st.DataObject) -> None:
    """Every record-shaped input (valid records, their mutations, truncations, other bin
    headers and random bytes) splits to the same body, signature and fields, or the
    same error class, with and without the fast path."""
    body_len = data.draw(st.integers(0, 700))
    body = data.draw(st.binary(min_size=body_len, max_size=body_len)) if body_len < 40 else bytes(body_len)
    if data.draw(st.booleans()):
        fields = data.draw(
            st.lists(
                st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=40), st.text(max_size=20)),
                max_size=12,
            )
        )
        body = encoding.pack(fields)
    sig = data.draw(st.binary(min_size=60, max_size=68))
    raw = encoding.pack([body, sig])
    choice = data.draw(st.integers(0, 4))
    if choice == 1 and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1 :]
    elif choice == 2:
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif choice == 3:
        raw = raw + data.draw(st.binary(min_size=1, max_size=4))
    elif choice == 4:
        raw = data.draw(st.binary(max_size=700))
    assert _split_outcome(raw, True) == _split_outcome(raw, False)


#: body elements of every type MessagePack has, the allowed ones and the refused ones
#: (negative integers, booleans, floats, nested arrays, maps)
_ANY_ELEMENT = st.one_of(
    st.integers(-(2**63), U64),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.none(),
    st.booleans(),
    st.floats(),
    st.lists(st.integers(0, 300), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2),
)
_SCALAR_ELEMENT = st.one_of(st.integers(0, U64), st.binary(max_size=40), st.text(max_size=20), st.none())


@given(st.data())
@settings(max_examples=3000, deadline=None)
def test_body_decoding_fast_path_agrees_with_the_strict_decoder(data: st.DataObject) -> None:
    """The signed body inside a well-framed record: flat arrays of allowed scalars, the
    same with refused types mixed in, their mutations (non-minimal integer and length
    headers, bin/str swaps, flips, insertions, truncations) and MessagePack-like bytes
    split to the same fields, or the same error (class, type and message), with and
    without the fast paths."""
    choice = data.draw(st.integers(0, 3))
    if choice == 3:
        body = data.draw(msgpackish)
    else:
        element = _SCALAR_ELEMENT if choice == 0 else _ANY_ELEMENT
        body = encoding.pack(data.draw(st.lists(element, max_size=14)))
        if choice == 2:
            body = mutate(data, body, data.draw(st.sampled_from(MUTATIONS)))
    if len(body) > encoding.MAX_BODY:
        return
    raw = encoding.join_record(body, data.draw(st.binary(min_size=64, max_size=64)))
    assert _split_outcome(raw, True) == _split_outcome(raw, False)


# --- the constructors' one-expression check agrees with the ordered field rules ----------------

_UINTISH = st.one_of(
    st.integers(0, U64),
    st.sampled_from([0, 1, U64, U64 + 1, -1, 2**70]),
    st.sampled_from([None, True, b"1", "1", 1.0]),
)
_KEYISH = st.one_of(st.binary(min_size=31, max_size=33), st.sampled_from([None, "k" * 32, 5, bytearray(32)]))
_ROLEISH = st.one_of(
    st.sampled_from(sorted(records.PROTOCOL_ROLES)),
    st.sampled_from(["maintenance-2", "Operator", "", "2fa", "a" * 32, "a" * 33, "op_x", None, b"log"]),
    st.text(max_size=6),
)
_TEXTISH = st.one_of(
    st.text(max_size=70),
    st.text(st.characters(max_codepoint=0x7F), max_size=70),
    st.sampled_from(["a" * 64, "a" * 65, "\u00e9" * 32, "\u00e9" * 33, "\x7f", "\x85", None, b"t"]),
)


def _first_failing_rule(checks: Callable[[], object]) -> str | None:
    try:
        checks()
    except InvalidField as exc:
        return str(exc)
    return None


_PRINTABLE_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64)
_U32 = st.integers(0, U64)
_K32 = st.binary(min_size=32, max_size=32)
#: field -> (a valid value, an odd one); each example makes up to two fields odd
_GRANT_FIELDS = {
    "seq": (_U32, _UINTISH),
    "prev": (_K32, _KEYISH),
    "time": (_U32, _UINTISH),
    "subject": (_K32, _KEYISH),
    "role": (st.sampled_from([*sorted(records.PROTOCOL_ROLES), "maintenance-2"]), _ROLEISH),
    "scope": (_PRINTABLE_ASCII, _TEXTISH),
    "name": (_PRINTABLE_ASCII, _TEXTISH),
    "nb": (st.integers(0, 2**40), _UINTISH),
    "na": (st.one_of(st.just(0), st.integers(2**40 + 1, U64)), _UINTISH),
}
_REVOKE_FIELDS = {
    "seq": (_U32, _UINTISH),
    "prev": (_K32, _KEYISH),
    "time": (_U32, _UINTISH),
    "signer": (_U32, _UINTISH),
    "target": (st.one_of(_U32, _K32), st.one_of(_UINTISH, _KEYISH)),
    "reason": (_U32, _UINTISH),
}


def _draw_fields(data: st.DataObject, fields: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    odd = data.draw(st.sets(st.sampled_from(sorted(fields)), max_size=2), label="odd fields")
    return {f: data.draw(pair[f in odd], label=f) for f, pair in fields.items()}


@MEDIUM
@given(st.data())
def test_grant_constructor_refuses_exactly_what_the_field_rules_refuse(data: st.DataObject) -> None:
    """A grant is built when every field rule of docs/protocol.md, "Records" holds, and
    otherwise refused with the first failing rule's message (the rules in their order)."""
    v = _draw_fields(data, _GRANT_FIELDS)

    def rules() -> None:
        records.check_uint("seq", v["seq"])
        records.check_uint("time", v["time"])
        records.check_key("prev", v["prev"])
        records.check_key("subject", v["subject"])
        records.check_role(v["role"])
        records.check_text("scope", v["scope"], records.MAX_SCOPE)
        records.check_text("name", v["name"], records.MAX_NAME)
        records.check_uint("not_before", v["nb"])
        records.check_uint("not_after", v["na"])
        if v["na"] != 0 and v["na"] <= v["nb"]:
            raise InvalidField("not_after must be 0 (no expiry) or later than not_before")

    want = _first_failing_rule(rules)
    got = _first_failing_rule(lambda: Grant(*v.values()))
    event("accepted" if want is None else "refused")
    assert got == want


@MEDIUM
@given(st.data())
def test_revoke_constructor_refuses_exactly_what_the_field_rules_refuse(data: st.DataObject) -> None:
    v = _draw_fields(data, _REVOKE_FIELDS)

    def rules() -> None:
        records.check_uint("seq", v["seq"])
        records.check_uint("time", v["time"])
        records.check_key("prev", v["prev"])
        records.check_uint("signer", v["signer"])
        if type(v["target"]) is int:
            records.check_uint("target", v["target"])
        else:
            records.check_key("target", v["target"])
        records.check_uint("reason", v["reason"])

    want = _first_failing_rule(rules)
    got = _first_failing_rule(lambda: Revoke(*v.values()))
    event("accepted" if want is None else "refused")
    assert got == want


# --- the state's cheap copies -----------------------------------------------------

_LAYERED_OPS = st.lists(
    st.tuples(st.sampled_from(["set", "del", "copy", "switch"]), st.integers(0, 40), st.integers()),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(ops=_LAYERED_OPS, fold=st.integers(0, 8))
def test_layered_maps_behave_as_independent_dicts(ops: list[tuple[str, int, int]], fold: int) -> None:
    """Every copy of a Layered map reads, iterates (in insertion order) and
    compares exactly like a dict copy, however the copies are written later."""
    maps: list[tuple[Layered[int, int], dict[int, int]]] = [(Layered(), {})]
    Layered.FOLD_MIN = fold  # small: copies fold their top often
    try:
        _layered_ops(maps, ops)
    finally:
        Layered.FOLD_MIN = 1024
    for lay, ref in maps:
        assert list(lay.items()) == list(ref.items()) and len(lay) == len(ref) and lay == ref
        assert all(lay.get(k) == ref.get(k) and (k in lay) == (k in ref) for k in range(41))


def _layered_ops(
    maps: list[tuple[Layered[int, int], dict[int, int]]], ops: list[tuple[str, int, int]]
) -> None:
    cur = 0
    for op, key, value in ops:
        lay, ref = maps[cur]
        if op == "set":
            lay[key] = value
            ref[key] = value
        elif op == "del" and key in ref:
            del lay[key]
            del ref[key]
        elif op == "copy":
            maps.append((lay.copy(), dict(ref)))
        elif op == "switch":
            cur = key % len(maps)


def test_state_copies_share_nothing_that_either_writes() -> None:
    """The state after the vectors, copied many times (past the fold threshold),
    then each copy extended: the original and the copies never see each other."""
    base = prefix_states()[FULL]
    before = base.snapshot()
    state = base.copy()
    for i in range(3000):  # enough grants to make Layered.copy fold its top at least once
        state.grants[10_000 + i] = next(iter(base.grants.values()))._replace(seq=10_000 + i)
        state = state.copy()
    snap = state.snapshot()
    other = state.copy()
    other.grants[99_999] = next(iter(base.grants.values()))
    assert base.snapshot() == before and state.snapshot() == snap
    assert len(other.grants) == len(state.grants) + 1
