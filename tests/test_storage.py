"""ledger/storage: one suite run against both backends (litetlog's testAllStorage style).

Every test that takes the ``backend`` or ``store`` fixture runs twice, on
:class:`MemoryStorage` and on :class:`SqliteStorage` in ``tmp_path``, so the
in-memory twin is held to exactly the semantics of the real thing. The
records are real: the protocol vectors' ledger, continued with grants and
revokes signed here and verified with :class:`LedgerState` like the server
would before it appends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import records
from ledger.crypto import SeedSigner, sha256
from ledger.errors import (
    CorruptLedger,
    HeadConflict,
    InvalidField,
    LedgerExists,
    LedgerMissing,
    StorageError,
    WrongAnchor,
)
from ledger.records import Grant, Reason, Revoke, SignedRecord
from ledger.state import LedgerState
from ledger.storage import EMPTY_HEAD, FAULT_STEPS, Fault, Head, MemoryStorage, ReceiptRow, Storage
from ledger.storage.load import load_ledger
from ledger.storage.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteStorage, schema_sql
from ledger.tree import MerkleLevels, leaf_hash
from tests.helpers.vectors_data import ledger_vectors

V = ledger_vectors()
SIGNERS = {V.public(name): V.signer(name) for name in V.raw["keys"]}
LOG_KEY = V.public("log")
REPO = Path(__file__).resolve().parent.parent

AnyStorage = MemoryStorage | SqliteStorage


# --- records: the writer's verified view ------------------------------------------


class _Records:
    """Records and the state they lead to (the fields of :class:`Batch` and :class:`Chain`)."""

    state: LedgerState
    records: list[SignedRecord]

    @property
    def head(self) -> Head:
        return Head(self.state.size, self.state.root)

    @property
    def raws(self) -> list[bytes]:
        return [r.raw for r in self.records]


@dataclass
class Batch(_Records):
    """Records verified against ``expected`` and the state they lead to."""

    expected: Head
    records: list[SignedRecord]
    state: LedgerState

    @property
    def new_root(self) -> bytes:
        return self.state.root


@dataclass
class Chain(_Records):
    """What the server knows: the state of every acknowledged record."""

    state: LedgerState = field(default_factory=lambda: LedgerState(V.anchor, origin=V.origin))
    records: list[SignedRecord] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def vectors(self) -> Batch:
        """The ten records of ledger-v1.json (only onto an empty ledger)."""
        st_ = self.state.copy()
        return Batch(self.head, [st_.apply(raw) for raw in V.records], st_)

    def random_key(self) -> bytes:
        return SeedSigner(self.rng.randbytes(32)).public_key

    def grants(
        self,
        n: int,
        *,
        name: str | None = None,
        subject: bytes | None = None,
        role: str = "device",
        not_after: int = 0,
    ) -> Batch:
        """``n`` grants to random keys (or ``subject``), signed by the root in force."""
        st_ = self.state.copy()
        out = []
        for _ in range(n):
            assert st_.root_key is not None
            body = Grant(
                seq=st_.size,
                prev=st_.root,
                time=st_.last_time,
                subject=subject or self.random_key(),
                role=role,
                scope="",
                name=name or f"g-{st_.size}",
                not_before=0,
                not_after=not_after,
            )
            out.append(st_.apply(records.sign(body, SIGNERS[st_.root_key])))
        return Batch(self.head, out, st_)

    def revoke(self, target: int | bytes, reason: int = int(Reason.LOST)) -> Batch:
        st_ = self.state.copy()
        assert st_.root_key is not None
        body = Revoke(seq=st_.size, prev=st_.root, time=st_.last_time, signer=0, target=target, reason=reason)
        return Batch(self.head, [st_.apply(records.sign(body, SIGNERS[st_.root_key]))], st_)

    def commit(self, batch: Batch) -> None:
        assert batch.expected == self.head
        self.state = batch.state
        self.records += batch.records


async def push(store: Storage, chain: Chain, batch: Batch) -> Head:
    head = await store.append(batch.expected, batch.records, batch.new_root)
    assert head == batch.head
    chain.commit(batch)
    return head


# --- the backends ---------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    path: Path
    opened: list[AnyStorage] = field(default_factory=list)

    async def open(self, *, init: bool = True, fault: Fault | None = None) -> AnyStorage:
        s: AnyStorage
        if self.kind == "memory":
            s = MemoryStorage(fault=fault)
        else:
            s = await SqliteStorage.open(self.path, create=True, fault=fault)
        self.opened.append(s)
        if init:
            await s.init(V.origin, V.anchor, LOG_KEY)
        return s

    async def reopen(self, s: AnyStorage) -> AnyStorage:
        """Sqlite: close and open the file again (what a restart sees). Memory: the same object."""
        if isinstance(s, MemoryStorage):
            s.fault = None
            return s
        await s.close()
        new = await SqliteStorage.open(self.path)
        self.opened.append(new)
        return new

    async def _sql(self, s: AnyStorage, sql: str, params: tuple[object, ...] = ()) -> AnyStorage:
        """Run ``sql`` on the closed file behind the server's back, then reopen it."""
        assert isinstance(s, SqliteStorage)
        await s.close()
        con = sqlite3.connect(self.path)
        try:
            con.execute(sql, params)
            con.commit()
        finally:
            con.close()
        new = await SqliteStorage.open(self.path)
        self.opened.append(new)
        return new

    async def tamper(
        self, s: AnyStorage, seq: int, *, raw: bytes | None = None, lh: bytes | None = None
    ) -> AnyStorage:
        if isinstance(s, MemoryStorage):
            old_raw, old_lh = s._records[seq]
            s._records[seq] = (raw if raw is not None else old_raw, lh if lh is not None else old_lh)
            return s
        if raw is not None:
            s = await self._sql(s, "UPDATE records SET raw = ? WHERE seq = ?", (raw, seq))
        if lh is not None:
            s = await self._sql(s, "UPDATE records SET leaf_hash = ? WHERE seq = ?", (lh, seq))
        return s

    async def delete(self, s: AnyStorage, seq: int) -> AnyStorage:
        if isinstance(s, MemoryStorage):
            del s._records[seq]
            return s
        return await self._sql(s, "DELETE FROM records WHERE seq = ?", (seq,))

    async def set_head(self, s: AnyStorage, head: Head) -> AnyStorage:
        if isinstance(s, MemoryStorage):
            s._head = head
            return s
        return await self._sql(s, "UPDATE head SET size = ?, root = ? WHERE id = 0", (head.size, head.root))


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path / "ledger.db")
    yield b
    for s in b.opened:
        await s.close()


