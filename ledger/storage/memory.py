"""The in-memory twin of the SQLite backend: the same contract, the same fault
steps, the same shared checks (tests and throw-away demos)."""

from __future__ import annotations

import time as _time
from collections.abc import AsyncIterator, Sequence

from ..errors import LedgerExists, LedgerMissing, StorageError
from ..records import SignedRecord
from .checks import (
    check_batch,
    check_checkpoint,
    check_identity,
    check_note_args,
    check_range,
    check_receipt,
    head_conflict,
    missing_records,
    prepare,
    receipt_is_newer,
)
from .contract import EMPTY_HEAD, Fault, Head, Meta, ReceiptRow


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

    async def scan(self, batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        check_batch(batch)
        self._open()
        seqs = sorted(self._records)
        for i in range(0, len(seqs), batch):
            self._open()
            yield [(s, *self._records[s]) for s in seqs[i : i + batch] if s in self._records]

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
        check_note_args(size, note)
        check_checkpoint(size, self._current(), self._checkpoint[0] if self._checkpoint else None)
        self._checkpoint = (size, note)

    async def latest_checkpoint(self) -> str | None:
        self._open()
        return self._checkpoint[1] if self._checkpoint else None

    async def close(self) -> None:
        self._closed = True


__all__ = ["MemoryStorage"]
