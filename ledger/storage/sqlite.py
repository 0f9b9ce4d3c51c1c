"""The ledger in one SQLite file, through aiosqlite.

Durability: WAL journal, ``synchronous = FULL`` (every commit is fsynced
before :meth:`SqliteStorage.append` returns), ``foreign_keys = ON`` and a
``busy_timeout``. Every append is one ``BEGIN IMMEDIATE`` transaction: the
compare-and-swap on the head row, the record inserts, the head
update, ``COMMIT``. One process writes; reads go through the same connection.

Each operation (a whole append transaction: compare-and-swap, inserts, head
update, ``COMMIT``; a read) is one function run on aiosqlite's connection
thread, so it costs the event loop one hop however many statements it runs,
and no other operation's statements can interleave with it: no reader ever
sees rows of a transaction that may still roll back. The thread runs the
operations in the order they were called, so the server may queue the next
group's append while the current one is still committing (it runs the moment
that one's ``COMMIT`` returns, behind the same compare-and-swap).

The schema is ``schema.sql`` beside this module (package data), versioned
with ``PRAGMA user_version``; a file with a version this code does not know,
or another application's ``application_id``, is refused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
import sqlite3
import time as _time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
#: the most record rows one INSERT statement carries (3 parameters each: well
#: under SQLite's smallest limit on parameters, 999).
INSERT_ROWS = 256

T = TypeVar("T")

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

    async def _read(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the connection's thread: one round trip."""
        with _db_errors(what):
            return await _on_thread(self._conn(), fn)

    async def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` in one ``BEGIN IMMEDIATE`` .. ``COMMIT`` transaction, run
        whole on the connection's thread (one round trip): any exception rolls back.

        Operations run in the order they are called (the thread's queue), so a
        caller may queue a write before the one before it has finished; it runs
        against what that one left. A cancelled caller does not stop it: the
        transaction still ends there, committed or rolled back, before the next
        operation runs, so what a cancelled write did is read back whole or not at all."""
        if self.read_only:
            raise StorageError(f"{what}: {self.path} is open read-only")
        with _db_errors(what):
            return await _on_thread(self._conn(), functools.partial(_transaction, fn))

    # -- the ledger ----------------------------------------------------------

    async def init(self, origin: str, anchor: bytes, log_public_key: bytes) -> None:
        check_identity(origin, anchor, log_public_key)
        created = int(_time.time())

        def run(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM meta").fetchone() is not None:
                raise LedgerExists(f"a ledger is already initialised in {self.path}")
            conn.execute(
                "INSERT INTO meta (id, origin, anchor, log_public_key, created_at) VALUES (0, ?, ?, ?, ?)",
                (origin, anchor, log_public_key, created),
            )
            conn.execute(
                "INSERT INTO head (id, size, root) VALUES (0, ?, ?)", (EMPTY_HEAD.size, EMPTY_HEAD.root)
            )

        await self._write("init", run)

    async def meta(self) -> Meta:
        def run(conn: sqlite3.Connection) -> Any:
            return conn.execute("SELECT origin, anchor, log_public_key, created_at FROM meta").fetchone()

        row = await self._read("meta", run)
        if row is None:
            raise LedgerMissing("no ledger here: run init first")
        origin, anchor, log_key, created = row
        return Meta(origin, bytes(anchor), bytes(log_key), created)

    async def head(self) -> Head:
        return await self._read("head", _current)

    async def append(
        self,
        expected: Head,
        records: Sequence[SignedRecord],
        new_root: bytes,
        checkpoint: str | None = None,
    ) -> Head:
        def run(conn: sqlite3.Connection) -> Head:
            # the whole transaction is this one call on the connection's thread (the
            # argument checks and the fault hook too): one hop from the event loop
            # per append, and few statements (each one gives up and takes back the GIL)
            rows = [(r.seq, r.raw, r.leaf_hash) for r in prepare(expected, records, new_root, checkpoint)]
            new_head = Head(expected.size + len(rows), new_root)
            self._step("begin")
            changed = conn.execute(  # the compare-and-swap
                "UPDATE head SET size = ?, root = ? WHERE id = 0 AND size = ? AND root = ?",
                (new_head.size, new_head.root, expected.size, expected.root),
            ).rowcount
            if changed != 1:
                current = _current(conn)
                raise (
                    head_conflict(current, expected)
                    if current != expected
                    else StorageError("the head row did not take the update")
                )
            for i in range(0, len(rows), INSERT_ROWS):
                chunk = rows[i : i + INSERT_ROWS]
                conn.execute(_insert_records(len(chunk)), [v for row in chunk for v in row])
            self._step("insert")
            if checkpoint is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO checkpoint (id, size, note) VALUES (0, ?, ?)",
                    (new_head.size, checkpoint),
                )
            self._step("head")
            return new_head

        new_head = await self._write("append", run)
        # committed and fsynced (synchronous = FULL) by now
        self._step("commit")
        return new_head

    async def read(self, start: int, end: int) -> list[bytes]:
        check_range(start, end)

        def run(conn: sqlite3.Connection) -> tuple[int, list[Any]]:
            stop = min(end, _current(conn).size)
            if start >= stop:
                return stop, []
            cur = conn.execute(
                "SELECT seq, raw FROM records WHERE seq >= ? AND seq < ? ORDER BY seq", (start, stop)
            )
            return stop, cur.fetchall()

        stop, rows = await self._read("read", run)
        bad = missing_records(start, stop, [r[0] for r in rows]) if start < stop else None
        if bad is not None:
            raise bad
        return [bytes(r[1]) for r in rows]

    async def scan(self, batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        check_batch(batch)
        after = -1
        while True:

            def run(conn: sqlite3.Connection, after: int = after) -> list[Any]:
                cur = conn.execute(
                    "SELECT seq, raw, leaf_hash FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, batch),
                )
                return cur.fetchall()

            rows = await self._read("scan", run)
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

        def run(conn: sqlite3.Connection) -> None:
            _current(conn)
            for r in latest.values():
                found = conn.execute(
                    "SELECT device_grant_seq, size, root, time, raw, received_at FROM receipts "
                    "WHERE device_grant_seq = ?",
                    (r.device_grant_seq,),
                ).fetchone()
                if receipt_is_newer(r.size, r.time, _receipt(found) if found is not None else None):
                    conn.execute(
                        "INSERT OR REPLACE INTO receipts "
                        "(device_grant_seq, size, root, time, raw, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (r.device_grant_seq, r.size, r.root, _i64(r.time), r.raw, _i64(r.received_at)),
                    )

        await self._write("put_receipts", run)

    async def receipts(self) -> list[ReceiptRow]:
        def run(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(
                "SELECT device_grant_seq, size, root, time, raw, received_at FROM receipts "
                "ORDER BY device_grant_seq"
            ).fetchall()

        return [_receipt(r) for r in await self._read("receipts", run)]

    async def put_checkpoint(self, size: int, note: str) -> None:
        check_note_args(size, note)

        def run(conn: sqlite3.Connection) -> None:
            head = _current(conn)
            row = conn.execute("SELECT size FROM checkpoint WHERE id = 0").fetchone()
            check_checkpoint(size, head, row[0] if row is not None else None)
            conn.execute("INSERT OR REPLACE INTO checkpoint (id, size, note) VALUES (0, ?, ?)", (size, note))

        await self._write("put_checkpoint", run)

    async def latest_checkpoint(self) -> str | None:
        def run(conn: sqlite3.Connection) -> Any:
            return conn.execute("SELECT note FROM checkpoint WHERE id = 0").fetchone()

        row = await self._read("latest_checkpoint", run)
        return str(row[0]) if row is not None else None

    # -- operations ----------------------------------------------------------

    async def pragmas(self) -> dict[str, Any]:
        """The settings that matter for durability, as the connection reports them."""
        names = (
            "journal_mode",
            "synchronous",
            "foreign_keys",
            "busy_timeout",
            "user_version",
            "application_id",
        )

        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

        return await self._read("pragmas", run)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await _close(db)  # queued after every operation already called


@functools.lru_cache(maxsize=8)
def _insert_records(n: int) -> str:
    """One INSERT of ``n`` record rows (one statement: one step, however many rows)."""
    placeholders = ", ".join(["(?, ?, ?)"] * n)  # placeholders only: the values are bound
    return f"INSERT INTO records (seq, raw, leaf_hash) VALUES {placeholders}"  # noqa: S608


def _current(conn: sqlite3.Connection) -> Head:
    """The head row (connection's thread), or :class:`LedgerMissing`."""
    row = conn.execute("SELECT size, root FROM head WHERE id = 0").fetchone()
    if row is None:
        raise LedgerMissing("no ledger here: run init first")
    return Head(row[0], bytes(row[1]))


def _transaction(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    """``BEGIN IMMEDIATE``, ``fn(conn)``, ``COMMIT`` (fsynced: synchronous = FULL), on the
    connection's thread; any exception (a failed ``COMMIT`` too) rolls back."""
    if conn.in_transaction:  # left open by a failure that could not roll back
        conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        raise
    return out


async def _on_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` with the sqlite3 connection on aiosqlite's own thread (the only
    thread that may use it), in the connection's queue of operations: one hop.
    aiosqlite's ``_execute`` is the call its own public methods are built on."""
    run: Callable[[Callable[[], T]], Awaitable[T]] = db._execute
    return await run(lambda: fn(db._conn))


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


async def _pragma(db: aiosqlite.Connection, name: str) -> Any:
    rows: Iterable[Any] = await db.execute_fetchall(f"PRAGMA {name}")
    for row in rows:
        return row[0]
    return None


def _receipt(row: Sequence[Any]) -> ReceiptRow:
    seq, size, root, time, raw, received_at = row
    return ReceiptRow(seq, size, bytes(root), _u64(time), bytes(raw), _u64(received_at))


__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SqliteStorage", "schema_sql"]
