"""ledger-v1.json, byte for byte: encoding, the validity table, messages.

The rules themselves are tested module by module (tests/test_records.py,
tests/test_state.py, tests/test_credential.py); this file pins the vectors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ledger import crypto, encoding, errors, messages, records
from ledger.records import Grant, Revoke, Rotate
from ledger.state import LedgerState
from ledger.tree import leaf_hash
from tests.helpers.vectors import state_fingerprint, vector_state
from tests.helpers.vectors_data import ledger_vectors

V = ledger_vectors()


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
    st = vector_state()
    assert st.root_key == V.public("root_next")
    assert st.root_for(7) == V.public("root")
    assert st.root_for(8) == V.public("root_next")
    assert st.pending_digest == crypto.sha256(V.public("root_next_2"))
    assert st.is_revoked(5)  # tablet-07, revoked by the revoker at seq 6
    assert st.key_revoked(V.public("stolen_laptop"))
    assert st.active_keys("log") == [V.public("log")]
    assert st.counts[records.Kind.GRANT] == 6


@pytest.mark.parametrize("vec", V.invalid, ids=[v["desc"] for v in V.invalid])
def test_invalid_record_rejected_with_its_type(vec: dict[str, Any]) -> None:
    st = vector_state()
    before = state_fingerprint(st)
    with pytest.raises(errors.RecordRejected) as info:
        st.apply(bytes.fromhex(vec["record"]))
    assert info.value.type == vec["expect"]
    assert state_fingerprint(st) == before


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
