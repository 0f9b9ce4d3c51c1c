"""Time going wrong (docs/threats.md: a device's own clock; a log that signs the future).

- Devices whose clock is skewed forward or backward (±1 h, ±1 day) against an
  honest log and an honest tablet: what freshness and the 300 s auth window
  make of it (fail closed: any skew beyond 300 s refuses every credential as
  ``clock-skew``; a skew within the staleness bound still syncs).
- A checkpoint timestamped in the future (a log key holder, or a server whose
  clock jumped): more than 300 s ahead of the device's clock it is refused
  (``future-checkpoint``, evidence kept, the timestamp floor unchanged), so
  honest checkpoints keep being accepted and revocations keep arriving; up to
  300 s ahead it is accepted, and honest checkpoints are refused as
  ``timestamp-regression`` for at most those 300 s. A server whose clock jumped
  back never signs ahead of it: it serves its last note unchanged until its
  clock passes that timestamp, also across a restart.
- A revoker grant expiring mid-scenario: its later revokes are refused
  ``unauthorized-signer`` by the server and by a device; a revoke *backdated*
  into the window is accepted while no later record exists (pinned too).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from api.service import LedgerService
from device_sim.device import Device
from ledger import checkpoints, encoding, records
from ledger.errors import FutureCheckpoint, StorageError, TimestampRegression, UnauthorizedSigner
from ledger.records import Revoke
from ledger.storage import MemoryStorage
from ledger.tree import leaf_hash, mth
from tests.helpers.device import T0, signer
from tests.helpers.lost_tablet import LostTablet
from tests.helpers.server import Clock, Mirror, inprocess_server, post_records, service

HOUR, DAY = 3600, 86400
T = T0 + 1000  # the true time of the honest parties


# --- a skewed device clock ------------------------------------------------------------

SKEWS = [-DAY - 1, -DAY, -HOUR, -300, 0, 300, HOUR, DAY, DAY + 1]


@pytest.mark.parametrize("skew", SKEWS)
def test_skewed_device_against_an_honest_tablet(skew: int) -> None:
    """The tablet signs at the true time; the device judges at its own. Beyond
    300 s of skew every credential is refused (clock-skew): fail closed."""
    story = LostTablet.build()
    w = story.world
    dev = story.device()  # synced while its clock was right
    assert dev.size == w.size
    accepted, reason = story.ask(dev, now=T + skew, signed_at=T)
    if abs(skew) <= 300:
        assert (accepted, reason) == (True, None)
    else:
        assert (accepted, reason) == (False, "clock-skew")


@pytest.mark.parametrize("skew", SKEWS)
def test_skewed_device_and_tablet_agree_freshness_decides(skew: int) -> None:
    """Tablet and device share the same wrong clock (the tablet set it from the device):
    the auth window passes, and the checkpoint's age on the device's clock decides.
    More than a day fast, or more than 300 s slow (the checkpoint is then in its
    future, never fresh), makes the device stale: refused."""
    story = LostTablet.build()
    dev = story.device()
    accepted, reason = story.ask(dev, now=T + skew, signed_at=T + skew)
    stale = skew > DAY or skew < -300  # max_staleness is 24 h, inclusive; 300 s ahead counts as now
    assert dev.is_stale(T + skew) is stale
    assert (accepted, reason) == ((False, "stale") if stale else (True, None))


@pytest.mark.parametrize("skew", [-HOUR, HOUR])
def test_skew_shifts_expiry(skew: int) -> None:
    """A credential valid until T + 30 min: a device an hour fast refuses it early; one
    an hour slow honours it for an hour after it expired (bounded by the skew)."""
    story = LostTablet.build(not_after=T + 1800)
    dev = story.device(now=T + skew, ts=T + min(skew, 0))  # the log's clock agrees, or is behind
    accepted, reason = story.ask(dev, now=T + skew, signed_at=T + skew)
    assert (accepted, reason) == ((False, "expired") if skew > 0 else (True, None))
    if skew < 0:  # really expired 30 min ago, still accepted on the slow clock
        assert story.ask(dev, now=T + 2 * 1800 + skew, signed_at=T + 2 * 1800 + skew) == (True, None)


@pytest.mark.parametrize("skew", [-301, -HOUR, -DAY])
def test_a_slow_device_refuses_honest_checkpoints_as_future(skew: int) -> None:
    """A device clock more than 300 s slow sees the honest log's checkpoints in
    its future: refused (``future-checkpoint``), state and floor unchanged,
    evidence kept; it fails closed (stale) until its clock is fixed."""
    story = LostTablet.build()
    w = story.world
    dev = story.device(ts=T - DAY, now=T - DAY)
    before = dev.state.snapshot()
    story.revoke()
    with pytest.raises(FutureCheckpoint):
        dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T), T + skew)
    assert dev.state.snapshot() == before and dev.checkpoint_time == T - DAY
    assert dev.evidence[-1].kind == "future-checkpoint"
    dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T), T)  # the clock is fixed
    assert story.ask(dev, now=T, signed_at=T) == (False, "revoked")


def test_a_device_clock_jumping_back_never_accepts_an_older_checkpoint() -> None:
    story = LostTablet.build()
    w = story.world
    dev = story.device(ts=T, now=T)
    with pytest.raises(TimestampRegression):
        dev.apply_update([], dev.size, w.checkpoint(T - HOUR), T - DAY)
    with pytest.raises(FutureCheckpoint):  # and one at the true time is in its future
        dev.apply_update([], dev.size, w.checkpoint(T + 1), T - DAY)
    assert dev.checkpoint_time == T


# --- a checkpoint from the future -------------------------------------------------------


@pytest.mark.parametrize("ahead", [301, HOUR, 10 * 365 * DAY])
@pytest.mark.parametrize("policy", ["refuse", "accept"])
def test_a_future_checkpoint_is_refused_and_blocks_nothing(ahead: int, policy: str) -> None:
    """Issue #10: a log key signs the same tree `ahead` seconds in the future.
    It is refused, the floor stays, and the honest log's next checkpoint (with
    the tablet's revocation) is accepted: under either staleness policy."""
    story = LostTablet.build()
    w = story.world
    dev = story.device(stale_policy=policy)
    before = dev.state.snapshot()
    with pytest.raises(FutureCheckpoint):
        dev.apply_update([], dev.size, w.checkpoint(T + ahead), T)
    assert dev.checkpoint_time == T and dev.state.snapshot() == before
    assert dev.evidence[-1].kind == "future-checkpoint" and len(dev.evidence[-1].notes) == 2
    assert story.ask(dev, now=T, signed_at=T) == (True, None)
    story.revoke()
    dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T + 60), T + 60)
    assert story.ask(dev, now=T + 60, signed_at=T + 60) == (False, "revoked")