@pytest.fixture
async def store(backend: Backend) -> AnyStorage:
    return await backend.open()


async def loaded_chain(store: Storage, grants: int = 20) -> Chain:
    """The vectors' ledger plus ``grants`` grants, appended in a few batches."""
    chain = Chain()
    await push(store, chain, chain.vectors())
    left = grants
    while left:
        n = min(left, 7)
        await push(store, chain, chain.grants(n))
        left -= n
    return chain


async def assert_stored(store: Storage, chain: Chain) -> None:
    """Storage holds exactly the chain: head, bytes, leaf hashes, and it audits clean."""
    assert await store.head() == chain.head
    assert await store.read(0, 1 << 40) == chain.raws
    assert [h for batch in [b async for b in store.scan()] for _, _, h in batch] == [
        leaf_hash(r) for r in chain.raws
    ]
    loaded = await load_ledger(store, anchor=V.anchor, origin=V.origin)
    assert loaded.head == chain.head
    assert loaded.state.root == chain.state.root and loaded.state.size == chain.state.size
    assert loaded.levels.size == chain.state.size and loaded.levels.root() == chain.state.root


async def stored_grants(store: Storage, name: str) -> list[int]:
    """Seqs of the stored grants named ``name``, read back from the records themselves."""
    out = []
    for seq, raw in enumerate(await store.read(0, 1 << 40)):
        env = records.parse(raw)
        if env.kind == records.Kind.GRANT and env.extra[3] == name:
            out.append(seq)
    return out


# --- identity ---------------------------------------------------------------------


async def test_both_backends_satisfy_the_protocol(store: AnyStorage) -> None:
    assert isinstance(store, Storage)


async def test_new_ledger(backend: Backend, store: AnyStorage) -> None:
    meta = await store.meta()
    assert (meta.origin, meta.anchor, meta.log_public_key) == (V.origin, V.anchor, LOG_KEY)
    assert meta.created_at > 1_700_000_000
    assert await store.head() == EMPTY_HEAD == Head(0, sha256(b""))
    assert await store.read(0, 10) == []
    assert [b async for b in store.scan()] == []
    assert await store.latest_checkpoint() is None
    assert await store.receipts() == []
    store = await backend.reopen(store)
    assert await store.meta() == meta
    loaded = await load_ledger(store, anchor=V.anchor, origin=None)
    assert loaded.head == EMPTY_HEAD and loaded.state.size == 0 and loaded.levels.size == 0


async def test_init_twice_is_ledger_exists(backend: Backend, store: AnyStorage) -> None:
    meta = await store.meta()
    with pytest.raises(LedgerExists):
        await store.init("other.example/x", V.anchor, LOG_KEY)
    store = await backend.reopen(store)
    with pytest.raises(LedgerExists):
        await store.init(V.origin, V.anchor, LOG_KEY)
    assert await store.meta() == meta


@pytest.mark.parametrize(
    ("origin", "anchor", "log_key"),
    [
        ("has space.example", V.anchor, LOG_KEY),
        ("plus+sign.example", V.anchor, LOG_KEY),
        ("", V.anchor, LOG_KEY),
        (V.origin, V.anchor[:31], LOG_KEY),
        (V.origin, V.anchor, LOG_KEY + b"\x00"),
    ],
    ids=["origin-with-space", "origin-with-plus", "empty-origin", "short-anchor", "long-log-key"],
)
async def test_init_refuses_a_bad_identity(
    backend: Backend, origin: str, anchor: bytes, log_key: bytes
) -> None:
    store = await backend.open(init=False)
    with pytest.raises(InvalidField):
        await store.init(origin, anchor, log_key)
    with pytest.raises(LedgerMissing):
        await store.meta()


async def test_uninitialised_is_ledger_missing(backend: Backend) -> None:
    store = await backend.open(init=False)
    chain = Chain()
    batch = chain.vectors()
    for call in (
        store.meta(),
        store.head(),
        store.append(EMPTY_HEAD, batch.records, batch.new_root),
        store.read(0, 1),
        store.put_checkpoint(0, "x"),
        store.put_receipts([ReceiptRow(3, 1, b"\x00" * 32, 1, b"r", 1)]),
    ):
        with pytest.raises(LedgerMissing):
            await call
    with pytest.raises(LedgerMissing):
        await load_ledger(store, anchor=V.anchor, origin=V.origin)


