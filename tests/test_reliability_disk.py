"""A failing disk under the server (docs/threats.md: power loss, a dying disk).

The server runs in process on a real :class:`SqliteStorage` whose ``fault``
hook raises ``OSError(EIO)`` at a step of the append transaction (``begin``,
``insert``, ``head``: nothing persisted; ``commit``: persisted, then the error,
as when fsync reports a failure after the data reached the disk), or on a
database that is really full (``PRAGMA max_page_count``). Each time: the
client gets ``503 storage-error`` problem+json (after a ``commit`` fault, the
reload finds the batch stored and the client gets its 200), the server stays consistent
(served records == stored records == what the checkpoint names, the next
append works, a restart reloads the same head), and a client that re-syncs
after the error never loses or duplicates a record.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from api.config import Limits
from ledger import checkpoints, encoding, records, tiles
from ledger.crypto import SeedSigner, sha256
from ledger.errors import StorageError
from ledger.storage import FAULT_STEPS
from ledger.storage.sqlite import SqliteStorage
from ledger.tree import leaf_hash, mth
from tests.helpers.server import Mirror, inprocess_server, make_ledger, post_records, service

ORIGIN = "disk.writ.example/ledger"
ROOT = SeedSigner(sha256(b"writ-disk-tests/root"))
LIMITS = Limits(write_rate=100000, write_burst=100000)


class Disk:
    """The fault hook: fails the steps in ``failing`` (each call to ``fail`` counts down ``times``)."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.times = 0
        self.hits: list[str] = []
        self.rng: random.Random | None = None
        self.p = 0.0

    def fail(self, *steps: str, times: int = 1) -> None:
        self.failing = set(steps)
        self.times = times

    def __call__(self, step: str) -> None:
        hit = step in self.failing and self.times > 0
        if not hit and self.rng is not None and self.rng.random() < self.p:
            hit = True
        if hit:
            self.times -= 1
            self.hits.append(step)
            raise OSError(errno.EIO, os.strerror(errno.EIO) + f" (injected at {step})")


async def served(client: httpx.AsyncClient, start: int = 0) -> list[bytes]:
    out: list[bytes] = []
    while True:
        r = await client.get("/v1/records", params={"start": start + len(out), "limit": 1000})
        assert r.status_code == 200, r.text
        page = encoding.unpack_records(r.content, max_count=1000)
        out.extend(page)
        if len(page) < 1000:
            return out


def assert_storage_error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    doc: dict[str, Any] = r.json()
    assert doc["type"] == "urn:writ:problem:storage-error" and doc["status"] == 503
    assert "Traceback" not in r.text and "injected" not in doc.get("detail", "")
    return doc


async def stored(db: Path) -> list[bytes]:
    """What the database file holds, read through a second connection."""
    s = await SqliteStorage.open(db)
    try:
        head = await s.head()
        return await s.read(0, head.size)
    finally:
        await s.close()


async def assert_consistent(client: httpx.AsyncClient, app: Starlette, db: Path) -> list[bytes]:
    """Served records == stored records; the checkpoint and the last tile name exactly them."""
    svc = service(app)
    got = await served(client)
    assert got == await stored(db)
    assert svc.size == svc.state.size == len(got)
    root = mth([leaf_hash(r) for r in got])
    assert svc.state.root == root
    cp = checkpoints.verify_checkpoint(
        (await client.get("/checkpoint")).text, ORIGIN, [svc.signer.public_key]
    )
    assert (cp.checkpoint.size, cp.checkpoint.root) == (len(got), root)
    last = (len(got) - 1) // tiles.TILE_WIDTH
    width = len(got) - last * tiles.TILE_WIDTH
    r = await client.get("/" + tiles.entries_path(last, width))
    assert tiles.decode_entry_bundle(r.content, width) == got[last * tiles.TILE_WIDTH :]
    return got


@asynccontextmanager
async def server(
    tmp_path: Path, disk: Disk, data_dir: Path | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette, Path]]:
    db = tmp_path / "ledger.db"
    storage = await SqliteStorage.open(db, create=True, fault=disk)
    async with inprocess_server(
        tmp_path, ROOT.public_key, ORIGIN, storage, limits=LIMITS, data_dir=data_dir
    ) as (client, app):
        yield client, app, db


