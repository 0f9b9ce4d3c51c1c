"""The real ``writ serve`` process: vectors, an independent C2SP verifier, races, signals, crashes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from tlog_scales.backend import HttpBackend
from tlog_scales.reader import TilesReader
from tlog_scales.signing import Vkey

from ledger import checkpoints, encoding, records, tree
from ledger.crypto import SeedSigner
from ledger.state import LedgerState
from ledger.storage.load import load_ledger
from ledger.storage.sqlite import SqliteStorage
from tests.helpers.server import (
    Mirror,
    make_ledger,
    run_writ,
    running_server,
    served_records,
    start_server,
    stop_server,
)
from tests.helpers.vectors_data import ledger_vectors

pytestmark = pytest.mark.e2e

V = ledger_vectors()
MSGPACK = {"content-type": "application/msgpack"}


def push(url: str, raws: list[bytes], client: httpx.Client | None = None) -> httpx.Response:
    c = client or httpx
    return c.post(url + "/v1/records", content=encoding.pack_records(raws), headers=MSGPACK, timeout=30)


def test_server_init_cli(tmp_path: Path) -> None:
    data = tmp_path / "d"
    code, doc, _ = run_writ(
        "server", "init", "--data", str(data), "--anchor", V.anchor.hex(), "--origin", V.origin
    )
    assert code == 0
    pub = bytes.fromhex(doc["log_public_key"])
    assert (doc["log_vkey"], doc["cosig_vkey"]) == checkpoints.checkpoint_vkeys(V.origin, pub)
    assert (data / "log.key").stat().st_mode & 0o777 == 0o600
    assert (data / "ledger.db").exists()
    code, doc, err = run_writ(
        "server", "init", "--data", str(data), "--anchor", V.anchor.hex(), "--origin", V.origin
    )
    assert (code, doc["error"]) == (1, "ledger-exists")
    assert "Traceback" not in err
    for anchor, origin in (
        ("abc", V.origin),
        ("zz" * 32, V.origin),
        (V.anchor.hex(), "has space"),
        (V.anchor.hex(), "a+b"),
    ):
        code, doc, err = run_writ(
            "server", "init", "--data", str(tmp_path / "e"), "--anchor", anchor, "--origin", origin
        )
        assert (code, doc["error"]) == (2, "usage"), (anchor, origin)
        assert "Traceback" not in err
    code, doc, _ = run_writ("serve", "--data", str(tmp_path / "missing"))
    assert code == 2 and doc["error"] == "usage"


def test_vectors_served_back_and_verified_by_tlog_scales(tmp_path: Path) -> None:
    with running_server(tmp_path, V.anchor, V.origin, checkpoint_interval=1) as srv:
        r = push(srv.url, V.records)
        assert r.status_code == 200, r.text
        assert r.json()["size"] == 10
        assert served_records(srv.url) == V.records

        info = httpx.get(srv.url + "/v1/ledger").json()
        assert info["log_public_key"] == srv.log_public_key.hex()

        reader = TilesReader(HttpBackend(srv.url))
        cp = reader.get_checkpoint()
        assert (cp.origin, cp.size) == (V.origin, 10)
        assert cp.root_hash == bytes.fromhex(V.raw["final"]["root"])
        assert reader.calculate_root_hash() == cp.root_hash
        assert [reader.get_entry(i) for i in range(10)] == V.records
        for vkey_text in (info["log_vkey"], info["cosig_vkey"]):
            vkey = Vkey.from_string(vkey_text)
            sigs = [s for s in cp.signatures if vkey.match(s)]
            assert len(sigs) == 1
            vkey.get_verifier().verify_note(sigs[0], cp)  # raises on a bad signature
        proof = reader.get_consistency_proof(4, 10)
        levels = tree.MerkleLevels(tree.leaf_hash(x) for x in V.records)
        proof.check(levels.root(4), cp.root_hash)

        # the 0x04 timestamp moves on with re-signing, the size does not
        t1 = checkpoints.verify_checkpoint(
            httpx.get(srv.url + "/checkpoint").text, V.origin, [srv.log_public_key]
        )
        time.sleep(2.2)
        t2 = checkpoints.verify_checkpoint(
            httpx.get(srv.url + "/checkpoint").text, V.origin, [srv.log_public_key]
        )
        assert t1.timestamp is not None and t2.timestamp is not None and t2.timestamp > t1.timestamp
        assert t2.checkpoint.size == 10


def test_concurrent_appends_racing_for_one_seq(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    origin = "race.example/e2e"
    with running_server(tmp_path, root.public_key, origin, write_burst=1000) as srv:
        base = make_ledger(root, origin, srv.log_public_key, 3)
        assert push(srv.url, base).status_code == 200
        contenders = []
        for i in range(16):
            m = Mirror(root, origin)
            m.extend(base)
            contenders.append(m.grant(os.urandom(32), "operator", f"racer-{i}"))
        barrier = threading.Barrier(len(contenders))

        def go(raw: bytes) -> httpx.Response:
            with httpx.Client() as c:
                barrier.wait()
                return push(srv.url, [raw], c)

        with ThreadPoolExecutor(len(contenders)) as pool:
            results = list(pool.map(go, contenders))
        codes = sorted(r.status_code for r in results)
        assert codes == [200] + [409] * (len(contenders) - 1), codes
        for r in results:
            if r.status_code == 409:
                assert r.json()["type"] == "urn:writ:problem:stale-head"
                assert r.json()["size"] == len(base) + 1
        winner = next(raw for raw, r in zip(contenders, results, strict=True) if r.status_code == 200)
        assert served_records(srv.url) == [*base, winner]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_promptly_finishing_appends_with_streams_open(tmp_path: Path, sig: int) -> None:
    root = SeedSigner.generate()
    origin = "term.example/e2e"
    acked: dict[int, bytes] = {}
    with running_server(tmp_path, root.public_key, origin) as srv:
        base = make_ledger(root, origin, srv.log_public_key)
        push(srv.url, base)
        acked.update(enumerate(base))
        # open event streams must not hold the shutdown, appends in flight must finish
        clients = [httpx.Client(timeout=httpx.Timeout(20.0)) for _ in range(3)]
        streams = [c.stream("GET", srv.url + "/v1/events") for c in clients]
        for s in streams:
            assert s.__enter__().status_code == 200
        mirror = Mirror(root, origin)
        mirror.extend(base)
        stop = threading.Event()
        t = threading.Thread(target=_appender, args=(srv.url, mirror, acked, stop))
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        code = stop_server(srv, sig, timeout=10)
        elapsed = time.monotonic() - t0
        stop.set()
        t.join(10)
        for s in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
        assert code == 0 and elapsed < 10
        assert len(acked) > len(base)
        srv2 = start_server(srv.data_dir)
        try:
            served = served_records(srv2.url)
            assert all(served[seq] == raw for seq, raw in acked.items())
            assert len(served) - len(acked) <= 1  # at most the one whose reply was cut off
        finally:
            assert stop_server(srv2) == 0


def _appender(url: str, mirror: Mirror, acked: dict[int, bytes], stop: threading.Event) -> None:
    """Append one grant at a time until the server goes away; remember what was acknowledged."""
    with httpx.Client(timeout=5) as c:
        while not stop.is_set():
            raw = mirror.grant(os.urandom(32), "device", f"dev-{mirror.state.size}")
            seq = mirror.state.size - 1
            try:
                r = push(url, [raw], c)
            except httpx.HTTPError:
                return
            if r.status_code != 200:
                return
            acked[seq] = raw


def test_sigkill_during_appends_loses_no_acknowledged_record(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    origin = "crash.example/e2e"
    rng = random.Random(7)
    acked: dict[int, bytes] = {}
    with running_server(tmp_path, root.public_key, origin) as first:
        data_dir = first.data_dir
        base = make_ledger(root, origin, first.log_public_key)
        assert push(first.url, base).status_code == 200
        acked.update(enumerate(base))
    srv = start_server(data_dir)
    for _ in range(5):
        served = served_records(srv.url)
        mirror = Mirror(root, origin)
        mirror.extend(served)
        stop = threading.Event()
        t = threading.Thread(target=_appender, args=(srv.url, mirror, acked, stop))
        t.start()
        time.sleep(rng.uniform(0.2, 0.6))
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait(10)
        stop.set()
        t.join(10)
        stop_server(srv)  # already dead: closes its pipe
        srv = start_server(data_dir)
        served = served_records(srv.url)
        for seq, raw in acked.items():
            assert served[seq] == raw, f"acknowledged record {seq} lost or changed after SIGKILL"
        cp = checkpoints.verify_checkpoint(
            httpx.get(srv.url + "/checkpoint").text, origin, [srv.log_public_key]
        )
        assert cp.checkpoint.size == len(served)
        assert cp.checkpoint.root == tree.mth([tree.leaf_hash(x) for x in served])
    assert stop_server(srv) == 0
    assert len(acked) > len(base) + 5

    async def audit() -> LedgerState:
        storage = await SqliteStorage.open(data_dir / "ledger.db")
        try:
            loaded = await load_ledger(storage, anchor=root.public_key, origin=origin)
        finally:
            await storage.close()
        return loaded.state

    state = asyncio.run(audit())
    assert state.size >= max(acked) + 1
    assert state.counts[records.Kind.GRANT] == state.size - 1


def test_serve_refuses_a_second_server_and_a_corrupt_ledger(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    origin = "corrupt.example/e2e"
    with running_server(tmp_path, root.public_key, origin) as srv:
        assert push(srv.url, make_ledger(root, origin, srv.log_public_key, 3)).status_code == 200
        code, doc, err = run_writ("serve", "--data", str(srv.data_dir), "--port", "0")
        assert (code, doc["error"]) == (1, "storage-error") and "another server" in doc["message"]
        assert "Traceback" not in err
    db = sqlite3.connect(srv.data_dir / "ledger.db")
    with db:
        (raw,) = db.execute("SELECT raw FROM records WHERE seq = 3").fetchone()
        bad = bytearray(raw)
        bad[-1] ^= 1
        db.execute(
            "UPDATE records SET raw = ?, leaf_hash = ? WHERE seq = 3",
            (bytes(bad), tree.leaf_hash(bytes(bad))),
        )
    db.close()
    code, doc, err = run_writ("serve", "--data", str(srv.data_dir), "--port", "0")
    assert (code, doc["error"], doc["seq"]) == (3, "corrupt-ledger", 3)  # the verification status, as audit
    assert doc["cause"] == "bad-signature"
    assert "Traceback" not in err and "first bad seq 3" in err