async def test_closed_storage_refuses_with_storage_error(store: AnyStorage) -> None:
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StorageError):
        await store.head()
    with pytest.raises(StorageError):
        await store.read(0, 1)


# --- append and read ----------------------------------------------------------------


async def test_append_read_round_trip_verbatim(backend: Backend, store: AnyStorage) -> None:
    chain = Chain()
    assert await push(store, chain, chain.vectors()) == Head(10, bytes.fromhex(V.raw["final"]["root"]))
    for n in (1, 2, 13, 50, 1):
        await push(store, chain, chain.grants(n))
    raws = chain.raws
    assert len(raws) == 77
    await assert_stored(store, chain)
    # ranges: end is clamped, an empty or out-of-range start is empty
    assert await store.read(3, 7) == raws[3:7]
    assert await store.read(70, 1000) == raws[70:]
    assert await store.read(77, 80) == []
    assert await store.read(9, 9) == []
    assert await store.read(12, 3) == []
    # scan: every record in order, in batches of the asked size
    batches = [b async for b in store.scan(batch=10)]
    assert [len(b) for b in batches] == [10] * 7 + [7]
    assert [row for b in batches for row in b] == [(i, r, leaf_hash(r)) for i, r in enumerate(raws)]
    # and all of it survives a restart
    store = await backend.reopen(store)
    await assert_stored(store, chain)


async def test_negative_range_is_refused(store: AnyStorage) -> None:
    with pytest.raises(StorageError):
        await store.read(-1, 3)
    with pytest.raises(StorageError):
        await store.read(0, -3)
    with pytest.raises(StorageError):
        async for _ in store.scan(batch=0):
            pass


STALE_HEADS = ["empty-head", "older-head", "right-size-wrong-root", "fork-at-the-same-size", "future-head"]


@pytest.mark.parametrize("case", STALE_HEADS)
async def test_stale_expected_head_is_head_conflict_and_writes_nothing(store: AnyStorage, case: str) -> None:
    chain = await loaded_chain(store, grants=5)
    before = await store.head()
    fresh = chain.grants(3, name="fresh")
    expected: Head
    recs: list[SignedRecord]
    match case:
        case "empty-head":  # the whole vector ledger again, for an empty head
            batch = Chain().vectors()
            expected, recs = batch.expected, batch.records
        case "older-head":  # a replay of records already stored, for the head they were made for
            expected, recs = Head(10, bytes.fromhex(V.raw["final"]["root"])), chain.records[10:13]
        case "right-size-wrong-root":
            expected, recs = Head(before.size, b"\x01" * 32), fresh.records
        case "fork-at-the-same-size":  # a head this ledger never had, of the same size
            fork = Chain(state=fresh.state.copy())
            expected, recs = Head(before.size, fork.grants(1).new_root), fresh.records
        case _:  # a head from the future: records made on top of an append that never happened
            later = Chain(state=fresh.state.copy(), records=chain.records + fresh.records).grants(2)
            expected, recs = later.expected, later.records
    with pytest.raises(HeadConflict) as info:
        await store.append(expected, recs, fresh.new_root)
    assert info.value.type == "stale-head"
    assert info.value.detail == {"size": before.size, "root": before.root.hex()}
    await assert_stored(store, chain)
    assert await stored_grants(store, "fresh") == []
    await push(store, chain, fresh)


async def test_concurrent_appends_for_one_head_exactly_one_wins(backend: Backend, store: AnyStorage) -> None:
    chain = await loaded_chain(store, grants=3)
    a = chain.grants(5, name="team-a")
    b = chain.grants(8, name="team-b")
    assert a.expected == b.expected
    results = await asyncio.gather(
        store.append(a.expected, a.records, a.new_root),
        store.append(b.expected, b.records, b.new_root),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, Head)]
    losses = [r for r in results if isinstance(r, HeadConflict)]
    assert len(wins) == 1 and len(losses) == 1, results
    winner = a if results[0] == a.head else b
    assert wins[0] == winner.head
    chain.commit(winner)
    await assert_stored(store, chain)
    loser_name = "team-b" if winner is a else "team-a"
    assert await stored_grants(store, loser_name) == []
    assert len(await stored_grants(store, "team-a" if winner is a else "team-b")) == len(winner.records)
    store = await backend.reopen(store)
    await assert_stored(store, chain)


async def test_many_concurrent_writers_serialise(store: AnyStorage) -> None:
    """Writers that retry on HeadConflict all get in, one after another."""
    chain = await loaded_chain(store, grants=0)
    lock = asyncio.Lock()

    async def writer(i: int) -> None:
        while True:
            async with lock:  # building a batch reads the chain; appending races
                batch = chain.grants(2, name=f"writer-{i}")
            try:
                await store.append(batch.expected, batch.records, batch.new_root)
            except HeadConflict:
                await asyncio.sleep(0)
                continue
            async with lock:
                chain.commit(batch)
            return

    await asyncio.gather(*(writer(i) for i in range(6)))
    await assert_stored(store, chain)
    for i in range(6):
        assert len(await stored_grants(store, f"writer-{i}")) == 2