async def started(tmp_path: Path, client: httpx.AsyncClient, app: Starlette) -> Mirror:
    """A ledger of genesis, the log grant and 3 grants; the mirror that signed it."""
    svc = service(app)
    m = Mirror(ROOT, ORIGIN)
    m.extend(make_ledger(ROOT, ORIGIN, svc.signer.public_key, 3))
    assert (await post_records(client, m.records)).status_code == 200
    return m


def batch(m: Mirror, n: int, tag: str) -> list[bytes]:
    """``n`` grants on top of the mirror (applied to it)."""
    return [m.grant(os.urandom(32), records.ROLE_OPERATOR, f"{tag}-{i}") for i in range(n)]


def resync(m: Mirror, got: list[bytes]) -> Mirror:
    """A new mirror on what the server serves."""
    fresh = Mirror(ROOT, ORIGIN)
    fresh.extend(got)
    return fresh


# --- one fault at each step ----------------------------------------------------------


@pytest.mark.parametrize("step", [s for s in FAULT_STEPS if s != "commit"])
@pytest.mark.parametrize("n", [1, 50])
async def test_eio_before_the_commit_appends_nothing_and_the_retry_works(
    tmp_path: Path, step: str, n: int
) -> None:
    disk = Disk()
    async with server(tmp_path, disk) as (client, app, db):
        m = await started(tmp_path, client, app)
        before = await assert_consistent(client, app, db)
        raws = batch(m, n, "eio")
        disk.fail(step)
        assert_storage_error(await post_records(client, raws))
        assert disk.hits == [step]
        assert await assert_consistent(client, app, db) == before  # nothing of the batch
        r = await post_records(client, raws)  # the client's retry, same bytes: the disk is back
        assert r.status_code == 200, r.text
        assert r.json()["first_seq"] == len(before) and r.json()["appended"] == n
        got = await assert_consistent(client, app, db)
        assert got == before + raws
        data_dir = service(app).config.data_dir
    disk.fail()
    async with server(tmp_path, disk, data_dir) as (client, app, db):  # a restart reloads the same head
        assert await assert_consistent(client, app, db) == got


@pytest.mark.parametrize("n", [1, 50])
async def test_eio_after_the_commit_is_acknowledged_once_never_duplicated(tmp_path: Path, n: int) -> None:
    """The data reached the disk, then the error (fsync reporting late). The server
    reloads what is stored, finds the batch there and acknowledges it (200 and
    its head, not a false "nothing was appended"); the client's blind retry of
    the same bytes is refused as stale-head (never a duplicate); a client that
    re-syncs finds its records there exactly once."""
    disk = Disk()
    async with server(tmp_path, disk) as (client, app, db):
        m = await started(tmp_path, client, app)
        before = await assert_consistent(client, app, db)
        raws = batch(m, n, "late")
        disk.fail("commit")
        r = await post_records(client, raws)
        assert disk.hits == ["commit"]
        got = await assert_consistent(client, app, db)  # the server reloaded what is stored
        assert got == before + raws
        assert r.status_code == 200, r.text
        assert r.json() == {
            "size": len(got),
            "root": m.state.root.hex(),
            "appended": n,
            "first_seq": len(before),
        }
        assert (await client.get("/healthz")).json()["size"] == len(got)
        r = await post_records(client, raws)  # a blind retry
        assert r.status_code == 409 and r.json()["type"] == "urn:writ:problem:stale-head", r.text
        assert await assert_consistent(client, app, db) == got
        m = resync(m, got)  # re-sync: the records are there, and the writer carries on
        more = batch(m, 3, "after")
        assert (await post_records(client, more)).status_code == 200
        assert await assert_consistent(client, app, db) == got + more
        bodies = [records.parse(r).typed() for r in got + more]
        names = [b.name for b in bodies if isinstance(b, records.Grant)]
        assert len(names) == len(set(names))  # no duplicate
        data_dir = service(app).config.data_dir
    disk.fail()
    async with server(tmp_path, disk, data_dir) as (client, app, db):
        assert await assert_consistent(client, app, db) == got + more


