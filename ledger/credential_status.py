"""JSON-friendly views of a verified state: what a credential's status is.

Pure, shared by the server's JSON routes and dashboard and by the `writ` CLI,
so both say the same thing about the same grant.
"""

from __future__ import annotations

from typing import Any

from .records import Reason
from .state import GrantInfo, LedgerState, Revocation

__all__ = ["credential", "revocation_of", "status_of"]


def revocation_of(state: LedgerState, g: GrantInfo) -> tuple[Revocation, str] | None:
    """The revocation that ended grant ``g`` (the earlier one when by id and by key)."""
    found: list[tuple[Revocation, str]] = []
    if state.is_revoked(g.seq):
        r = state.revocations.get(g.seq)
        if r is not None:
            found.append((r, "id"))
    if state.key_revoked(g.subject):
        r = state.revocations.get(g.subject)
        if r is not None:
            found.append((r, "key"))
    return min(found, key=lambda x: x[0].seq) if found else None


def status_of(state: LedgerState, g: GrantInfo, now: int) -> str:
    if state.is_withdrawn(g.seq):
        return "revoked"
    if g.not_after != 0 and now >= g.not_after:
        return "expired"
    if now < g.not_before:
        return "not-yet-valid"
    return "active"


def credential(state: LedgerState, g: GrantInfo, now: int, raw: bytes | None) -> dict[str, Any]:
    rev = revocation_of(state, g)
    return {
        "seq": g.seq,
        "name": g.name,
        "role": g.role,
        "scope": g.scope,
        "subject": g.subject.hex(),
        "not_before": g.not_before,
        "not_after": g.not_after,
        "granted_at": g.time,
        "status": status_of(state, g, now),
        "revocation": None
        if rev is None
        else {
            "seq": rev[0].seq,
            "reason": Reason.label(rev[0].reason),
            "time": rev[0].time,
            "signer": rev[0].signer,
            "by": rev[1],
        },
        "record": raw.hex() if raw is not None else None,
    }
