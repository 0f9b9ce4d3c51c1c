"""The rules every storage backend shares: argument checks, the compare-and-swap
conflict, the missing-record check, which receipt to keep, and :func:`prepare`,
which turns an append's arguments into the rows to store.

A failed check here is a caller's bug (the records were verified before they
reached storage), raised as :class:`~ledger.errors.StorageError`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CorruptLedger, HeadConflict, StorageError
from ..records import SignedRecord, check_key, check_origin
from ..tree import leaf_hash
from .contract import Head, PreparedRecord, ReceiptRow

HASH_SIZE = 32
_U64 = 1 << 64
#: seqs and sizes are below 2**63 (SQLite integers are signed 64-bit).
MAX_SEQ = (1 << 63) - 1


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


def check_note_args(size: object, note: object) -> None:
    """``put_checkpoint``'s arguments: a size and the note's text."""
    check_seq("size", size)
    if type(note) is not str:
        raise StorageError("a checkpoint note is text")


def check_batch(batch: object) -> int:
    """``scan``'s batch size: a positive integer."""
    if type(batch) is not int or batch < 1:
        raise StorageError("batch must be a positive integer")
    return batch


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
        out.append(PreparedRecord(want, rec.raw, lh))
    return out


def check_checkpoint(size: int, head: Head, previous: int | None) -> None:
    """A checkpoint is for a size the ledger has, and never for a smaller one than the last."""
    if size > head.size:
        raise StorageError(f"a checkpoint for size {size} but the ledger has {head.size} records")
    if previous is not None and size < previous:
        raise StorageError(f"a checkpoint for size {size} would go back from {previous}")
