"""Device receipts: verified against the ledger, then stored durably before
the reply, group-committed.

:func:`verify_receipt` checks a receipt (an unrevoked device grant, its key's
signature, a head of this ledger). :class:`ReceiptWriter` stores it: receipts
that arrive while a storage transaction is running share the next one (one
fsync for a whole fleet's burst instead of one each); the flush runs in a task
of its own, so a request cancelled while it waits can never strand the others.
:meth:`api.service.LedgerService.accept_receipt` runs both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

from ledger import crypto, messages, records
from ledger.errors import BadSignature, StorageError, UnknownDevice, UnknownHead
from ledger.state import LedgerState
from ledger.storage import ReceiptRow, Storage
from ledger.tree import MerkleLevels

__all__ = ["ReceiptWriter", "verify_receipt"]


async def verify_receipt(
    raw: bytes, state: LedgerState, levels: Callable[[], MerkleLevels], pool: Executor
) -> messages.Receipt:
    """The receipt ``raw`` of an unrevoked device grant of ``state``, signed by
    its key (checked in ``pool``), naming a head of ``levels()`` (the tree as it
    is once the signature is checked)."""
    r = messages.parse_receipt(raw)
    g = state.grants.get(r.device_grant_seq)
    if g is None or g.role != records.ROLE_DEVICE or state.is_withdrawn(g.seq):
        raise UnknownDevice(f"seq {r.device_grant_seq} is not an unrevoked device grant")
    loop = asyncio.get_running_loop()
    ok = await loop.run_in_executor(pool, crypto.check, g.subject, crypto.RECEIPT_DOMAIN, r.body, r.signature)
    if not ok:
        raise BadSignature("the receipt is not signed by the device's granted key")
    tree = levels()
    if r.size > tree.size or tree.root(r.size) != r.root:
        raise UnknownHead(f"({r.size}, {r.root.hex()[:16]}…) is not a head of this ledger")
    return r


class ReceiptWriter:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._batch: list[ReceiptRow] = []
        self._done: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def store(self, row: ReceiptRow) -> None:
        """Return once ``row`` is durable (raises what storing it raised)."""
        self._batch.append(row)
        fut = self._done
        if fut is None:
            fut = self._done = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._flush(fut), name="writ-receipts")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(fut)

    async def _flush(self, fut: asyncio.Future[None]) -> None:
        try:
            async with self._lock:
                batch, self._batch = self._batch, []
                if self._done is fut:
                    self._done = None
                await self.storage.put_receipts(batch)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else StorageError("receipts not stored"))
                fut.exception()  # its waiters may all be gone: never "exception was never retrieved"
            if not isinstance(exc, Exception):
                raise
        else:
            fut.set_result(None)
        finally:
            if self._done is fut:  # cancelled before it took the batch
                self._done = None