def _reordered(b: Batch) -> list[SignedRecord]:
    r = list(b.records)
    r[0], r[1] = r[1], r[0]
    return r


# name, builds (expected, records, new_root) from the chain and a valid 3-record batch
REFUSED_BATCHES: list[tuple[str, Callable[[Chain, Batch], tuple[Head, list[SignedRecord], bytes]]]] = [
    ("seq-gap", lambda c, b: (b.expected, b.records[1:], b.new_root)),
    ("seq-hole-inside", lambda c, b: (b.expected, [b.records[0], b.records[2]], b.new_root)),
    ("reordered", lambda c, b: (b.expected, _reordered(b), b.new_root)),
    ("duplicated-record", lambda c, b: (b.expected, [b.records[0], b.records[0]], b.new_root)),
    ("replay-of-stored-seqs", lambda c, b: (b.expected, c.records[-3:], b.new_root)),
    ("empty-batch", lambda c, b: (b.expected, [], b.new_root)),
    (
        "leaf-hash-not-of-bytes",
        lambda c, b: (
            b.expected,
            [replace(b.records[0], leaf_hash=b"\x00" * 32), *b.records[1:]],
            b.new_root,
        ),
    ),
    ("short-new-root", lambda c, b: (b.expected, b.records, b.new_root[:31])),
    ("negative-head", lambda c, b: (Head(-1, b.expected.root), b.records, b.new_root)),
]


@pytest.mark.parametrize("make", [m for _, m in REFUSED_BATCHES], ids=[n for n, _ in REFUSED_BATCHES])
async def test_malformed_batch_is_refused_and_writes_nothing(
    store: AnyStorage, make: Callable[[Chain, Batch], tuple[Head, list[SignedRecord], bytes]]
) -> None:
    chain = await loaded_chain(store, grants=4)
    batch = chain.grants(3)
    expected, recs, new_root = make(chain, batch)
    with pytest.raises(StorageError) as info:
        await store.append(expected, recs, new_root)
    assert not isinstance(info.value, HeadConflict)
    await assert_stored(store, chain)
    await push(store, chain, batch)  # and the good batch still goes in


async def test_uint64_edges_survive_storage(backend: Backend, store: AnyStorage) -> None:
    """Protocol integers are uint64; SQLite's are signed: the extreme values round-trip."""
    chain = await loaded_chain(store, grants=0)
    top = (1 << 64) - 1
    g = chain.grants(1, name="forever", not_after=top)
    await push(store, chain, g)
    seq = g.records[0].seq
    await push(store, chain, chain.revoke(seq, reason=top))
    await store.put_receipts([ReceiptRow(3, chain.state.size, chain.state.root, top, b"receipt", top)])
    store = await backend.reopen(store)
    assert await stored_grants(store, "forever") == [seq]
    [row] = await store.receipts()
    assert (row.time, row.received_at) == (top, top)
    await assert_stored(store, chain)


# --- receipts and checkpoints --------------------------------------------------------


async def test_receipts_keep_the_latest_per_device(backend: Backend, store: AnyStorage) -> None:
    root = b"\x11" * 32
    steps = [
        # (device, size, time) offered, then the (size, time) kept for that device
        ((3, 5, 100), (5, 100)),
        ((3, 4, 200), (5, 100)),  # smaller size, even if later: ignored
        ((3, 5, 90), (5, 100)),  # equal size, earlier: ignored
        ((3, 5, 100), (5, 100)),  # equal size, same time: the first stays
        ((3, 5, 150), (5, 150)),  # equal size, later: kept
        ((3, 7, 10), (7, 10)),  # larger size, even if "earlier": kept
        ((4, 1, 1), (1, 1)),  # another device
    ]
    for i, ((dev, size, time), kept) in enumerate(steps):
        await store.put_receipts([ReceiptRow(dev, size, root, time, f"raw-{i}".encode(), 1_000 + i)])
        rows = {r.device_grant_seq: r for r in await store.receipts()}
        assert (rows[dev].size, rows[dev].time) == kept, steps[i]
    store = await backend.reopen(store)
    assert await store.receipts() == [
        ReceiptRow(3, 7, root, 10, b"raw-5", 1_005),
        ReceiptRow(4, 1, root, 1, b"raw-6", 1_006),
    ]


async def test_receipts_in_one_batch_keep_the_latest_per_device(backend: Backend, store: AnyStorage) -> None:
    """put_receipts (one transaction) keeps the same rows as one put_receipt after another."""
    root = b"\x22" * 32
    await store.put_receipts([ReceiptRow(3, 6, root, 50, b"old", 1)])
    await store.put_receipts(
        [
            ReceiptRow(3, 5, root, 100, b"smaller", 2),  # smaller than stored: ignored
            ReceiptRow(4, 2, root, 10, b"a", 3),
            ReceiptRow(4, 2, root, 20, b"b", 4),  # same batch, later: kept
            ReceiptRow(4, 1, root, 30, b"c", 5),  # same batch, smaller: ignored
            ReceiptRow(5, 9, root, 1, b"d", 6),
        ]
    )
    store = await backend.reopen(store)
    assert [(r.device_grant_seq, r.raw) for r in await store.receipts()] == [
        (3, b"old"),
        (4, b"b"),
        (5, b"d"),
    ]


