"""The storage contract: what the server needs from durable storage, and nothing more.

The server is the only writer. It verifies records with
:class:`~ledger.state.LedgerState` first, then hands them to
:meth:`Storage.append`, which stores them all or nothing behind a
compare-and-swap on the head (size, root). Storage does not re-verify
signatures on append; it does refuse a batch whose seqs are not exactly the
next ones (defence in depth). Verification happens again, in full, on every
start: :func:`ledger.storage.load.load_ledger` re-applies every stored record
and refuses to serve a ledger that does not audit clean.

Every method here has a production caller (the server's writer, its start-up
load, the receipts flush, the auditor's ``--data`` source); the records are
the only truth, so there are no secondary indexes to keep in step with them.

Backends with the same semantics: :class:`ledger.storage.memory.MemoryStorage`
(tests, throw-away demos) and :class:`ledger.storage.sqlite.SqliteStorage`.
Both accept a ``fault`` hook for crash tests: it is called with the name of
each step of :meth:`Storage.append` (:data:`FAULT_STEPS`). Raising at
``"begin"``, ``"insert"`` or ``"head"`` leaves nothing persisted; raising at
``"commit"`` happens after the commit, so the data is persisted but the
caller sees an error. Either way the storage stays usable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..records import EMPTY_HASH, SignedRecord

#: the steps of :meth:`Storage.append` at which the fault hook is called, in order.
FAULT_STEPS: tuple[str, ...] = ("begin", "insert", "head", "commit")

#: a crash-test hook: called with a step name, may raise.
Fault = Callable[[str], None]


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
    """The latest receipt of one device (docs/protocol.md, "Receipts", ``POST /v1/receipts``)."""

    device_grant_seq: int
    size: int
    root: bytes
    time: int
    raw: bytes
    received_at: int


@dataclass(frozen=True, slots=True)
class PreparedRecord:
    """A record as the backends store it: its seq, bytes and leaf hash."""

    seq: int
    raw: bytes
    leaf_hash: bytes


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

    def scan(self, batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        """Every stored record as (seq, raw, stored leaf hash), in seq order, in batches."""
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


__all__ = ["EMPTY_HEAD", "FAULT_STEPS", "Fault", "Head", "Meta", "PreparedRecord", "ReceiptRow", "Storage"]
