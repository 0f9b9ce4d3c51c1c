"""A witness's durable state: per log, the latest checkpoint it cosigned.

The contract (after litewitness, and the storage contract of
``ledger/storage``), met by :class:`MemoryWitnessStore` (the in-process twin
the tests use) and :class:`SqliteWitnessStore`:

- :meth:`head(origin)` is the latest cosigned ``(size, root, timestamp)`` of
  the log, or size 0 with the empty tree's root and timestamp 0 when the
  witness never cosigned for it;
- :meth:`advance(expected, new)` is a compare-and-swap: it stores ``new``
  only if the stored head still has ``expected``'s size and root, in one
  durable transaction, and returns the timestamp to sign with (never below
  the stored one). Otherwise it raises :class:`~ledger.errors.WitnessConflict`
  with the stored size and stores nothing. A cosignature is made only after
  ``advance`` returned, so whatever the witness signed is on disk first: a
  SIGKILL at any point can lose an answer, never let it sign two trees of
  one size;
- :meth:`put_evidence` keeps a bounded number of refused-but-validly-signed
  checkpoints per log (a fork or a bad proof is proof of log misbehaviour).

Both backends call a ``fault`` hook at ``begin``, ``write`` and ``commit``
(crash tests raise there: fail-and-not-persist before the commit, and
fail-but-persist when raised after it, at ``committed``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosqlite

from ledger.errors import StorageError, WitnessConflict
from ledger.tree import EMPTY_ROOT

#: the root of the empty tree: the head of a log the witness never cosigned.
#: refused checkpoints kept per log as evidence (the oldest go first).
MAX_EVIDENCE = 64
#: at most this many characters of a refused request are kept.
MAX_EVIDENCE_TEXT = 16384
SCHEMA_VERSION = 1
APPLICATION_ID = int.from_bytes(b"WrtW", "big")

Fault = Callable[[str], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_head (
    origin    TEXT PRIMARY KEY,
    size      INTEGER NOT NULL CHECK (size >= 0),
    root      BLOB NOT NULL CHECK (length(root) = 32),
    timestamp INTEGER NOT NULL CHECK (timestamp >= 0)
) STRICT;
CREATE TABLE IF NOT EXISTS evidence (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    origin      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    observed_at INTEGER NOT NULL,
    request     TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS evidence_origin ON evidence (origin, id);
"""


@dataclass(frozen=True, slots=True)
class LogHead:
    """The latest checkpoint the witness cosigned for one log."""

    size: int
    root: bytes
    timestamp: int


EMPTY_HEAD = LogHead(0, EMPTY_ROOT, 0)


@dataclass(frozen=True, slots=True)
class EvidenceRow:
    origin: str
    kind: str
    observed_at: int
    request: str


class WitnessStore(Protocol):
    async def head(self, origin: str) -> LogHead: ...

    async def heads(self) -> dict[str, LogHead]: ...

    async def advance(self, origin: str, expected: LogHead, new: LogHead) -> int: ...

    async def put_evidence(self, origin: str, kind: str, observed_at: int, request: str) -> None: ...

    async def evidence(self, origin: str) -> list[EvidenceRow]: ...

    async def close(self) -> None: ...


def _check_new(new: LogHead) -> None:
    if new.size < 0 or len(new.root) != 32 or new.timestamp < 0:
        raise StorageError("refusing to store a malformed log head")


class MemoryWitnessStore:
    """:class:`WitnessStore` in process memory, with the same semantics."""

    def __init__(self, *, fault: Fault | None = None) -> None:
        self.fault = fault
        self._heads: dict[str, LogHead] = {}
        self._evidence: dict[str, list[EvidenceRow]] = {}

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    async def head(self, origin: str) -> LogHead:
        return self._heads.get(origin, EMPTY_HEAD)

    async def heads(self) -> dict[str, LogHead]:
        return dict(self._heads)

    async def advance(self, origin: str, expected: LogHead, new: LogHead) -> int:
        _check_new(new)
        self._step("begin")
        cur = self._heads.get(origin, EMPTY_HEAD)
        if (cur.size, cur.root) != (expected.size, expected.root):
            raise WitnessConflict(f"the witness has cosigned size {cur.size}", size=cur.size)
        stored = LogHead(new.size, new.root, max(new.timestamp, cur.timestamp))
        self._step("write")
        self._step("commit")
        self._heads[origin] = stored
        self._step("committed")
        return stored.timestamp

    async def put_evidence(self, origin: str, kind: str, observed_at: int, request: str) -> None:
        rows = self._evidence.setdefault(origin, [])
        rows.append(EvidenceRow(origin, kind, observed_at, request[:MAX_EVIDENCE_TEXT]))
        del rows[:-MAX_EVIDENCE]

    async def evidence(self, origin: str) -> list[EvidenceRow]:
        return list(self._evidence.get(origin, []))

    async def close(self) -> None:
        pass