async def test_receipt_arguments_are_checked(store: AnyStorage) -> None:
    with pytest.raises(StorageError):
        await store.put_receipts([ReceiptRow(3, 1, b"short", 1, b"r", 1)])
    with pytest.raises(StorageError):
        await store.put_receipts([ReceiptRow(-3, 1, b"\x00" * 32, 1, b"r", 1)])
    assert await store.receipts() == []


async def test_checkpoint_is_persisted_and_never_goes_back(backend: Backend, store: AnyStorage) -> None:
    assert await store.latest_checkpoint() is None
    await store.put_checkpoint(0, "empty\n")
    chain = await loaded_chain(store, grants=2)
    await store.put_checkpoint(10, "note at 10\n")
    await store.put_checkpoint(12, "note at 12\n")
    await store.put_checkpoint(12, "note at 12, re-signed\n")
    assert await store.latest_checkpoint() == "note at 12, re-signed\n"
    with pytest.raises(StorageError):
        await store.put_checkpoint(11, "back in time\n")
    with pytest.raises(StorageError):
        await store.put_checkpoint(chain.state.size + 1, "beyond the ledger\n")
    store = await backend.reopen(store)
    assert await store.latest_checkpoint() == "note at 12, re-signed\n"


async def test_checkpoint_appended_with_the_records_in_one_transaction(
    backend: Backend, store: AnyStorage
) -> None:
    chain = await loaded_chain(store, grants=2)
    batch = chain.grants(3)
    await store.append(batch.expected, batch.records, batch.new_root, "note of the new head\n")
    chain.commit(batch)
    assert await store.latest_checkpoint() == "note of the new head\n"
    # a failed append leaves the old note: the two are written together or not at all
    failing = chain.grants(2)
    store.fault = crash_at("head")
    with pytest.raises(InjectedCrash):
        await store.append(failing.expected, failing.records, failing.new_root, "never stored\n")
    store.fault = None
    store = await backend.reopen(store)
    assert await store.latest_checkpoint() == "note of the new head\n"
    assert (await store.head()) == chain.head


# --- crash injection ------------------------------------------------------------------


class InjectedCrash(Exception):
    pass


def crash_at(step: str) -> Fault:
    seen: list[str] = []

    def hook(name: str) -> None:
        seen.append(name)
        if name == step:
            raise InjectedCrash(name)

    return hook


@pytest.mark.parametrize("n", [1, 50], ids=["single", "batch-of-50"])
@pytest.mark.parametrize("step", FAULT_STEPS)
async def test_crash_at_each_step(backend: Backend, step: str, n: int) -> None:
    store = await backend.open()
    chain = await loaded_chain(store, grants=5)
    acknowledged = list(chain.raws)
    batch = chain.grants(n, name="faulted")
    store.fault = crash_at(step)
    with pytest.raises(InjectedCrash):
        await store.append(batch.expected, batch.records, batch.new_root)
    store.fault = None
    persisted = step == "commit"  # fail-but-persist; every earlier step: fail-and-not-persist
    # the same connection, before any restart, already shows all or nothing
    assert await store.head() == (batch.head if persisted else batch.expected)
    assert len(await store.read(0, 1 << 40)) == (batch.head if persisted else batch.expected).size
    assert len(await stored_grants(store, "faulted")) == (n if persisted else 0)
    store = await backend.reopen(store)

    if persisted:
        chain.commit(batch)
    await assert_stored(store, chain)  # audits clean, wholly present or wholly absent
    assert (await store.read(0, len(acknowledged))) == acknowledged
    assert await stored_grants(store, "faulted") == ([r.seq for r in batch.records] if persisted else [])
    # the storage is usable: the next append with the right head works
    await push(store, chain, chain.grants(3))
    store = await backend.reopen(store)
    await assert_stored(store, chain)


async def test_append_queued_behind_an_unfinished_one_runs_after_it(backend: Backend) -> None:
    """The server queues the next group's append before the current one has
    committed: appends run in call order, each against what the one before left."""
    store = await backend.open()
    chain = await loaded_chain(store, grants=2)
    first = chain.grants(3)
    then = Chain(state=first.state.copy(), rng=chain.rng).grants(2)
    assert then.expected == first.head
    stale = chain.grants(1)  # built on the head both of them move on from
    tasks = [
        asyncio.ensure_future(store.append(b.expected, b.records, b.new_root)) for b in (first, then, stale)
    ]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[:2] == [first.head, then.head]
    assert isinstance(done[2], HeadConflict)
    chain.commit(first)
    chain.commit(then)
    store = await backend.reopen(store)
    await assert_stored(store, chain)


async def test_cancelled_append_is_all_or_nothing(backend: Backend) -> None:
    """A writer cancelled at any await of an append leaves the batch wholly in or
    wholly out (which one: read the head), and the storage usable."""
    store = await backend.open()
    chain = await loaded_chain(store, grants=0)
    outcomes = set()
    for ticks in range(0, 40, 2):
        batch = chain.grants(4, name=f"cancel-{ticks}")
        task = asyncio.create_task(store.append(batch.expected, batch.records, batch.new_root))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
            outcomes.add("done")
        except asyncio.CancelledError:
            outcomes.add("cancelled")
        head = await store.head()
        assert head in (batch.expected, batch.head)
        if head == batch.head:
            chain.commit(batch)
        assert await store.read(0, 1 << 40) == chain.raws
        assert (
            await stored_grants(store, f"cancel-{ticks}")
            == [r.seq for r in batch.records][: 4 * (head == batch.head)]
        )
    await push(store, chain, chain.grants(1))
    store = await backend.reopen(store)
    await assert_stored(store, chain)
    assert "cancelled" in outcomes


