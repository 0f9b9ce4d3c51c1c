"""Loading a stored ledger: a full audit before the first byte is served.

:func:`load_ledger` reads every record back, re-applies it with
:meth:`LedgerState.apply_all <ledger.state.LedgerState.apply_all>` (the same
rules as any device or auditor, signatures checked in parallel on the
executor), checks each stored leaf hash against the record's bytes, and checks
that the stored head is the size and root those records make. Anything else is
:class:`~ledger.errors.CorruptLedger` naming the first bad seq and a cause:

- a rejection type of docs/protocol.md, "Validity rules" (``bad-signature``, ``stale-head``,
  ``not-canonical``, ...): the record at that seq does not verify;
- ``leaf-hash-mismatch``: the stored leaf hash is not SHA-256(0x00 || record);
- ``missing-record``: a seq below the head has no record (``duplicate-record``:
  a backend returned one twice);
- ``head-mismatch``: the head row disagrees with the records (more records
  than the head says, or another root);
- ``meta-mismatch``: the database belongs to another origin (another anchor is
  :class:`~ledger.errors.WrongAnchor`, a configuration mistake).

A corrupt ledger is never served silently. Nothing may append while a load
runs (the server loads before it listens).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from ..errors import CorruptLedger, WritError, WrongAnchor
from ..state import LedgerState
from ..tree import MerkleLevels, leaf_hash
from . import Head, Meta, Storage


@dataclass(frozen=True, slots=True, eq=False)
class Loaded:
    """A ledger read back and audited: its full state, its tree, its head."""

    meta: Meta
    state: LedgerState
    levels: MerkleLevels
    head: Head


async def load_ledger(
    storage: Storage,
    *,
    anchor: bytes,
    origin: str | None,
    executor: Executor | None = None,
    batch: int = 5000,
    progress: Callable[[int, int], None] | None = None,
) -> Loaded:
    """Read and re-verify every stored record; see the module docstring.

    ``origin`` None means the origin stored by ``init``; the genesis must
    match it either way. ``progress(verified, total)`` is called after each
    batch (the server logs it). Raises :class:`LedgerMissing` for an uninitialised
    storage and :class:`CorruptLedger` for anything that does not audit.
    """

    meta = await storage.meta()
    if meta.anchor != anchor:
        # the wrong anchor was given (or the wrong data directory): a configuration
        # mistake, named as the genesis check names it, not as tampering
        raise WrongAnchor(
            f"the stored ledger is anchored at {meta.anchor.hex()}, not at the anchor given {anchor.hex()}",
            seq=0,
            anchor=anchor.hex(),
            genesis_root=meta.anchor.hex(),
        )
    if origin is not None and meta.origin != origin:
        raise CorruptLedger(
            f"the stored ledger is {meta.origin!r}, not the configured {origin!r}", cause="meta-mismatch"
        )
    head = await storage.head()
    state = LedgerState(anchor, origin=meta.origin)
    levels = MerkleLevels()

    scan = storage.scan(batch).__aiter__()
    # the next batch is read while this one is verified (reading and verifying overlap)
    ahead: asyncio.Future[list[tuple[int, bytes, bytes]] | None] = asyncio.ensure_future(anext(scan, None))
    try:
        while (rows := await ahead) is not None:
            ahead = asyncio.ensure_future(anext(scan, None))
            await _load_batch(state, levels, rows, executor)
            if progress is not None:
                progress(state.size, head.size)
    finally:
        if not ahead.done():
            ahead.cancel()
            with contextlib.suppress(BaseException):
                await ahead

    if state.size < head.size:
        raise CorruptLedger(
            f"the head says {head.size} records but storage holds only {state.size}",
            seq=state.size,
            cause="missing-record",
        )
    if state.size > head.size:
        raise CorruptLedger(
            f"storage holds {state.size} records but the head says {head.size}",
            seq=head.size,
            cause="head-mismatch",
        )
    if state.root != head.root:
        raise CorruptLedger(
            f"the stored head root {head.root.hex()} is not the root {state.root.hex()} of the "
            f"{state.size} stored records",
            cause="head-mismatch",
        )
    return Loaded(meta, state, levels, head)


async def _load_batch(
    state: LedgerState,
    levels: MerkleLevels,
    rows: list[tuple[int, bytes, bytes]],
    executor: Executor | None,
) -> None:
    """Apply one scanned batch; the first thing wrong in it raises :class:`CorruptLedger`."""
    base = state.size
    raws: list[bytes] = []
    bad: CorruptLedger | None = None
    for i, (seq, raw, _) in enumerate(rows):
        pos = base + i
        if seq != pos:
            cause = "missing-record" if seq > pos else "duplicate-record"
            bad = CorruptLedger(f"storage has no record {pos} (next is {seq})", seq=pos, cause=cause)
            break
        raws.append(raw)

    def mismatch(upto: int, hashes: list[bytes]) -> CorruptLedger | None:
        """The first stored leaf hash (of the first ``upto`` rows) that is not its record's."""
        for i in range(upto):
            if rows[i][2] != hashes[i]:
                return CorruptLedger(
                    f"the stored leaf hash of record {base + i} is not the hash of its bytes",
                    seq=base + i,
                    cause="leaf-hash-mismatch",
                )
        return None

    try:
        # the in-order rules run in a worker thread: a reload inside a serving
        # process must not stall its event loop
        applied = await asyncio.to_thread(state.apply_all, raws, executor=executor)
    except WritError as exc:
        # records before the bad one stay applied: state.size is the bad position; a
        # damaged stored leaf hash before it is the earlier fault
        done = state.size - base
        earlier = mismatch(done, [leaf_hash(r) for r in raws[:done]])
        if earlier is not None:
            raise earlier from None
        raise CorruptLedger(
            f"stored record {state.size} does not verify: {exc.type}: {exc.message}",
            seq=state.size,
            cause=exc.type,
        ) from None
    hashes = [rec.leaf_hash for rec in applied]  # computed once, by the rules
    wrong = mismatch(len(applied), hashes)
    if wrong is not None:
        raise wrong
    levels.extend(hashes)
    if bad is not None:
        raise bad


__all__ = ["Loaded", "load_ledger"]
