"""The log side (api/witnessing.py): a real server app submits its checkpoints
to in-process witnesses and serves their cosignatures, in process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from api.witness import WitnessConfig, create_witness_app, init_witness_dir, logs_from_flags
from api.witness_store import MemoryWitnessStore
from api.witnessing import Witnessing
from ledger import checkpoints, encoding, notes, records
from ledger.crypto import SeedSigner
from ledger.storage import MemoryStorage

from .helpers.server import Mirror, inprocess_server, sse_stream

ORIGIN = "ledger.example/witnessed"
MSGPACK = {"content-type": "application/msgpack"}


class Router(httpx.AsyncBaseTransport):
    """Routes each witness host to its in-process app; hosts in ``down`` refuse to connect."""

    def __init__(self) -> None:
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.down: set[str] = set()
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        host = request.url.host
        if host in self.down or host not in self.apps:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.apps[host].handle_async_request(request)


class Wit:
    def __init__(self, name: str, public_key: bytes, app: Starlette) -> None:
        self.name = name
        self.public_key = public_key
        self.app = app


@contextlib.asynccontextmanager
async def witness_app(tmp_path: Path, name: str, log_key: bytes) -> AsyncIterator[Wit]:
    data = tmp_path / name.replace("/", "_")
    doc = await init_witness_dir(data, name)
    config = WitnessConfig(data_dir=data, logs=logs_from_flags([f"{ORIGIN}={log_key.hex()}"]))
    app = create_witness_app(config, store=MemoryWitnessStore())
    async with app.router.lifespan_context(app):
        yield Wit(name, bytes.fromhex(doc["witness_public_key"]), app)


class Ledger:
    def __init__(self, client: httpx.AsyncClient, app: Starlette, mirror: Mirror) -> None:
        self.client = client
        self.app = app
        self.m = mirror

    async def push(self, *raws: bytes) -> None:
        r = await self.client.post("/v1/records", content=encoding.pack_records(list(raws)), headers=MSGPACK)
        assert r.status_code == 200, r.text

    async def note(self) -> str:
        return (await self.client.get("/checkpoint")).text

    async def wait_cosigned(self, names: set[str], size: int | None = None, timeout: float = 5.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                note = await self.note()
                have = {s.name for s in notes.parse_note(note).signatures}
                if names <= have and (
                    size is None
                    or checkpoints.parse_checkpoint_body(notes.parse_note(note).body).size == size
                ):
                    return note
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def witnessed_ledger(tmp_path: Path, n: int = 2) -> AsyncIterator[tuple[Ledger, list[Wit], Router]]:
    root = SeedSigner.generate()
    router = Router()
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, MemoryStorage()) as (client, app):
        svc = app.state.service
        m = Mirror(root, ORIGIN)
        m.genesis()
        m.grant(svc.signer.public_key, records.ROLE_LOG, "log")
        async with contextlib.AsyncExitStack() as stack:
            wits = [
                await stack.enter_async_context(
                    witness_app(tmp_path, f"w{i}.example/w", svc.signer.public_key)
                )
                for i in range(n)
            ]
            for w in wits:
                m.grant(w.public_key, records.ROLE_WITNESS, w.name)
                router.apps[w.name.split("/")[0]] = httpx.ASGITransport(app=w.app)
            ledger = Ledger(client, app, m)
            await ledger.push(*m.records)
            witnessing = Witnessing(svc, [f"http://{w.name.split('/')[0]}" for w in wits], transport=router)
            svc.witnessing = witnessing
            witnessing.start()
            try:
                yield ledger, wits, router
            finally:
                await witnessing.close()
                svc.witnessing = None


def _keys(wits: list[Wit]) -> list[tuple[str, bytes]]:
    return [(w.name, w.public_key) for w in wits]


async def test_checkpoint_is_served_with_every_witness_cosignature(tmp_path: Path) -> None:
    async with witnessed_ledger(tmp_path) as (ledger, wits, _):
        svc = ledger.app.state.service
        note = await ledger.wait_cosigned({w.name for w in wits})
        vc = checkpoints.verify_checkpoint(
            note, ORIGIN, [svc.signer.public_key], _keys(wits), require_witnesses=2
        )
        assert set(vc.cosigners) == {w.name for w in wits}
        led = (await ledger.client.get("/v1/ledger")).json()
        assert [x["state"] for x in led["witnesses"]] == ["ok", "ok"]
        assert all(x["cosigned_size"] == led["size"] and x["age"] is not None for x in led["witnesses"])
        page = (await ledger.client.get("/")).text
        assert all(f"{w.name}</span>: ok, cosigned size {led['size']}" in page for w in wits)
        # an append is cosigned in turn, the proof from the witness's size
        tablet = ledger.m.grant(SeedSigner.generate().public_key, "operator", "tablet")
        await ledger.push(tablet, ledger.m.revoke(ledger.m.state.size - 1, 2))
        note = await ledger.wait_cosigned({w.name for w in wits}, size=ledger.m.state.size)
        checkpoints.verify_checkpoint(note, ORIGIN, [svc.signer.public_key], _keys(wits), require_witnesses=2)


async def test_cosignatures_stay_on_re_signed_notes_and_refresh(tmp_path: Path) -> None:
    async with witnessed_ledger(tmp_path) as (ledger, wits, _):
        svc = ledger.app.state.service
        await ledger.wait_cosigned({w.name for w in wits})
        before = svc.checkpoint
        async with svc._lock:
            await svc._publish()  # a periodic re-sign of the same tree
        assert svc.checkpoint is not before
        again = await ledger.note()
        # carried over at once (same tree), then refreshed by the witnesses
        names = {s.name for s in notes.parse_note(again).signatures}
        assert {w.name for w in wits} <= names


async def test_new_cosignatures_are_pushed_to_the_event_streams(tmp_path: Path) -> None:
    async with witnessed_ledger(tmp_path, n=1) as (ledger, wits, router):
        router.down.add("w0.example")
        await asyncio.sleep(0.05)
        async with sse_stream(ledger.app, "/v1/events") as stream:
            ev = await stream.next_event()
            assert wits[0].name not in ev.data
            router.down.clear()
            witnessing = ledger.app.state.service.witnessing
            witnessing.peers[0].wake.set()
            async with asyncio.timeout(5):
                while wits[0].name not in ev.data:
                    ev = await stream.next_event(timeout=5)
            assert ev.event == "checkpoint"


async def test_a_down_witness_blocks_neither_appends_nor_reads(tmp_path: Path) -> None:
    async with witnessed_ledger(tmp_path) as (ledger, wits, router):
        router.down.add("w1.example")
        for i in range(5):
            async with asyncio.timeout(2):
                await ledger.push(ledger.m.grant(SeedSigner.generate().public_key, "operator", f"op-{i}"))
                assert (await ledger.client.get("/checkpoint")).status_code == 200
        note = await ledger.wait_cosigned({wits[0].name}, size=ledger.m.state.size)
        assert wits[1].name not in note
        led = (await ledger.client.get("/v1/ledger")).json()
        assert [x["state"] for x in led["witnesses"]] == ["ok", "down"]


async def test_log_learns_the_witness_size_from_409_and_sends_a_proof(tmp_path: Path) -> None:
    """A restarted log starts at old 0; the witness answers 409 with its size."""
    async with witnessed_ledger(tmp_path, n=1) as (ledger, wits, router):
        svc = ledger.app.state.service
        await ledger.wait_cosigned({wits[0].name})
        await svc.witnessing.close()
        restarted = Witnessing(svc, ["http://w0.example"], transport=router)
        svc.witnessing = restarted
        restarted.start()
        await ledger.push(ledger.m.grant(SeedSigner.generate().public_key, "operator", "late"))
        await ledger.wait_cosigned({wits[0].name}, size=ledger.m.state.size)
        assert restarted.peers[0].state == "ok"


@contextlib.asynccontextmanager
async def one_witness(
    tmp_path: Path, transport: httpx.AsyncBaseTransport, url: str, grant: tuple[bytes, str] | None = None
) -> AsyncIterator[tuple[Ledger, Witnessing]]:
    """A ledger (``grant``: a witness grant) whose server submits to ``url`` through ``transport``."""
    root = SeedSigner.generate()
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, MemoryStorage()) as (client, app):
        svc = app.state.service
        m = Mirror(root, ORIGIN)
        m.genesis()
        m.grant(svc.signer.public_key, records.ROLE_LOG, "log")
        if grant is not None:
            m.grant(grant[0], records.ROLE_WITNESS, grant[1])
        ledger = Ledger(client, app, m)
        await ledger.push(*m.records)
        witnessing = Witnessing(svc, [url], transport=transport)
        svc.witnessing = witnessing
        witnessing.start()
        try:
            async with asyncio.timeout(5):
                while witnessing.peers[0].state == "pending":
                    await asyncio.sleep(0.02)
            yield ledger, witnessing
        finally:
            await witnessing.close()
            svc.witnessing = None


async def test_an_ungranted_witness_is_not_served(tmp_path: Path) -> None:
    router = Router()  # the witness is not up yet: the first attempt finds it down
    async with one_witness(tmp_path, router, "http://stranger.example") as (ledger, witnessing):
        svc = ledger.app.state.service
        async with witness_app(tmp_path, "stranger.example/w", svc.signer.public_key) as w:
            router.apps["stranger.example"] = httpx.ASGITransport(app=w.app)
            witnessing.peers[0].wake.set()
            async with asyncio.timeout(5):
                while witnessing.peers[0].state in ("pending", "down"):
                    await asyncio.sleep(0.02)
            assert witnessing.peers[0].state == "ungranted"
            assert w.name not in await ledger.note()


class Liar(httpx.AsyncBaseTransport):
    """A witness that answers with a line under a granted name but a bad signature."""

    def __init__(self, name: str, key: bytes) -> None:
        self.line = notes.NoteSignature(
            name, notes.Verifier.create(name, notes.SIG_ED25519_COSIGNATURE, key).key_id, bytes(72)
        ).line()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(self.line.encode()))


async def test_a_witness_sending_a_bad_cosignature_cannot_poison_the_note(tmp_path: Path) -> None:
    wkey = SeedSigner.generate()
    liar = Liar("liar.example/w", wkey.public_key)
    async with one_witness(tmp_path, liar, "http://liar.example", (wkey.public_key, "liar.example/w")) as (
        ledger,
        _,
    ):
        svc = ledger.app.state.service
        note = await ledger.note()
        assert ledger.app.state.service.witnessing.peers[0].state == "bad-cosignature"
        assert "liar.example" not in note
        checkpoints.verify_checkpoint(
            note, ORIGIN, [svc.signer.public_key], [("liar.example/w", wkey.public_key)]
        )


@pytest.mark.parametrize("url", ["ftp://x", "w.example", "http://", "http://x/?q=1"])
def test_bad_witness_url_is_a_usage_error(url: str) -> None:
    from api.cli import _witness_urls
    from ledger.errors import UsageError

    with pytest.raises(UsageError):
        _witness_urls([url])


class Busy(httpx.AsyncBaseTransport):
    """A witness that first answers 429 with a Retry-After, then serves normally."""

    def __init__(self, inner: httpx.AsyncBaseTransport, times: int) -> None:
        self.inner = inner
        self.times = times

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.times > 0:
            self.times -= 1
            return httpx.Response(429, headers={"Retry-After": "1"}, stream=httpx.ByteStream(b"slow down"))
        return await self.inner.handle_async_request(request)


async def test_a_rate_limited_log_waits_as_told_and_is_then_cosigned(tmp_path: Path) -> None:
    router = Router()
    busy = Busy(router, 1)
    wkey_name = "busy.example/w"
    async with one_witness(tmp_path, busy, "http://busy.example") as (ledger, witnessing):
        assert witnessing.peers[0].state == "refused"
        svc = ledger.app.state.service
        async with witness_app(tmp_path, wkey_name, svc.signer.public_key) as w:
            router.apps["busy.example"] = httpx.ASGITransport(app=w.app)
            await ledger.push(ledger.m.grant(w.public_key, records.ROLE_WITNESS, wkey_name))
            note = await ledger.wait_cosigned({wkey_name}, size=ledger.m.state.size)
            assert wkey_name in note and witnessing.peers[0].state == "ok"
