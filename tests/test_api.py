"""The ledger server in process (httpx.ASGITransport): every route, every rejection."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from api.config import Limits
from api.service import LedgerService
from ledger import checkpoints, compact, crypto, encoding, messages, records, tiles, tree
from ledger.crypto import SeedSigner
from ledger.errors import BadKeyFile, CorruptLedger, StorageError
from ledger.records import Grant
from ledger.state import LedgerState
from ledger.storage import Head, MemoryStorage, ReceiptRow
from tests.helpers.server import Mirror, inprocess_server, make_ledger, sse_stream
from tests.helpers.vectors_data import ledger_vectors

V = ledger_vectors()
#: a little after the vector ledger's last record (2026-01-01), so time-in-future does not fire.
T0 = 1767233000
MSGPACK = {"content-type": "application/msgpack"}
PROBLEM = "urn:writ:problem:"
FINAL_ROOT = bytes.fromhex(V.raw["final"]["root"])


class Clock:
    """A settable clock for create_app."""

    def __init__(self, t: float = T0 + 100) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def body_of(raws: list[bytes]) -> bytes:
    return encoding.pack_records(raws)


async def post(client: httpx.AsyncClient, raws: list[bytes]) -> httpx.Response:
    return await client.post("/v1/records", content=body_of(raws), headers=MSGPACK)


def assert_problem(r: httpx.Response, name: str, status: int | None = None) -> dict[str, Any]:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    doc: dict[str, Any] = r.json()
    assert doc["type"] == PROBLEM + name, doc
    assert doc["status"] == r.status_code
    assert {"title", "detail"} <= doc.keys()
    if status is not None:
        assert r.status_code == status, doc
    return doc


def service(app: Starlette) -> LedgerService:
    svc = app.state.service
    assert isinstance(svc, LedgerService)
    return svc


def next_mirror() -> Mirror:
    """A mirror of the vector ledger whose root in force is root_next (after the rotate at seq 8)."""
    m = Mirror(V.signer("root_next"), V.origin, time=T0)
    m.state = LedgerState(V.anchor, origin=V.origin)
    m.extend(V.records)
    return m


@pytest.fixture
async def empty(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette]]:
    async with inprocess_server(tmp_path, V.anchor, V.origin, MemoryStorage(), clock=Clock()) as ca:
        yield ca


@pytest.fixture
async def loaded(empty: tuple[httpx.AsyncClient, Starlette]) -> tuple[httpx.AsyncClient, Starlette]:
    client, _ = empty
    r = await post(client, V.records)
    assert r.status_code == 200, r.text
    return empty


# --- the read paths ---------------------------------------------------------------


async def test_empty_ledger_serves_size_zero_checkpoint(empty: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, app = empty
    r = await client.get("/checkpoint")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert "max-age=2" in r.headers["cache-control"]
    vc = checkpoints.verify_checkpoint(r.text, V.origin, [service(app).signer.public_key])
    assert vc.checkpoint.size == 0
    assert vc.checkpoint.root == tree.EMPTY_ROOT
    assert vc.timestamp == T0 + 100
    r = await client.get("/healthz")
    assert r.json() == {"ok": True, "size": 0}
    assert_problem(await client.get("/tile/entries/000.p/1"), "bad-tile-path", 404)


async def test_vectors_pushed_and_served_back_byte_for_byte(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    client, app = loaded
    svc = service(app)
    r = await client.get("/v1/ledger")
    info = r.json()
    assert info["size"] == 10 and info["root"] == FINAL_ROOT.hex()
    assert info["origin"] == V.origin and info["anchor"] == V.anchor.hex()
    assert (info["log_vkey"], info["cosig_vkey"]) == checkpoints.checkpoint_vkeys(
        V.origin, svc.signer.public_key
    )
    assert info["log_public_key"] == svc.signer.public_key.hex()

    r = await client.get("/v1/records")
    assert r.headers["content-type"] == "application/msgpack"
    assert encoding.unpack_records(r.content, max_count=1000) == V.records
    r = await client.get("/v1/records", params={"start": 3, "limit": 4})
    assert encoding.unpack_records(r.content, max_count=1000) == V.records[3:7]
    r = await client.get("/v1/records", params={"start": 50})
    assert encoding.unpack_records(r.content, max_count=1000) == []

    r = await client.get("/tile/entries/000.p/10")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert "immutable" in r.headers["cache-control"]
    assert tiles.decode_entry_bundle(r.content, 10) == V.records
    r = await client.get("/tile/entries/000.p/4")  # a narrower partial bundle never changes
    assert tiles.decode_entry_bundle(r.content, 4) == V.records[:4]

    independent = tree.MerkleLevels(tree.leaf_hash(raw) for raw in V.records)
    r = await client.get("/tile/0/000.p/10")
    assert r.content == independent.tile(0, 0, 10) == svc.levels.tile(0, 0, 10)
    assert tree.mth(tiles.decode_hash_tile(r.content, 10)) == FINAL_ROOT

    for missing in (
        "/tile/0/000.p/11",
        "/tile/0/000",
        "/tile/entries/000",
        "/tile/1/000.p/1",
        "/tile/0/001.p/1",
    ):
        assert_problem(await client.get(missing), "bad-tile-path", 404)
    for bad in ("/tile/0/0", "/tile/0/000.p/0", "/tile/0/000.p/256", "/tile/x/000", "/tile/0/x000/001"):
        assert_problem(await client.get(bad), "bad-tile-path", 404)

    r = await client.get("/checkpoint")
    vc = checkpoints.verify_checkpoint(r.text, V.origin, [svc.signer.public_key])
    assert (vc.checkpoint.size, vc.checkpoint.root) == (10, FINAL_ROOT)
    assert vc.timestamp is not None and vc.timestamp >= T0


@pytest.mark.parametrize("case", V.invalid, ids=[c["desc"] for c in V.invalid])
async def test_vector_invalid_records_are_refused_with_their_type(
    loaded: tuple[httpx.AsyncClient, Starlette], case: dict[str, Any]
) -> None:
    client, app = loaded
    r = await post(client, [bytes.fromhex(case["record"])])
    doc = assert_problem(r, case["expect"])
    assert r.status_code in (403, 409, 413, 422)
    if case["expect"] == "stale-head":
        assert r.status_code == 409
        assert (doc["size"], doc["root"]) == (10, FINAL_ROOT.hex())
    assert service(app).size == 10
    assert (await client.get("/v1/ledger")).json()["root"] == FINAL_ROOT.hex()


async def test_each_record_rejection_type_has_a_problem_status(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    """The rejection types the vectors do not cover: too-large, invalid-field, misplaced-genesis,
    unsupported-version, time-in-future."""
    client, app = loaded
    m = next_mirror()
    big = encoding.pack([encoding.pack([1, 1, 10, m.state.root, T0, 0, b"x" * 600]), b"s" * 64])
    assert_problem(await post(client, [big]), "too-large", 413)
    body = encoding.pack([2, 1, 10, m.state.root, T0, 0])
    assert_problem(await post(client, [encoding.pack([body, b"s" * 64])]), "unsupported-version", 422)
    genesis = make_ledger(V.signer("root"), V.origin, os.urandom(32))[0]
    assert_problem(await post(client, [genesis]), "misplaced-genesis", 409)
    # a role the pattern refuses, encoded by hand (the Grant class would refuse to build it)
    fields = [1, 1, 10, m.state.root, T0, 0, os.urandom(32), "Bad Role", "", "x", 0, 0]
    body = encoding.pack(fields)
    raw = encoding.join_record(body, crypto.sign(V.signer("root_next"), crypto.RECORD_DOMAIN, body))
    assert_problem(await post(client, [raw]), "invalid-field", 422)
    # an invalid field the body class cannot catch: a grant to the root key itself
    to_root = Grant(10, m.state.root, T0, V.public("root_next"), "operator", "", "x", 0, 0)
    assert_problem(await post(client, [records.sign(to_root, V.signer("root_next"))]), "invalid-field", 422)
    future = Grant(10, m.state.root, int(T0 + 100 + 301), os.urandom(32), "operator", "", "late", 0, 0)
    assert_problem(await post(client, [records.sign(future, V.signer("root_next"))]), "time-in-future", 422)
    ok = Grant(10, m.state.root, int(T0 + 100 + 300), os.urandom(32), "operator", "", "just-in-time", 0, 0)
    assert (await post(client, [records.sign(ok, V.signer("root_next"))])).status_code == 200
    assert service(app).size == 11


async def test_server_refuses_a_genesis_of_another_origin_or_anchor(tmp_path: Path) -> None:
    async with inprocess_server(tmp_path, V.anchor, "other.example/x", MemoryStorage(), clock=Clock()) as (
        c,
        _,
    ):
        doc = assert_problem(await post(c, V.records[:1]), "invalid-field", 422)
        assert "origin" in doc["detail"]
    other = SeedSigner.generate()
    async with inprocess_server(tmp_path, other.public_key, V.origin, MemoryStorage(), clock=Clock()) as (
        c,
        _,
    ):
        doc = assert_problem(await post(c, V.records[:1]), "wrong-anchor", 422)
        assert doc["anchor"] == other.public_key.hex() and doc["genesis_root"] == V.anchor.hex()
        own = make_ledger(other, V.origin, os.urandom(32), 2, time=T0)
        r = await post(c, own)
        assert r.status_code == 200 and r.json()["appended"] == 4


async def test_a_batch_is_all_or_nothing(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, app = loaded
    m = next_mirror()
    good = [m.grant(os.urandom(32), "operator", f"t-{i}") for i in range(3)]
    bad = bytearray(m.grant(os.urandom(32), "operator", "broken"))
    bad[-1] ^= 1
    doc = assert_problem(await post(client, [*good, bytes(bad)]), "bad-signature", 403)
    assert doc["seq"] == 13 and doc["index"] == 3
    assert service(app).size == 10
    r = await post(client, good)
    assert r.json() == {"size": 13, "root": service(app).root.hex(), "appended": 3, "first_seq": 10}


async def test_stale_head_reports_the_current_head(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, _ = loaded
    doc = assert_problem(await post(client, V.records[9:]), "stale-head", 409)
    assert (doc["size"], doc["root"]) == (10, FINAL_ROOT.hex())


# --- request limits ---------------------------------------------------------------


async def test_wrong_media_type_is_415(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, _ = loaded
    for ctype in ("application/json", "text/plain", ""):
        r = await client.post("/v1/records", content=body_of(V.records[:1]), headers={"content-type": ctype})
        assert_problem(r, "unsupported-media-type", 415)
    r = await client.post("/v1/receipts", content=b"\x90", headers={"content-type": "application/json"})
    assert_problem(r, "unsupported-media-type", 415)


async def test_too_many_records_or_too_big_a_body_is_413(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, _ = loaded
    assert_problem(await post(client, [b"x"] * 1001), "payload-too-large", 413)
    huge = b"\xdd\xff\xff\xff\xff"  # an array32 header announcing 4 billion elements
    r = await client.post("/v1/records", content=huge, headers=MSGPACK)
    assert_problem(r, "payload-too-large", 413)
    r = await client.post("/v1/records", content=b"\x91" + b"\x00" * 700_000, headers=MSGPACK)
    assert_problem(r, "payload-too-large", 413)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(100):
            yield b"\x00" * 10_000

    r = await client.post("/v1/records", content=chunks(), headers=MSGPACK)
    assert_problem(r, "payload-too-large", 413)


async def test_rate_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    limits = Limits(write_rate=0.01, write_burst=3)
    async with inprocess_server(
        tmp_path, V.anchor, V.origin, MemoryStorage(), clock=Clock(), limits=limits
    ) as (
        client,
        _,
    ):
        statuses = [(await post(client, V.records[:1])).status_code for _ in range(3)]
        assert statuses == [200, 409, 409]
        r = await post(client, V.records[1:2])
        assert_problem(r, "rate-limited", 429)
        assert int(r.headers["retry-after"]) >= 1
        assert (await client.get("/checkpoint")).status_code == 200  # reads are not limited


HOSTILE_BODIES: dict[str, bytes] = {
    "empty body": b"",
    "empty array": b"\x90",
    "nil": b"\xc0",
    "a map": encoding.pack({"a": 1}) if False else b"\x81\xa1a\x01",
    "an empty map": b"\x80",
    "array of maps": b"\x91\x80",
    "array of ints": encoding.pack([1, 2, 3]),
    "array of str": encoding.pack(["a", "b"]),
    "negative int": b"\x91\xff",
    "float": b"\x91\xcb" + b"\x00" * 8,
    "ext type": b"\x91\xd4\x01\x00",
    "timestamp ext": b"\x91\xd6\xff\x00\x00\x00\x00",
    "nested arrays 1000 deep": b"\x91" * 1000 + b"\xc4\x01x",
    "nested arrays 100k deep": b"\x91" * 100_000,
    "array16 of 1000 bins announced, none present": b"\xdc\x03\xe8",
    "array of one truncated bin": b"\x91\xc5\xff\xff",
    "bin of garbage": encoding.pack([os.urandom(64)]),
    "non-minimal array header": b"\xdc\x00\x01\xc4\x01x",
    "trailing bytes": encoding.pack([b"x"]) + b"\x00",
    "bool": b"\x91\xc3",
    "a valid record not in an array": V.records[0],
    "a valid record nested twice": encoding.pack([[V.records[0]]]),
    "str8 with invalid utf-8": b"\x91\xd9\x02\xff\xfe",
    "record whose body is a map": encoding.pack([b"\x81\xa1a\x01", b"s" * 64]),
    "record with a 63-byte signature": encoding.pack([encoding.pack([1, 1, 0]), b"s" * 63]),
    "record of zero-length body": encoding.pack([encoding.pack([b"", b"s" * 64])]),
}


async def test_hostile_bodies_are_4xx_never_5xx(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, app = loaded
    for name, body in HOSTILE_BODIES.items():
        for path in ("/v1/records", "/v1/receipts"):
            r = await client.post(path, content=body, headers=MSGPACK)
            assert 400 <= r.status_code < 500, (name, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json"), (name, path)
    rng = random.Random(20260101)
    for i in range(300):
        body = rng.randbytes(rng.randrange(0, 2000))
        if i % 3 == 0:
            body = b"\x91" + body  # look like an array to get further in
        for path in ("/v1/records", "/v1/receipts"):
            r = await client.post(path, content=body, headers=MSGPACK)
            assert 400 <= r.status_code < 500, (body.hex()[:80], path, r.status_code, r.text)
    assert service(app).size == 10


async def test_bad_query_parameters_are_400(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, _ = loaded
    for path in (
        "/v1/records?start=-1",
        "/v1/records?start=abc",
        "/v1/records?start=01",
        "/v1/records?limit=0",
        "/v1/records?limit=1001",
        "/v1/records?start=1&start=2",
        "/v1/records?start=99999999999999999999999",
        "/v1/proof/inclusion",
        "/v1/proof/inclusion?index=10",
        "/v1/proof/inclusion?index=0&size=11",
        "/v1/proof/consistency?old=0",
        "/v1/proof/consistency?old=5&new=4",
        "/v1/proof/consistency?old=5&new=11",
        "/v1/credentials/abc",
        "/v1/credentials?subject=zz",
        "/v1/credentials?subject=00",
        "/v1/events?records=maybe",
        "/v1/fleet?revocations=x",
    ):
        assert_problem(await client.get(path), "bad-request", 400)
    r = await client.get("/v1/events", headers={"last-event-id": "nope"})
    assert_problem(r, "bad-request", 400)


async def test_unknown_paths_and_methods_are_problems(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, _ = loaded
    assert_problem(await client.get("/v1/nothing"), "not-found", 404)
    assert_problem(await client.delete("/v1/records"), "method-not-allowed", 405)
    assert_problem(await client.get("/v1/credentials/6"), "not-found", 404)  # a revoke, not a grant


async def test_an_internal_error_is_500_without_a_traceback(
    loaded: tuple[httpx.AsyncClient, Starlette],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, app = loaded

    async def boom(start: int, end: int) -> list[bytes]:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(service(app), "read_records", boom)
    with caplog.at_level(logging.ERROR, logger="writ.api"):
        r = await client.get("/v1/records")
    doc = assert_problem(r, "internal", 500)
    assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert doc["detail"]
    assert any("unhandled error" in rec.message for rec in caplog.records)


# --- storage failures -------------------------------------------------------------


@pytest.mark.parametrize("step", ["begin", "insert", "head"])
async def test_storage_failure_before_commit_appends_nothing(tmp_path: Path, step: str) -> None:
    armed = {"on": False}

    def fault(name: str) -> None:
        if armed["on"] and name == step:
            raise StorageError(f"injected failure at {name}")

    storage = MemoryStorage(fault=fault)
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage, clock=Clock()) as (client, app):
        assert (await post(client, V.records[:5])).status_code == 200
        armed["on"] = True
        assert_problem(await post(client, V.records[5:]), "storage-error", 503)
        svc = service(app)
        assert svc.size == 5 and svc.state.size == 5
        assert len(encoding.unpack_records((await client.get("/v1/records")).content, max_count=1000)) == 5
        armed["on"] = False
        r = await post(client, V.records[5:])
        assert r.status_code == 200 and r.json()["size"] == 10


async def test_storage_failure_after_commit_acknowledges_what_was_stored(tmp_path: Path) -> None:
    """fail-but-persist: the batch is durable, so the client is told so (never 'nothing appended')."""
    armed = {"on": False}

    def fault(name: str) -> None:
        if armed["on"] and name == "commit":
            raise OSError("injected failure after the commit")

    storage = MemoryStorage(fault=fault)
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage, clock=Clock()) as (client, app):
        assert (await post(client, V.records[:5])).status_code == 200
        armed["on"] = True
        r = await post(client, V.records[5:])
        assert r.status_code == 200 and r.json()["size"] == 10 and r.json()["first_seq"] == 5
        armed["on"] = False
        svc = service(app)
        assert svc.size == 10 and svc.state.root == FINAL_ROOT  # reloaded: the records were stored
        cp = checkpoints.verify_checkpoint(
            (await client.get("/checkpoint")).text, V.origin, [svc.signer.public_key]
        )
        assert cp.checkpoint.size == 10
        assert_problem(await post(client, V.records[5:]), "stale-head", 409)


async def _pipelined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, fail_first: bool
) -> tuple[list[httpx.Response], list[list[bytes]], list[bytes], LedgerService, Head]:
    """Group k = [a] stores (blocked until group k+1 = [b, rival] was verified
    ahead against k's uncommitted result), then fails or commits. ``b`` is
    chained on ``a``; ``rival`` competes with ``a`` for seq 10."""
    storage = MemoryStorage()
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage, clock=Clock()) as (client, app):
        assert (await post(client, V.records)).status_code == 200
        svc = service(app)
        m = next_mirror()
        a, b = m.grant(os.urandom(32), "operator", "a"), m.grant(os.urandom(32), "operator", "b")
        rival = next_mirror().grant(os.urandom(32), "operator", "rival")
        verified: list[list[bytes]] = []
        verify, append = svc._verify_group, storage.append

        def spy(base: LedgerState, group: list[Any], now: int, *, in_place: bool = False) -> LedgerState:
            out = verify(base, group, now, in_place=in_place)
            verified.append([raw for p in group for raw in p.records])
            return out

        async def fault(expected: Any, recs: Sequence[Any], new_root: bytes, checkpoint: Any = None) -> Any:
            if recs[0].raw == a:
                for _ in range(2000):  # until group k+1 is verified ahead
                    if any(b in g for g in verified):
                        break
                    await asyncio.sleep(0.001)
                if fail_first:
                    raise StorageError("injected failure of group k")
            return await append(expected, recs, new_root, checkpoint)

        monkeypatch.setattr(svc, "_verify_group", spy)
        monkeypatch.setattr(storage, "append", fault)
        first = asyncio.create_task(post(client, [a]))
        while not verified:  # group k is taken and verified: its append is (about to be) running
            await asyncio.sleep(0.001)
        rest = await asyncio.gather(post(client, [b]), post(client, [rival]))
        replies = [await first, *rest]
        stored = encoding.unpack_records((await client.get("/v1/records")).content, max_count=1000)
        return replies, verified, stored, svc, await storage.head()


async def test_group_verified_ahead_of_a_failed_commit_is_verified_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group k's append fails while group k+1 is already verified against k's result:
    k+1 is verified again, from scratch, against the reloaded ledger."""
    (ra, rb, rival), verified, stored, svc, head = await _pipelined(tmp_path, monkeypatch, fail_first=True)
    a, b = ra.request.content, rb.request.content
    assert_problem(ra, "storage-error", 503)
    assert_problem(rb, "stale-head", 409)  # b was valid only on top of a, which was never stored
    assert rival.status_code == 200 and rival.json()["first_seq"] == 10  # refused on top of a, valid without
    assert sum(1 for g in verified if encoding.unpack_records(b, max_count=1)[0] in g) == 2
    assert a not in (encoding.pack_records([r]) for r in stored)
    # acknowledged records are exactly the stored ones; memory is not ahead of the disk
    assert stored == [*V.records, encoding.unpack_records(rival.request.content, max_count=1)[0]]
    assert (head.size, head.root) == (svc.size, svc.state.root) == (11, svc.levels.root(11))


async def test_group_verified_ahead_commits_without_a_second_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ra, rb, rival), verified, stored, svc, head = await _pipelined(tmp_path, monkeypatch, fail_first=False)
    assert ra.status_code == 200 and rb.status_code == 200
    assert_problem(rival, "stale-head", 409)
    b = encoding.unpack_records(rb.request.content, max_count=1)[0]
    assert sum(1 for g in verified if b in g) == 1
    assert len(stored) == 12 and stored[11] == b
    assert (head.size, head.root) == (svc.size, svc.state.root) == (12, svc.levels.root(12))


