"""device_sim.device: the firmware model (docs/protocol.md, "Credentials on a device" to "Sync bundles").

Credentials: one test per refusal reason and the acceptance; persistence,
atomic writes, bundles, receipts, status; the sources (HTTP tiles, SSE push,
bundle files) against the in-memory test log."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_sim.device import MAX_EVIDENCE, Device
from device_sim.sources import BundleSource, HttpSource, SseSource, Update
from device_sim.sources import sync as source_sync
from ledger import messages, records
from ledger.crypto import SeedSigner
from ledger.errors import (
    BadKeyFile,
    BadMessage,
    BadSignature,
    CheckpointRejected,
    Fork,
    StaleHead,
    UsageError,
)
from ledger.state import LedgerState
from tests.helpers.device import ORIGIN, T0, FakeLog, World, signer

NOW = T0 + 1000
TS = T0 + 900  # the checkpoint's timestamp


def new_device(world: World, tmp: Path | None = None, **kw: object) -> Device:
    return Device.create(
        world.root.public_key,
        world.origin,
        directory=tmp,
        now=T0,
        signer=kw.pop("signer", None),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def sync(dev: Device, world: World, ts: int = TS, now: int = NOW) -> None:
    dev.apply_update(world.records[dev.size :], dev.size, world.checkpoint(ts), now)


# --- credentials ----------------------------------------------------------------


@dataclass
class Scene:
    world: World
    device: Device
    creds: dict[str, tuple[bytes, SeedSigner]]


def _published(w: World, name: str, role: str = "operator", **kw: object) -> tuple[bytes, SeedSigner]:
    key = signer(name)
    seq = w.grant(key.public_key, role, name, **kw)
    return w.records[seq], key


@pytest.fixture(scope="module")
def scene() -> Scene:
    w = World()
    dev = new_device(w, signer=signer("plc-17"))
    w.grant(dev.public_key, "device", "plc-17", scope="plant-1/line-3")
    creds: dict[str, tuple[bytes, SeedSigner]] = {}
    creds["ok"] = _published(w, "tablet-ok", scope="plant-1")
    creds["ok-global"] = _published(w, "tablet-global")
    creds["revoked"] = _published(w, "tablet-lost")
    w.revoke(records.parse(creds["revoked"][0]).seq, reason=2, by_revoker=True)
    creds["revoked-key"] = _published(w, "tablet-stolen")
    w.revoke(creds["revoked-key"][1].public_key, reason=1)
    creds["expired"] = _published(w, "tablet-old", not_before=T0, not_after=T0 + 50)
    creds["not-yet-valid"] = _published(w, "tablet-future", not_before=NOW + 10_000)
    creds["wrong-role"] = _published(w, "maint-1", role="maintenance")
    creds["out-of-scope"] = _published(w, "tablet-plant-2", scope="plant-2")
    # a correctly root-signed grant never published (the stolen-root attack)
    secret = signer("secret-tablet")
    creds["unpublished"] = (w.grant_record(secret.public_key, "operator", "secret"), secret)
    # one that reuses the seq (and prev) of a published record
    reuse_seq = records.parse(creds["ok"][0]).seq
    creds["unpublished-reused-seq"] = (
        w.grant_record(secret.public_key, "operator", "secret", seq=reuse_seq, prev=w.root_at(reuse_seq)),
        secret,
    )
    sync(dev, w)
    return Scene(w, dev, creds)


def _ask(
    s: Scene, cred: str, *, now: int = NOW, at: int | None = None, key: SeedSigner | None = None, **kw: object
) -> tuple[bool, str | None]:
    rec, k = s.creds[cred]
    ch = s.device.challenge()
    auth = messages.make_auth(rec, key or k, s.device.public_key, ch, now if at is None else at)
    v = s.device.check(auth, now, **kw)  # type: ignore[arg-type]
    return v.accepted, v.reason


def test_valid_credential_is_accepted(scene: Scene) -> None:
    assert _ask(scene, "ok") == (True, None)  # scope plant-1 covers plant-1/line-3
    assert _ask(scene, "ok-global") == (True, None)


@pytest.mark.parametrize(
    "cred",
    ["revoked", "revoked-key", "expired", "not-yet-valid", "wrong-role", "out-of-scope", "unpublished"],
)
def test_refusal_reason(scene: Scene, cred: str) -> None:
    assert _ask(scene, cred) == (False, cred)


def test_stolen_root_grant_reusing_a_published_seq_is_unpublished(scene: Scene) -> None:
    assert _ask(scene, "unpublished-reused-seq") == (False, "unpublished")


def test_wrong_role_accepted_when_the_role_is_asked(scene: Scene) -> None:
    assert _ask(scene, "wrong-role", roles=["maintenance"]) == (True, None)
    assert _ask(scene, "ok", roles=["maintenance"]) == (False, "wrong-role")


def test_possession_by_another_key_is_bad_signature(scene: Scene) -> None:
    assert _ask(scene, "ok", key=signer("thief")) == (False, "bad-signature")


def test_forged_grant_signature_is_bad_signature(scene: Scene) -> None:
    rec, key = scene.creds["ok"]
    forged = rec[:-1] + bytes([rec[-1] ^ 1])
    ch = scene.device.challenge()
    v = scene.device.check(messages.make_auth(forged, key, scene.device.public_key, ch, NOW), NOW)
    assert (v.accepted, v.reason) == (False, "bad-signature")


def test_garbage_auth_is_bad_signature(scene: Scene) -> None:
    scene.device.challenge()
    assert scene.device.check(b"\x93garbage", NOW).reason == "bad-signature"


def test_clock_skew(scene: Scene) -> None:
    assert _ask(scene, "ok", at=NOW + 301) == (False, "clock-skew")
    assert _ask(scene, "ok", at=NOW - 301) == (False, "clock-skew")
    assert _ask(scene, "ok", at=NOW + 300) == (True, None)


def test_bad_challenge(scene: Scene) -> None:
    rec, key = scene.creds["ok"]
    dev = scene.device
    # no challenge issued
    dev.check(b"", NOW)  # consumes any pending challenge
    auth = messages.make_auth(rec, key, dev.public_key, bytes(32), NOW)
    assert dev.check(auth, NOW).reason == "bad-challenge"
    # another challenge than the one issued
    dev.challenge()
    assert dev.check(auth, NOW).reason == "bad-challenge"
    # an auth made for another device (verifier key)
    ch = dev.challenge()
    other = messages.make_auth(rec, key, signer("other-device").public_key, ch, NOW)
    assert dev.check(other, NOW).reason == "bad-challenge"
    # a replayed auth: the challenge is single use
    ch = dev.challenge()
    good = messages.make_auth(rec, key, dev.public_key, ch, NOW)
    assert dev.check(good, NOW).accepted
    assert dev.check(good, NOW).reason == "bad-challenge"


def test_bad_challenge_comes_before_everything(scene: Scene) -> None:
    rec, _ = scene.creds["revoked"]
    auth = messages.make_auth(rec, signer("thief"), scene.device.public_key, bytes(32), NOW + 999)
    scene.device.challenge()
    assert scene.device.check(auth, NOW).reason == "bad-challenge"


def test_stale_view_refused_by_default_and_reported() -> None:
    w = World()
    dev = new_device(w, max_staleness=3600)
    rec, key = _published(w, "tablet")
    sync(dev, w, ts=TS)
    late = TS + 3601

    def ask(d: Device, now: int) -> tuple[bool, str | None, bool]:
        v = d.check(messages.make_auth(rec, key, d.public_key, d.challenge(), now), now)
        return v.accepted, v.reason, v.stale

    assert ask(dev, TS + 3600) == (True, None, False)
    assert ask(dev, late) == (False, "stale", True)
    assert dev.status(late)["stale"] is True
    lenient = new_device(w, max_staleness=3600, stale_policy="accept")
    sync(lenient, w, ts=TS)
    assert ask(lenient, late) == (True, None, True)


def test_device_that_never_synced_refuses() -> None:
    w = World()
    dev = new_device(w)
    rec, key = w.records[w.revoker_seq], w.revoker
    v = dev.check(messages.make_auth(rec, key, dev.public_key, dev.challenge(), NOW), NOW)
    assert (v.accepted, v.reason) == (False, "bad-signature")  # no root known yet: nothing verifies


def test_revocation_reaches_the_device() -> None:
    w = World()
    dev = new_device(w)
    rec, key = _published(w, "tablet")
    sync(dev, w)

    def ok() -> bool:
        return dev.check(messages.make_auth(rec, key, dev.public_key, dev.challenge(), NOW), NOW).accepted

    assert ok()
    w.revoke(records.parse(rec).seq)
    sync(dev, w, ts=TS + 1)
    assert not ok()


# --- construction, persistence, atomicity -------------------------------------------


def test_init_writes_a_private_key_and_an_enrollment(tmp_path: Path) -> None:
    w = World()
    d = tmp_path / "dev"
    dev = new_device(w, d, name="plc-line3-17")
    assert stat.S_IMODE(os.stat(d / "device.key").st_mode) == 0o600
    enroll = messages.parse_enroll((d / "enroll.bin").read_bytes())
    assert (enroll.subject, enroll.name, enroll.time) == (dev.public_key, "plc-line3-17", T0)
    seed_hex = (d / "device.key").read_text().strip()
    assert seed_hex not in repr(dev) and dev.public_key.hex() in repr(dev)
    assert seed_hex not in str(dev.status(NOW))
    with pytest.raises(UsageError):
        new_device(w, d)  # an initialised directory is never overwritten
    assert (d / "device.key").read_text().strip() == seed_hex


def test_bad_config_is_refused() -> None:
    w = World()
    with pytest.raises(UsageError):
        new_device(w, stale_policy="sometimes")
    with pytest.raises(UsageError):
        Device.create(b"\x00" * 31, ORIGIN, now=T0)
    with pytest.raises(UsageError):
        Device.create(w.root.public_key, "has space", now=T0)


def test_state_survives_a_restart(tmp_path: Path) -> None:
    w = World()
    dev = new_device(w, tmp_path)
    w.grant(dev.public_key, "device", "plc", scope="plant-1")
    rec, key = _published(w, "tablet")
    sync(dev, w)
    again = Device.load(tmp_path)
    assert again.public_key == dev.public_key
    assert (again.size, again.root, again.checkpoint_time) == (w.size, w.root_at(), TS)
    assert again.view == dev.view and again.scope == "plant-1" and again.own_grant == dev.own_grant
    assert again.state.snapshot() == dev.state.snapshot()
    # a challenge issued by one process is answered in the next one
    ch = again.challenge()
    v = Device.load(tmp_path).check(messages.make_auth(rec, key, dev.public_key, ch, NOW), NOW)
    assert v.accepted
    assert Device.load(tmp_path).check(messages.make_auth(rec, key, dev.public_key, ch, NOW), NOW).reason == (
        "bad-challenge"
    )


def test_crash_between_write_and_rename_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World()
    dev = new_device(w, tmp_path)
    sync(dev, w)
    before = (tmp_path / "state.bin").read_bytes()
    w.grant(signer("t").public_key, "operator", "t")

    def crash(src: object, dst: object) -> None:
        raise SystemExit("power lost")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        sync(dev, w, ts=TS + 1)
    monkeypatch.undo()
    assert (tmp_path / "state.bin").read_bytes() == before
    assert dev.size == w.size - 1  # the in-memory device did not move either
    # a torn temporary file left by a real crash is ignored
    (tmp_path / ".state.bin.tmp").write_bytes(b"torn")
    again = Device.load(tmp_path)
    assert again.size == w.size - 1
    sync(again, w, ts=TS + 1)
    assert Device.load(tmp_path).size == w.size


def test_damaged_state_is_refused(tmp_path: Path) -> None:
    w = World()
    new_device(w, tmp_path)
    (tmp_path / "state.bin").write_bytes(b"\x95\x01")
    with pytest.raises(BadMessage):
        Device.load(tmp_path)


def test_readable_key_file_is_refused(tmp_path: Path) -> None:
    w = World()
    new_device(w, tmp_path)
    os.chmod(tmp_path / "device.key", 0o644)
    with pytest.raises(BadKeyFile):
        Device.load(tmp_path)


def test_uninitialised_directory_is_usage(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Device.load(tmp_path)


# --- updates ------------------------------------------------------------------


def test_empty_ledger_sync_is_a_no_op() -> None:
    w = World()
    dev = new_device(w)
    r = dev.apply_update([], 0, w.checkpoint(TS, 0), NOW)
    assert (r.size, r.checkpoint_time, r.appended) == (0, None, 0)
    assert dev.view is None


def test_all_or_nothing() -> None:
    w = World()
    dev = new_device(w)
    sync(dev, w)
    snap = dev.state.snapshot()
    for i in range(3):
        w.grant(signer(f"op{i}").public_key, "operator", f"op{i}")
    bad = list(w.records[dev.size :])
    bad[2] = bad[2][:-1] + bytes([bad[2][-1] ^ 0x80])
    with pytest.raises(BadSignature) as info:
        dev.apply_update(bad, dev.size, w.checkpoint(TS + 1), NOW)
    assert info.value.seq == dev.size + 2
    assert dev.state.snapshot() == snap
    ev = dev.evidence[-1]
    assert (ev.kind, ev.seq, ev.data) == ("bad-signature", dev.size + 2, bad[2].hex())


def test_records_must_reach_the_checkpoint() -> None:
    w = World()
    dev = new_device(w)
    w.grant(signer("a").public_key, "operator", "a")
    with pytest.raises(BadMessage):  # one record short
        dev.apply_update(w.records[:-1], 0, w.checkpoint(TS), NOW)
    with pytest.raises(BadMessage):  # one record too many
        dev.apply_update(w.records, 0, w.checkpoint(TS, w.size - 1), NOW)
    with pytest.raises(BadMessage):  # none at all
        dev.apply_update([], 0, w.checkpoint(TS), NOW)
    assert dev.size == 0


def test_gap_is_refused() -> None:
    w = World()
    dev = new_device(w)
    with pytest.raises(BadMessage):
        dev.apply_update(w.records[1:], 1, w.checkpoint(TS), NOW)


def test_overlap_is_accepted_when_it_is_the_same_history() -> None:
    w = World()
    dev = new_device(w)
    sync(dev, w)
    w.grant(signer("a").public_key, "operator", "a")
    r = dev.apply_update(w.records, 0, w.checkpoint(TS + 1), NOW)
    assert (r.size, r.appended) == (w.size, 1)


def test_overlap_with_another_published_grant_is_a_fork() -> None:
    w = World()
    dev = new_device(w)
    sync(dev, w)
    snap = dev.state.snapshot()
    other = list(w.records)
    other[w.revoker_seq] = w.grant_record(
        signer("evil").public_key, "revoker", "evil", seq=w.revoker_seq, prev=w.root_at(w.revoker_seq)
    )
    w.grant(signer("a").public_key, "operator", "a")
    with pytest.raises(Fork):
        dev.apply_update([*other, w.records[-1]], 0, w.checkpoint(TS + 1), NOW)
    with pytest.raises(StaleHead):  # a record out of place in the overlap
        dev.apply_update([w.records[1], *w.records[1:]], 0, w.checkpoint(TS + 1), NOW)
    assert dev.state.snapshot() == snap


def test_compact_fleet_device_finds_its_own_grant() -> None:
    w = World()
    dev = new_device(w, keep_roles={"operator"})
    assert dev.own_grant is None
    with pytest.raises(UsageError):
        dev.receipt(NOW)
    seq = w.grant(dev.public_key, "device", "plc-9", scope="site-a")
    w.grant(signer("other-plc").public_key, "device", "plc-10")
    sync(dev, w)
    assert dev.own_grant is not None and (dev.own_grant.seq, dev.scope) == (seq, "site-a")
    assert seq not in dev.state.grants  # compact: device grants are not kept
    r = messages.parse_receipt(dev.receipt(NOW))
    r.verify(dev.public_key)
    assert (r.device_grant_seq, r.size, r.root, r.time) == (seq, w.size, w.root_at(), NOW)
    w.revoke(seq)
    sync(dev, w, ts=TS + 1)
    assert dev.status(NOW)["grant"]["revoked"] is True


def test_status_reports_head_revocations_and_evidence() -> None:
    w = World()
    dev = new_device(w)
    a = w.grant(signer("a").public_key, "operator", "a")
    w.revoke(a)
    w.revoke(signer("b").public_key)
    sync(dev, w)
    with pytest.raises(BadMessage):
        dev.apply_update([], 0, w.checkpoint(TS, w.size + 1, root=bytes(32)), NOW)
    s = dev.status(NOW)
    assert (s["size"], s["root"], s["checkpoint_time"], s["staleness"]) == (
        w.size,
        w.root_at().hex(),
        TS,
        100,
    )
    assert s["revoked"] == {"ids": 1, "keys": 1}
    assert s["grant"] is None and s["stale"] is False
    assert [e["kind"] for e in s["evidence"]] == ["bad-message"]


def test_evidence_is_bounded(tmp_path: Path) -> None:
    w = World()
    dev = new_device(w, tmp_path)
    for i in range(MAX_EVIDENCE + 5):
        with pytest.raises(BadMessage):
            dev.apply_update([], 0, w.checkpoint(TS + i, w.size + 1, root=bytes(32)), NOW)
    assert len(dev.evidence) == MAX_EVIDENCE
    assert len(Device.load(tmp_path).evidence) == MAX_EVIDENCE


# --- sources ------------------------------------------------------------------


def _big_world(n: int) -> World:
    w = World()
    for i in range(n):
        w.grant(signer(f"op-{i}").public_key, "operator", f"op-{i}")
    return w


async def test_http_sync_across_tiles_and_resume() -> None:
    w = _big_world(300)  # 303 records: one full entry bundle and a partial one
    log = FakeLog()
    log.publish(w, TS, 200)
    dev = new_device(w)
    async with log.client() as client:
        src = HttpSource(client, "http://log.test")
        r = dev.apply(await src.fetch(dev.size), NOW)
        assert r.size == 200
        log.publish(w, TS + 1)
        up = await src.fetch(dev.size)
        assert up.start == 200 and len(up.records) == w.size - 200
        r = dev.apply(up, NOW)
        assert (r.size, r.root, r.appended) == (w.size, w.root_at(), w.size - 200)
        # nothing new: only the checkpoint is fetched
        log.requests.clear()
        assert (await src.fetch(dev.size)).records == []
        assert log.requests == ["/checkpoint"]


async def test_partial_tile_gone_falls_back_to_the_full_tile() -> None:
    w = _big_world(300)
    log = FakeLog(drop_partial=True)
    log.publish(w, TS)
    dev = new_device(w)
    async with log.client() as client:
        src = HttpSource(client, "http://log.test")
        dev.apply(await src.fetch(0), NOW)
        # a checkpoint older than the tree: size 100 needs 000.p/100, which is gone
        assert await src.records(50, 100, 100) == w.records[50:100]
    assert dev.size == w.size
    assert "/tile/entries/000.p/100" in log.requests and "/tile/entries/000" in log.requests


def test_bundle_sync_equals_http_sync(tmp_path: Path) -> None:
    w = _big_world(20)
    http_dev = new_device(w, signer=signer("same-device"))
    log = FakeLog()
    log.publish(w, TS)

    async def via_http() -> None:
        async with log.client() as client:
            http_dev.apply(await HttpSource(client, "http://x").fetch(0), NOW)

    asyncio.run(via_http())
    path = tmp_path / "sync.bundle"
    path.write_bytes(w.bundle(0, TS))
    bundle_dev = new_device(w, signer=signer("same-device"))
    bundle_dev.apply(BundleSource(path).read(), NOW)
    assert bundle_dev.state.snapshot() == http_dev.state.snapshot()
    assert bundle_dev.view == http_dev.view


def test_bad_bundle_files() -> None:
    with pytest.raises(BadMessage):
        BundleSource.parse(b"\x94\x02\x00\x90\xa0")
    with pytest.raises(UsageError):
        BundleSource("/nonexistent/bundle").read()


async def test_sse_push_with_records_and_tile_fallback() -> None:
    w = World()
    log = FakeLog()
    log.publish(w, TS)
    dev = new_device(w)
    sizes: list[int] = []
    async with log.client() as client:
        tiles_src = HttpSource(client, "http://log.test")
        sse = SseSource(client, "http://log.test", tiles_source=tiles_src, backoff=(0.01, 0.05))
        gen = sse.updates(lambda: dev.size)
        try:
            # first connection: Last-Event-ID 0 -> the records event covers everything
            up = await asyncio.wait_for(anext(gen), 5)
            sizes.append(dev.apply(up, NOW).size)
            log.requests.clear()
            w.grant(signer("a").public_key, "operator", "a")
            log.publish(w, TS + 1)
            up = await asyncio.wait_for(anext(gen), 5)
            sizes.append(dev.apply(up, NOW).size)
            assert not any(p.startswith("/tile") for p in log.requests)
            # records events switched off: the records come from tiles
            log.events_records = False
            w.grant(signer("b").public_key, "operator", "b")
            log.publish(w, TS + 2)
            up = await asyncio.wait_for(anext(gen), 5)
            sizes.append(dev.apply(up, NOW).size)
            assert any(p.startswith("/tile/entries") for p in log.requests)
        finally:
            log.closing = True
            log.notify()
            await gen.aclose()
    assert sizes == [w.size - 2, w.size - 1, w.size]


async def test_sse_reconnects_after_the_stream_ends() -> None:
    w = World()
    log = FakeLog(events_per_connection=1)
    log.publish(w, TS)
    dev = new_device(w)
    errors: list[Exception] = []
    async with log.client() as client:
        sse = SseSource(client, "http://log.test", backoff=(0.01, 0.02), on_error=errors.append)
        gen = sse.updates(lambda: dev.size)
        try:
            for i in range(3):
                up = await asyncio.wait_for(anext(gen), 5)
                dev.apply(up, NOW)
                w.grant(signer(f"x{i}").public_key, "operator", f"x{i}")
                log.publish(w, TS + 1 + i)
        finally:
            log.closing = True
            log.notify()
            await gen.aclose()
    assert sse.connections >= 3 and errors
    assert dev.size == w.size - 1


async def test_sse_checkpoint_events_feed_rollback_evidence() -> None:
    w = World()
    w.grant(signer("a").public_key, "operator", "a")
    log = FakeLog()
    log.publish(w, TS)
    dev = new_device(w)
    sync(dev, w)
    log.publish(w, TS + 5, w.size - 1)  # a replayed older head
    async with log.client() as client:
        gen = SseSource(client, "http://log.test").updates(lambda: dev.size)
        try:
            up = await asyncio.wait_for(anext(gen), 5)
        finally:
            log.closing = True
            log.notify()
            await gen.aclose()
    assert up == Update(dev.size, [], log.note)
    with pytest.raises(CheckpointRejected):
        dev.apply(up, NOW)
    assert dev.evidence[-1].kind == "rollback"


def test_state_snapshot_is_canonical_for_equal_histories() -> None:
    w = _big_world(5)
    a, b = new_device(w, signer=signer("d")), new_device(w, signer=signer("d"))
    sync(a, w)
    for i in range(0, w.size, 3):  # in several steps
        b.apply_update(w.records[b.size : i + 3], b.size, w.checkpoint(TS, min(i + 3, w.size)), NOW)
    assert LedgerState.restore(a.state.snapshot()).snapshot() == b.state.snapshot()


# --- against the real server ------------------------------------------------------


async def _real_ledger(client: Any, root: SeedSigner) -> tuple[Device, Any, int]:
    """A device of ``root`` and a mirror holding the genesis and the server's log grant."""
    import time as _time

    from tests.helpers.server import Mirror

    log_key = bytes.fromhex((await client.get("/v1/ledger")).json()["log_public_key"])
    now = int(_time.time())
    dev = Device.create(root.public_key, ORIGIN, now=now, keep_roles={"operator"})
    m = Mirror(root, ORIGIN)
    m.genesis()
    m.grant(log_key, "log", "log")
    return dev, m, now


