"""Verify a whole ledger from genesis with nothing but the anchor.

``audit`` takes record bytes (from a server, a database, a bundle: the caller
does the I/O) and runs every record through :meth:`LedgerState.apply`, the
same rules the server and the devices run. It raises the first rejection with
its ``seq``, or returns an :class:`AuditReport`. ``check_checkpoint`` then
holds a signed checkpoint against the tree the audit computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from . import acceptance, checkpoints, records
from .errors import Fork, RecordRejected, Rollback
from .records import Kind
from .state import LedgerState
from .verifier import ProcessVerifier


@dataclass
class AuditReport:
    origin: str | None
    size: int
    root: bytes
    records_by_kind: dict[str, int]
    active_grants: int
    revoked_grants: int
    revoked_keys: int
    roots: list[tuple[int, bytes]]
    log_keys: list[bytes]
    checkpoint: dict[str, Any] | None = None
    roles: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "origin": self.origin,
            "size": self.size,
            "root": self.root.hex(),
            "records_by_kind": self.records_by_kind,
            "active_grants": self.active_grants,
            "revoked_grants": self.revoked_grants,
            "revoked_keys": self.revoked_keys,
            "grants_by_role": self.roles,
            "roots": [{"from_seq": s, "key": k.hex()} for s, k in self.roots],
            "log_keys": [k.hex() for k in self.log_keys],
            "checkpoint": self.checkpoint,
        }


def report(state: LedgerState, now: int | None = None) -> AuditReport:
    active = revoked = 0
    roles: dict[str, int] = {}
    for g in state.grants.values():
        if state.is_withdrawn(g.seq):
            revoked += 1
        else:
            active += 1
            roles[g.role] = roles.get(g.role, 0) + 1
    return AuditReport(
        origin=state.origin,
        size=state.size,
        root=state.root,
        records_by_kind={k.name.lower(): state.counts[k] for k in Kind},
        active_grants=active,
        revoked_grants=revoked,
        revoked_keys=len(state.revoked_keys),
        roots=list(state.roots),
        log_keys=state.active_keys(records.ROLE_LOG),
        roles=roles,
    )


def audit(
    chunks: Iterable[Sequence[bytes]],
    *,
    anchor: bytes,
    origin: str | None = None,
    executor: Executor | None = None,
    verifier: ProcessVerifier | None = None,
    progress: Callable[[int], None] | None = None,
    state: LedgerState | None = None,
) -> tuple[LedgerState, AuditReport]:
    """Apply every record of ``chunks`` (in order) to a fresh full state.

    Raises the first :class:`RecordRejected`, its ``seq`` set to the position
    of the bad record (which is what the record *should* have had). The chunks
    flow through one pipeline (:meth:`LedgerState.apply_stream`): with an
    ``executor`` or a ``verifier``, signatures are checked ahead in parallel
    (worker processes for long ledgers, see :mod:`ledger.verifier`).
    """

    st = state if state is not None else LedgerState(anchor, origin=origin)
    try:
        st.apply_stream(chunks, executor=executor, verifier=verifier, on_span=progress)
    except RecordRejected as exc:
        exc.seq = st.size
        exc.detail["seq"] = st.size
        raise
    return st, report(st)


def check_checkpoint(
    state: LedgerState, note: str | bytes, *, now: int, witnesses: int = 0
) -> checkpoints.VerifiedCheckpoint:
    """A checkpoint must be signed by a log key granted (and unrevoked) in the
    ledger, be dated at most 300 s ahead of the auditor's clock ``now``
    (``future-checkpoint``), and name exactly the tree the audit computed (at
    its size, when the ledger is ahead of it, only equal sizes are checked
    here). The signature rules are the devices' (:func:`ledger.acceptance.verify`)."""

    assert state.origin is not None
    vc = acceptance.verify(note, state, now=now, require_witnesses=witnesses)
    cp = vc.checkpoint
    if cp.size > state.size:
        # a truncated ledger: the first record missing is the first bad seq
        raise Rollback(
            f"the checkpoint names size {cp.size} but only {state.size} records were served:"
            f" record {state.size} is missing",
            seq=state.size,
        )
    if cp.size == state.size and cp.root != state.root:
        raise Fork("the checkpoint's root is not the root of the records served")
    return vc