async def test_fault_hook_sees_every_step_in_order(backend: Backend) -> None:
    seen: list[str] = []
    store = await backend.open(fault=seen.append)
    chain = Chain()
    await push(store, chain, chain.vectors())
    assert seen == list(FAULT_STEPS)


# --- corruption -----------------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def _prev_offset(raw: bytes) -> int:
    return raw.index(records.parse(raw).prev)


@dataclass(frozen=True)
class Corruption:
    name: str
    seq: int | None  # the first bad seq load must name
    cause: str


CORRUPTIONS = [
    Corruption("flipped-signature-byte", 12, "bad-signature"),
    Corruption("flipped-genesis-signature", 0, "bad-signature"),
    Corruption("flipped-revoker-revoke-signature", 6, "bad-signature"),
    Corruption("flipped-prev-byte", 12, "stale-head"),
    Corruption("record-swapped-for-the-next", 12, "stale-head"),
    Corruption("leaf-hash-column-damaged", 12, "leaf-hash-mismatch"),
    Corruption("record-row-deleted", 12, "missing-record"),
    Corruption("last-record-row-deleted", 19, "missing-record"),
    Corruption("head-size-too-small", 19, "head-mismatch"),
    Corruption("head-size-too-large", 20, "missing-record"),
    Corruption("head-root-wrong", None, "head-mismatch"),
]


@pytest.mark.parametrize("batch", [5000, 4, 7])
@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c.name for c in CORRUPTIONS])
async def test_corruption_is_never_served(backend: Backend, case: Corruption, batch: int) -> None:
    """Whatever the read batches (the first bad seq on a batch boundary or inside one)."""
    store = await backend.open()
    chain = await loaded_chain(store, grants=10)
    assert chain.state.size == 20
    raws = chain.raws
    s: AnyStorage = store
    match case.name:
        case "flipped-signature-byte" | "flipped-genesis-signature" | "flipped-revoker-revoke-signature":
            assert case.seq is not None
            s = await backend.tamper(s, case.seq, raw=_flip(raws[case.seq], len(raws[case.seq]) - 1))
        case "flipped-prev-byte":
            s = await backend.tamper(s, 12, raw=_flip(raws[12], _prev_offset(raws[12]) + 5))
        case "record-swapped-for-the-next":
            s = await backend.tamper(s, 12, raw=raws[13], lh=leaf_hash(raws[13]))
        case "leaf-hash-column-damaged":
            s = await backend.tamper(s, 12, lh=_flip(leaf_hash(raws[12]), 0))
        case "record-row-deleted":
            s = await backend.delete(s, 12)
        case "last-record-row-deleted":
            s = await backend.delete(s, 19)
        case "head-size-too-small":
            s = await backend.set_head(s, Head(19, MerkleLevels(leaf_hash(r) for r in raws[:19]).root()))
        case "head-size-too-large":
            s = await backend.set_head(s, Head(21, chain.state.root))
        case "head-root-wrong":
            s = await backend.set_head(s, Head(20, _flip(chain.state.root, 31)))
    with pytest.raises(CorruptLedger) as info:
        await load_ledger(s, anchor=V.anchor, origin=V.origin, batch=batch)
    assert info.value.seq == case.seq
    assert info.value.cause == case.cause
    assert info.value.type == "corrupt-ledger"


async def test_read_over_a_missing_row_is_corrupt_ledger(backend: Backend) -> None:
    store = await backend.open()
    await loaded_chain(store, grants=5)
    s = await backend.delete(store, 4)
    assert len(await s.read(0, 4)) == 4
    for call in (s.read(0, 15), s.read(4, 5), s.read(2, 9)):
        with pytest.raises(CorruptLedger) as info:
            await call
        assert (info.value.seq, info.value.cause) == (4, "missing-record")


async def test_a_cancelled_load_leaves_no_thread_behind(store: AnyStorage) -> None:
    """A server stopped while it loads: the rules thread waiting for the next batch
    gives up instead of blocking the process's exit."""
    await loaded_chain(store, grants=30)
    real_scan = store.scan

    async def slow_scan(batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        async for rows in real_scan(batch):
            yield rows
            await asyncio.sleep(30)

    store.scan = slow_scan  # type: ignore[method-assign]
    task = asyncio.ensure_future(load_ledger(store, anchor=V.anchor, origin=V.origin, batch=8))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # every worker thread (the rules thread included) finishes
    await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 5)


async def test_load_refuses_another_ledgers_storage(store: AnyStorage) -> None:
    await loaded_chain(store, grants=1)
    with pytest.raises(WrongAnchor) as wrong:
        await load_ledger(store, anchor=V.public("root_next"), origin=V.origin)
    assert wrong.value.detail["genesis_root"] == V.anchor.hex()
    with pytest.raises(CorruptLedger) as info:
        await load_ledger(store, anchor=V.anchor, origin="other.example/ledger")
    assert info.value.cause == "meta-mismatch"


