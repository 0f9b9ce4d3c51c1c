"""JSON views of the ledger state shared by the JSON routes and the dashboard.

A credential's status is :mod:`ledger.credential_status` (the CLI shows the same)."""

from __future__ import annotations

import bisect
from typing import Any

from ledger import records
from ledger.records import Reason
from ledger.state import GrantInfo, LedgerState, Revocation
from ledger.storage import ReceiptRow

#: the most devices one fleet page lists.
MAX_DEVICES_PAGE = 1000
#: the most revocations one fleet report covers.
MAX_REVOCATIONS = 100
#: the most stragglers listed per revocation on one page of GET /v1/fleet/revocations/{seq}.
MAX_STRAGGLERS = 100
#: ... and per revocation in the fleet report (the rest: that page's link).
MAX_FLEET_STRAGGLERS = 20
_NONE = -1  # the receipt size of a device that never sent one (sorts first: furthest behind)


class FleetIndex:
    """The fleet report's running counts, kept up to date as records and receipts arrive.

    Every unrevoked device grant is kept in one list sorted by (latest receipt
    size, grant seq), a device without a receipt at size -1. For a revoke at
    seq ``s`` the devices that have not applied it are exactly the prefix of
    that list with size <= ``s``: the counts are a binary search and a page of
    stragglers a slice, whatever the fleet's size. :meth:`sync` folds in the
    grants and revocations appended since the last call (the state's dicts
    keep seq order), :meth:`receipt` a device's newer receipt; neither ever
    rescans the fleet, so a report costs its page size, never the fleet size
    times the number of revocations.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.seen = 0  # records folded in
        self.devices: list[int] = []  # every device grant seq, ascending (revoked ones too)
        self.active: dict[int, int] = {}  # unrevoked device seq -> receipt size (or -1)
        self.by_size: list[tuple[int, int]] = []  # (size, seq) of the active devices, sorted
        self.by_subject: dict[bytes, list[int]] = {}  # subject -> active device seqs
        self.revocations: list[Revocation] = []  # ascending seq
        self.names: dict[int, str | None] = {}  # revoke seq -> the names it revoked
        self._subject_names: dict[bytes, set[str]] = {}  # subject -> names granted to it (any role)

    def sync(self, state: LedgerState, receipts: dict[int, ReceiptRow]) -> None:
        """Fold in what ``state`` has beyond what was seen (rebuild if it went back)."""
        if state.size < self.seen:
            self._reset()
        if state.size == self.seen:
            return
        grants: list[GrantInfo] = []
        for seq in reversed(state.grants):
            if seq < self.seen:
                break
            grants.append(state.grants[seq])
        revs: list[Revocation] = []
        for key in reversed(state.revocations):
            rev = state.revocations[key]
            if rev.seq < self.seen:
                break
            revs.append(rev)
        for g in reversed(grants):
            self._subject_names.setdefault(g.subject, set()).add(g.name)
            if g.role != records.ROLE_DEVICE:
                continue
            self.devices.append(g.seq)
            if not state.is_withdrawn(g.seq):
                r = receipts.get(g.seq)
                self._add(g.seq, g.subject, r.size if r is not None else _NONE)
        for rev in reversed(revs):
            self.revocations.append(rev)
            if isinstance(rev.target, int):
                target = state.grants.get(rev.target)
                self.names[rev.seq] = target.name if target is not None else None
                if target is not None:
                    self._remove(target.seq, target.subject)
            else:
                self.names[rev.seq] = ", ".join(sorted(self._subject_names.get(rev.target, ()))) or None
                for seq in list(self.by_subject.get(rev.target, ())):
                    self._remove(seq, rev.target)
        self.seen = state.size

    def receipt(self, row: ReceiptRow) -> None:
        """``row`` is now the latest receipt of its device."""
        old = self.active.get(row.device_grant_seq)
        if old is None or old == row.size:
            return
        seq = row.device_grant_seq
        del self.by_size[bisect.bisect_left(self.by_size, (old, seq))]
        bisect.insort(self.by_size, (row.size, seq))
        self.active[seq] = row.size

    def _add(self, seq: int, subject: bytes, size: int) -> None:
        self.active[seq] = size
        bisect.insort(self.by_size, (size, seq))
        self.by_subject.setdefault(subject, []).append(seq)

    def _remove(self, seq: int, subject: bytes) -> None:
        size = self.active.pop(seq, None)
        if size is None:
            return
        del self.by_size[bisect.bisect_left(self.by_size, (size, seq))]
        seqs = self.by_subject.get(subject, [])
        if seq in seqs:
            seqs.remove(seq)
        if not seqs:
            self.by_subject.pop(subject, None)

    def not_applied(self, rev_seq: int) -> int:
        """How many active devices' latest receipt does not cover seq ``rev_seq``."""
        return bisect.bisect_right(self.by_size, (rev_seq, 1 << 64))

    def stragglers(self, rev_seq: int, after: tuple[int, int] | None, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` (size, seq) of devices behind ``rev_seq`` past ``after``, furthest behind first."""
        end = self.not_applied(rev_seq)
        start = 0 if after is None else bisect.bisect_right(self.by_size, after)
        return self.by_size[start : min(end, start + limit)]

    def revocation(self, seq: int) -> Revocation | None:
        i = bisect.bisect_left(self.revocations, seq, key=lambda r: r.seq)
        if i < len(self.revocations) and self.revocations[i].seq == seq:
            return self.revocations[i]
        return None


def straggler_cursor(size: int, seq: int) -> str:
    """The opaque ``after`` cursor of a straggler page: ``SIZE+1 '-' SEQ``."""
    return f"{size + 1}-{seq}"


def parse_straggler_cursor(text: str) -> tuple[int, int] | None:
    a, sep, b = text.partition("-")
    if not sep or not (a.isascii() and a.isdigit() and b.isascii() and b.isdigit()):
        return None
    if len(a) > 20 or len(b) > 20:
        return None
    return int(a) - 1, int(b)


def _device_json(state: LedgerState, g: GrantInfo, r: ReceiptRow | None) -> dict[str, Any]:
    return {
        "grant_seq": g.seq,
        "name": g.name,
        "public_key": g.subject.hex(),
        "scope": g.scope,
        "size": r.size if r else None,
        "root": r.root.hex() if r else None,
        "time": r.time if r else None,
        "received_at": r.received_at if r else None,
        "revoked": state.is_withdrawn(g.seq),
    }


def revocation_spread(
    state: LedgerState,
    receipts: dict[int, ReceiptRow],
    index: FleetIndex,
    rev: Revocation,
    *,
    max_stragglers: int,
    after: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """How far one revocation has spread: applied/total and a page of stragglers.

    ``total`` is the number of unrevoked device grants (a revoke's own targets
    are revoked, hence never counted), ``applied`` those whose latest receipt
    is for a size past the revoke's seq; the stragglers come furthest behind
    first, ``stragglers_next`` is the cursor of the next page (None at the end).
    """
    behind = index.not_applied(rev.seq)
    total = len(index.active)
    page = index.stragglers(rev.seq, after, max_stragglers)
    out_stragglers = []
    for size, seq in page:
        g = state.grants[seq]
        r = receipts.get(seq)
        out_stragglers.append(
            {
                "grant_seq": seq,
                "name": g.name,
                "size": None if size == _NONE else size,
                "received_at": r.received_at if r else None,
            }
        )
    more = bool(page) and bisect.bisect_right(index.by_size, page[-1]) < behind
    return {
        "seq": rev.seq,
        "target": rev.target if isinstance(rev.target, int) else rev.target.hex(),
        "name": index.names.get(rev.seq),
        "reason": Reason.label(rev.reason),
        "time": rev.time,
        "signer": rev.signer,
        "applied": total - behind,
        "total": total,
        "stragglers": out_stragglers,
        "stragglers_total": behind,
        "stragglers_next": straggler_cursor(*page[-1]) if more else None,
        "stragglers_url": f"/v1/fleet/revocations/{rev.seq}",
    }


def fleet(
    state: LedgerState,
    receipts: dict[int, ReceiptRow],
    index: FleetIndex,
    *,
    limit: int = MAX_DEVICES_PAGE,
    after: int | None = None,
    max_revocations: int = 50,
    max_stragglers: int = 20,
) -> dict[str, Any]:
    """One page of the fleet report: devices (by grant seq, past ``after``) with their
    latest receipt, and the newest ``max_revocations`` revocations with how far each
    has spread (:func:`revocation_spread`). ``index`` must be synced with ``state``.

    The work is bounded by the page sizes, which the caller caps: never by the
    fleet size times the number of revocations.
    """
    start = 0 if after is None else bisect.bisect_right(index.devices, after)
    page = index.devices[start : start + limit]
    out_devices = [_device_json(state, state.grants[seq], receipts.get(seq)) for seq in page]
    more = start + limit < len(index.devices)
    revs = index.revocations[-max_revocations:][::-1] if max_revocations else []
    return {
        "devices": out_devices,
        "devices_total": len(index.devices),
        "active_devices": len(index.active),
        "next": page[-1] if more and page else None,
        "revocations": [
            revocation_spread(state, receipts, index, rev, max_stragglers=max_stragglers) for rev in revs
        ],
        "revocations_total": len(index.revocations),
    }


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
