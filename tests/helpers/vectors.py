"""States and the credential case built from the protocol vectors (tests/vectors/).

``vector_credential()`` is the ledger state of the vector records up to the
auth vector's time (before the vector ledger revokes that grant), the auth
message, and the freshness and ``now`` it is checked at;
``check_vector_auth(auth)`` runs :func:`ledger.credential.check_credential`
on ``auth`` as the vector device would (its key, its challenge, scope
``line-3``). ``vector_state(n)`` is the state after the first ``n`` vector
records; ``state_fingerprint(st)`` what the rules consult, for comparisons.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from ledger import credential, messages, records
from ledger.state import LedgerState
from tests.helpers.vectors_data import ledger_vectors


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


def vector_state(n: int | None = None, *, keep_roles: list[str] | None = None) -> LedgerState:
    """A new state holding the vector records ``[0:n]`` (all of them by default)."""
    v = ledger_vectors()
    st = LedgerState(v.anchor, origin=v.origin, keep_roles=keep_roles)
    for raw in v.records[:n]:
        st.apply(raw)
    return st


def state_fingerprint(st: LedgerState) -> Any:
    """Everything the rules consult, comparable with ``==`` (a rejected record changes none of it)."""
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
