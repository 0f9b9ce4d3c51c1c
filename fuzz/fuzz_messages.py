"""Fuzz the other signed messages and the credential check (docs/protocol.md, "Credentials on
a device", "Receipts", "Enrollment requests", "Sync bundles").

Every input goes through all four decoders, so one corpus serves them all.
Oracles:

- ``parse_auth``, ``parse_receipt``, ``parse_enroll`` and ``parse_bundle``
  raise only :class:`~ledger.errors.BadMessage`; what they accept is canonical:
  encoding the parsed parts again gives back the input;
- a receipt that verifies under plc-1's key and an enrollment request that
  parses (its signature is checked) are the vector messages themselves;
- ``credential.check_credential`` on the state of the vector ledger before
  tablet-07's revocation, with plc-1's key and the vector challenge, never
  raises and accepts only the vector auth message.

Run: ``python fuzz/fuzz_messages.py -runs=100000`` (libFuzzer flags).
"""

from __future__ import annotations

import _common as common

atheris = common.require_atheris("messages")

with atheris.instrument_imports(include=["ledger"]):
    from ledger import credential, encoding, messages, records
    from ledger.errors import BadMessage, BadSignature
    from ledger.state import LedgerState

V = common.ledger_vectors()
AUTH = bytes.fromhex(V["auth"]["message"])
RECEIPT = bytes.fromhex(V["receipt"]["message"])
ENROLL = bytes.fromhex(V["enroll"]["message"])
DEVICE_KEY = bytes.fromhex(V["auth"]["verifier"])
CHALLENGE = bytes.fromhex(V["auth"]["challenge"])
NOW = messages.parse_auth(AUTH).time
PLC_1 = common.public_key("plc_1")

STATE = LedgerState(common.anchor(), origin=common.origin())
for _raw in common.vector_records():
    if records.parse(_raw).time > NOW:
        break
    STATE.apply(_raw)
FRESH = credential.Freshness(checkpoint_time=NOW)
SCOPE = "line-3"  # plc-1's own scope


def _check(data: bytes) -> credential.Verdict:
    return credential.check_credential(
        STATE, data, device_key=DEVICE_KEY, challenge=CHALLENGE, now=NOW, device_scope=SCOPE, freshness=FRESH
    )


_expected = _check(AUTH)
assert _expected.accepted, _expected


def _auth(data: bytes) -> None:
    try:
        a = messages.parse_auth(data)
    except BadMessage:
        return
    if encoding.pack([a.grant_record, a.body, a.signature]) != data:
        raise AssertionError("parse_auth accepted a non-canonical message")
    if encoding.pack([1, a.verifier_key, a.challenge, a.time]) != a.body:
        raise AssertionError("parse_auth accepted a non-canonical body")


def _receipt(data: bytes) -> None:
    try:
        r = messages.parse_receipt(data)
    except BadMessage:
        return
    if encoding.pack([r.body, r.signature]) != data or r.raw != data:
        raise AssertionError("parse_receipt accepted a non-canonical message")
    if encoding.pack([1, r.device_grant_seq, r.size, r.root, r.time]) != r.body:
        raise AssertionError("parse_receipt accepted a non-canonical body")
    try:
        r.verify(PLC_1)
    except BadSignature:
        return
    if data != RECEIPT:
        raise AssertionError("a receipt nobody signed verified")


def _enroll(data: bytes) -> None:
    try:
        e = messages.parse_enroll(data)
    except BadMessage:
        return
    if data != ENROLL:
        raise AssertionError(f"an enrollment request nobody signed was accepted: {e}")


def _bundle(data: bytes) -> None:
    try:
        b = messages.parse_bundle(data)
    except BadMessage:
        return
    if messages.make_bundle(b.start, list(b.records), b.checkpoint) != data:
        raise AssertionError("parse_bundle accepted a non-canonical bundle")


def _credential(data: bytes) -> None:
    verdict = _check(data)
    if verdict.accepted != (data == AUTH):
        raise AssertionError(f"check_credential verdict {verdict} for {data.hex()}")
    if not verdict.accepted and verdict.reason not in credential.REFUSALS:
        raise AssertionError(f"refusal reason {verdict.reason!r} is not a conformance name")


def test_one_input(data: bytes) -> None:
    _auth(data)
    _receipt(data)
    _enroll(data)
    _bundle(data)
    _credential(data)


if __name__ == "__main__":
    common.main("messages", test_one_input)
