"""``ledger.records``: steps 1-6 of the validity table, typed bodies, text rules, signing.

``parse`` takes a record's bytes through steps 1-6 in order and yields an
:class:`~ledger.records.Envelope`; ``Envelope.typed`` builds the frozen body
classes, which cannot hold an invalid field; ``sign`` encodes, signs and
joins. The stateful rules (steps 7-14) are in ``tests/test_state.py``; the
vectors' exact bytes in ``tests/test_ledger_vectors.py``; hostile bytes in
``tests/test_properties.py``.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import Any

import pytest

from ledger import crypto, encoding, errors, records
from ledger.records import Envelope, Genesis, Grant, Kind, Revoke, Rotate, SignedRecord
from tests.helpers.vectors_data import ledger_vectors

V = ledger_vectors()
PREV = records.EMPTY_HASH
KEY = b"k" * 32


def framed(fields: list[Any], sig: bytes = bytes(64)) -> bytes:
    """A record of ``fields`` (any values) with ``sig``: no size or shape check on the way."""
    return encoding.pack([encoding.pack(fields), sig])


GRANT = [1, int(Kind.GRANT), 1, PREV, 10, 0, KEY, "operator", "", "t", 0, 0]


# --- parse: steps 1-6, in order ---------------------------------------------------------------


def test_a_well_formed_record_parses_to_its_envelope() -> None:
    raw = framed(GRANT, b"s" * 64)
    env = records.parse(raw)
    assert (env.kind, env.seq, env.prev, env.time, env.signer) == (Kind.GRANT, 1, PREV, 10, 0)
    assert env.extra == (KEY, "operator", "", "t", 0, 0)
    assert env.raw is raw and env.signature == b"s" * 64
    assert env.body_bytes == encoding.pack(GRANT)


def test_an_oversized_record_is_too_large() -> None:
    raw = framed([*GRANT[:8], "s" * 600, *GRANT[9:]])
    assert len(raw) > encoding.MAX_RECORD
    with pytest.raises(errors.TooLarge):
        records.parse(raw)


@pytest.mark.parametrize(
    "raw",
    [
        encoding.pack(encoding.pack(GRANT)),  # not an array
        encoding.pack([encoding.pack(GRANT)]),  # one element
        encoding.pack([encoding.pack(GRANT), bytes(64), b""]),  # three
        encoding.pack([encoding.pack(GRANT), bytes(63)]),  # short signature
        encoding.pack([encoding.pack(GRANT), "s" * 64]),  # signature as str
        encoding.pack([GRANT, bytes(64)]),  # body not wrapped in bin
        encoding.pack([encoding.pack(7), bytes(64)]),  # body not an array
        encoding.pack([encoding.pack(GRANT[:5]), bytes(64)]),  # fewer than six header fields
        framed(GRANT) + b"\x00",  # trailing bytes
        b"",
    ],
    ids=[
        "not-an-array",
        "one-element",
        "three-elements",
        "short-signature",
        "signature-as-str",
        "body-not-bin",
        "body-not-array",
        "short-header",
        "trailing-byte",
        "empty",
    ],
)
def test_a_record_of_the_wrong_shape_is_not_canonical(raw: bytes) -> None:
    with pytest.raises(errors.NotCanonical):
        records.parse(raw)


def test_negative_integers_and_nested_arrays_are_not_canonical() -> None:
    """The wire format has no negative numbers, floats, booleans or nesting in a body (step 2)."""
    for index, value in ((2, -1), (4, -10), (6, [KEY]), (2, 1.5), (10, True)):
        fields = list(GRANT)
        fields[index] = value
        with pytest.raises(errors.NotCanonical):
            records.parse(framed(fields))


def test_a_non_minimal_encoding_is_not_canonical() -> None:
    body = encoding.pack(GRANT)
    wide = body.replace(b"\x0a", b"\xcc\x0a", 1)  # time 10 as uint8: one byte too many
    assert wide != body
    with pytest.raises(errors.NotCanonical):
        records.parse(encoding.pack([wide, bytes(64)]))


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_an_unknown_version_is_unsupported(version: object) -> None:
    with pytest.raises(errors.UnsupportedVersion):
        records.parse(framed([version, *GRANT[1:]]))


@pytest.mark.parametrize("kind", [4, 255, "grant", None])
def test_an_unknown_kind_is_refused(kind: object) -> None:
    with pytest.raises(errors.UnknownKind):
        records.parse(framed([1, kind, *GRANT[2:]]))


@pytest.mark.parametrize("kind", list(Kind))
def test_a_body_of_the_wrong_arity_is_not_canonical(kind: Kind) -> None:
    header = [1, int(kind), 1, PREV, 10, 0]
    n = records.ARITY[kind]
    for extra in (n - 7, n - 5):
        with pytest.raises(errors.NotCanonical):
            records.parse(framed(header + [0] * extra))


@pytest.mark.parametrize(
    ("index", "value"),
    [(2, "1"), (2, None), (4, None), (5, b"\x00"), (3, PREV[:31]), (3, "p" * 32)],
    ids=["seq-str", "seq-nil", "time-nil", "signer-bin", "prev-31-bytes", "prev-str"],
)
def test_an_ill_typed_header_is_invalid_field(index: int, value: object) -> None:
    fields = list(GRANT)
    fields[index] = value
    with pytest.raises(errors.InvalidField):
        records.parse(framed(fields))


def test_the_steps_run_in_order() -> None:
    """With several faults, the earliest step names the rejection."""
    cases: list[tuple[bytes, type[errors.RecordRejected]]] = [
        (encoding.pack([encoding.pack([9, 9, *GRANT[2:], "s" * 600]), bytes(63)]), errors.TooLarge),
        (encoding.pack([encoding.pack([9, 9, *GRANT[2:]]), bytes(63)]), errors.NotCanonical),
        (framed([9, 9, "seq", *GRANT[3:5]]), errors.NotCanonical),  # step 2: fewer than six fields
        (framed([9, 9, "seq", *GRANT[3:]]), errors.UnsupportedVersion),
        (framed([1, 9, "seq", *GRANT[3:], 0]), errors.UnknownKind),
        (framed([1, 1, "seq", *GRANT[3:], 0]), errors.NotCanonical),  # arity before the header types
        (framed([1, 1, "seq", *GRANT[3:]]), errors.InvalidField),
    ]
    for raw, exc in cases:
        with pytest.raises(errors.RecordRejected) as info:
            records.parse(raw)
        assert type(info.value) is exc, (exc, info.value)


# --- typed bodies ---------------------------------------------------------------------------


BODIES: list[records.Body] = [
    Genesis(0, PREV, 1, "ledger.example/p", KEY, b"d" * 32),
    Genesis(0, PREV, 1, "ledger.example/p", KEY, None),
    Grant(1, PREV, 2, KEY, "operator", "plant-1/line-3", "tablet-07", 5, 6),
    Revoke(2, PREV, 3, 0, 1, int(records.Reason.LOST)),
    Revoke(2, PREV, 3, 1, KEY, int(records.Reason.KEY_COMPROMISE)),
    Rotate(3, PREV, 4, KEY, None),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_each_kind_parses_back_to_its_body(body: records.Body) -> None:
    raw = encoding.join_record(body.encode(), bytes(64))
    env = records.parse(raw)
    assert env.kind is body.KIND and env.typed() == body
    assert env.typed().encode() == env.body_bytes


def test_a_revoke_target_that_is_neither_a_seq_nor_a_key_is_invalid_field() -> None:
    for target in ("k" * 32, None, b"k" * 31):
        env = records.parse(framed([1, int(Kind.REVOKE), 2, PREV, 3, 0, target, 2]))
        with pytest.raises(errors.InvalidField):
            env.typed()


def test_bodies_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BODIES[2].seq = 9  # type: ignore[misc]


def test_roles_and_reasons() -> None:
    assert records.check_role("maintenance-2") == "maintenance-2"
    # check_role takes the protocol roles without the pattern: each of them must match it
    assert all(records.ROLE_PATTERN.fullmatch(role) for role in records.PROTOCOL_ROLES)
    for bad in ("", "2fa", "Operator", "a" * 33, "op_x", 7):
        with pytest.raises(errors.InvalidField):
            records.check_role(bad)
    assert records.Reason.parse("Lost") is records.Reason.LOST
    with pytest.raises(errors.InvalidField):
        records.Reason.parse("misplaced")
    assert records.Reason.label(4) == "retired" and records.Reason.label(99) == "reason-99"


@pytest.mark.parametrize(
    ("cred", "device", "ok"),
    [
        ("", "", True),
        ("", "plant-1", True),
        ("plant-1", "plant-1", True),
        ("plant-1", "plant-1/line-3", True),
        ("plant-1", "plant-10", False),
        ("plant-1/line-3", "plant-1", False),
        ("plant-1", "", False),
    ],
)
def test_scope_is_a_path_prefix(cred: str, device: str, ok: bool) -> None:
    assert records.in_scope(cred, device) is ok


# --- field rules and text rules (1.1: exact) -------------------------------------------------

CC = ["\x00", "\x1f", "\x7f", "\x80", "\x85", "\x9f"]  # C0, DEL and C1: general category Cc
WHITE_SPACE_NOT_CC = [
    " ",
    "\xa0",
    "\u1680",
    "\u2000",
    "\u200a",
    "\u2028",
    "\u2029",
    "\u202f",
    "\u205f",
    "\u3000",
]


def test_body_classes_refuse_invalid_fields() -> None:
    prev = records.EMPTY_HASH
    with pytest.raises(errors.InvalidField):
        Grant(1, prev, 0, b"x" * 31, "operator", "", "t", 0, 0)
    with pytest.raises(errors.InvalidField):
        Grant(1, prev, 0, b"x" * 32, "Operator", "", "t", 0, 0)
    with pytest.raises(errors.InvalidField):
        Grant(1, prev, 0, b"x" * 32, "operator", "", "t\n", 0, 0)
    with pytest.raises(errors.InvalidField):
        Grant(1, prev, 0, b"x" * 32, "operator", "s" * 65, "t", 0, 0)
    with pytest.raises(errors.InvalidField):
        Grant(1, prev, 0, b"x" * 32, "operator", "", "t", 10, 10)
    with pytest.raises(errors.InvalidField):
        Genesis(0, prev, 0, "has space", b"r" * 32, None)
    with pytest.raises(errors.InvalidField):
        Genesis(0, prev, 0, "a+b", b"r" * 32, None)
    with pytest.raises(errors.InvalidField):
        Revoke(1, prev, 0, 0, b"k" * 31, 2)
    with pytest.raises(errors.InvalidField):
        Rotate(1, prev, 0, b"k" * 32, b"d" * 31)


def test_an_oversized_body_is_too_large_even_with_a_bad_signature_shape() -> None:
    """Step 1 (sizes) comes before step 2 (shape): a 513-byte body beside a 63-byte signature."""
    body = encoding.pack([1, 1, 1, b"\x00" * 32, 0, 0, b"x" * 32, "operator", "s" * 400, "n", 0, 0])
    big = encoding.pack(
        [1, 1, 1, b"\x00" * 32, 0, 0, b"x" * 32, "operator", "s" * (400 + 513 - len(body)), "n", 0, 0]
    )
    assert len(big) > encoding.MAX_BODY
    raw = encoding.pack([big, b"\x01" * 63])
    assert len(raw) <= encoding.MAX_RECORD
    with pytest.raises(errors.TooLarge):
        records.parse(raw)


@pytest.mark.parametrize("ch", CC, ids=lambda c: f"U+{ord(c):04X}")
def test_control_character_in_any_text_field_is_invalid_field(ch: str) -> None:
    prev = records.EMPTY_HASH
    for scope, name in ((f"a{ch}b", "t"), ("", f"tab{ch}let")):
        with pytest.raises(errors.InvalidField):
            Grant(1, prev, 0, b"x" * 32, "operator", scope, name, 0, 0)
    with pytest.raises(errors.InvalidField):
        Genesis(0, prev, 0, f"ledger.example{ch}x", b"r" * 32, None)


@pytest.mark.parametrize("ch", WHITE_SPACE_NOT_CC, ids=lambda c: f"U+{ord(c):04X}")
def test_white_space_in_origin_is_invalid_field_but_allowed_in_a_name(ch: str) -> None:
    prev = records.EMPTY_HASH
    with pytest.raises(errors.InvalidField):
        Genesis(0, prev, 0, f"ledger.example/plant{ch}7", b"r" * 32, None)
    assert Grant(1, prev, 0, b"x" * 32, "operator", "", f"tablet{ch}07", 0, 0).name == f"tablet{ch}07"


def test_text_rules_are_exactly_cc_and_white_space() -> None:
    """Cc is exactly what a text field refuses; White_Space (plus '+') is exactly
    what an origin refuses on top. Format characters such as U+200B (zero width
    space) are neither: allowed, as the rule says."""
    for cp in range(0x3001):
        ch = chr(cp)
        cc = unicodedata.category(ch) == "Cc"
        if 0xD800 <= cp <= 0xDFFF:
            continue
        try:
            records.check_text("name", ch, 64)
            text_ok = True
        except errors.InvalidField:
            text_ok = False
        assert text_ok is not cc, f"U+{cp:04X}"
        if not cc:
            try:
                records.check_origin(f"a{ch}b")
                origin_ok = True
            except errors.InvalidField:
                origin_ok = False
            assert origin_ok is not (ch in records.WHITE_SPACE or ch == "+"), f"U+{cp:04X}"
    assert records.check_origin("ledger.example/a\u200bb") == "ledger.example/a\u200bb"
    # the spelled-out set is the White_Space property (every one of them is a space to Python too)
    assert all(c.isspace() for c in records.WHITE_SPACE)
    assert {chr(c) for c in range(0x110000) if chr(c).isspace()} - records.WHITE_SPACE == {
        "\x1c",
        "\x1d",
        "\x1e",
        "\x1f",
    }  # Python's extra four are Cc, refused anyway


# --- signing and joining ---------------------------------------------------------------------


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_sign_produces_a_record_that_verifies_under_the_record_domain(body: records.Body) -> None:
    key = V.signer("root")
    raw = records.sign(body, key)
    env = records.parse(raw)
    assert env.body_bytes == body.encode()
    assert crypto.check(key.public_key, crypto.RECORD_DOMAIN, env.body_bytes, env.signature)
    assert not crypto.check(key.public_key, crypto.AUTH_DOMAIN, env.body_bytes, env.signature)
    assert encoding.join_record(env.body_bytes, env.signature) == raw
    assert records.sign(body, key) == raw  # Ed25519 is deterministic


def test_join_refuses_what_parse_would_refuse_as_too_large() -> None:
    with pytest.raises(errors.TooLarge):
        encoding.join_record(b"\x00" * (encoding.MAX_BODY + 1), bytes(64))


def test_decode_unverified_and_the_leaf_hash() -> None:
    raw = V.records[5]
    rec = records.decode_unverified(raw)
    assert isinstance(rec, SignedRecord) and rec.raw == raw and rec.seq == 5
    assert rec.leaf_hash == crypto.sha256(b"\x00" + raw)
    assert isinstance(rec.body, Grant) and rec.body.name == "tablet-07"


def test_describe_names_every_field_in_json_terms() -> None:
    out = [records.describe(b) for b in BODIES]
    assert out[0] == {
        "kind": "genesis",
        "seq": 0,
        "time": 1,
        "origin": "ledger.example/p",
        "root": KEY.hex(),
        "next_root_digest": (b"d" * 32).hex(),
    }
    assert out[2]["scope"] == "plant-1/line-3" and out[2]["subject"] == KEY.hex()
    assert (out[3]["target"], out[3]["reason"]) == (1, "lost")
    assert (out[4]["target"], out[4]["signer"]) == (KEY.hex(), 1)
    assert out[5] == {"kind": "rotate", "seq": 3, "time": 4, "new_root": KEY.hex(), "next_root_digest": None}


def test_an_envelope_is_what_parse_returns() -> None:
    assert isinstance(records.parse(V.records[0]), Envelope)
