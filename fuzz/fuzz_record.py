"""Fuzz ``records.parse`` and ``LedgerState.apply`` (docs/protocol.md, "Records" and "Validity rules").

The first byte of an input picks a mode, the rest is the payload:

- even (*raw*): the payload is a record, applied as it is. The fuzzer cannot
  sign, so it can only be accepted with a signature some vector key made over
  that very body (a vector record, or an ``invalid`` vector whose flipped
  signature bit the fuzzer flipped back);
- odd (*signed*): the payload is a record *body*, which the harness signs with
  the vector key the rules will ask for (the root in force, the committed next
  root for a rotate, the revoker for a revoke naming a signer), so that
  mutations get past ``bad-signature`` to the field, target and revocation
  rules (steps 12-14) and can be accepted.

Each record is parsed (steps 1-6, then step 12's stateless part), applied to
the state holding the whole vector ledger and, when it parses with a seq the
vector ledger has, to the state holding the records before that seq, so that
mutations of vector record k reach the rules past ``stale-head``. Oracles:

- parsing and applying raise only :class:`~ledger.errors.RecordRejected`
  (step 12's typed view: only :class:`~ledger.errors.InvalidField`);
- a rejection leaves the state byte for byte as it was (``snapshot()``);
- an accepted record carries the (deterministic) Ed25519 signature of one of
  the vector keys over its body: nothing else can verify;
- an accepted record is stored verbatim (``rec.raw``), its typed body encodes
  back to the signed body bytes, the state grew by exactly one record with the
  RFC 6962 root of the old records plus this one, and applying the same bytes
  again is refused.

Run: ``python fuzz/fuzz_record.py -runs=100000`` (libFuzzer flags).
"""

from __future__ import annotations

import contextlib

import _common as common

atheris = common.require_atheris("record")

with atheris.instrument_imports(include=["ledger"]):
    from ledger import crypto, encoding, records, tree
    from ledger.errors import InvalidField, RecordRejected
    from ledger.records import Envelope, Kind
    from ledger.state import LedgerState

RECORDS = common.vector_records()
LEAVES = [tree.leaf_hash(r) for r in RECORDS]
#: a time no vector record is ahead of: the vector records pass ``time-in-future``.
NOW = max(records.parse(r).time for r in RECORDS)
SIGNERS = {
    s.public_key: s
    for s in (crypto.SeedSigner(common.seed(name)) for name in common.ledger_vectors()["keys"])
}


def _prefix_states() -> list[LedgerState]:
    states = [LedgerState(common.anchor(), origin=common.origin())]
    for raw in RECORDS:
        nxt = states[-1].copy()
        nxt.apply(raw)
        states.append(nxt)
    return states


PRISTINE = _prefix_states()
SNAPSHOTS = [st.snapshot() for st in PRISTINE]
states = [st.copy() for st in PRISTINE]


def _signer_for(st: LedgerState, env: Envelope) -> crypto.SeedSigner:
    """The vector key that step 11 will check this body's signature under (root if none)."""
    key: bytes | None = st.root_key
    if env.kind is Kind.GENESIS:
        key = st.anchor
    elif env.kind is Kind.ROTATE and type(env.extra[0]) is bytes:
        key = env.extra[0]
    elif env.kind is Kind.REVOKE and env.signer in st.grants:
        key = st.grants[env.signer].subject
    return SIGNERS.get(key or b"", SIGNERS[st.anchor])


def _signed_by_a_vector_key(env: Envelope) -> bool:
    return any(
        crypto.sign(s, crypto.RECORD_DOMAIN, env.body_bytes) == env.signature for s in SIGNERS.values()
    )


def _apply(k: int, data: bytes, now: int | None) -> None:
    st = states[k]
    try:
        rec = st.apply(data, now=now)
    except RecordRejected:
        if st.snapshot() != SNAPSHOTS[k]:
            raise AssertionError(f"a rejected record changed the state of size {k}") from None
        return
    states[k] = PRISTINE[k].copy()  # the next input starts from the vector state again
    env = records.parse(data)
    if not _signed_by_a_vector_key(env):
        raise AssertionError(f"accepted a record no vector key signed: {data.hex()}")
    if rec.raw != data or rec.body.encode() != env.body_bytes or rec.seq != k:
        raise AssertionError("the accepted record is not the bytes applied")
    if st.size != k + 1 or st.root != tree.mth([*LEAVES[:k], rec.leaf_hash]):
        raise AssertionError("the state did not grow by exactly the accepted record")
    try:
        st.apply(data, now=now)
    except RecordRejected:
        return
    raise AssertionError("the same record was accepted twice")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    signed = bool(data[0] & 1)
    payload = data[1:]
    full = len(RECORDS)
    if signed:
        try:
            env = records.parse(encoding.pack([payload, bytes(64)]))
        except RecordRejected:
            env = None
        k = env.seq if env is not None and env.seq < full else full
        sig = crypto.sign(_signer_for(states[k], env), crypto.RECORD_DOMAIN, payload) if env else bytes(64)
        raw = encoding.pack([payload, sig])
    else:
        raw = payload
    try:
        env = records.parse(raw)
    except RecordRejected:
        env = None
    if env is not None:
        with contextlib.suppress(InvalidField):
            env.typed()
    _apply(full, raw, None)
    if env is not None and env.seq < full:
        _apply(env.seq, raw, NOW)


if __name__ == "__main__":
    common.main("record", test_one_input)