async def _post_records(client: Any, raws: list[bytes]) -> None:
    from ledger import encoding

    r = await client.post(
        "/v1/records", content=encoding.pack_records(raws), headers={"content-type": "application/msgpack"}
    )
    assert r.status_code == 200, r.text


async def test_sources_against_the_real_server(tmp_path: Path) -> None:
    """HttpSource, SseSource and receipts against api.app (in process)."""
    from ledger import encoding
    from tests.helpers.server import BASE_URL, inprocess_server

    root = signer("root")
    async with inprocess_server(tmp_path, root.public_key, ORIGIN) as (client, _app):
        dev, m, now = await _real_ledger(client, root)
        grant = m.grant(dev.public_key, "device", "plc-1")
        for i in range(300):
            m.grant(signer(f"op-{i}").public_key, "operator", f"op-{i}")
        r = await client.post(
            "/v1/records",
            content=encoding.pack_records(m.records),
            headers={"content-type": "application/msgpack"},
        )
        assert r.status_code == 200, r.text
        src = HttpSource(client, BASE_URL)
        res = dev.apply(await src.fetch(dev.size), now)
        assert (res.size, res.root, res.stale) == (m.state.size, m.state.root, False)
        # a receipt for that head is accepted
        r = await client.post(
            "/v1/receipts", content=dev.receipt(now), headers={"content-type": "application/msgpack"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["device_grant_seq"] == records.parse(grant).seq
        # a tablet granted and revoked: the device follows through tiles again
        tablet = signer("tablet")
        tablet_grant = m.grant(tablet.public_key, "operator", "tablet")
        m.revoke(records.parse(tablet_grant).seq, reason=2)
        r = await client.post(
            "/v1/records",
            content=encoding.pack_records(m.records[-2:]),
            headers={"content-type": "application/msgpack"},
        )
        assert r.status_code == 200, r.text
        dev.apply(await src.fetch(dev.size), now)
        v = dev.check(messages.make_auth(tablet_grant, tablet, dev.public_key, dev.challenge(), now), now)
        assert (v.accepted, v.reason) == (False, "revoked")


async def test_sse_compact_events_carry_records_and_note_deltas() -> None:
    """``?format=compact``: each event brings the new records and the note (the
    full note first, then deltas); nothing is fetched besides the stream, and a
    server that sends no records gets the gap fetched (records, then tiles)."""
    w = World()
    log = FakeLog(events_compact=True)
    log.publish(w, TS)
    dev = new_device(w)
    sizes: list[int] = []
    async with log.client() as client:
        sse = SseSource(client, "http://log.test", backoff=(0.01, 0.05))
        gen = sse.updates(lambda: dev.size)
        try:
            sizes.append(dev.apply(await asyncio.wait_for(anext(gen), 5), NOW).size)
            for i in range(2):
                log.requests.clear()
                w.grant(signer(f"c{i}").public_key, "operator", f"c{i}")
                log.publish(w, TS + 1 + i)
                up = await asyncio.wait_for(anext(gen), 5)
                assert up.records == w.records[-1:] and up.note == log.note
                sizes.append(dev.apply(up, NOW).size)
                assert log.requests == []  # the stream alone
            log.events_records = False  # no records in the events: the gap is fetched
            w.revoke(dev.size - 1)
            log.publish(w, TS + 5)
            sizes.append(dev.apply(await asyncio.wait_for(anext(gen), 5), NOW).size)
            assert "/v1/records" in log.requests and any(p.startswith("/tile/entries") for p in log.requests)
        finally:
            log.closing = True
            log.notify()
            await gen.aclose()
    assert sse.connections == 1
    assert sizes == [w.size - 3, w.size - 2, w.size - 1, w.size]


async def test_polling_device_in_sync_fetches_only_the_new_record(tmp_path: Path) -> None:
    """A device in sync that polls downloads the checkpoint and the one new
    record (``GET /v1/records``), not the partial entry bundle of every record
    of its tile (24.5 KB in the sizes benchmark); catch-up still reads tiles."""
    from tests.helpers.server import BASE_URL, inprocess_server

    root = signer("root")
    async with inprocess_server(tmp_path, root.public_key, ORIGIN) as (client, _app):
        dev, m, now = await _real_ledger(client, root)
        for i in range(150):
            m.grant(signer(f"op-{i}").public_key, "operator", f"op-{i}")

        await _post_records(client, m.records)
        src = HttpSource(client, BASE_URL)
        await source_sync(dev, src, now)  # catch-up: tiles
        assert dev.size == m.state.size and src.bytes_received > 150 * 100
        for target in (5, 6):
            m.revoke(target)
            await _post_records(client, m.records[-1:])
            src.bytes_received = 0
            res = await source_sync(dev, src, now)
            assert res.size == m.state.size and not res.stale
            checkpoint = len((await client.get("/checkpoint")).content)
            assert src.bytes_received <= checkpoint + len(m.records[-1]) + 8 < 1000
        tiles_only = HttpSource(client, BASE_URL)
        tiles_only.records_api = False
        m.revoke(7)
        await _post_records(client, m.records[-1:])
        await source_sync(dev, tiles_only, now)
        assert tiles_only.bytes_received > 20 * src.bytes_received