async def test_load_in_parallel_gives_the_full_state(backend: Backend, store: AnyStorage) -> None:
    """Enough records for apply_all to fan signature checks out to the executor."""
    chain = await loaded_chain(store, grants=0)
    for _ in range(3):
        await push(store, chain, chain.grants(200))
    with ThreadPoolExecutor(2) as pool:
        loaded = await load_ledger(store, anchor=V.anchor, origin=V.origin, executor=pool, batch=256)
    assert loaded.head == chain.head
    assert loaded.state.counts == chain.state.counts
    assert loaded.state.grants == chain.state.grants
    assert loaded.state.revoked_keys == chain.state.revoked_keys
    assert loaded.levels.root(10) == bytes.fromhex(V.raw["final"]["root"])
    assert loaded.levels.inclusion_proof(5, 600) == chain_levels(chain).inclusion_proof(5, 600)


def chain_levels(chain: Chain) -> MerkleLevels:
    return MerkleLevels(r.leaf_hash for r in chain.records)


# --- sqlite specifics -------------------------------------------------------------------


async def test_sqlite_connection_is_durable(tmp_path: Path) -> None:
    s = await SqliteStorage.open(tmp_path / "l.db", create=True)
    try:
        p = await s.pragmas()
        assert p["journal_mode"] == "wal"
        assert p["synchronous"] == 2  # FULL
        assert p["foreign_keys"] == 1
        assert p["busy_timeout"] > 0
        assert p["user_version"] == SCHEMA_VERSION
        assert p["application_id"] == APPLICATION_ID
    finally:
        await s.close()


def test_schema_is_package_data_with_every_table() -> None:
    sql = schema_sql()
    for table in ("meta", "records", "head", "receipts", "checkpoint"):
        assert f"CREATE TABLE IF NOT EXISTS {table} " in sql
    assert "grants" not in sql.split("--")[-1] and "CREATE INDEX" not in sql
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(sql)
        indexes = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")]
        assert [n for n in indexes if not n.startswith("sqlite_")] == []  # no secondary index to keep
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("INSERT INTO head (id, size, root) VALUES (1, 0, ?)", (b"\x00" * 32,))
    finally:
        con.close()


async def test_sqlite_refuses_an_unknown_future_schema(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    s = await SqliteStorage.open(path, create=True)
    await s.init(V.origin, V.anchor, LOG_KEY)
    await s.close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    for create in (False, True):
        with pytest.raises(StorageError) as info:
            await SqliteStorage.open(path, create=create)
        assert "newer" in info.value.message
        assert info.value.detail["schema_version"] == SCHEMA_VERSION + 1
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # left untouched
    con.close()


async def test_sqlite_refuses_what_is_not_a_writ_ledger(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("PRAGMA application_id = 42")
    con.execute("PRAGMA user_version = 1")
    con.close()
    for path in (other, garbage, foreign):
        for create in (False, True):
            with pytest.raises(StorageError) as info:
                await SqliteStorage.open(path, create=create)
            assert not isinstance(info.value, LedgerMissing)


async def test_sqlite_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(LedgerMissing):
        await SqliteStorage.open(tmp_path / "nothing.db")
    assert not (tmp_path / "nothing.db").exists()
    (tmp_path / "empty.db").touch()
    with pytest.raises(LedgerMissing):
        await SqliteStorage.open(tmp_path / "empty.db")


_KILLED = 77
_CHILD = """
import asyncio, json, os, sys
from ledger import records
from ledger.storage import Head
from ledger.storage.sqlite import SqliteStorage

args = json.load(sys.stdin)

def hook(step):
    if step == args["step"]:
        os._exit(KILLED)  # the process dies here: no rollback, no close

async def main():
    s = await SqliteStorage.open(args["path"], fault=hook)
    recs = [records.decode_unverified(bytes.fromhex(r)) for r in args["records"]]
    await s.append(Head(args["size"], bytes.fromhex(args["root"])), recs, bytes.fromhex(args["new_root"]))

asyncio.run(main())
""".replace("KILLED", str(_KILLED))


@pytest.mark.parametrize("step", FAULT_STEPS)
async def test_sqlite_process_killed_at_each_step(tmp_path: Path, step: str) -> None:
    """A real crash: the writing process exits mid-append, SQLite recovers on open."""
    path = tmp_path / "killed.db"
    s = await SqliteStorage.open(path, create=True)
    await s.init(V.origin, V.anchor, LOG_KEY)
    chain = await loaded_chain(s, grants=5)
    await s.close()
    batch = chain.grants(50, name="in-flight")
    args = {
        "path": str(path),
        "step": step,
        "records": [r.hex() for r in batch.raws],
        "size": batch.expected.size,
        "root": batch.expected.root.hex(),
        "new_root": batch.new_root.hex(),
    }
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _CHILD],
        input=json.dumps(args).encode(),
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == _KILLED, proc.stderr.decode()
    if step == "commit":
        chain.commit(batch)
    s = await SqliteStorage.open(path)
    try:
        await assert_stored(s, chain)
        await push(s, chain, chain.grants(2))
        await assert_stored(s, chain)
    finally:
        await s.close()


# --- a property: any split into batches, any range ----------------------------------------


_PROPERTY_CHAIN: list[Chain] = []


def _property_records() -> list[SignedRecord]:
    if not _PROPERTY_CHAIN:
        c = Chain()
        c.commit(c.vectors())
        c.commit(c.grants(30))
        _PROPERTY_CHAIN.append(c)
    return _PROPERTY_CHAIN[0].records


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 39), max_size=8, unique=True),
    ranges=st.lists(st.tuples(st.integers(0, 45), st.integers(0, 45)), min_size=1, max_size=6),
)
def test_any_batching_reads_back_the_same(cuts: list[int], ranges: list[tuple[int, int]]) -> None:
    recs = _property_records()
    bounds = [0, *sorted(cuts), len(recs)]
    # the states at each cut, from a fresh replay, give each batch's expected head and new root
    levels = MerkleLevels(r.leaf_hash for r in recs)

    async def run(store: AnyStorage) -> None:
        await store.init(V.origin, V.anchor, LOG_KEY)
        for lo, hi in itertools.pairwise(bounds):
            head = await store.append(Head(lo, levels.root(lo)), recs[lo:hi], levels.root(hi))
            assert head == Head(hi, levels.root(hi))
        raws = [r.raw for r in recs]
        for start, end in ranges:
            assert await store.read(start, end) == raws[start:end]
        loaded = await load_ledger(store, anchor=V.anchor, origin=V.origin)
        assert loaded.head == Head(len(recs), levels.root())
        await store.close()

    asyncio.run(run(MemoryStorage()))
    with tempfile.TemporaryDirectory() as d:

        async def sqlite_run() -> None:
            await run(await SqliteStorage.open(Path(d) / "p.db", create=True))

        asyncio.run(sqlite_run())