# --- concurrency ------------------------------------------------------------------


async def test_concurrent_appends_racing_for_one_seq_exactly_one_wins(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    client, app = loaded
    contenders = []
    for i in range(12):
        m = next_mirror()
        contenders.append(m.grant(os.urandom(32), "operator", f"racer-{i}"))
    results = await asyncio.gather(*(post(client, [raw]) for raw in contenders))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [409] * 11
    for r in results:
        if r.status_code == 409:
            assert_problem(r, "stale-head")
    assert service(app).size == 11


async def test_concurrent_chained_appends_commit_in_groups(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    client, app = loaded
    m = next_mirror()
    chain = [m.grant(os.urandom(32), "operator", f"chained-{i}") for i in range(30)]
    bad = bytearray(m.state.root)  # one request in the middle that fails alone
    results = await asyncio.gather(*(post(client, [raw]) for raw in chain[:15]), post(client, [bytes(bad)]))
    assert [r.status_code for r in results[:15]] == [200] * 15
    assert 400 <= results[15].status_code < 500
    results = await asyncio.gather(*(post(client, [raw]) for raw in chain[15:]))
    assert all(r.status_code == 200 for r in results)
    svc = service(app)
    assert svc.size == 40 and svc.state.root == m.state.root
    assert {r.json()["first_seq"] for r in results} == set(range(25, 40))
    text = (await client.get("/metrics")).text
    assert "writ_commit_group_requests_count" in text


# --- events -----------------------------------------------------------------------


async def test_sse_sends_a_checkpoint_event_per_append(empty: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, app = empty
    async with sse_stream(app, "/v1/events?records=1") as stream:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        first = await stream.next_event()
        assert (first.event, first.id) == ("checkpoint", "0")
        assert (await post(client, V.records[:4])).status_code == 200
        ev = await stream.next_event()
        assert ev.event == "records"
        doc = json.loads(ev.data)
        assert doc["start"] == 0 and [base64.b64decode(x) for x in doc["records"]] == V.records[:4]
        ev = await stream.next_event()
        assert (ev.event, ev.id) == ("checkpoint", "4")
        note = ev.data + "\n"
        assert note == (await client.get("/checkpoint")).text
        checkpoints.verify_checkpoint(note, V.origin, [service(app).signer.public_key])
        assert (await post(client, V.records[4:])).status_code == 200
        ev = await stream.next_event()
        assert ev.event == "records" and json.loads(ev.data)["start"] == 4
        assert (await stream.next_event()).id == "10"


async def test_sse_catch_up_from_last_event_id(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    _, app = loaded
    async with sse_stream(app, "/v1/events?records=1", {"Last-Event-ID": "6"}) as stream:
        ev = await stream.next_event()
        assert ev.event == "records"
        doc = json.loads(ev.data)
        assert doc["start"] == 6 and [base64.b64decode(x) for x in doc["records"]] == V.records[6:]
        ev = await stream.next_event()
        assert (ev.event, ev.id) == ("checkpoint", "10")
    async with sse_stream(app, "/v1/events?since=10&records=1") as stream:
        ev = await stream.next_event()
        assert (ev.event, ev.id) == ("checkpoint", "10")  # nothing to catch up
    async with sse_stream(app, "/v1/events") as stream:  # no records without records=1
        assert (await stream.next_event()).event == "checkpoint"


async def test_sse_compact_format_one_event_per_checkpoint_encoded_once(
    loaded: tuple[httpx.AsyncClient, Starlette], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?format=compact``: one unnamed event per checkpoint, ``id: <size>``; the
    first a stream gets carries the note verbatim, later ones only its delta;
    streams in sync share one encoding (encoded once, not once per client)."""
    client, app = loaded
    calls: list[int] = []
    real = compact.encode

    def counting(prev: str | None, note: str, size: int, recs: Sequence[bytes]) -> str:
        calls.append(size)
        return real(prev, note, size, recs)

    monkeypatch.setattr(compact, "encode", counting)  # what api.routes.events calls
    m = next_mirror()
    grant = m.grant(os.urandom(32), "operator", "tablet-07")
    revoke = m.revoke(records.parse(grant).seq, reason=1)
    headers = {"Last-Event-ID": "10"}
    async with (
        sse_stream(app, "/v1/events?format=compact", headers) as a,
        sse_stream(app, "/v1/events?format=compact", headers) as b,
    ):
        served = (await client.get("/checkpoint")).text
        firsts = [await a.next_event(), await b.next_event()]
        for ev in firsts:
            assert (ev.event, ev.id) == (None, "10")
            assert compact.decode(None, 10, json.loads(ev.data)) == ([], served)
        assert firsts[0] == firsts[1] and calls == [10]
        assert (await post(client, [grant])).status_code == 200
        evs = [await a.next_event(), await b.next_event()]
        assert evs[0] == evs[1] and evs[0].id == "11"
        assert type(json.loads(evs[0].data)) is str  # the delta form
        new = (await client.get("/checkpoint")).text
        assert compact.decode(served, 11, json.loads(evs[0].data)) == ([grant], new)
        checkpoints.verify_checkpoint(new, V.origin, [service(app).signer.public_key])
        assert (await post(client, [revoke])).status_code == 200
        ev = await a.next_event()
        assert compact.decode(new, 12, json.loads(ev.data))[0] == [revoke]
        assert calls == [10, 11, 12]  # two streams, three checkpoints, three encodings
    async with sse_stream(app, "/v1/events?format=compact", {"Last-Event-ID": "9"}) as c:
        ev = await c.next_event()  # catch-up: its own encoding, the full form
        recs, note = compact.decode(None, 12, json.loads(ev.data))
        assert recs == [*V.records[9:], grant, revoke] and note == (await client.get("/checkpoint")).text
    r = await client.get("/v1/events?format=tiny")
    assert_problem(r, "bad-request", 400)


async def test_sse_compact_event_of_one_revocation_is_under_400_bytes(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    """A device in sync receives one revocation in one compact event of at most
    400 bytes on the wire (chunked transfer framing included, no witnesses),
    against some 600 for the standard records + checkpoint events."""
    client, app = loaded
    m = next_mirror()
    grant = m.grant(os.urandom(32), "operator", "tablet-07")
    assert (await post(client, [grant])).status_code == 200
    revoke = m.revoke(records.parse(grant).seq, reason=1)
    async with (
        sse_stream(app, "/v1/events?format=compact", {"Last-Event-ID": "11"}) as cpt,
        sse_stream(app, "/v1/events?records=1", {"Last-Event-ID": "11"}) as std,
    ):
        await cpt.next_event()
        await std.next_event()
        assert (await post(client, [revoke])).status_code == 200
        ev = await cpt.next_event()
        event = f"id: {ev.id}\ndata: {ev.data}\n\n".encode()
        wire = len(event) + len(f"{len(event):x}\r\n\r\n")
        rec, cp = await std.next_event(), await std.next_event()
    lines = "".join(f"data: {line}\n" for line in cp.data.split("\n"))
    old = len(f"event: records\ndata: {rec.data}\n\nid: {cp.id}\nevent: checkpoint\n{lines}\n".encode())
    assert wire <= 400 < old, (wire, old)


async def test_sse_heartbeat_resign_and_connection_cap(tmp_path: Path) -> None:
    clock = Clock()
    limits = Limits(sse_heartbeat=0.05, max_sse_clients=1)
    async with inprocess_server(
        tmp_path, V.anchor, V.origin, MemoryStorage(), clock=clock, limits=limits, checkpoint_interval=0.3
    ) as (client, app):
        async with sse_stream(app, "/v1/events") as stream:
            first = await stream.next_event()
            hb = await stream.next_event(comments=True)
            assert hb.comment == "hb"
            r = await client.get("/v1/events")
            assert_problem(r, "overloaded", 503)
            clock.t += 5
            ev = await stream.next_event(timeout=3)  # the re-signed checkpoint, same size, a new time
            assert (ev.event, ev.id) == ("checkpoint", "0")
            t1 = checkpoints.verify_checkpoint(
                first.data + "\n", V.origin, [service(app).signer.public_key]
            ).timestamp
            t2 = checkpoints.verify_checkpoint(
                ev.data + "\n", V.origin, [service(app).signer.public_key]
            ).timestamp
            assert t1 is not None and t2 is not None and t2 > t1
            served = (await client.get("/checkpoint")).text
            clock.t -= 1000  # the clock goes back: nothing is signed below t2 nor ahead of the clock
            with pytest.raises(TimeoutError):
                await stream.next_event(timeout=1)
            assert (await client.get("/checkpoint")).text == served  # the last note, unchanged
            clock.t += 1001  # the clock passes t2: re-signing resumes
            ev = await stream.next_event(timeout=3)
            t3 = checkpoints.verify_checkpoint(
                ev.data + "\n", V.origin, [service(app).signer.public_key]
            ).timestamp
            assert t3 is not None and t3 > t2
        metrics = (await client.get("/metrics")).text
        assert "writ_sse_clients 0.0" in metrics


# --- receipts and the fleet -------------------------------------------------------


def receipt(signer: SeedSigner, grant_seq: int, size: int, root: bytes, t: int = T0) -> bytes:
    return messages.make_receipt(signer, grant_seq, size, root, t)


async def post_receipt(client: httpx.AsyncClient, raw: bytes) -> httpx.Response:
    return await client.post("/v1/receipts", content=raw, headers=MSGPACK)


async def test_receipts_accepted_refused_and_latest_kept(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, app = loaded
    svc = service(app)
    r = await post_receipt(client, bytes.fromhex(V.raw["receipt"]["message"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": True, "device_grant_seq": 3, "size": 10}
    plc2 = V.signer("plc_2")
    root5 = svc.levels.root(5)
    assert (await post_receipt(client, receipt(plc2, 4, 5, root5))).status_code == 200

    refused = {
        "forged: plc-2 signs as plc-1": (receipt(plc2, 3, 10, FINAL_ROOT), "bad-signature", 403),
        "unknown device: an operator grant": (
            receipt(V.signer("tablet_08"), 9, 10, FINAL_ROOT),
            "unknown-device",
            403,
        ),
        "unknown device: a revoked grant": (
            receipt(V.signer("tablet_07"), 5, 10, FINAL_ROOT),
            "unknown-device",
            403,
        ),
        "unknown device: no such seq": (receipt(plc2, 99, 10, FINAL_ROOT), "unknown-device", 403),
        "unknown head: wrong root": (receipt(plc2, 4, 10, root5), "unknown-head", 422),
        "unknown head: size beyond the tree": (receipt(plc2, 4, 11, FINAL_ROOT), "unknown-head", 422),
        "bad message: not a receipt": (encoding.pack([b"x", b"y"]), "bad-message", 422),
    }
    for name, (raw, kind, status) in refused.items():
        r = await post_receipt(client, raw)
        assert r.status_code == status, (name, r.text)
        assert_problem(r, kind)

    # an older head after a newer one does not replace it
    assert (
        await post_receipt(client, receipt(V.signer("plc_1"), 3, 4, svc.levels.root(4)))
    ).status_code == 200
    fleet = (await client.get("/v1/fleet")).json()
    devices = {d["name"]: d for d in fleet["devices"]}
    assert devices["plc-1"]["size"] == 10 and devices["plc-1"]["root"] == FINAL_ROOT.hex()
    assert devices["plc-2"]["size"] == 5 and devices["plc-2"]["revoked"] is False
    assert devices["plc-1"]["received_at"] == T0 + 100
    revs = {r["seq"]: r for r in fleet["revocations"]}
    tablet = revs[6]
    assert (tablet["name"], tablet["reason"], tablet["target"]) == ("tablet-07", "lost", 5)
    assert (tablet["applied"], tablet["total"]) == (1, 2)
    assert [s["name"] for s in tablet["stragglers"]] == ["plc-2"]
    assert tablet["stragglers"][0]["size"] == 5
    by_key = revs[7]
    assert by_key["reason"] == "key_compromise" and by_key["target"] == V.public("stolen_laptop").hex()
    assert (by_key["applied"], by_key["total"]) == (1, 2)
    # plc-2 catches up
    assert (await post_receipt(client, receipt(plc2, 4, 10, FINAL_ROOT))).status_code == 200
    fleet = (await client.get("/v1/fleet")).json()
    assert all(r["applied"] == r["total"] == 2 and r["stragglers"] == [] for r in fleet["revocations"])
    assert "writ_receipts_total 4.0" in (await client.get("/metrics")).text


class CountingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.receipt_transactions = 0

    async def put_receipts(self, rows: Sequence[ReceiptRow]) -> None:
        self.receipt_transactions += 1
        await asyncio.sleep(0.01)  # a transaction takes time: receipts arriving meanwhile wait for the next
        await super().put_receipts(rows)


async def test_concurrent_receipts_share_transactions(tmp_path: Path) -> None:
    storage = CountingStorage()
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage, clock=Clock()) as (client, _):
        await post(client, V.records)
        plc1, plc2 = V.signer("plc_1"), V.signer("plc_2")
        raws = [
            receipt(plc1 if i % 2 else plc2, 3 if i % 2 else 4, 10, FINAL_ROOT, T0 + i) for i in range(40)
        ]
        results = await asyncio.gather(*(post_receipt(client, raw) for raw in raws))
        assert all(r.status_code == 200 for r in results)
        assert storage.receipt_transactions < 20  # grouped: far fewer transactions than receipts
        rows = {r.device_grant_seq: r for r in await storage.receipts()}
        assert rows[3].time == T0 + 39 and rows[4].time == T0 + 38  # the latest of each device kept


async def test_a_cancelled_receipt_request_strands_no_other(tmp_path: Path) -> None:
    """A request cancelled while its receipt waits for the next group commit must not
    leave the requests that joined its group (or later ones) waiting forever."""
    storage = CountingStorage()
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage, clock=Clock()) as (client, app):
        await post(client, V.records)
        svc = service(app)
        plc1, plc2 = V.signer("plc_1"), V.signer("plc_2")
        rows = [
            ReceiptRow(
                3 if i % 2 else 4,
                10,
                FINAL_ROOT,
                T0 + i,
                receipt(plc1 if i % 2 else plc2, 3 if i % 2 else 4, 10, FINAL_ROOT, T0 + i),
                T0,
            )
            for i in range(4)
        ]
        first = asyncio.create_task(svc.receipt_writer.store(rows[0]))  # holds the transaction
        await asyncio.sleep(0)
        leader = asyncio.create_task(svc.receipt_writer.store(rows[1]))  # leads the next group
        follower = asyncio.create_task(svc.receipt_writer.store(rows[2]))  # joins it
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.wait_for(asyncio.gather(first, follower), 2)
        await asyncio.wait_for(svc.receipt_writer.store(rows[3]), 2)  # and later receipts still flow
        kept = {r.device_grant_seq: r.time for r in await storage.receipts()}
        assert kept == {3: T0 + 3, 4: T0 + 2}


async def test_receipts_survive_a_restart(tmp_path: Path) -> None:
    storage = MemoryStorage()
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage, clock=Clock()) as (client, app):
        await post(client, V.records)
        assert (await post_receipt(client, bytes.fromhex(V.raw["receipt"]["message"]))).status_code == 200
        data_dir = service(app).config.data_dir
    storage2 = MemoryStorage()
    storage2.__dict__.update({k: v for k, v in storage.__dict__.items() if k != "_closed"})
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage2, clock=Clock(), data_dir=data_dir) as (
        client,
        _,
    ):
        devices = (await client.get("/v1/fleet")).json()["devices"]
        assert [d["size"] for d in devices] == [10, None]


# --- credentials and proofs -------------------------------------------------------


async def test_credentials_by_seq_name_subject_role(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, _ = loaded
    c5 = (await client.get("/v1/credentials/5")).json()
    assert c5["name"] == "tablet-07" and c5["role"] == "operator" and c5["status"] == "revoked"
    assert c5["revocation"] == {"seq": 6, "reason": "lost", "time": 1767229200, "signer": 2, "by": "id"}
    assert bytes.fromhex(c5["record"]) == V.records[5]
    c3 = (await client.get("/v1/credentials/3")).json()
    assert c3["status"] == "active" and c3["revocation"] is None and c3["scope"] == "line-3"
    assert c3["subject"] == V.public("plc_1").hex() and c3["granted_at"] == 1767225630
    r = (await client.get("/v1/credentials", params={"name": "plc-2"})).json()
    assert [c["seq"] for c in r["credentials"]] == [4]
    r = (await client.get("/v1/credentials", params={"subject": V.public("tablet_08").hex()})).json()
    assert [c["seq"] for c in r["credentials"]] == [9]
    r = (await client.get("/v1/credentials", params={"role": "device"})).json()
    assert [c["seq"] for c in r["credentials"]] == [3, 4]
    r = (await client.get("/v1/credentials", params={"role": "device", "name": "plc-1"})).json()
    assert [c["seq"] for c in r["credentials"]] == [3]
    r = (await client.get("/v1/credentials", params={"name": "nobody"})).json()
    assert r["credentials"] == []


async def test_credential_status_expired_and_not_yet_valid(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    client, _ = loaded
    m = next_mirror()
    now = T0 + 100
    await post(
        client,
        [
            m.grant(os.urandom(32), "operator", "expired", not_before=now - 100, not_after=now - 1),
            m.grant(os.urandom(32), "operator", "future", not_before=now + 3600),
        ],
    )
    assert (await client.get("/v1/credentials/10")).json()["status"] == "expired"
    assert (await client.get("/v1/credentials/11")).json()["status"] == "not-yet-valid"
    # revoked by key
    key = os.urandom(32)
    await post(client, [m.grant(key, "operator", "doomed"), m.revoke(key, 4)])
    c = (await client.get("/v1/credentials/12")).json()
    assert (
        c["status"] == "revoked" and c["revocation"]["by"] == "key" and c["revocation"]["reason"] == "retired"
    )


async def test_inclusion_and_consistency_proofs_verify(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, app = loaded
    for index in range(10):
        for size in (index + 1, 10):
            doc = (await client.get("/v1/proof/inclusion", params={"index": index, "size": size})).json()
            assert doc["leaf_hash"] == tree.leaf_hash(V.records[index]).hex()
            tree.verify_inclusion(
                tree.leaf_hash(V.records[index]),
                index,
                size,
                [bytes.fromhex(h) for h in doc["proof"]],
                bytes.fromhex(doc["root"]),
            )
    for old in range(1, 11):
        doc = (await client.get("/v1/proof/consistency", params={"old": old})).json()
        assert doc["new"] == 10 and doc["new_root"] == FINAL_ROOT.hex()
        tree.verify_consistency(
            old, 10, [bytes.fromhex(h) for h in doc["proof"]], bytes.fromhex(doc["old_root"]), FINAL_ROOT
        )
    vec = V.raw["proofs"]["inclusion"]
    vec = vec[0] if isinstance(vec, list) else vec
    # the text form: C2SP tlog-proof against the current checkpoint
    r = await client.get("/v1/proof/inclusion", params={"index": 3}, headers={"accept": "text/plain"})
    head, _, note = r.text.partition("\n\n")
    lines = head.split("\n")
    assert lines[:2] == ["c2sp.org/tlog-proof@v1", "index 3"]
    proof = [base64.b64decode(x) for x in lines[2:]]
    tree.verify_inclusion(tree.leaf_hash(V.records[3]), 3, 10, proof, FINAL_ROOT)
    checkpoints.verify_checkpoint(note, V.origin, [service(app).signer.public_key])
    r = await client.get(
        "/v1/proof/inclusion", params={"index": 3, "size": 5}, headers={"accept": "text/plain"}
    )
    assert_problem(r, "bad-request", 400)
    r = await client.get("/v1/proof/consistency", params={"old": 4}, headers={"accept": "text/plain"})
    proof = [base64.b64decode(x) for x in r.text.splitlines()]
    tree.verify_consistency(4, 10, proof, service(app).levels.root(4), FINAL_ROOT)


# --- dashboard, metrics, openapi --------------------------------------------------


async def test_dashboard_shows_names_revocations_and_escapes(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    client, app = loaded
    m = next_mirror()
    await post(client, [m.grant(os.urandom(32), "operator", "<script>alert(1)</script>")])
    await post_receipt(client, bytes.fromhex(V.raw["receipt"]["message"]))
    r = await client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for text in (
        V.origin,
        "tablet-07",
        "plc-1",
        "plc-2",
        "tablet-08",
        "lost",
        "key_compromise",
        service(app).root.hex(),
    ):
        assert text in page, text
    assert "revoker #2 revoked grant #5 (operator &#x27;tablet-07&#x27;): lost" in page
    assert "1/2 devices" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    page = (await client.get("/", params={"q": "plc"})).text
    creds = page.split("<h2>Credentials</h2>", 1)[1].split("<h2>", 1)[0]
    assert "plc-1" in creds and "plc-2" in creds and "tablet-07" not in creds
    page = (await client.get("/", params={"q": "zzz"})).text
    assert "No credentials match" in page


async def test_metrics_have_the_counters(loaded: tuple[httpx.AsyncClient, Starlette]) -> None:
    client, _ = loaded
    await post(client, [bytes.fromhex(V.invalid[0]["record"])])
    text = (await client.get("/metrics")).text
    assert "writ_appends_total 10.0" in text
    assert 'writ_rejections_total{type="bad-signature"} 1.0' in text
    assert "writ_sse_clients 0.0" in text
    assert "writ_checkpoint_age_seconds" in text
    assert "writ_append_latency_seconds_bucket" in text
    assert "writ_tree_size 10.0" in text


async def test_openapi_is_valid_3x_and_lists_the_json_routes(
    loaded: tuple[httpx.AsyncClient, Starlette],
) -> None:
    client, _ = loaded
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    for path in (
        "/checkpoint",
        "/v1/records",
        "/v1/ledger",
        "/v1/events",
        "/v1/receipts",
        "/v1/credentials",
        "/v1/credentials/{seq}",
        "/v1/fleet",
        "/v1/proof/inclusion",
        "/v1/proof/consistency",
        "/healthz",
    ):
        assert path in doc["paths"], path
    op_ids = set()
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        for method, op in item.items():
            assert method in {"get", "post"}
            assert op["responses"] and all(
                k.isdigit() and "description" in v for k, v in op["responses"].items()
            )
            assert op["operationId"] not in op_ids
            op_ids.add(op["operationId"])
            for p in op.get("parameters", []):
                assert p["in"] in {"query", "path"} and "schema" in p
                if p["in"] == "path":
                    assert p["required"] is True and "{" + p["name"] + "}" in path

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert (
            ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
        )
    try:  # a full validation when the validator happens to be installed (it is not a dependency)
        from openapi_spec_validator import validate  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    validate(doc)


# --- start-up ---------------------------------------------------------------------


async def test_restart_reloads_and_never_goes_back_in_time(tmp_path: Path) -> None:
    clock = Clock(T0 + 5000)
    async with inprocess_server(tmp_path, V.anchor, V.origin, clock=clock) as (client, app):  # SQLite
        await post(client, V.records)
        data_dir = service(app).config.data_dir
        t_before = service(app).checkpoint.timestamp
    clock.t = T0 + 10  # the clock went back across the restart
    async with inprocess_server(tmp_path, V.anchor, V.origin, clock=clock, data_dir=data_dir) as (
        client,
        app,
    ):
        svc = service(app)
        assert svc.size == 10 and svc.root == FINAL_ROOT
        vc = checkpoints.verify_checkpoint(
            (await client.get("/checkpoint")).text, V.origin, [svc.signer.public_key]
        )
        assert vc.timestamp is not None and vc.timestamp >= t_before
        assert encoding.unpack_records((await client.get("/v1/records")).content, max_count=1000) == V.records


async def test_a_corrupt_ledger_refuses_to_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = MemoryStorage()
    async with inprocess_server(tmp_path, V.anchor, V.origin, storage, clock=Clock()) as (client, app):
        await post(client, V.records)
        data_dir = service(app).config.data_dir
    raw, _ = storage._records[4]
    flipped = bytearray(raw)
    flipped[-5] ^= 0x40
    storage._records[4] = (bytes(flipped), tree.leaf_hash(bytes(flipped)))
    storage._closed = False
    with caplog.at_level(logging.ERROR, logger="writ.api"), pytest.raises(CorruptLedger) as info:
        async with inprocess_server(tmp_path, V.anchor, V.origin, storage, data_dir=data_dir):
            pass
    assert info.value.seq == 4
    assert any("first bad seq 4" in r.message for r in caplog.records)


async def test_a_group_readable_log_key_refuses_to_start(tmp_path: Path) -> None:
    async with inprocess_server(tmp_path, V.anchor, V.origin, MemoryStorage()) as (_, app):
        data_dir = service(app).config.data_dir
    key = data_dir / "log.key"
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o640)
    with pytest.raises(BadKeyFile):
        async with inprocess_server(tmp_path, V.anchor, V.origin, MemoryStorage(), data_dir=data_dir):
            pass


def test_token_bucket_refills() -> None:
    from api.ratelimit import TokenBuckets

    now = [0.0]
    b = TokenBuckets(2.0, 2, clock=lambda: now[0], max_keys=2)
    assert [b.take("a"), b.take("a")] == [0.0, 0.0]
    assert b.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert b.take("a") == 0.0
    assert b.take("b") == 0.0 and b.take("c") == 0.0  # evicts, never grows past max_keys
    assert len(b._buckets) <= 2
