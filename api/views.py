"""JSON views of the ledger state shared by the JSON routes and the dashboard.

A credential's status is :mod:`ledger.views` (the CLI shows the same)."""

from __future__ import annotations

import bisect
from typing import Any

from ledger import records
from ledger.records import Reason
from ledger.state import GrantInfo, LedgerState, Revocation
from ledger.storage import ReceiptRow


def _device_revoked(state: LedgerState, g: GrantInfo) -> bool:
    return state.is_revoked(g.seq) or state.key_revoked(g.subject)


def fleet(
    state: LedgerState,
    receipts: dict[int, ReceiptRow],
    *,
    max_revocations: int = 50,
    max_stragglers: int = 100,
) -> dict[str, Any]:
    """Devices with their latest receipt, and how far each revocation has spread.

    For each revoke record (newest first, at most ``max_revocations``):
    ``total`` is the number of unrevoked device grants other than the target,
    ``applied`` those whose latest receipt is for a size past the revoke's
    seq; ``stragglers`` the first ``max_stragglers`` of the others.
    """
    devices = sorted((g for g in state.grants.values() if g.role == records.ROLE_DEVICE), key=lambda g: g.seq)
    out_devices = []
    for g in devices:
        r = receipts.get(g.seq)
        out_devices.append(
            {
                "grant_seq": g.seq,
                "name": g.name,
                "public_key": g.subject.hex(),
                "scope": g.scope,
                "size": r.size if r else None,
                "root": r.root.hex() if r else None,
                "time": r.time if r else None,
                "received_at": r.received_at if r else None,
                "revoked": _device_revoked(state, g),
            }
        )
    active = [g for g in devices if not _device_revoked(state, g)]
    sizes = sorted(receipts[g.seq].size if g.seq in receipts else -1 for g in active)
    revs = sorted({id(r): r for r in state.revocations.values()}.values(), key=lambda r: r.seq, reverse=True)
    out_revs = []
    for rev in revs[:max_revocations]:
        targets = _target_grants(state, rev)
        target_seqs = {t.seq for t in targets}
        excluded = [g for g in active if g.seq in target_seqs]
        applied = len(sizes) - bisect.bisect_right(sizes, rev.seq)
        for g in excluded:
            s = receipts[g.seq].size if g.seq in receipts else -1
            if s > rev.seq:
                applied -= 1
        total = len(active) - len(excluded)
        stragglers: list[dict[str, Any]] = []
        n_stragglers = 0
        for g in active:
            if g.seq in target_seqs:
                continue
            r = receipts.get(g.seq)
            if r is None or r.size <= rev.seq:
                n_stragglers += 1
                if len(stragglers) < max_stragglers:
                    stragglers.append(
                        {
                            "grant_seq": g.seq,
                            "name": g.name,
                            "size": r.size if r else None,
                            "received_at": r.received_at if r else None,
                        }
                    )
        out_revs.append(
            {
                "seq": rev.seq,
                "target": rev.target if isinstance(rev.target, int) else rev.target.hex(),
                "name": ", ".join(sorted({t.name for t in targets})) or None,
                "reason": Reason.label(rev.reason),
                "time": rev.time,
                "signer": rev.signer,
                "applied": applied,
                "total": total,
                "stragglers": stragglers,
                "stragglers_total": n_stragglers,
            }
        )
    return {"devices": out_devices, "revocations": out_revs}


def _target_grants(state: LedgerState, rev: Revocation) -> list[GrantInfo]:
    if isinstance(rev.target, int):
        g = state.grants.get(rev.target)
        return [g] if g is not None else []
    return state.grants_of(rev.target)


def describe_record(body: records.Body, state: LedgerState) -> str:
    """One human sentence: who granted what to whom, who revoked what and why."""
    if isinstance(body, records.Genesis):
        return f"genesis of {body.origin} under root {body.root.hex()[:16]}…"
    if isinstance(body, records.Grant):
        scope = f" in scope {body.scope!r}" if body.scope else ""
        until = f" until {body.not_after}" if body.not_after else ""
        return f"root granted {body.role} {body.name!r}{scope}{until} to key {body.subject.hex()[:16]}…"
    if isinstance(body, records.Revoke):
        who = "root" if body.signer == 0 else f"revoker #{body.signer}"
        if isinstance(body.target, int):
            g = state.grants.get(body.target)
            what = f"grant #{body.target}" + (f" ({g.role} {g.name!r})" if g else "")
        else:
            names = sorted({g.name for g in state.grants_of(body.target)})
            what = f"key {body.target.hex()[:16]}…" + (f" ({', '.join(names)})" if names else "")
        return f"{who} revoked {what}: {Reason.label(body.reason)}"
    return f"root rotated to {body.new_root.hex()[:16]}…"