# --- schema v1 -> v2 and read-only opens -------------------------------------------------

_V1_INDEX_TABLES = """
CREATE TABLE grants (seq INTEGER PRIMARY KEY REFERENCES records (seq), subject BLOB NOT NULL,
    role TEXT NOT NULL, scope TEXT NOT NULL, name TEXT NOT NULL, not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL, time INTEGER NOT NULL);
CREATE INDEX grants_by_name ON grants (name);
CREATE INDEX grants_by_subject ON grants (subject);
CREATE TABLE revocations (seq INTEGER PRIMARY KEY REFERENCES records (seq), target_seq INTEGER,
    target_key BLOB, reason INTEGER NOT NULL, signer INTEGER NOT NULL, time INTEGER NOT NULL);
CREATE INDEX revocations_by_target_seq ON revocations (target_seq);
CREATE INDEX revocations_by_target_key ON revocations (target_key);
PRAGMA user_version = 1;
"""


async def _as_v1_file(tmp_path: Path) -> tuple[Path, Chain]:
    """A ledger file as version 1 of the schema left it (with its index tables)."""
    path = tmp_path / "v1.db"
    s = await SqliteStorage.open(path, create=True)
    await s.init(V.origin, V.anchor, LOG_KEY)
    chain = await loaded_chain(s, grants=12)
    await s.close()
    con = sqlite3.connect(path)
    con.executescript(_V1_INDEX_TABLES)
    con.close()
    return path, chain


async def test_a_v1_file_is_migrated_in_place_and_keeps_every_record(tmp_path: Path) -> None:
    path, chain = await _as_v1_file(tmp_path)
    s = await SqliteStorage.open(path)
    try:
        assert (await s.pragmas())["user_version"] == SCHEMA_VERSION == 2
        await assert_stored(s, chain)
        await push(s, chain, chain.grants(2))  # and appends go on
    finally:
        await s.close()
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert "grants" not in tables and "revocations" not in tables


async def test_read_only_open_reads_a_v1_file_without_changing_it(tmp_path: Path) -> None:
    path, chain = await _as_v1_file(tmp_path)
    before = path.read_bytes()
    s = await SqliteStorage.open(path, read_only=True)
    try:
        await assert_stored(s, chain)
    finally:
        await s.close()
    assert path.read_bytes() == before


async def test_read_only_open_creates_no_side_files_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    s = await SqliteStorage.open(path, create=True)
    await s.init(V.origin, V.anchor, LOG_KEY)
    chain = await loaded_chain(s, grants=3)
    await s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.db"]  # a clean close leaves no WAL
    tmp_path.chmod(0o555)  # a read-only directory (root ignores it: the side-file check below holds anyway)
    try:
        ro = await SqliteStorage.open(path, read_only=True)
        try:
            await assert_stored(ro, chain)
            batch = chain.grants(1)
            for call in (
                ro.append(batch.expected, batch.records, batch.new_root),
                ro.put_checkpoint(0, "x"),
                ro.put_receipts([ReceiptRow(3, 1, b"\x00" * 32, 1, b"r", 1)]),
            ):
                with pytest.raises(StorageError):
                    await call
        finally:
            await ro.close()
    finally:
        tmp_path.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.db"]
    with pytest.raises(StorageError):
        await SqliteStorage.open(path, create=True, read_only=True)


async def test_read_only_open_sees_a_running_writers_latest_commit(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    writer = await SqliteStorage.open(path, create=True)
    try:
        await writer.init(V.origin, V.anchor, LOG_KEY)
        chain = await loaded_chain(writer, grants=3)
        ro = await SqliteStorage.open(path, read_only=True)
        try:
            await assert_stored(ro, chain)
            await push(writer, chain, chain.grants(4))  # committed in the writer's WAL
            await assert_stored(ro, chain)
        finally:
            await ro.close()
    finally:
        await writer.close()
