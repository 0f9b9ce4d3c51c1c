"""The ledger as the server holds it: the single writer, the tree, the checkpoints.

:class:`LedgerService` owns, for the lifetime of the app, the storage, the
verified :class:`~ledger.state.LedgerState`, the :class:`~ledger.tree.MerkleLevels`
node store, the log signer and the published checkpoint.

Appends (group commit). ``submit`` queues a request's records; one writer task
takes every request waiting (up to :data:`GROUP_RECORDS` records), and under
the writer lock:

1. in a worker thread (a few one-record requests: on the event loop, see
   ``_verified``), copies the live state and applies each request's
   records to the copy in order, each request against the state after the
   previous ones; a one-record request is applied in place (``apply`` checks
   every rule before it mutates), a batch on a copy of the copy, so a batch
   is all or nothing and a request that fails alone gets its own error; in
   the same call, signs the checkpoint of the result (``_note_for`` checks it
   on the event loop before it is used);
2. stores the records of every request that passed and that checkpoint in
   *one* storage append (compare-and-swap on the head, fsynced);
3. only then swaps the copy in as the live state, extends the tree, serves
   and publishes the new checkpoint, answers the requests, and then wakes
   the SSE streams.

Pipelining: while group k's storage append (and its fsync) runs, the writer
takes group k+1 and verifies it (as in step 1) against a private copy
of group k's *unpublished* result (speculation). Group k+1 is used as verified
only if that result did become the live state (group k committed); when group
k's append fails, the state is reloaded and group k+1 is verified again from
scratch against it. Speculation changes nothing anyone can see: the copy is
private, and nothing of group k+1 is stored or answered before group k is.

The live state therefore never gets ahead of storage, and readers (which run
on the event loop) never see a state that a worker thread is changing. When
the storage append fails, the state is reloaded from storage (a full audit)
and the requests get ``503 storage-error`` (``409 stale-head`` when another
writer moved the head): nothing half-applied.

Checkpoints are dated and signed by :mod:`api.checkpoint_signer` (a timestamp
never goes back nor ahead of the clock; while the clock is behind, appends are
taken and the last note is served unchanged), re-signed at least every
``checkpoint_interval`` seconds. Records are served through
:mod:`api.record_cache`, receipts verified and stored by :mod:`api.receipts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ledger import checkpoints
from ledger.crypto import Signer
from ledger.errors import (
    HeadConflict,
    HttpProblem,
    StaleHead,
    StorageError,
    WritError,
)
from ledger.records import SignedRecord
from ledger.state import LedgerState
from ledger.storage import Head, ReceiptRow, Storage, receipt_is_newer
from ledger.storage.load import Loaded, load_ledger
from ledger.tree import MerkleLevels, leaf_hash

from .broadcast import Broadcaster, CheckpointEvent
from .checkpoint_signer import CheckpointSigner, stored_checkpoint
from .config import Identity, ServerConfig
from .fleet_report import FleetIndex
from .metrics import Metrics
from .problems import Problem
from .receipts import ReceiptWriter, verify_receipt
from .record_cache import RecordCache

if TYPE_CHECKING:
    from .witnessing import Witnessing

log = logging.getLogger("writ.api")

#: the most records committed in one storage transaction (several requests).
GROUP_RECORDS = 5000
#: the most requests committed together.
GROUP_REQUESTS = 256
#: up to this many one-record requests are verified on the event loop (the loop
#: waits at most about 1.3 ms); more, or any batch, in the writer thread.
INLINE_REQUESTS = 16


#: seconds after a commit by which the streams are woken even if no reply flushed them.
NOTIFY_BACKSTOP = 0.05


@dataclass(frozen=True, slots=True)
class AppendResult:
    size: int
    root: bytes
    appended: int
    first_seq: int

    def to_json(self) -> dict[str, object]:
        return {
            "size": self.size,
            "root": self.root.hex(),
            "appended": self.appended,
            "first_seq": self.first_seq,
        }


@dataclass(eq=False)
class _Pending:
    records: list[bytes]
    future: asyncio.Future[AppendResult]
    outcome: list[SignedRecord] | WritError | None = None
    first_seq: int = 0
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Ahead:
    """A group verified speculatively: against ``base``, the result of the
    group before it, which was not yet committed when the verification ran."""

    group: list[_Pending]
    base: LedgerState
    work: LedgerState | None  # None: the speculation failed; verify again
    event: CheckpointEvent | None = None  # the note of ``work``'s head, signed with it


class LedgerService:
    def __init__(
        self,
        *,
        config: ServerConfig,
        ident: Identity,
        storage: Storage,
        signer: Signer,
        loaded: Loaded,
        clock: Callable[[], float],
        metrics: Metrics,
        sig_pool: ThreadPoolExecutor,
        ts_floor: int,
    ) -> None:
        self.config = config
        self.ident = ident
        self.origin = ident.origin
        self.anchor = ident.anchor
        self.storage = storage
        self.signer = signer
        self.clock = clock
        self.metrics = metrics
        self.sig_pool = sig_pool
        self.writer_pool = ThreadPoolExecutor(1, thread_name_prefix="writ-writer")
        self.state: LedgerState = loaded.state
        self.levels: MerkleLevels = loaded.levels
        self.log_vkey, self.cosig_vkey = checkpoints.checkpoint_vkeys(self.origin, signer.public_key)
        self._lock = asyncio.Lock()
        self._queue: list[_Pending] = []
        self._ahead: _Ahead | None = None  # the next group, verified while the current one stores
        self._verifying: asyncio.Future[None] | None = None  # the task verifying it
        self._wake = asyncio.Event()
        self._closing = False
        self._broken: str | None = None
        self._pending_event: CheckpointEvent | None = None
        self.receipt_writer = ReceiptWriter(storage)  # api/receipts.py
        self.cp_signer = CheckpointSigner(self.origin, signer, clock, ts_floor)  # api/checkpoint_signer.py
        self.record_cache = RecordCache(storage)  # api/record_cache.py
        self.receipts: dict[int, ReceiptRow] = {}
        self.fleet = FleetIndex()  # the fleet report's running counts (api/fleet_report.py)
        self.checkpoint: CheckpointEvent = CheckpointEvent(0, b"", 0, "")
        self._published_mono = 0.0
        self.broadcaster: Broadcaster | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # (witness) set by create_app for `writ serve --witness URL`: api/witnessing.py
        self.witnessing: Witnessing | None = None

    # -- life cycle ----------------------------------------------------------

    @classmethod
    async def start(
        cls,
        *,
        config: ServerConfig,
        ident: Identity,
        storage: Storage,
        signer: Signer,
        clock: Callable[[], float],
        metrics: Metrics,
        progress: Callable[[int, int], None] | None = None,
    ) -> LedgerService:
        if signer.public_key != ident.log_public_key:
            raise StorageError("the log key file does not match the log public key in server.json")
        meta = await storage.meta()
        if meta.log_public_key != ident.log_public_key:
            raise StorageError("the ledger database was initialised with another log key")
        sig_pool = ThreadPoolExecutor(2, thread_name_prefix="writ-verify")
        try:
            loaded = await load_ledger(
                storage, anchor=ident.anchor, origin=ident.origin, executor=sig_pool, progress=progress
            )
            note = await storage.latest_checkpoint()
            stored = stored_checkpoint(note, ident.origin, ident.log_public_key) if note else None
            if stored is not None and (
                stored.size > loaded.levels.size or loaded.levels.root(stored.size) != stored.root
            ):
                raise StorageError("the stored checkpoint does not name a head of the stored ledger")
            floor = stored.timestamp if stored is not None else 0
            self = cls(
                config=config,
                ident=ident,
                storage=storage,
                signer=signer,
                loaded=loaded,
                clock=clock,
                metrics=metrics,
                sig_pool=sig_pool,
                ts_floor=floor,
            )
            if stored is not None:
                self.checkpoint = stored  # served until a new one can be signed
            await self.record_cache.reset(self.levels.size)
            for row in await storage.receipts():
                self.receipts[row.device_grant_seq] = row
            first = await self._publish(notify=False)
            self.broadcaster = Broadcaster(first)
        except BaseException:
            sig_pool.shutdown(wait=False, cancel_futures=True)
            raise
        metrics.tree_size.set(self.levels.size)
        metrics.bind_checkpoint_age(lambda: max(0.0, self.clock() - self.checkpoint.timestamp))
        self._tasks = [
            asyncio.create_task(self._writer_loop(), name="writ-writer"),
            asyncio.create_task(self._ticker(), name="writ-checkpoints"),
        ]
        return self

    def begin_shutdown(self) -> None:
        """Stop taking appends and end the event streams; appends already queued still commit."""
        self._closing = True
        if self.broadcaster is not None:
            self.broadcaster.close()

    async def close(self) -> None:
        self.begin_shutdown()
        # finish the appends in flight (uvicorn already waited for the requests)
        for _ in range(300):
            if not (self._queue or self._ahead or self._verifying or self._lock.locked()):
                break
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._fail_ahead(Problem(HttpProblem.SHUTTING_DOWN, 503, "the server is shutting down"))
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(Problem(HttpProblem.SHUTTING_DOWN, 503, "the server is shutting down"))
        self._queue.clear()
        self.writer_pool.shutdown(wait=True)
        self.sig_pool.shutdown(wait=True)
        await self.storage.close()

    @property
    def size(self) -> int:
        return self.levels.size

    @property
    def root(self) -> bytes:
        return self.state.root

    # -- appends -------------------------------------------------------------

    async def submit(self, raws: list[bytes]) -> AppendResult:
        """Append ``raws`` (already decoded from the request) all or nothing; wait for the commit."""
        if self._closing:
            raise Problem(
                HttpProblem.SHUTTING_DOWN, 503, "the server is shutting down", headers={"Retry-After": "5"}
            )
        if self._broken is not None:
            raise StorageError(f"the ledger cannot take appends: {self._broken}")
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(raws, fut))
        self._wake.set()
        # a waiter that gives up (timeout) cancels ``fut`` but not the append: the
        # writer still commits the records and answers no one (it skips done futures)
        return await fut

    async def _writer_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or self._ahead is not None or self._verifying is not None:
                try:
                    if self._verifying is not None:  # the next group's verification, started ahead
                        verifying, self._verifying = self._verifying, None
                        await verifying
                except asyncio.CancelledError:
                    self._fail_ahead(Problem(HttpProblem.SHUTTING_DOWN, 503, "the server is shutting down"))
                    raise
                group = self._ahead.group if self._ahead is not None else self._take_group()
                if not group:
                    continue
                try:
                    async with self._lock:
                        await self._commit_group(group)
                except asyncio.CancelledError:
                    shutting = Problem(HttpProblem.SHUTTING_DOWN, 503, "the server is shutting down")
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(shutting)
                    if self._verifying is not None:
                        self._verifying.cancel()
                    self._fail_ahead(shutting)
                    raise
                except Exception as exc:  # a bug: answer 500 rather than leave requests hanging
                    log.exception("append group failed")
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    if self._ahead is not None and self._ahead.group is group:
                        self._ahead = None

    def _take_group(self, requests: int = GROUP_REQUESTS, n: int = 0) -> list[_Pending]:
        """The next requests of the queue, up to ``requests`` requests and
        :data:`GROUP_RECORDS` records (``n`` of which are already taken)."""
        group: list[_Pending] = []
        while self._queue and len(group) < requests:
            k = len(self._queue[0].records)
            if (group or n) and n + k > GROUP_RECORDS:
                break
            group.append(self._queue.pop(0))
            n += k
        return group

    def _fail_ahead(self, exc: Exception) -> None:
        """Answer the requests of the speculatively verified group with ``exc``."""
        ahead, self._ahead = self._ahead, None
        for p in ahead.group if ahead is not None else ():
            if not p.future.done():
                p.future.set_exception(exc)

    def _verify_group(
        self, base: LedgerState, group: list[_Pending], now: int, *, in_place: bool = False
    ) -> LedgerState:
        """Worker thread: apply each request to a private copy of the state
        (``in_place``: ``base`` is private already); every request's
        ``outcome`` and ``first_seq`` are set afresh."""
        work = base if in_place else base.copy()
        for p in group:
            first = work.size
            try:
                if len(p.records) == 1:
                    p.outcome = [work.apply(p.records[0], now=now)]
                else:
                    trial = work.copy()
                    index = [0]

                    def count(_: SignedRecord, index: list[int] = index) -> None:
                        index[0] += 1

                    try:
                        p.outcome = trial.apply_all(
                            p.records, executor=self.sig_pool, now=now, on_record=count, chunk=128
                        )
                    except WritError as exc:
                        exc.detail.setdefault("index", index[0])
                        raise
                    work = trial
                p.first_seq = first
            except WritError as exc:
                p.outcome = exc
        return work

    def _verify_and_sign(
        self, base: LedgerState, group: list[_Pending], now: int, *, in_place: bool = False
    ) -> tuple[LedgerState, CheckpointEvent | None]:
        """:meth:`_verify_group`, then the checkpoint of the result signed when the
        group has records to store: in the same call, so in the writer thread
        it is off the event loop too (see ``_verified``). The note is used only
        if it still names the head being stored and is not dated before the
        last durable note (``_note_for``)."""
        work = self._verify_group(base, group, now, in_place=in_place)
        stores = any(isinstance(p.outcome, list) for p in group)
        return work, self.cp_signer.sign(work.size, work.root) if stores else None

    async def _verified(
        self, base: LedgerState, group: list[_Pending], now: int, *, in_place: bool = False
    ) -> tuple[LedgerState, CheckpointEvent | None]:
        """:meth:`_verify_and_sign`, in the writer thread; a few one-record requests
        (:data:`INLINE_REQUESTS`) right here on the event loop instead: about 80 µs
        a record (the Ed25519 check lets go of the GIL), less than the hop to the
        thread and back costs once three threads contend for the GIL."""
        if len(group) <= INLINE_REQUESTS and all(len(p.records) == 1 for p in group):
            return self._verify_and_sign(base, group, now, in_place=in_place)
        return await asyncio.get_running_loop().run_in_executor(
            self.writer_pool, functools.partial(self._verify_and_sign, base, group, now, in_place=in_place)
        )

    def _note_for(self, work: LedgerState, event: CheckpointEvent | None) -> CheckpointEvent | None:
        """``event`` if it is a checkpoint of ``work`` dated no earlier than the last
        durable one, else a checkpoint signed now (None: the clock is behind)."""
        if (
            event is not None
            and (event.size, event.root) == (work.size, work.root)
            and event.timestamp >= self.cp_signer.floor
        ):
            return event
        return self.cp_signer.sign(work.size, work.root)

    async def _verify_ahead(self, base: LedgerState, store: asyncio.Future[Head]) -> None:
        """While ``store`` (the current group's append) runs: take the requests
        that arrive and verify them, as the next group, against ``base`` (the
        current group's result, not committed yet), on a private copy."""
        while not store.done() and not self._closing:
            ahead = self._ahead
            n = sum(len(p.records) for p in ahead.group) if ahead is not None else 0
            room = GROUP_REQUESTS - (len(ahead.group) if ahead is not None else 0)
            more = self._take_group(room, n) if room > 0 else []
            if not more:
                if room <= 0 or n >= GROUP_RECORDS:
                    return  # the next group is full
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((store, waiter), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                self._wake.clear()
                continue
            if ahead is None:
                ahead = self._ahead = _Ahead([], base, None)
                on, in_place = base, False
            elif ahead.work is not None:
                on, in_place = ahead.work, True  # the private result of the requests taken before
            else:  # verifying ahead failed before: the group is verified when its turn comes
                ahead.group += more
                continue
            ahead.group += more
            try:
                ahead.work, ahead.event = await self._verified(on, more, int(self.clock()), in_place=in_place)
            except Exception:  # a bug; the group is verified again, the normal way, when its turn comes
                log.exception("verifying the next group ahead failed")
                ahead.work = None

    async def _commit_group(self, group: list[_Pending]) -> None:
        base = self.state
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.group is group and ahead.base is base and ahead.work is not None:
            work, signed = ahead.work, ahead.event  # verified ahead against what is now the committed state
        else:  # nothing ahead, or verified against a result that was never committed: from scratch
            work, signed = await self._verified(base, group, int(self.clock()))
        accepted = [p for p in group if isinstance(p.outcome, list)]
        rejected = [(p, p.outcome) for p in group if isinstance(p.outcome, WritError)]
        batch = [rec for p in accepted if isinstance(p.outcome, list) for rec in p.outcome]
        if not batch:
            self._answer_rejected(rejected)
            return
        event = self._note_for(work, signed)
        note = event.note if event is not None else None  # None: the clock is behind the last note
        store = asyncio.ensure_future(self.storage.append(Head(base.size, base.root), batch, work.root, note))
        # the requests that arrive while the append runs are verified meanwhile, in a task
        # of their own: this group's replies never wait for the next group's verification
        self._verifying = asyncio.ensure_future(self._verify_ahead(work, store))
        try:
            await store
        except Exception as exc:
            await self._recover(accepted, exc)
            self._answer_rejected(rejected)
            return
        self.state = work
        self.levels.extend(rec.leaf_hash for rec in batch)
        self.record_cache.add([rec.raw for rec in batch])
        self.metrics.appends.inc(len(batch))
        self.metrics.append_requests.inc(len(accepted))
        self.metrics.group_size.observe(len(accepted))
        self.metrics.tree_size.set(self.levels.size)
        if event is not None:
            event = self._signed(event)  # persisted with the records, in the same transaction
        now_m = time.monotonic()
        for p in accepted:
            n = len(p.records)
            self.metrics.append_latency.observe(now_m - p.enqueued)
            if not p.future.done():
                p.future.set_result(AppendResult(self.levels.size, self.state.root, n, p.first_seq))
        self._answer_rejected(rejected)
        # The event streams are woken after the replies have gone out, so 20,000
        # streams never delay an acknowledgement: the replies' tasks were woken
        # (set_result) before this callback is queued, and each sends its reply
        # in the step it is woken in; a timer is the backstop.
        if event is not None:
            self._pending_event = event
            loop = asyncio.get_running_loop()
            loop.call_soon(self.flush_notify)
            loop.call_later(NOTIFY_BACKSTOP, self.flush_notify)

    def _answer_rejected(self, rejected: list[tuple[_Pending, WritError]]) -> None:
        """Refused requests learn the head as it is after the group's commit (or its failure)."""
        for p, exc in rejected:
            if isinstance(exc, StaleHead):
                exc.detail.update(size=self.levels.size, root=self.state.root.hex())
            if not p.future.done():
                p.future.set_exception(exc)

    async def _recover(self, accepted: Sequence[_Pending], exc: Exception) -> None:
        """The storage append failed: reload what storage really holds, answer 503 (or 409)."""
        log.error(
            "storage append failed (%s: %s); reloading the ledger from storage", type(exc).__name__, exc
        )
        try:
            await self._reload()
        except Exception as reload_exc:
            self._broken = f"reload after a storage failure failed: {type(reload_exc).__name__}"
            log.exception("reload after a storage failure failed; refusing appends")
        for p in accepted:
            if p.future.done():
                continue
            if self._broken is None and self._stored(p):
                # the failure came after the commit (fail-but-persist): the
                # records are durable, so the client is told they are.
                p.future.set_result(
                    AppendResult(self.levels.size, self.state.root, len(p.records), p.first_seq)
                )
                continue
            if isinstance(exc, HeadConflict):
                p.future.set_exception(
                    HeadConflict(
                        "another writer moved the head", size=self.levels.size, root=self.state.root.hex()
                    )
                )
            else:
                p.future.set_exception(StorageError("the append could not be stored; nothing was appended"))

    def _stored(self, p: _Pending) -> bool:
        """Does the (reloaded) ledger hold ``p``'s records at their seqs?"""
        end = p.first_seq + len(p.records)
        if not p.records or end > self.levels.size:
            return False
        return all(self.levels.leaf(p.first_seq + i) == leaf_hash(raw) for i, raw in enumerate(p.records))

    async def _reload(self) -> None:
        loaded = await load_ledger(
            self.storage, anchor=self.anchor, origin=self.origin, executor=self.sig_pool
        )
        grew = loaded.levels.size != self.levels.size
        self.state = loaded.state
        self.levels = loaded.levels
        self.record_cache.clear()
        await self.record_cache.reset(self.levels.size)
        self.metrics.tree_size.set(self.levels.size)
        if grew:
            await self._publish()

    # -- records -------------------------------------------------------------

    async def read_records(self, start: int, end: int) -> list[bytes]:
        """Record bytes of seqs ``start .. end-1`` (``end`` clamped to the size), verbatim."""
        return await self.record_cache.read(start, min(end, self.levels.size))

    # -- checkpoints ---------------------------------------------------------

    def _signed(self, event: CheckpointEvent) -> CheckpointEvent:
        """``event`` is durable: serve it from now on (returns what is served)."""
        if self.witnessing is not None:  # (witness) submit it; serve it with the cosignatures held
            event = self.witnessing.on_signed(event)
        self.cp_signer.advance(event.timestamp)
        self.metrics.checkpoints.inc()
        self.checkpoint = event
        self._published_mono = time.monotonic()
        return event

    async def _publish(self, *, notify: bool = True) -> CheckpointEvent:
        """Sign, persist and serve a checkpoint of the current head; wake the event streams.
        While the clock is behind the last timestamp, the served checkpoint stays as it is."""
        event = self.cp_signer.sign(self.levels.size, self.state.root)
        if event is None:
            return self.checkpoint
        try:
            await self.storage.put_checkpoint(event.size, event.note)
        except Exception as exc:  # the records are durable; the note is re-signed and re-persisted later
            log.warning(
                "could not persist the checkpoint of size %d: %s: %s", event.size, type(exc).__name__, exc
            )
        event = self._signed(event)
        if notify:
            self._notify(event)
        return event

    def _notify(self, event: CheckpointEvent) -> None:
        self._pending_event = None
        if self.broadcaster is not None:
            self.broadcaster.publish(event)

    def serve_cosigned(self, event: CheckpointEvent) -> None:
        """(witness) Serve ``event``, the current checkpoint with more witness
        cosignatures, and send it to the event streams."""
        self.checkpoint = event
        self._notify(event)

    def flush_notify(self) -> None:
        """Wake the event streams for a commit whose replies were sent."""
        event = self._pending_event
        if event is not None:
            self._notify(event)

    async def _ticker(self) -> None:
        interval = self.config.checkpoint_interval
        while True:
            wait = self._published_mono + interval - time.monotonic()
            behind = self.cp_signer.clock_behind()
            if behind > 0:  # try again once the clock should have passed the last timestamp
                wait = min(interval, behind + 0.01)
            await asyncio.sleep(max(0.01, wait))
            unsigned = self.checkpoint.size != self.levels.size
            if unsigned or time.monotonic() - self._published_mono >= interval * 0.99:
                try:
                    async with self._lock:
                        await self._publish()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("re-signing the checkpoint failed")

    # -- receipts ------------------------------------------------------------

    async def accept_receipt(self, raw: bytes) -> dict[str, object]:
        r = await verify_receipt(raw, self.state, lambda: self.levels, self.sig_pool)
        row = ReceiptRow(r.device_grant_seq, r.size, r.root, r.time, raw, int(self.clock()))
        await self.receipt_writer.store(row)
        if receipt_is_newer(r.size, r.time, self.receipts.get(r.device_grant_seq)):
            self.receipts[r.device_grant_seq] = row
            self.fleet.receipt(row)
        self.metrics.receipts.inc()
        return {"accepted": True, "device_grant_seq": r.device_grant_seq, "size": r.size}