async def test_a_really_full_disk_is_503_and_the_append_works_once_there_is_room(tmp_path: Path) -> None:
    """Not a hook: SQLite's own ``database or disk is full`` (SQLITE_FULL)."""
    disk = Disk()
    async with server(tmp_path, disk) as (client, app, db):
        m = await started(tmp_path, client, app)
        before = await assert_consistent(client, app, db)
        storage = service(app).storage
        assert isinstance(storage, SqliteStorage)
        conn = storage._conn()
        pages = next(iter(await conn.execute_fetchall("PRAGMA page_count")))[0]
        await conn.execute(f"PRAGMA max_page_count = {pages}")
        raws = batch(m, 300, "full")  # ~100 KB: more than the pages left
        assert_storage_error(await post_records(client, raws))
        assert await assert_consistent(client, app, db) == before
        await conn.execute("PRAGMA max_page_count = 1073741823")
        r = await post_records(client, raws)
        assert r.status_code == 200, r.text
        assert await assert_consistent(client, app, db) == before + raws


async def test_reads_failing_are_5xx_problems_never_torn_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fails under the read path (records not in the memory cache)."""
    disk = Disk()
    async with server(tmp_path, disk) as (client, app, db):
        m = await started(tmp_path, client, app)
        assert (await post_records(client, batch(m, 600, "many"))).status_code == 200
        good = await assert_consistent(client, app, db)
        svc = service(app)
        svc.record_cache.clear()  # cold cache: full bundles come from the disk

        async def broken(start: int, end: int) -> list[bytes]:
            raise StorageError("read failed: OSError: [Errno 5] Input/output error")

        monkeypatch.setattr(svc.storage, "read", broken)
        for path in ("/v1/records?start=0&limit=10", "/" + tiles.entries_path(0)):
            r = await client.get(path)
            assert r.status_code == 503 and r.json()["type"] == "urn:writ:problem:storage-error", r.text
        assert (await client.get("/checkpoint")).status_code == 200  # from memory
        monkeypatch.undo()
        assert await assert_consistent(client, app, db) == good


async def test_checkpoint_persist_failing_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put_checkpoint fails (the records are durable): appends still answer 200 and
    the served checkpoint names them; the note is re-persisted later."""
    disk = Disk()
    async with server(tmp_path, disk) as (client, app, db):
        m = await started(tmp_path, client, app)
        svc = service(app)
        real = svc.storage.put_checkpoint

        async def broken(size: int, note: str) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(svc.storage, "put_checkpoint", broken)
        raws = batch(m, 10, "cp")
        assert (await post_records(client, raws)).status_code == 200
        got = await assert_consistent(client, app, db)
        monkeypatch.setattr(svc.storage, "put_checkpoint", real)
        assert (await post_records(client, batch(m, 1, "cp2"))).status_code == 200
        got = await assert_consistent(client, app, db)
        data_dir = svc.config.data_dir
    async with server(tmp_path, disk, data_dir) as (client, app, db):
        assert await assert_consistent(client, app, db) == got


# --- a flaky disk under a stream of appends ---------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_flaky_disk_under_a_stream_no_loss_no_duplicate(tmp_path: Path, seed: int) -> None:
    """Every append step fails with probability 0.15. The writer re-syncs after each
    503 and re-sends only what is missing. At the end: each acknowledged batch
    is there once, nothing appears twice, the stored ledger is the served one,
    and it reloads clean."""
    disk = Disk()
    async with server(tmp_path, disk) as (client, app, db):
        m = await started(tmp_path, client, app)
        disk.rng = random.Random(seed)
        disk.p = 0.15
        acked: dict[int, bytes] = {}
        errors = 0
        for i in range(40):
            raws = batch(m, random.Random(seed * 100 + i).choice([1, 1, 10, 40]), f"s{i}")
            for _attempt in range(20):
                r = await post_records(client, raws)
                if r.status_code == 200:
                    first = r.json()["first_seq"]
                    acked.update((first + k, raw) for k, raw in enumerate(raws))
                    break
                assert_storage_error(r)
                errors += 1
                got = await served(client)
                first = records.parse(raws[0]).seq
                if got[first : first + len(raws)] == raws:  # it was stored after all (commit step)
                    acked.update((first + k, raw) for k, raw in enumerate(raws))
                    break
                assert len(got) == first  # nothing of it, and nobody else writes
            else:
                pytest.fail("the append never went through")
        disk.p = 0.0
        assert errors > 5 and {"begin", "commit"} <= set(disk.hits), disk.hits
        got = await assert_consistent(client, app, db)
        assert all(got[seq] == raw for seq, raw in acked.items())
        assert len(got) == 5 + len(acked)  # the base ledger and the acknowledged: nothing else
        assert len(set(got)) == len(got)
        data_dir = service(app).config.data_dir
    async with server(tmp_path, disk, data_dir) as (client, app, db):
        assert await assert_consistent(client, app, db) == got
