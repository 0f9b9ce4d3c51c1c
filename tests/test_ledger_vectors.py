"""ledger-v1.json, byte for byte: encoding, the validity table, messages."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ledger import crypto, encoding, errors, messages, records
from ledger.records import Genesis, Grant, Revoke, Rotate
from ledger.state import LedgerState
from ledger.tree import leaf_hash
from tests.vectors_data import ledger_vectors

V = ledger_vectors()


def applied(n: int | None = None) -> LedgerState:
    st = LedgerState(V.anchor, origin=V.origin)
    for raw in V.records[:n]:
        st.apply(raw)
    return st


@pytest.mark.parametrize("i", range(len(V.raw["ledger"])), ids=[r["desc"] for r in V.raw["ledger"]])
def test_record_reencodes_from_fields(i: int) -> None:
    vec = V.raw["ledger"][i]
    raw = bytes.fromhex(vec["record"])
    env = records.parse(raw)
    body = env.typed()
    # build the same body again from its typed fields and sign it with the vector key
    again = type(body)(**{f.name: getattr(body, f.name) for f in dataclasses.fields(body)})
    assert again.encode() == env.body_bytes
    assert encoding.join_record(env.body_bytes, env.signature) == raw
    assert leaf_hash(raw) == bytes.fromhex(vec["leaf_hash"])
    assert env.prev == bytes.fromhex(vec["prev"])


def _signer_for(body: records.Body) -> crypto.SeedSigner:
    if isinstance(body, Rotate):
        return V.signer("root_next")
    if isinstance(body, Revoke) and body.signer != 0:
        return V.signer("revoker")
    return V.signer("root_next") if body.seq > 8 else V.signer("root")


def test_signing_reproduces_every_record() -> None:
    for raw in V.records:
        body = records.parse(raw).typed()
        assert records.sign(body, _signer_for(body)) == raw, body


def test_apply_reaches_every_root() -> None:
    st = LedgerState(V.anchor, origin=V.origin)
    for vec in V.raw["ledger"]:
        rec = st.apply(bytes.fromhex(vec["record"]))
        assert rec.raw == bytes.fromhex(vec["record"])
        assert st.size == vec["size_after"]
        assert st.root == bytes.fromhex(vec["root_after"])
    assert st.root == bytes.fromhex(V.raw["final"]["root"])
    assert st.size == V.raw["final"]["size"]


def test_state_after_vectors() -> None:
    st = applied()
    assert st.root_key == V.public("root_next")
    assert st.root_for(7) == V.public("root")
    assert st.root_for(8) == V.public("root_next")
    assert st.pending_digest == crypto.sha256(V.public("root_next_2"))
    assert st.is_revoked(5)  # tablet-07, revoked by the revoker at seq 6
    assert st.key_revoked(V.public("stolen_laptop"))
    assert st.active_keys("log") == [V.public("log")]
    assert st.counts[records.Kind.GRANT] == 6


def _state_fingerprint(st: LedgerState) -> Any:
    return (
        st.size,
        st.root,
        st.last_time,
        list(st.roots),
        st.pending_digest,
        dict(st.grants),
        st.grant_bits.to_bytes(),
        st.revoked.to_bytes(),
        dict(st.revoked_keys),
        dict(st.revocations),
    )


@pytest.mark.parametrize("vec", V.invalid, ids=[v["desc"] for v in V.invalid])
def test_invalid_record_rejected_with_its_type(vec: dict[str, Any]) -> None:
    st = applied()
    before = _state_fingerprint(st)
    with pytest.raises(errors.RecordRejected) as info:
        st.apply(bytes.fromhex(vec["record"]))
    assert info.value.type == vec["expect"]
    assert _state_fingerprint(st) == before


def test_every_rejection_type_is_known() -> None:
    names = {cls.type for cls in errors.RECORD_REJECTIONS}
    assert {v["expect"] for v in V.invalid} <= names
    for name in names:
        assert errors.by_type(name) is not None


def test_auth_vector() -> None:
    vec = V.raw["auth"]
    auth = messages.parse_auth(bytes.fromhex(vec["message"]))
    assert auth.verifier_key == bytes.fromhex(vec["verifier"])
    assert auth.challenge == bytes.fromhex(vec["challenge"])
    auth.verify(V.public("tablet_07"))
    again = messages.make_auth(
        auth.grant_record, V.signer("tablet_07"), auth.verifier_key, auth.challenge, auth.time
    )
    assert again == bytes.fromhex(vec["message"])
    grant = records.parse(auth.grant_record).typed()
    assert isinstance(grant, Grant) and grant.name == "tablet-07"


def test_receipt_vector() -> None:
    raw = bytes.fromhex(V.raw["receipt"]["message"])
    r = messages.parse_receipt(raw)
    assert (r.device_grant_seq, r.size, r.root) == (3, 10, bytes.fromhex(V.raw["final"]["root"]))
    r.verify(V.public("plc_1"))
    with pytest.raises(errors.BadSignature):
        r.verify(V.public("plc_2"))
    assert messages.make_receipt(V.signer("plc_1"), 3, r.size, r.root, r.time) == raw


def test_enroll_vector() -> None:
    raw = bytes.fromhex(V.raw["enroll"]["message"])
    e = messages.parse_enroll(raw)
    assert e.subject == V.public("plc_3")
    assert e.name == "plc-3"
    assert messages.make_enroll(V.signer("plc_3"), e.name, e.time) == raw
    forged = bytearray(raw)
    forged[-1] ^= 1
    with pytest.raises(errors.BadMessage):
        messages.parse_enroll(bytes(forged))


def test_domain_separation_blocks_cross_protocol_replay() -> None:
    """A record signature cannot be replayed as an auth/receipt/enroll signature."""
    raw = V.records[5]
    env = records.parse(raw)
    for domain in (crypto.AUTH_DOMAIN, crypto.RECEIPT_DOMAIN, crypto.ENROLL_DOMAIN):
        assert not crypto.check(V.public("root"), domain, env.body_bytes, env.signature)
    assert crypto.check(V.public("root"), crypto.RECORD_DOMAIN, env.body_bytes, env.signature)


def test_genesis_for_another_origin_is_refused() -> None:
    st = LedgerState(V.anchor, origin="other.example/x")
    with pytest.raises(errors.InvalidField):
        st.apply(V.records[0])
    assert st.size == 0


def test_genesis_under_another_anchor_is_refused_as_wrong_anchor() -> None:
    st = LedgerState(V.public("log"))
    with pytest.raises(errors.WrongAnchor) as info:
        st.apply(V.records[0])
    assert info.value.seq == 0 and st.size == 0
    assert info.value.detail["anchor"] == V.public("log").hex()
    assert info.value.detail["genesis_root"] == V.anchor.hex()


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


def test_snapshot_round_trip_full_and_compact() -> None:
    for keep in (None, ["operator"]):
        st = LedgerState(V.anchor, origin=V.origin, keep_roles=keep)
        for raw in V.records:
            st.apply(raw)
        again = LedgerState.restore(st.snapshot())
        assert _state_fingerprint(again) == _state_fingerprint(st)
        assert again.snapshot() == st.snapshot()


def test_damaged_snapshot_is_refused() -> None:
    snap = applied().snapshot()
    with pytest.raises(errors.BadMessage):
        LedgerState.restore(snap[:-3])
    with pytest.raises(errors.BadMessage):
        LedgerState.restore(b"\x93\x01\x02\x03")


def test_the_pending_successor_key_is_not_a_root_key_yet() -> None:
    """Step 12 forbids root keys current or past: the committed successor is neither,
    so a grant to it (or a revoke of it by key) follows the table like any other key."""
    st = applied(9)  # after the rotate to root_next; root_next_2 is pending
    successor = V.public("root_next_2")
    assert st.pending_digest == crypto.sha256(successor)
    body = Grant(st.size, st.root, st.last_time, successor, "operator", "", "odd-but-legal", 0, 0)
    st.copy().apply(records.sign(body, V.signer("root_next")))
    with pytest.raises(errors.InvalidField):  # a current root key stays refused
        st.copy().apply(
            records.sign(
                Grant(st.size, st.root, st.last_time, V.public("root_next"), "operator", "", "x", 0, 0),
                V.signer("root_next"),
            )
        )


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


def test_rotate_with_a_malformed_new_root_is_invalid_field_before_the_signer_rule() -> None:
    st = applied(8)
    body = encoding.pack([1, 3, st.size, st.root, st.last_time, 7, b"short", None])
    raw = encoding.join_record(body, b"\x00" * 64)
    with pytest.raises(errors.InvalidField):
        st.apply(raw)