class SqliteWitnessStore:
    """:class:`WitnessStore` in one SQLite file: WAL, ``synchronous = FULL``, and
    each compare-and-swap one ``BEGIN IMMEDIATE`` transaction, so two witness
    processes on one file are as safe as one."""

    def __init__(self, db: aiosqlite.Connection, fault: Fault | None) -> None:
        self._db = db
        self.fault = fault
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, path: Path, *, create: bool = False, fault: Fault | None = None
    ) -> SqliteWitnessStore:
        if not create and not Path(path).exists():
            raise StorageError(f"no witness database at {path}: run `writ witness init` first")
        try:
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open {path}: {type(exc).__name__}") from None
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA busy_timeout = 5000")
            cur = await db.execute("PRAGMA application_id")
            app_id = (await cur.fetchone() or (0,))[0]
            cur = await db.execute("PRAGMA user_version")
            version = (await cur.fetchone() or (0,))[0]
            if version == 0 and app_id == 0:
                await db.executescript(_SCHEMA)
                await db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif app_id != APPLICATION_ID or version != SCHEMA_VERSION:
                raise StorageError(f"{path} is not a Writ witness database of schema {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            await db.close()
            raise StorageError(f"cannot open {path}: {exc}") from None
        except BaseException:
            await db.close()
            raise
        return cls(db, fault)

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    async def head(self, origin: str) -> LogHead:
        async with self._lock:
            try:
                cur = await self._db.execute(
                    "SELECT size, root, timestamp FROM log_head WHERE origin = ?", (origin,)
                )
                row = await cur.fetchone()
            except (sqlite3.Error, ValueError) as exc:
                raise StorageError(f"reading the witness state failed: {exc}") from None
        return EMPTY_HEAD if row is None else LogHead(int(row[0]), bytes(row[1]), int(row[2]))

    async def heads(self) -> dict[str, LogHead]:
        async with self._lock:
            try:
                cur = await self._db.execute("SELECT origin, size, root, timestamp FROM log_head")
                rows = await cur.fetchall()
            except (sqlite3.Error, ValueError) as exc:
                raise StorageError(f"reading the witness state failed: {exc}") from None
        return {str(r[0]): LogHead(int(r[1]), bytes(r[2]), int(r[3])) for r in rows}

    async def advance(self, origin: str, expected: LogHead, new: LogHead) -> int:
        _check_new(new)
        async with self._lock:
            db = self._db
            try:
                self._step("begin")
                await db.execute("BEGIN IMMEDIATE")
                try:
                    cur = await db.execute(
                        "SELECT size, root, timestamp FROM log_head WHERE origin = ?", (origin,)
                    )
                    row = await cur.fetchone()
                    stored = EMPTY_HEAD if row is None else LogHead(int(row[0]), bytes(row[1]), int(row[2]))
                    if (stored.size, stored.root) != (expected.size, expected.root):
                        raise WitnessConflict(
                            f"the witness has cosigned size {stored.size}", size=stored.size
                        )
                    ts = max(new.timestamp, stored.timestamp)
                    self._step("write")
                    await db.execute(
                        "INSERT INTO log_head (origin, size, root, timestamp) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (origin) DO UPDATE SET size = excluded.size, root = excluded.root, "
                        "timestamp = excluded.timestamp",
                        (origin, new.size, new.root, ts),
                    )
                    self._step("commit")
                    await db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        await db.execute("ROLLBACK")
                    raise
                self._step("committed")
                return ts
            except sqlite3.Error as exc:
                raise StorageError(f"storing the witness state failed: {exc}") from None

    async def put_evidence(self, origin: str, kind: str, observed_at: int, request: str) -> None:
        async with self._lock:
            db = self._db
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    await db.execute(
                        "INSERT INTO evidence (origin, kind, observed_at, request) VALUES (?, ?, ?, ?)",
                        (origin, kind, observed_at, request[:MAX_EVIDENCE_TEXT]),
                    )
                    await db.execute(
                        "DELETE FROM evidence WHERE origin = ? AND id NOT IN "
                        "(SELECT id FROM evidence WHERE origin = ? ORDER BY id DESC LIMIT ?)",
                        (origin, origin, MAX_EVIDENCE),
                    )
                    await db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"storing witness evidence failed: {exc}") from None

    async def evidence(self, origin: str) -> list[EvidenceRow]:
        async with self._lock:
            try:
                cur = await self._db.execute(
                    "SELECT origin, kind, observed_at, request FROM evidence WHERE origin = ? ORDER BY id",
                    (origin,),
                )
                rows = await cur.fetchall()
            except (sqlite3.Error, ValueError) as exc:
                raise StorageError(f"reading witness evidence failed: {exc}") from None
        return [EvidenceRow(str(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()
