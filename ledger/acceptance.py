"""Which checkpoint a device, an auditor or a signing tool may accept (docs/protocol.md, "Checkpoints").

A verifier that has accepted a view of the ledger moves to a new checkpoint
only when every rule holds, checked in this order:

1. the note's 0x01 signature is by a key granted role ``log`` in the ledger
   (and not revoked there), with the checkpoint's origin; any signature by a
   known key that does not verify rejects the note (``untrusted-checkpoint``,
   ``wrong-origin``, ``bad-note``);
2. its size is not smaller than the last accepted size (``rollback``);
3. at equal size the root is the last accepted root (``fork``);
4. the root is the tree the verifier computed from the records it applied
   (``fork``);
5. its verified 0x04 timestamp, when present, is not older than the last
   accepted one (``timestamp-regression``);
6. (1.1) that timestamp is at most :data:`MAX_AHEAD` seconds ahead of the
   verifier's clock ``now`` (``future-checkpoint``): a note dated further
   ahead never becomes the timestamp floor, so a stolen log key cannot lock a
   verifier out of every honest checkpoint until that date.

Witnesses (1.1). Cosignatures never hold a checkpoint back: a note with a
valid log signature is accepted with any number of them, so a revocation is
applied at once. They decide *freshness* instead: a verifier that requires
``k`` witnesses is fresh by the k-th freshest witness timestamp on the tree
it holds (:meth:`AcceptedView.fresh_time`), never by the log's. Each witness
key has its own floor (:class:`WitnessStamp`, kept across trees): a
cosignature dated below it, or more than :data:`MAX_AHEAD` seconds ahead of
``now``, is not counted and moves nothing (the log's word alone decides which
records apply; a witness's bad clock must not stop them).

Anything else is evidence of a fork or a rollback: the caller keeps its old
state and an :class:`Evidence` record (the two conflicting signed notes, or
the hex of the bad data), and raises the alarm. Pure: no I/O, explicit times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import checkpoints, notes, records
from .errors import (
    BadMessage,
    Fork,
    FutureCheckpoint,
    Rollback,
    TimestampRegression,
    UntrustedCheckpoint,
    WritError,
)
from .state import LedgerState

__all__ = [
    "MAX_AHEAD",
    "MAX_EVIDENCE_DATA",
    "MAX_EVIDENCE_NOTE",
    "MAX_WITNESS_STAMPS",
    "AcceptedView",
    "Evidence",
    "WitnessStamp",
    "accept",
    "check_not_ahead",
    "checkpoint_size",
    "verify",
]

#: a signed checkpoint timestamp may be at most this many seconds ahead of the verifier's clock.
MAX_AHEAD = 300
#: evidence keeps at most this many bytes of bad data (as hex: twice as many characters).
MAX_EVIDENCE_DATA = 2048
#: and at most this many characters of each signed note (a log's note is far smaller).
MAX_EVIDENCE_NOTE = 16384
#: a stored view holds at most this many witness floors (one per granted witness key).
MAX_WITNESS_STAMPS = 4096


@dataclass(frozen=True, slots=True, order=True)
class WitnessStamp:
    """The latest counted cosignature of one witness key: its timestamp (the
    witness's floor, never lowered) and the size of the tree it cosigned."""

    key: bytes
    timestamp: int
    size: int

    def to_list(self) -> list[Any]:
        return [self.key, self.timestamp, self.size]

    @classmethod
    def from_list(cls, f: Any) -> WitnessStamp:
        if (
            type(f) is not list
            or len(f) != 3
            or type(f[0]) is not bytes
            or len(f[0]) != 32
            or type(f[1]) is not int
            or type(f[2]) is not int
            or f[1] < 0
            or f[2] < 0
        ):
            raise BadMessage("damaged witness timestamp")
        return cls(f[0], f[1], f[2])


def _stamps_from(items: Any) -> tuple[WitnessStamp, ...]:
    if type(items) is not list or len(items) > MAX_WITNESS_STAMPS:
        raise BadMessage("damaged witness timestamps")
    return tuple(sorted(WitnessStamp.from_list(x) for x in items))


@dataclass(frozen=True, slots=True)
class AcceptedView:
    """The last checkpoint a verifier accepted.

    ``timestamp`` is the latest *verified* 0x04 timestamp of the log (the
    floor): this note's, or, when this note carried none, the one carried over
    from the previous view (a larger tree signed after time T is at least as
    fresh as T). ``None`` until some accepted note carried one: such a view is
    never fresh by the log. ``witnesses`` holds one :class:`WitnessStamp` per
    granted witness key that ever counted, sorted by key.
    """

    size: int
    root: bytes
    timestamp: int | None
    note: str
    witnesses: tuple[WitnessStamp, ...] = ()

    def witness_time(self, k: int) -> int | None:
        """The k-th freshest witness timestamp on *this* tree (``None`` with fewer than ``k``).

        Only cosignatures of the tree the view holds count: a tree the log
        showed this verifier alone, which no witness saw, is never fresh."""
        if k <= 0:
            return None
        current = sorted((w.timestamp for w in self.witnesses if w.size == self.size), reverse=True)
        return current[k - 1] if len(current) >= k else None

    def fresh_time(self, require_witnesses: int = 0) -> int | None:
        """The timestamp freshness is judged by: the log's when no witness is
        required, else the ``require_witnesses``-th freshest witness timestamp."""
        return self.timestamp if require_witnesses <= 0 else self.witness_time(require_witnesses)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": self.root.hex(),
            "timestamp": self.timestamp,
            "note": self.note,
            "witnesses": [[w.key.hex(), w.timestamp, w.size] for w in self.witnesses],
        }

    @classmethod
    def from_json(cls, obj: Any) -> AcceptedView:
        try:
            ts = obj["timestamp"]
            wits = [[bytes.fromhex(k), t, n] for k, t, n in obj.get("witnesses", [])]
            view = cls(
                int(obj["size"]),
                bytes.fromhex(obj["root"]),
                None if ts is None else int(ts),
                obj["note"],
                _stamps_from(wits),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadMessage(f"damaged accepted view ({type(exc).__name__})") from None
        if view.size < 0 or len(view.root) != 32 or not isinstance(view.note, str):
            raise BadMessage("damaged accepted view")
        return view

    def to_list(self) -> list[Any]:
        """The MessagePack-ready form a device stores (:meth:`from_list` reads it back);
        the witness stamps are flattened (key, timestamp, size, key, ...) to keep it two levels deep."""
        flat = [x for w in self.witnesses for x in w.to_list()]
        return [self.size, self.root, self.timestamp, self.note, flat]

    @classmethod
    def from_list(cls, f: Any) -> AcceptedView:
        """Read :meth:`to_list` (or the four-element form written before witness floors)."""
        if (
            type(f) is not list
            or len(f) not in (4, 5)
            or type(f[0]) is not int
            or f[0] < 0
            or type(f[1]) is not bytes
            or len(f[1]) != 32
            or not (f[2] is None or type(f[2]) is int)
            or type(f[3]) is not str
        ):
            raise BadMessage("damaged accepted view")
        wits: tuple[WitnessStamp, ...] = ()
        if len(f) == 5:
            if type(f[4]) is not list or len(f[4]) % 3:
                raise BadMessage("damaged accepted view")
            wits = _stamps_from([f[4][i : i + 3] for i in range(0, len(f[4]), 3)])
        return cls(f[0], f[1], f[2], f[3], wits)


def checkpoint_size(note: str | bytes) -> int:
    """The tree size a checkpoint note names, from its text alone (signatures
    unchecked: only to know which records to fetch). Raises BadNote."""
    return checkpoints.parse_checkpoint_body(notes.parse_note(note).body).size


def _log_keys(state: LedgerState) -> list[bytes]:
    return state.active_keys(records.ROLE_LOG)


def _witness_keys(state: LedgerState) -> list[tuple[str, bytes]]:
    return [
        (g.name, g.subject)
        for g in state.grants.values()
        if g.role == records.ROLE_WITNESS and not state.is_withdrawn(g.seq)
    ]


def check_not_ahead(timestamp: int | None, now: int) -> None:
    """Raise :class:`FutureCheckpoint` when a signed ``timestamp`` is more than
    :data:`MAX_AHEAD` seconds ahead of ``now`` (protocol revision 1.1: docs/protocol.md, "Checkpoints")."""
    if timestamp is not None and timestamp > now + MAX_AHEAD:
        raise FutureCheckpoint(
            f"checkpoint timestamp {timestamp} is {timestamp - now} s ahead of this clock ({now});"
            f" at most {MAX_AHEAD} s are allowed",
            timestamp=timestamp,
            now=now,
        )


def verify(
    note: str | bytes, state: LedgerState, *, now: int, require_witnesses: int = 0
) -> checkpoints.VerifiedCheckpoint:
    """Rule 1 and rule 6 alone, for a verifier with no accepted view (an auditor).

    The log and witness keys are those ``state`` holds granted and unrevoked;
    ``require_witnesses`` (the auditor's option) refuses a note with fewer
    distinct witness cosignatures (``missing-cosignatures``)."""
    vc = _verify_signatures(note, state, require_witnesses)
    check_not_ahead(vc.timestamp, now)
    return vc


def _verify_signatures(
    note: str | bytes, state: LedgerState, require_witnesses: int = 0
) -> checkpoints.VerifiedCheckpoint:
    origin = state.origin if state.origin is not None else state.expected_origin
    if origin is None:
        raise UntrustedCheckpoint("no genesis applied and no origin configured: no log key is known")
    return checkpoints.verify_checkpoint(
        note, origin, _log_keys(state), _witness_keys(state), require_witnesses=require_witnesses
    )


def _count_witnesses(
    previous: AcceptedView | None, vc: checkpoints.VerifiedCheckpoint, state: LedgerState, now: int
) -> tuple[WitnessStamp, ...]:
    """Each witness key's floor after ``vc``: a cosignature counts when it is
    not below that key's floor and not more than MAX_AHEAD ahead of ``now``."""
    active = {key for _, key in _witness_keys(state)}
    floors = {w.key: w for w in (previous.witnesses if previous is not None else ()) if w.key in active}
    size = vc.checkpoint.size
    for key, ts in vc.witness_stamps:
        if ts > now + MAX_AHEAD:
            continue  # a future cosignature never counts and never becomes a floor
        old = floors.get(key)
        if old is not None and ts < old.timestamp:
            continue  # below this witness's floor: an old cosignature, or a witness going back
        if old is None or ts > old.timestamp or size > old.size:
            floors[key] = WitnessStamp(key, ts, size)
    kept: list[WitnessStamp] = list(floors.values())
    if len(floors) > MAX_WITNESS_STAMPS:  # bounded: the stalest floors go first
        kept = sorted(kept, key=lambda w: (w.size, w.timestamp), reverse=True)[:MAX_WITNESS_STAMPS]
    return tuple(sorted(kept))


def accept(
    previous: AcceptedView | None,
    note: str | bytes,
    state: LedgerState,
    *,
    now: int,
) -> AcceptedView:
    """Accept ``note`` after ``previous`` at the verifier's clock ``now``, or
    raise the rule it breaks.

    ``state`` is the verifier's state after applying the records up to the
    checkpoint's size (for a checkpoint smaller than ``previous``, simply the
    current state: the note is refused as a rollback once its signature is
    checked). The log and witness keys are those ``state`` holds granted and
    unrevoked, so records that revoke a stolen log key and grant its successor
    take effect for the note that comes with them. Any number of witness
    cosignatures is accepted; :meth:`AcceptedView.fresh_time` judges them.
    """

    vc = _verify_signatures(note, state)
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
    check_not_ahead(vc.timestamp, now)
    ts = vc.timestamp if vc.timestamp is not None else last_ts
    return AcceptedView(cp.size, cp.root, ts, vc.note, _count_witnesses(previous, vc, state, now))


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