def test_a_checkpoint_300_s_ahead_blocks_honest_ones_for_at_most_300_s() -> None:
    """Within the bound the note is accepted (a log clock a little fast is no
    attack); honest checkpoints dated before it are refused until then."""
    story = LostTablet.build()
    w = story.world
    dev = story.device()
    dev.apply_update([], dev.size, w.checkpoint(T + 300), T)
    assert dev.checkpoint_time == T + 300 and not dev.is_stale(T)
    story.revoke()
    with pytest.raises(TimestampRegression):
        dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T + 60), T + 60)
    dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T + 300), T + 300)
    assert story.ask(dev, now=T + 300, signed_at=T + 300) == (False, "revoked")


async def served(c: httpx.AsyncClient, svc: LedgerService) -> checkpoints.VerifiedCheckpoint:
    return checkpoints.verify_checkpoint(
        (await c.get("/checkpoint")).text, svc.origin, [svc.signer.public_key]
    )


async def wait_for_size(
    c: httpx.AsyncClient, svc: LedgerService, size: int
) -> checkpoints.VerifiedCheckpoint:
    for _ in range(200):
        vc = await served(c, svc)
        if vc.checkpoint.size == size:
            return vc
        await asyncio.sleep(0.02)
    raise AssertionError(f"no checkpoint of size {size} was served")


