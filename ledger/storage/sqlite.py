"""The ledger in one SQLite file, through aiosqlite.

Durability: WAL journal, ``synchronous = FULL`` (every commit is fsynced
before :meth:`SqliteStorage.append` returns), ``foreign_keys = ON`` and a
``busy_timeout``. Every append is one ``BEGIN IMMEDIATE`` transaction: the
compare-and-swap on the head row, the record inserts, the head
update, ``COMMIT``. One process writes; reads go through the same connection.

One connection is one sequence of statements, so an :class:`asyncio.Lock`
keeps each operation (a whole append transaction, a read) from interleaving
with another coroutine's: no reader ever sees rows of a transaction that may
still roll back.

The schema is ``schema.sql`` beside this module (package data), versioned
with ``PRAGMA user_version``; a file with a version this code does not know,
or another application's ``application_id``, is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import sqlite3
import time as _time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import LedgerExists, LedgerMissing, StorageError, WritError
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

#: the schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION = 2
#: older versions this code opens: a writable open migrates them in one
#: transaction (:data:`MIGRATIONS`); a read-only open reads them as they are.
MIGRATIONS: dict[int, str] = {
    # v1 kept `grants` and `revocations` index tables that nothing read: the
    # records are the truth, and the server keeps its indexes in memory.
    1: """
        DROP INDEX IF EXISTS grants_by_name;
        DROP INDEX IF EXISTS grants_by_subject;
        DROP TABLE IF EXISTS grants;
        DROP INDEX IF EXISTS revocations_by_target_seq;
        DROP INDEX IF EXISTS revocations_by_target_key;
        DROP TABLE IF EXISTS revocations;
    """,
}
#: ``PRAGMA application_id``: 'Writ'.
APPLICATION_ID = int.from_bytes(b"Writ", "big")
BUSY_TIMEOUT_MS = 5000

_I64 = 1 << 63
_U64 = 1 << 64


def _i64(value: int) -> int:
    """An unsigned 64-bit protocol integer as SQLite's signed INTEGER (two's complement)."""
    return value - _U64 if value >= _I64 else value


def _u64(value: int) -> int:
    return value + _U64 if value < 0 else value


def schema_sql() -> str:
    """The whole schema (package data ``ledger/storage/schema.sql``)."""
    return importlib.resources.files("ledger.storage").joinpath("schema.sql").read_text(encoding="utf-8")


@contextlib.contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """sqlite3 (and aiosqlite's closed-connection ValueError) as StorageError."""
    try:
        yield
    except WritError:
        raise
    except sqlite3.Error as exc:
        raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # aiosqlite: "no active connection"
        raise StorageError(f"{what} failed: {exc}") from exc


class SqliteStorage:
    """:class:`~ledger.storage.Storage` in a SQLite database. Use :meth:`open`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, *, fault: Fault | None = None) -> None:
        self._db: aiosqlite.Connection | None = db
        self.path = path
        self.fault = fault
        self.read_only = False
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteStorage({str(self.path)!r})"

    # -- opening -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        create: bool = False,
        *,
        read_only: bool = False,
        fault: Fault | None = None,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> SqliteStorage:
        """Open the ledger database at ``path``.

        ``create``: make the file and its schema when they do not exist yet
        (``init`` then writes the ledger's identity). Without it a missing
        file, or one with no schema, is :class:`LedgerMissing`. A file of an
        unknown schema version or another application is :class:`StorageError`.

        ``read_only`` (the auditor's ``--data``, a backup on a read-only mount):
        SQLite is never asked to write, and no ``-wal``/``-shm`` file is
        created beside the database (such files, made by root, could lock the
        service user out). When a writer is running (its ``-wal`` file exists)
        the database is read through that writer's WAL, a consistent snapshot
        per read; when none is, the file is opened ``immutable``. Writing
        methods then raise :class:`StorageError`.
        """

        if create and read_only:
            raise StorageError("a read-only open cannot create a database")
        p = Path(path)
        if not create and not p.exists():
            raise LedgerMissing(f"no ledger database at {p}")
        uri = p.resolve().as_uri()
        if read_only:
            wal = p.with_name(p.name + "-wal")
            shm = p.with_name(p.name + "-shm")
            uri += "?mode=ro" if wal.exists() and shm.exists() else "?mode=ro&immutable=1"
        else:
            # without create, mode=rw: SQLite itself never makes the file
            uri += "?mode=rwc" if create else "?mode=rw"
        with _db_errors(f"opening {p}"):
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        try:
            with _db_errors(f"opening {p}"):
                await cls._setup(db, p, create, busy_timeout_ms, read_only=read_only)
        except BaseException:
            with contextlib.suppress(Exception):
                await db.close()
            raise
        store = cls(db, p, fault=fault)
        store.read_only = read_only
        return store

    @staticmethod
    async def _setup(
        db: aiosqlite.Connection, path: Path, create: bool, busy_timeout_ms: int, *, read_only: bool
    ) -> None:
        await _exec(db, f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        version = await _pragma(db, "user_version")
        app = await _pragma(db, "application_id")
        if version == 0:
            tables = await db.execute_fetchall("SELECT name FROM sqlite_master")
            if tables or app not in (0, APPLICATION_ID):
                raise StorageError(f"{path} is not a Writ ledger database")
            if not create:
                raise LedgerMissing(f"{path} holds no ledger")
        elif app != APPLICATION_ID:
            raise StorageError(f"{path} is not a Writ ledger database (application_id {app})")
        elif version != SCHEMA_VERSION and version not in MIGRATIONS:
            raise StorageError(
                f"{path} has schema version {version}; this Writ knows versions "
                f"{', '.join(map(str, [*sorted(MIGRATIONS), SCHEMA_VERSION]))}"
                + (" (it was written by a newer Writ)" if version > SCHEMA_VERSION else ""),
                schema_version=version,
            )
        if read_only:
            await _exec(db, "PRAGMA query_only = ON")
            return
        mode = await db.execute_fetchall("PRAGMA journal_mode = WAL")
        if not mode or str(next(iter(mode))[0]).lower() != "wal":
            raise StorageError(f"{path}: could not switch to WAL journal mode")
        await _exec(db, "PRAGMA synchronous = FULL")
        await _exec(db, "PRAGMA foreign_keys = ON")
        if version == 0:
            await db.executescript(schema_sql())  # one transaction; sets user_version
        while version in MIGRATIONS:
            # each step and its new user_version in one transaction: a crash leaves either version
            await db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[version]} PRAGMA user_version = {version + 1}; COMMIT;"
            )
            version = await _pragma(db, "user_version")
        if await _pragma(db, "user_version") != SCHEMA_VERSION:
            raise StorageError(f"{path}: schema.sql does not set user_version {SCHEMA_VERSION}")

    # -- plumbing ------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("the storage is closed")
        return self._db

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._conn().execute_fetchall(sql, params))

    async def _head(self) -> Head | None:
        rows = await self._rows("SELECT size, root FROM head WHERE id = 0")
        return Head(rows[0][0], bytes(rows[0][1])) if rows else None

    async def _current(self) -> Head:
        head = await self._head()
        if head is None:
            raise LedgerMissing("no ledger here: run init first")
        return head

    async def _rollback(self, *, always: bool = False) -> None:
        """Roll back an open transaction. ``always``: issue ROLLBACK even when none
        looks open, because a cancelled coroutine's BEGIN may still be queued on
        the connection's thread (the ROLLBACK is queued after it)."""
        db = self._db
        if db is None:
            return
        with contextlib.suppress(Exception):
            if always or db.in_transaction:
                await _exec(db, "ROLLBACK")

    @contextlib.asynccontextmanager
    async def _transaction(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` .. ``COMMIT`` under the lock; any exception rolls back."""
        if self.read_only:
            raise StorageError(f"{what}: {self.path} is open read-only")
        async with self._lock:
            db = self._conn()
            await self._rollback()  # a transaction left open by a failure we could not roll back
            try:
                with _db_errors(what):
                    await _exec(db, "BEGIN IMMEDIATE")
                    yield db
                    await _exec(db, "COMMIT")
            except BaseException:
                await self._rollback(always=True)
                raise

    # -- the ledger ----------------------------------------------------------

    async def init(self, origin: str, anchor: bytes, log_public_key: bytes) -> None:
        check_identity(origin, anchor, log_public_key)
        async with self._transaction("init") as db:
            if await self._rows("SELECT 1 FROM meta"):
                raise LedgerExists(f"a ledger is already initialised in {self.path}")
            await _exec(
                db,
                "INSERT INTO meta (id, origin, anchor, log_public_key, created_at) VALUES (0, ?, ?, ?, ?)",
                (origin, anchor, log_public_key, int(_time.time())),
            )
            await _exec(
                db, "INSERT INTO head (id, size, root) VALUES (0, ?, ?)", (EMPTY_HEAD.size, EMPTY_HEAD.root)
            )

    async def meta(self) -> Meta:
        async with self._lock:
            with _db_errors("meta"):
                rows = await self._rows("SELECT origin, anchor, log_public_key, created_at FROM meta")
        if not rows:
            raise LedgerMissing("no ledger here: run init first")
        origin, anchor, log_key, created = rows[0]
        return Meta(origin, bytes(anchor), bytes(log_key), created)

    async def head(self) -> Head:
        async with self._lock:
            with _db_errors("head"):
                return await self._current()

    async def append(
        self,
        expected: Head,
        records: Sequence[SignedRecord],
        new_root: bytes,
        checkpoint: str | None = None,
    ) -> Head:
        rows = prepare(expected, records, new_root, checkpoint)
        new_head = Head(expected.size + len(rows), new_root)
        async with self._transaction("append") as db:
            self._step("begin")
            current = await self._current()
            if current != expected:
                raise head_conflict(current, expected)
            await _execmany(
                db,
                "INSERT INTO records (seq, raw, leaf_hash) VALUES (?, ?, ?)",
                [(r.seq, r.raw, r.leaf_hash) for r in rows],
            )
            self._step("insert")
            changed = await _exec(
                db,
                "UPDATE head SET size = ?, root = ? WHERE id = 0 AND size = ? AND root = ?",
                (new_head.size, new_head.root, expected.size, expected.root),
            )
            if changed != 1:
                raise StorageError("the head row did not take the update")
            if checkpoint is not None:
                await _exec(
                    db,
                    "INSERT OR REPLACE INTO checkpoint (id, size, note) VALUES (0, ?, ?)",
                    (new_head.size, checkpoint),
                )
            self._step("head")
        # committed and fsynced (synchronous = FULL) by the end of the block
        self._step("commit")
        return new_head

    async def read(self, start: int, end: int) -> list[bytes]:
        check_range(start, end)
        async with self._lock:
            with _db_errors("read"):
                end = min(end, (await self._current()).size)
                if start >= end:
                    return []
                rows = await self._rows(
                    "SELECT seq, raw FROM records WHERE seq >= ? AND seq < ? ORDER BY seq",
                    (start, end),
                )
        bad = missing_records(start, end, [r[0] for r in rows])
        if bad is not None:
            raise bad
        return [bytes(r[1]) for r in rows]

    async def scan(self, batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        check_batch(batch)
        after = -1
        while True:
            async with self._lock:
                with _db_errors("scan"):
                    rows = await self._rows(
                        "SELECT seq, raw, leaf_hash FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                        (after, batch),
                    )
            if not rows:
                return
            after = rows[-1][0]
            yield [(seq, bytes(raw), bytes(lh)) for seq, raw, lh in rows]

    # -- receipts and checkpoints ---------------------------------------------

    async def put_receipts(self, rows: Sequence[ReceiptRow]) -> None:
        latest: dict[int, ReceiptRow] = {}
        for r in rows:
            check_receipt(r.device_grant_seq, r.size, r.root, r.time, r.raw, r.received_at)
            if receipt_is_newer(r.size, r.time, latest.get(r.device_grant_seq)):
                latest[r.device_grant_seq] = r
        if not latest:
            return
        async with self._transaction("put_receipts") as db:
            await self._current()
            for r in latest.values():
                found = await self._rows(
                    "SELECT device_grant_seq, size, root, time, raw, received_at FROM receipts "
                    "WHERE device_grant_seq = ?",
                    (r.device_grant_seq,),
                )
                if receipt_is_newer(r.size, r.time, _receipt(found[0]) if found else None):
                    await _exec(
                        db,
                        "INSERT OR REPLACE INTO receipts "
                        "(device_grant_seq, size, root, time, raw, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (r.device_grant_seq, r.size, r.root, _i64(r.time), r.raw, _i64(r.received_at)),
                    )

    async def receipts(self) -> list[ReceiptRow]:
        async with self._lock:
            with _db_errors("receipts"):
                rows = await self._rows(
                    "SELECT device_grant_seq, size, root, time, raw, received_at FROM receipts "
                    "ORDER BY device_grant_seq"
                )
        return [_receipt(r) for r in rows]

    async def put_checkpoint(self, size: int, note: str) -> None:
        check_note_args(size, note)
        async with self._transaction("put_checkpoint") as db:
            head = await self._current()
            rows = await self._rows("SELECT size FROM checkpoint WHERE id = 0")
            check_checkpoint(size, head, rows[0][0] if rows else None)
            await _exec(
                db, "INSERT OR REPLACE INTO checkpoint (id, size, note) VALUES (0, ?, ?)", (size, note)
            )

    async def latest_checkpoint(self) -> str | None:
        async with self._lock:
            with _db_errors("latest_checkpoint"):
                rows = await self._rows("SELECT note FROM checkpoint WHERE id = 0")
        return str(rows[0][0]) if rows else None

    # -- operations ----------------------------------------------------------

    async def pragmas(self) -> dict[str, Any]:
        """The settings that matter for durability, as the connection reports them."""
        out: dict[str, Any] = {}
        async with self._lock:
            with _db_errors("pragmas"):
                db = self._conn()
                for name in (
                    "journal_mode",
                    "synchronous",
                    "foreign_keys",
                    "busy_timeout",
                    "user_version",
                    "application_id",
                ):
                    out[name] = await _pragma(db, name)
        return out

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await _close(db)


async def _close(db: aiosqlite.Connection) -> None:
    with contextlib.suppress(Exception):
        if db.in_transaction:
            await _exec(db, "ROLLBACK")
    with _db_errors("close"):
        await db.close()


async def _exec(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement, close its cursor, return its rowcount."""
    cur = await db.execute(sql, params)
    try:
        return cur.rowcount
    finally:
        await cur.close()


async def _execmany(db: aiosqlite.Connection, sql: str, params: Iterable[Sequence[Any]]) -> None:
    cur = await db.executemany(sql, params)
    await cur.close()


async def _pragma(db: aiosqlite.Connection, name: str) -> Any:
    rows: Iterable[Any] = await db.execute_fetchall(f"PRAGMA {name}")
    for row in rows:
        return row[0]
    return None


def _receipt(row: Sequence[Any]) -> ReceiptRow:
    seq, size, root, time, raw, received_at = row
    return ReceiptRow(seq, size, bytes(root), _u64(time), bytes(raw), _u64(received_at))


__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SqliteStorage", "schema_sql"]
