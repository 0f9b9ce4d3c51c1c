"""Plain words for records about to be signed (what a signing command shows before it asks).

Pure: decodes the very bytes that will be sent and walks them over a copy of
the verified state, so the words name what the records say, not what a
command meant to say.
"""

from __future__ import annotations

from . import records as rec
from .errors import WritError
from .state import LedgerState

__all__ = ["describe", "utc_iso"]


def utc_iso(t: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(k: bytes) -> str:
    return k.hex()[:16] + "…"


def describe(state: LedgerState, raws: list[bytes]) -> list[str]:
    """Plain words for records about to be signed: kind, subject, role, scope, name, the
    validity window in UTC, and the signer (decoded from the very bytes that will be sent)."""
    out: list[str] = []
    st = state.copy()
    for raw in raws:
        body = rec.decode_unverified(raw).body
        signer = st.root_key if not isinstance(body, rec.Genesis) else body.root
        if isinstance(body, rec.Genesis):
            succ = _key(body.next_root_digest) if body.next_root_digest else "none (never rotatable)"
            out.append(f"genesis #{body.seq} of the ledger {body.origin!r}: root (anchor) {_key(body.root)}")
            out.append(f"    committed successor digest: {succ}")
        elif isinstance(body, rec.Grant):
            scope = repr(body.scope) if body.scope else "everywhere"
            start = utc_iso(body.not_before) if body.not_before else "now"
            end = utc_iso(body.not_after) if body.not_after else "no expiry"
            out.append(f"grant #{body.seq}: role {body.role!r} to the key {_key(body.subject)}")
            out.append(f"    name {body.name!r}, scope {scope}, valid from {start} until {end}")
        elif isinstance(body, rec.Revoke):
            reason = rec.Reason.label(body.reason)
            if isinstance(body.target, bytes):
                what = f"the key {_key(body.target)} (every grant of it, now and later)"
            else:
                g = st.grants.get(body.target)
                what = f"grant #{body.target}" + (
                    f" ({g.name!r}, role {g.role!r}, key {_key(g.subject)})" if g else ""
                )
            out.append(f"revoke #{body.seq}: {what}; reason {reason}")
            if body.signer:
                g = st.grants.get(body.signer)
                signer = g.subject if g else None
        elif isinstance(body, rec.Rotate):
            succ = _key(body.next_root_digest) if body.next_root_digest else "none (never rotatable again)"
            out.append(f"rotate #{body.seq}: the root passes to {_key(body.new_root)}")
            out.append(f"    its committed successor digest: {succ}")
            signer = body.new_root
        out.append(f"    signed by {_key(signer) if signer else '?'} at {utc_iso(body.time)}")
        try:
            st.apply(raw)
        except WritError:
            break
    return out