async def test_a_server_clock_jumping_back_serves_its_last_note_until_it_passes(tmp_path: Path) -> None:
    """The server's clock steps back 60 s: nothing is signed below the last
    timestamp nor ahead of the clock; the last note is served unchanged (also
    across a restart) while appends are still taken, and the checkpoint that
    covers them is signed as soon as the clock passes the old timestamp."""
    root = signer("root")
    origin = "ledger.test.example/back"
    clock = Clock(T + 100)
    async with inprocess_server(tmp_path, root.public_key, origin, clock=clock, checkpoint_interval=0.05) as (
        c,
        app,
    ):
        svc = service(app)
        m = Mirror(root, origin, time=T)
        m.genesis()
        m.grant(svc.signer.public_key, "log", "log")
        assert (await post_records(c, m.records)).status_code == 200
        first = await served(c, svc)
        assert first.timestamp == T + 100
        clock.t = T + 40  # NTP steps the clock back
        m.time = T + 10
        assert (await post_records(c, [m.grant(os.urandom(32), "operator", "x")])).status_code == 200
        await asyncio.sleep(0.2)  # several re-sign intervals
        assert (await c.get("/checkpoint")).text == first.note  # unchanged: size 2, T + 100
        data_dir = svc.config.data_dir
    async with inprocess_server(
        tmp_path, root.public_key, origin, clock=clock, checkpoint_interval=0.05, data_dir=data_dir
    ) as (c, app):
        svc = service(app)
        assert (await c.get("/checkpoint")).text == first.note  # a restart does not sign either
        clock.t = T + 101
        vc = await wait_for_size(c, svc, 3)
        assert vc.timestamp == T + 101
        dev = Device.create(root.public_key, origin, now=T + 101)
        raws = encoding.unpack_records((await c.get("/v1/records")).content, max_count=1000)
        r = dev.apply_update(raws, 0, vc.note, T + 101)
        assert r.size == 3 and not r.stale


async def test_a_server_clock_jump_forward_is_refused_by_devices(tmp_path: Path) -> None:
    """The server's clock jumps ten years ahead once and comes back: the note it
    signed then is refused by every device (``future-checkpoint``, nothing
    moves), and the server, which never signs below it, keeps serving it
    (docs/operations.md: replace the log key to recover before that date)."""
    root = signer("root")
    origin = "ledger.test.example/jump"
    clock = Clock(T)
    async with inprocess_server(tmp_path, root.public_key, origin, clock=clock) as (c, app):
        svc = service(app)
        m = Mirror(root, origin, time=T - 100)
        m.genesis()
        m.grant(svc.signer.public_key, "log", "log")
        assert (await post_records(c, m.records)).status_code == 200
        dev = Device.create(root.public_key, origin, now=T)
        good = await served(c, svc)
        dev.apply_update(list(m.records), 0, good.note, T)
        clock.t = T + 10 * 365 * DAY
        m.time = T - 50
        assert (await post_records(c, [m.grant(os.urandom(32), "operator", "x")])).status_code == 200
        clock.t = T
        m.time = T - 40
        assert (await post_records(c, [m.grant(os.urandom(32), "operator", "y")])).status_code == 200
        vc = await served(c, svc)
        assert (vc.checkpoint.size, vc.timestamp) == (3, T + 10 * 365 * DAY)
        raws = encoding.unpack_records((await c.get("/v1/records?start=2")).content, max_count=1000)
        with pytest.raises(FutureCheckpoint):
            dev.apply_update(raws[:1], 2, vc.note, T)
        assert (dev.size, dev.checkpoint_time) == (2, T)
        assert dev.evidence[-1].kind == "future-checkpoint"


