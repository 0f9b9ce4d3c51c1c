"""Which checkpoint a device or an auditor may accept (PROTOCOL section 5).

A verifier that has accepted a view of the ledger moves to a new checkpoint
only when every rule holds, checked in this order:

1. the note's 0x01 signature is by a key granted role ``log`` in the ledger
   (and not revoked there), with the checkpoint's origin; any signature by a
   known key that does not verify rejects the note (``untrusted-checkpoint``,
   ``wrong-origin``, ``bad-note``); ``require_witnesses`` distinct ``witness``
   keys cosigned it (``missing-cosignatures``);
2. its size is not smaller than the last accepted size (``rollback``);
3. at equal size the root is the last accepted root (``fork``);
4. the root is the tree the verifier computed from the records it applied
   (``fork``);
5. its verified 0x04 timestamp, when present, is not older than the last
   accepted one (``timestamp-regression``).

Anything else is evidence of a fork or a rollback: the caller keeps its old
state and an :class:`Evidence` record (the two conflicting signed notes, or
the hex of the bad data), and raises the alarm. Pure: no I/O, explicit times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import notes, records
from .errors import BadMessage, Fork, Rollback, TimestampRegression, UntrustedCheckpoint, WritError
from .state import LedgerState

__all__ = ["MAX_EVIDENCE_DATA", "MAX_EVIDENCE_NOTE", "AcceptedView", "Evidence", "accept", "checkpoint_size"]

#: evidence keeps at most this many bytes of bad data (as hex: twice as many characters).
MAX_EVIDENCE_DATA = 2048
#: and at most this many characters of each signed note (a log's note is far smaller).
MAX_EVIDENCE_NOTE = 16384


@dataclass(frozen=True, slots=True)
class AcceptedView:
    """The last checkpoint a verifier accepted.

    ``timestamp`` is the latest *verified* 0x04 timestamp of the log: this
    note's, or, when this note carried none, the one carried over from the
    previous view (a larger tree signed after time T is at least as fresh as
    T). ``None`` until some accepted note carried one: such a view is never
    fresh.
    """

    size: int
    root: bytes
    timestamp: int | None
    note: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root.hex(), "timestamp": self.timestamp, "note": self.note}

    @classmethod
    def from_json(cls, obj: Any) -> AcceptedView:
        try:
            ts = obj["timestamp"]
            view = cls(
                int(obj["size"]), bytes.fromhex(obj["root"]), None if ts is None else int(ts), obj["note"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadMessage(f"damaged accepted view ({type(exc).__name__})") from None
        if view.size < 0 or len(view.root) != 32 or not isinstance(view.note, str):
            raise BadMessage("damaged accepted view")
        return view


def checkpoint_size(note: str | bytes) -> int:
    """The tree size a checkpoint note names, from its text alone (signatures
    unchecked: only to know which records to fetch). Raises BadNote."""
    return notes.parse_checkpoint_body(notes.parse_note(note).body).size


def _log_keys(state: LedgerState) -> list[bytes]:
    return state.active_keys(records.ROLE_LOG)


def _witness_keys(state: LedgerState) -> list[tuple[str, bytes]]:
    return [
        (g.name, g.subject)
        for g in state.grants.values()
        if g.role == records.ROLE_WITNESS and not state.is_revoked(g.seq) and not state.key_revoked(g.subject)
    ]


def accept(
    previous: AcceptedView | None,
    note: str | bytes,
    state: LedgerState,
    *,
    require_witnesses: int = 0,
) -> AcceptedView:
    """Accept ``note`` after ``previous``, or raise the rule it breaks.

    ``state`` is the verifier's state after applying the records up to the
    checkpoint's size (for a checkpoint smaller than ``previous``, simply the
    current state: the note is refused as a rollback once its signature is
    checked). The log and witness keys are those ``state`` holds granted and
    unrevoked.
    """

    origin = state.origin if state.origin is not None else state.expected_origin
    if origin is None:
        raise UntrustedCheckpoint("no genesis applied and no origin configured: no log key is known")
    vc = notes.verify_checkpoint(
        note, origin, _log_keys(state), _witness_keys(state), require_witnesses=require_witnesses
    )
    cp = vc.checkpoint
    if previous is not None:
        if cp.size < previous.size:
            raise Rollback(
                f"checkpoint size {cp.size} is smaller than the accepted size {previous.size}",
                size=cp.size,
                accepted_size=previous.size,
            )
        if cp.size == previous.size and cp.root != previous.root:
            raise Fork(
                f"checkpoint root differs from the accepted root at the same size {cp.size}",
                size=cp.size,
            )
    if cp.size != state.size:
        raise Fork(
            f"checkpoint names size {cp.size} but the records applied make a tree of {state.size}",
            size=cp.size,
            computed_size=state.size,
        )
    if cp.root != state.root:
        raise Fork(
            f"checkpoint root is not the root of the {state.size} records applied",
            size=cp.size,
            computed_root=state.root.hex(),
        )
    last_ts = previous.timestamp if previous is not None else None
    if vc.timestamp is not None and last_ts is not None and vc.timestamp < last_ts:
        raise TimestampRegression(
            f"checkpoint timestamp {vc.timestamp} is older than the accepted {last_ts}",
            timestamp=vc.timestamp,
            accepted_timestamp=last_ts,
        )
    ts = vc.timestamp if vc.timestamp is not None else last_ts
    return AcceptedView(cp.size, cp.root, ts, vc.note)


# --- evidence ---------------------------------------------------------------


def _clip_note(note: str | bytes | None) -> str | None:
    if note is None:
        return None
    text = note if isinstance(note, str) else bytes(note).decode("utf-8", "replace")
    return text[:MAX_EVIDENCE_NOTE]


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a verifier keeps when it refuses data: proof for a human.

    ``kind`` is the error's stable type (``fork``, ``rollback``,
    ``bad-signature``...); ``notes`` the signed notes involved (for a fork or
    a rollback: the accepted one, then the conflicting one); ``data`` the hex
    of the offending bytes (a record, a bundle prefix), at most
    :data:`MAX_EVIDENCE_DATA` bytes; ``seq`` the record's position when known.
    """

    kind: str
    detail: str
    observed_at: int
    notes: tuple[str, ...] = ()
    data: str | None = None
    seq: int | None = None

    @classmethod
    def from_error(
        cls,
        exc: WritError,
        *,
        observed_at: int,
        notes: tuple[str | bytes | None, ...] = (),
        data: bytes | None = None,
    ) -> Evidence:
        kept = tuple(n for n in (_clip_note(x) for x in notes) if n is not None)
        seq = exc.detail.get("seq")
        return cls(
            exc.type,
            exc.message[:1024],
            observed_at,
            kept,
            None if data is None else bytes(data[:MAX_EVIDENCE_DATA]).hex(),
            seq if type(seq) is int else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "detail": self.detail,
            "observed_at": self.observed_at,
            "notes": list(self.notes),
            "data": self.data,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Evidence:
        try:
            kind, detail, at = obj["kind"], obj["detail"], obj["observed_at"]
            notes_ = tuple(obj.get("notes", ()))
            data, seq = obj.get("data"), obj.get("seq")
        except (KeyError, TypeError, AttributeError) as exc:
            raise BadMessage(f"damaged evidence ({type(exc).__name__})") from None
        if (
            not isinstance(kind, str)
            or not isinstance(detail, str)
            or type(at) is not int
            or not all(isinstance(n, str) for n in notes_)
            or not (data is None or isinstance(data, str))
            or not (seq is None or type(seq) is int)
        ):
            raise BadMessage("damaged evidence")
        return cls(kind, detail, at, notes_, data, seq)
