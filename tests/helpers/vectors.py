"""The protocol vectors' credential case, for the credential tests and the decoder properties.

``vector_credential()`` is the ledger state of the vector records up to the
auth vector's time (before the vector ledger revokes that grant), the auth
message, and the freshness and ``now`` it is checked at;
``check_vector_auth(auth)`` runs :func:`ledger.credential.check_credential`
on ``auth`` as the vector device would (its key, its challenge, scope
``line-3``).
"""

from __future__ import annotations

from functools import cache

from ledger import credential, messages, records
from ledger.state import LedgerState
from tests.vectors_data import ledger_vectors


@cache
def vector_credential() -> tuple[LedgerState, bytes, credential.Freshness, int]:
    v = ledger_vectors()
    auth = bytes.fromhex(v.raw["auth"]["message"])
    now = messages.parse_auth(auth).time
    state = LedgerState(v.anchor, origin=v.origin)
    for raw in v.records:
        if records.parse(raw).time > now:
            break
        state.apply(raw)
    return state, auth, credential.Freshness(checkpoint_time=now), now


def check_vector_auth(auth: bytes) -> credential.Verdict:
    v = ledger_vectors()
    state, _, fresh, now = vector_credential()
    return credential.check_credential(
        state,
        auth,
        device_key=bytes.fromhex(v.raw["auth"]["verifier"]),
        challenge=bytes.fromhex(v.raw["auth"]["challenge"]),
        now=now,
        device_scope="line-3",
        freshness=fresh,
    )
