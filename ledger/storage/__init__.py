"""Durable storage of the ledger: the protocol, its shared rules, and an in-memory twin.

The server is the only writer. It verifies records with
:class:`~ledger.state.LedgerState` first, then hands them to
:meth:`Storage.append`, which stores them all or nothing behind a
compare-and-swap on the head (size, root). Storage does not re-verify
signatures on append; it does refuse a batch whose seqs are not exactly the
next ones (defence in depth). Verification happens again, in full, on every
start: :func:`ledger.storage.load.load_ledger` re-applies every stored record
and refuses to serve a ledger that does not audit clean.

Two backends with the same semantics:

- :class:`MemoryStorage` (this module): tests and throw-away demos.
- :class:`ledger.storage.sqlite.SqliteStorage`: the real one (WAL,
  ``synchronous = FULL``, one ``BEGIN IMMEDIATE`` transaction per append).

Both accept a ``fault`` hook for crash tests: it is called with the name of
each step of :meth:`Storage.append` (:data:`FAULT_STEPS`). Raising at
``"begin"``, ``"insert"`` or ``"head"`` leaves nothing persisted; raising at
``"commit"`` happens after the commit, so the data is persisted but the
caller sees an error. Either way the storage stays usable.
"""

from __future__ import annotations

import time as _time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import CorruptLedger, HeadConflict, LedgerExists, LedgerMissing, StorageError
from ..records import EMPTY_HASH, Grant, Revoke, SignedRecord, check_key, check_origin
from ..tree import leaf_hash

#: the steps of :meth:`Storage.append` at which the fault hook is called, in order.
FAULT_STEPS: tuple[str, ...] = ("begin", "insert", "head", "commit")

#: a crash-test hook: called with a step name, may raise.
Fault = Callable[[str], None]

HASH_SIZE = 32
_U64 = 1 << 64
#: seqs and sizes are below 2**63 (SQLite integers are signed 64-bit).
MAX_SEQ = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Head:
    """The stored head: ``size`` records whose RFC 6962 tree root is ``root``."""

    size: int
    root: bytes

    def __repr__(self) -> str:
        return f"Head(size={self.size}, root={self.root.hex()})"


#: the head of a ledger with no records.
EMPTY_HEAD = Head(0, EMPTY_HASH)


@dataclass(frozen=True, slots=True)
class Meta:
    """What ``init`` was given: the ledger's identity."""

    origin: str
    anchor: bytes
    log_public_key: bytes
    created_at: int


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    """The latest receipt of one device (PROTOCOL section 6, ``POST /v1/receipts``)."""

    device_grant_seq: int
    size: int
    root: bytes
    time: int
    raw: bytes
    received_at: int


@dataclass(frozen=True, slots=True)
class GrantRow:
    """One row of the grants index."""

    seq: int
    subject: bytes
    role: str
    scope: str
    name: str
    not_before: int
    not_after: int
    time: int


@dataclass(frozen=True, slots=True)
class RevocationRow:
    """One row of the revocations index: exactly one of ``target_seq`` / ``target_key``."""

    seq: int
    target_seq: int | None
    target_key: bytes | None
    reason: int
    signer: int
    time: int


@dataclass(frozen=True, slots=True)
class PreparedRecord:
    """A record as the backends store it: its bytes, leaf hash and index rows."""

    seq: int
    raw: bytes
    leaf_hash: bytes
    grant: GrantRow | None
    revocation: RevocationRow | None