async def test_a_stored_checkpoint_naming_no_head_stops_the_server(tmp_path: Path) -> None:
    """The persisted note is the server's timestamp floor; one that verifies but
    names a tree the stored ledger never had is not signed over: start-up stops."""
    root = signer("root")
    origin = "ledger.test.example/stored"
    storage = MemoryStorage()
    async with inprocess_server(tmp_path, root.public_key, origin, storage, clock=Clock(T)) as (c, app):
        svc = service(app)
        m = Mirror(root, origin, time=T)
        m.genesis()
        m.grant(svc.signer.public_key, "log", "log")
        await post_records(c, m.records)
        data_dir = svc.config.data_dir
        forged = checkpoints.sign_checkpoint(
            checkpoints.Checkpoint(origin, 2, bytes(32)), origin, svc.signer, T + 1
        )
    storage._closed = False  # the same memory, as a restarted process would find it on disk
    await storage.put_checkpoint(2, forged)
    with pytest.raises(StorageError, match="does not name a head"):
        async with inprocess_server(
            tmp_path, root.public_key, origin, storage, clock=Clock(T), data_dir=data_dir
        ):
            pass


# --- a revoker grant that expires ---------------------------------------------------------


async def test_a_revoker_grant_expiring_mid_scenario(tmp_path: Path) -> None:
    origin = "ledger.test.example/revoker"
    root, oncall = signer("root"), signer("oncall")
    clock = Clock(T)
    async with inprocess_server(tmp_path, root.public_key, origin, clock=clock) as (c, app):
        svc = service(app)
        m = Mirror(root, origin, time=T)
        m.genesis()
        m.grant(svc.signer.public_key, "log", "log")
        revoker_seq = m.state.size
        m.grant(oncall.public_key, "revoker", "oncall", not_after=T + 100)  # valid for 100 s
        a = m.state.size
        m.grant(signer("tablet-a").public_key, "operator", "tablet-a")
        b = m.state.size
        m.grant(signer("tablet-b").public_key, "operator", "tablet-b")
        cc = m.state.size
        m.grant(signer("tablet-c").public_key, "operator", "tablet-c")
        assert (await post_records(c, m.records)).status_code == 200
        good = list(m.records)

        # inside the window: the revoker revokes tablet-a
        clock.t = m.time = T + 50
        r = await post_records(c, [m.revoke(a, reason=2, signer=(revoker_seq, oncall))])
        assert r.status_code == 200, r.text
        good = list(m.records)

        # after it: refused unauthorized-signer, nothing appended
        clock.t = T + 150
        head = (m.state.size, m.state.root)
        late = Revoke(head[0], head[1], T + 150, revoker_seq, b, 2)
        late_raw = records.sign(late, oncall)
        r = await post_records(c, [late_raw])
        assert r.status_code == 403 and r.json()["type"] == "urn:writ:problem:unauthorized-signer", r.text
        assert service(app).size == len(good)

        # a device refuses it too, when a stolen server serves it with a valid log signature
        dev = Device.create(root.public_key, origin, now=T + 150)
        dev.apply_update(good, 0, (await c.get("/checkpoint")).text, T + 150)
        forged = [*good, late_raw]
        note = checkpoints.sign_checkpoint(
            checkpoints.Checkpoint(origin, len(forged), mth([leaf_hash(x) for x in forged])),
            origin,
            svc.signer,
            T + 160,
        )
        before = dev.state.snapshot()
        with pytest.raises(UnauthorizedSigner):
            dev.apply_update([late_raw], len(good), note, T + 160)
        assert dev.state.snapshot() == before and dev.evidence[-1].kind == "unauthorized-signer"

        # residual risk, pinned: backdated into the window while no later record exists, it is accepted
        backdated = records.sign(Revoke(head[0], head[1], T + 99, revoker_seq, b, 2), oncall)
        r = await post_records(c, [backdated])
        assert r.status_code == 200, r.text
        m.extend([backdated])
        # ... but not once a record at or after the expiry is in the ledger (time never goes back)
        m.time = T + 150
        assert (await post_records(c, [m.grant(os.urandom(32), "operator", "later")])).status_code == 200
        again = records.sign(Revoke(m.state.size, m.state.root, T + 99, revoker_seq, cc, 2), oncall)
        r = await post_records(c, [again])
        assert r.status_code == 422 and r.json()["type"] == "urn:writ:problem:time-regression", r.text
        # the root itself can always revoke
        assert (await post_records(c, [m.revoke(cc, reason=2)])).status_code == 200
