"""Loading a stored ledger: a full audit before the first byte is served.

:func:`load_ledger` reads every record back, re-applies it with
:meth:`LedgerState.apply_stream <ledger.state.LedgerState.apply_stream>` (the
same rules as any device or auditor, signatures checked ahead in parallel, see
:mod:`ledger.verifier`), checks each stored leaf hash against the record's bytes, and checks
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
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

from ..errors import CorruptLedger, StorageError, WritError, WrongAnchor
from ..records import SignedRecord
from ..state import LedgerState
from ..tree import MerkleLevels
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
    await _stream(
        storage, state, levels, executor, batch, None if progress is None else (progress, head.size)
    )

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


class _Feed:
    """Scanned batches handed from the event loop to the thread running the rules.

    The loop reads ahead (at most two batches wait); the thread cuts them into
    runs of consecutive seqs and remembers each record's stored leaf hash. A
    gap in the seqs ends the stream after the records before it."""

    def __init__(self) -> None:
        self.q: queue.Queue[list[tuple[int, bytes, bytes]] | BaseException | None] = queue.Queue(maxsize=2)
        self.stopped = threading.Event()
        self.stored: deque[bytes] = deque()
        self.gap: CorruptLedger | None = None

    def put(self, item: list[tuple[int, bytes, bytes]] | BaseException | None) -> bool:
        """Hand over one item (blocking, in a worker thread); False once the reader stopped."""
        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _get(self) -> list[tuple[int, bytes, bytes]] | BaseException | None:
        while True:
            try:
                return self.q.get(timeout=0.05)
            except queue.Empty:
                if self.stopped.is_set():  # the load was abandoned (cancelled)
                    return StorageError("the load was abandoned")

    def runs(self, base: int) -> Iterator[list[bytes]]:
        pos = base
        while (item := self._get()) is not None:
            if isinstance(item, BaseException):
                raise item
            raws: list[bytes] = []
            for seq, raw, stored in item:
                if seq != pos:
                    cause = "missing-record" if seq > pos else "duplicate-record"
                    self.gap = CorruptLedger(
                        f"storage has no record {pos} (next is {seq})", seq=pos, cause=cause
                    )
                    break
                raws.append(raw)
                self.stored.append(stored)
                pos += 1
            if raws:
                yield raws
            if self.gap is not None:
                return


async def _stream(
    storage: Storage,
    state: LedgerState,
    levels: MerkleLevels,
    executor: Executor | None,
    batch: int,
    progress: tuple[Callable[[int, int], None], int] | None,
) -> None:
    """Apply every stored record in one pipeline (:meth:`LedgerState.apply_stream`,
    signatures checked ahead in parallel, across batch boundaries). The rules run
    in a worker thread, so a reload inside a serving process never stalls its
    event loop; the first thing wrong raises :class:`CorruptLedger`."""
    feed = _Feed()
    loop = asyncio.get_running_loop()

    async def read() -> None:
        try:
            async for rows in storage.scan(batch):
                if not await asyncio.to_thread(feed.put, rows):
                    return
        except BaseException as exc:  # handed to the reader, which raises it
            await asyncio.to_thread(feed.put, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            await asyncio.to_thread(feed.put, None)

    def check(rec: SignedRecord) -> None:
        if feed.stored.popleft() != rec.leaf_hash:  # computed once, by the rules
            raise CorruptLedger(
                f"the stored leaf hash of record {rec.seq} is not the hash of its bytes",
                seq=rec.seq,
                cause="leaf-hash-mismatch",
            )
        levels.append(rec.leaf_hash)

    def told(_n: int) -> None:
        if progress is not None:
            fn, total = progress
            loop.call_soon_threadsafe(fn, state.size, total)

    def run() -> None:
        try:
            state.apply_stream(feed.runs(state.size), executor=executor, on_record=check, on_span=told)
        finally:
            feed.stopped.set()

    reader = asyncio.ensure_future(read())
    try:
        await asyncio.to_thread(run)
    except (CorruptLedger, StorageError):
        raise
    except WritError as exc:
        raise CorruptLedger(
            f"stored record {state.size} does not verify: {exc.type}: {exc.message}",
            seq=state.size,
            cause=exc.type,
        ) from None
    finally:
        feed.stopped.set()
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
    if feed.gap is not None:
        raise feed.gap