@runtime_checkable
class Storage(Protocol):
    """What the server needs from durable storage. All methods are coroutines
    except :meth:`scan`, which returns an async iterator."""

    async def init(self, origin: str, anchor: bytes, log_public_key: bytes) -> None:
        """Create a new ledger (empty head). :class:`LedgerExists` if there is one."""
        ...

    async def meta(self) -> Meta:
        """The ledger's identity, or :class:`LedgerMissing`."""
        ...

    async def head(self) -> Head:
        """The current head (size 0, SHA-256("") for a new ledger)."""
        ...

    async def append(
        self,
        expected: Head,
        records: Sequence[SignedRecord],
        new_root: bytes,
        checkpoint: str | None = None,
    ) -> Head:
        """Store ``records`` (already verified) all or nothing, durably, if the
        head is still ``expected`` (else :class:`HeadConflict`, nothing written).
        ``checkpoint``, the signed note of the new head, is stored in the same
        transaction (one fsync). Returns the new head (size + len(records),
        ``new_root``)."""
        ...

    async def read(self, start: int, end: int) -> list[bytes]:
        """Verbatim record bytes of seqs ``start .. end-1`` (``end`` clamped to the size)."""
        ...

    async def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Stored leaf hashes of seqs ``start .. end-1`` (``end`` clamped to the size)."""
        ...

    def scan(self, batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        """Every stored record as (seq, raw, stored leaf hash), in seq order, in batches."""
        ...

    async def grants_named(self, name: str) -> list[int]:
        """Seqs of the grants whose ``name`` is ``name``, ascending."""
        ...

    async def grants_of(self, subject: bytes) -> list[int]:
        """Seqs of the grants of ``subject``, ascending."""
        ...

    async def revocations_of(self, target_seq: int) -> list[int]:
        """Seqs of the revoke records whose target is grant ``target_seq``."""
        ...

    async def revocations_of_key(self, key: bytes) -> list[int]:
        """Seqs of the revoke records whose target is the key ``key``."""
        ...

    async def put_receipt(
        self, device_grant_seq: int, size: int, root: bytes, time: int, raw: bytes, received_at: int
    ) -> None:
        """Keep this receipt if it is the device's latest (larger size; equal size: later time)."""
        ...

    async def put_receipts(self, rows: Sequence[ReceiptRow]) -> None:
        """:meth:`put_receipt` for many receipts in one transaction (one fsync)."""
        ...

    async def receipts(self) -> list[ReceiptRow]:
        """The latest receipt of every device, by device grant seq."""
        ...

    async def put_checkpoint(self, size: int, note: str) -> None:
        """Remember the last signed checkpoint note (never for a smaller size than before)."""
        ...

    async def latest_checkpoint(self) -> str | None:
        """The last signed checkpoint note, if any."""
        ...

    async def close(self) -> None: ...


# --- rules shared by the backends -----------------------------------------------


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64


def check_uint(what: str, value: object) -> int:
    if not _is_uint(value):
        raise StorageError(f"{what} must be an unsigned 64-bit integer")
    assert isinstance(value, int)
    return value


def check_seq(what: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise StorageError(f"{what} must be an integer in 0..2**63-1")
    return value


def check_hash(what: str, value: object) -> bytes:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        raise StorageError(f"{what} must be {HASH_SIZE} bytes")
    return value


def check_head(expected: object) -> Head:
    if not isinstance(expected, Head):
        raise StorageError("expected must be a Head")
    check_seq("head size", expected.size)
    check_hash("head root", expected.root)
    return expected


def check_identity(origin: str, anchor: bytes, log_public_key: bytes) -> None:
    """``init``'s arguments: a valid origin, two 32-byte keys (InvalidField otherwise)."""
    check_origin(origin)
    check_key("anchor", anchor)
    check_key("log_public_key", log_public_key)


def check_range(start: int, end: int) -> None:
    check_uint("start", start)
    check_uint("end", end)


def check_receipt(
    device_grant_seq: int, size: int, root: bytes, time: int, raw: bytes, received_at: int
) -> None:
    check_seq("device_grant_seq", device_grant_seq)
    check_seq("size", size)
    check_hash("root", root)
    check_uint("time", time)
    check_uint("received_at", received_at)
    if type(raw) is not bytes:
        raise StorageError("a receipt is bytes")


def receipt_is_newer(new_size: int, new_time: int, old: ReceiptRow | None) -> bool:
    """The receipt to keep: the larger size; at equal size, the later time."""
    return old is None or new_size > old.size or (new_size == old.size and new_time > old.time)


def head_conflict(current: Head, expected: Head) -> HeadConflict:
    return HeadConflict(
        f"the head moved: expected size {expected.size}, the ledger has {current.size}",
        size=current.size,
        root=current.root.hex(),
    )


def missing_records(start: int, end: int, seqs: Sequence[int]) -> CorruptLedger | None:
    """A :class:`CorruptLedger` naming the first seq of ``start .. end-1`` not in ``seqs`` (sorted)."""
    for want, got in zip(range(start, end), seqs, strict=False):
        if want != got:
            return CorruptLedger(f"record {want} is missing from storage", seq=want, cause="missing-record")
    if len(seqs) != end - start:
        first = start + len(seqs)
        return CorruptLedger(f"record {first} is missing from storage", seq=first, cause="missing-record")
    return None


def prepare(
    expected: Head, records: Sequence[SignedRecord], new_root: bytes, checkpoint: str | None = None
) -> list[PreparedRecord]:
    """Check an append's arguments and derive the rows to store; raises
    :class:`StorageError` (a caller's bug, not a rejection: the records were
    verified before) when the batch is empty, not contiguous from
    ``expected.size``, or carries a leaf hash that is not its bytes'."""

    check_head(expected)
    if checkpoint is not None and type(checkpoint) is not str:
        raise StorageError("a checkpoint note is text")
    check_hash("new_root", new_root)
    if isinstance(records, str | bytes) or len(records) == 0:
        raise StorageError("an append needs at least one record")
    check_seq("new size", expected.size + len(records))
    out: list[PreparedRecord] = []
    for i, rec in enumerate(records):
        want = expected.size + i
        if not isinstance(rec, SignedRecord) or type(rec.raw) is not bytes:
            raise StorageError(f"item {i} of the batch is not a SignedRecord")
        if rec.seq != want:
            raise StorageError(
                f"record {i} of the batch has seq {rec.seq}, not {want}: a batch for a head of size "
                f"{expected.size} holds seqs {expected.size}..{expected.size + len(records) - 1}",
                seq=rec.seq,
            )
        lh = leaf_hash(rec.raw)
        if rec.leaf_hash != lh:
            raise StorageError(
                f"record {want} carries a leaf hash that is not the hash of its bytes", seq=want
            )
        body = rec.body
        grant = revocation = None
        if isinstance(body, Grant):
            grant = GrantRow(
                want,
                body.subject,
                body.role,
                body.scope,
                body.name,
                body.not_before,
                body.not_after,
                body.time,
            )
        elif isinstance(body, Revoke):
            t = body.target
            revocation = RevocationRow(
                want,
                t if isinstance(t, int) else None,
                t if isinstance(t, bytes) else None,
                body.reason,
                body.signer,
                body.time,
            )
        out.append(PreparedRecord(want, rec.raw, lh, grant, revocation))
    return out


# --- the in-memory twin -----------------------------------------------------------


class MemoryStorage:
    """:class:`Storage` in process memory, with the same semantics and fault
    steps as the SQLite backend (nothing survives the process, of course).

    Records live in ``_records`` (seq -> (raw, leaf hash)); tests may poke it
    to simulate corruption.
    """

    def __init__(self, *, fault: Fault | None = None) -> None:
        self.fault = fault
        self._meta: Meta | None = None
        self._head: Head | None = None
        self._records: dict[int, tuple[bytes, bytes]] = {}
        self._names: dict[str, list[int]] = {}
        self._subjects: dict[bytes, list[int]] = {}
        self._rev_seq: dict[int, list[int]] = {}
        self._rev_key: dict[bytes, list[int]] = {}
        self._receipts: dict[int, ReceiptRow] = {}
        self._checkpoint: tuple[int, str] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryStorage(head={self._head!r})"

    def _open(self) -> None:
        if self._closed:
            raise StorageError("the storage is closed")

    def _current(self) -> Head:
        self._open()
        if self._head is None:
            raise LedgerMissing("no ledger here: run init first")
        return self._head

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    async def init(self, origin: str, anchor: bytes, log_public_key: bytes) -> None:
        self._open()
        check_identity(origin, anchor, log_public_key)
        if self._meta is not None:
            raise LedgerExists("a ledger is already initialised here")
        self._meta = Meta(origin, anchor, log_public_key, int(_time.time()))
        self._head = EMPTY_HEAD

    async def meta(self) -> Meta:
        self._open()
        if self._meta is None:
            raise LedgerMissing("no ledger here: run init first")
        return self._meta

    async def head(self) -> Head:
        return self._current()

    async def append(
        self,
        expected: Head,
        records: Sequence[SignedRecord],
        new_root: bytes,
        checkpoint: str | None = None,
    ) -> Head:
        rows = prepare(expected, records, new_root, checkpoint)
        current = self._current()
        # One "transaction": nothing below awaits, and nothing touches self
        # until every step before "commit" has passed.
        self._step("begin")
        if current != expected:
            raise head_conflict(current, expected)
        staged = {r.seq: (r.raw, r.leaf_hash) for r in rows}
        if any(seq in self._records for seq in staged):
            raise StorageError("a record already exists beyond the head")
        self._step("insert")
        new_head = Head(expected.size + len(rows), new_root)
        self._step("head")
        self._records.update(staged)
        for r in rows:
            if r.grant is not None:
                self._names.setdefault(r.grant.name, []).append(r.seq)
                self._subjects.setdefault(r.grant.subject, []).append(r.seq)
            if r.revocation is not None:
                if r.revocation.target_seq is not None:
                    self._rev_seq.setdefault(r.revocation.target_seq, []).append(r.seq)
                if r.revocation.target_key is not None:
                    self._rev_key.setdefault(r.revocation.target_key, []).append(r.seq)
        self._head = new_head
        if checkpoint is not None:
            self._checkpoint = (new_head.size, checkpoint)
        self._step("commit")
        return new_head

    def _range(self, start: int, end: int) -> list[tuple[bytes, bytes]]:
        check_range(start, end)
        end = min(end, self._current().size)
        if start >= end:
            return []
        seqs = [s for s in range(start, end) if s in self._records]
        bad = missing_records(start, end, seqs)
        if bad is not None:
            raise bad
        return [self._records[s] for s in seqs]

    async def read(self, start: int, end: int) -> list[bytes]:
        return [raw for raw, _ in self._range(start, end)]

    async def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        return [lh for _, lh in self._range(start, end)]

    async def scan(self, batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        if type(batch) is not int or batch < 1:
            raise StorageError("batch must be a positive integer")
        self._open()
        seqs = sorted(self._records)
        for i in range(0, len(seqs), batch):
            self._open()
            yield [(s, *self._records[s]) for s in seqs[i : i + batch] if s in self._records]

    async def grants_named(self, name: str) -> list[int]:
        self._open()
        return sorted(self._names.get(name, ()))

    async def grants_of(self, subject: bytes) -> list[int]:
        self._open()
        return sorted(self._subjects.get(subject, ()))

    async def revocations_of(self, target_seq: int) -> list[int]:
        self._open()
        return sorted(self._rev_seq.get(target_seq, ()))

    async def revocations_of_key(self, key: bytes) -> list[int]:
        self._open()
        return sorted(self._rev_key.get(key, ()))

    async def put_receipt(
        self, device_grant_seq: int, size: int, root: bytes, time: int, raw: bytes, received_at: int
    ) -> None:
        await self.put_receipts([ReceiptRow(device_grant_seq, size, root, time, raw, received_at)])

    async def put_receipts(self, rows: Sequence[ReceiptRow]) -> None:
        for r in rows:
            check_receipt(r.device_grant_seq, r.size, r.root, r.time, r.raw, r.received_at)
        self._current()
        for r in rows:
            if receipt_is_newer(r.size, r.time, self._receipts.get(r.device_grant_seq)):
                self._receipts[r.device_grant_seq] = r

    async def receipts(self) -> list[ReceiptRow]:
        self._open()
        return [self._receipts[k] for k in sorted(self._receipts)]

    async def put_checkpoint(self, size: int, note: str) -> None:
        check_seq("size", size)
        if type(note) is not str:
            raise StorageError("a checkpoint note is text")
        check_checkpoint(size, self._current(), self._checkpoint[0] if self._checkpoint else None)
        self._checkpoint = (size, note)

    async def latest_checkpoint(self) -> str | None:
        self._open()
        return self._checkpoint[1] if self._checkpoint else None

    async def close(self) -> None:
        self._closed = True


def check_checkpoint(size: int, head: Head, previous: int | None) -> None:
    """A checkpoint is for a size the ledger has, and never for a smaller one than the last."""
    if size > head.size:
        raise StorageError(f"a checkpoint for size {size} but the ledger has {head.size} records")
    if previous is not None and size < previous:
        raise StorageError(f"a checkpoint for size {size} would go back from {previous}")


__all__ = [
    "EMPTY_HEAD",
    "FAULT_STEPS",
    "Fault",
    "GrantRow",
    "Head",
    "MemoryStorage",
    "Meta",
    "ReceiptRow",
    "RevocationRow",
    "Storage",
]
