"""Time going wrong (THREATS.md: a device's own clock; a log that signs the future).

- Devices whose clock is skewed forward or backward (±1 h, ±1 day) against an
  honest log and an honest tablet: what freshness and the 300 s auth window
  make of it (fail closed: any skew beyond 300 s refuses every credential as
  ``clock-skew``; a skew within the staleness bound still syncs).
- A checkpoint timestamped in the future (a log key holder, or a server whose
  clock jumped): the device accepts it, and then refuses every honest
  checkpoint as ``timestamp-regression`` until that time: it can learn no new
  revocation meanwhile. Far ahead, the device is stale at once and (by
  default) refuses every credential; with the ``accept`` policy it keeps
  honouring a revoked credential. The server's own timestamp floor keeps a
  jumped clock's timestamp across restarts. These tests pin the behaviour
  (docs/reliability.md, "Residual risks").
- A revoker grant expiring mid-scenario: its later revokes are refused
  ``unauthorized-signer`` by the server and by a device; a revoke *backdated*
  into the window is accepted while no later record exists (pinned too).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from api.service import LedgerService
from device_sim.device import Device
from ledger import encoding, messages, notes, records
from ledger.errors import TimestampRegression, UnauthorizedSigner
from ledger.records import Revoke
from ledger.tree import leaf_hash, mth
from tests.device_fixtures import T0, World, signer
from tests.helpers.server import Mirror, inprocess_server

HOUR, DAY = 3600, 86400
T = T0 + 1000  # the true time of the honest parties
MSGPACK = {"content-type": "application/msgpack"}


def synced_device(w: World, *, policy: str = "refuse", ts: int = T, now: int = T) -> Device:
    dev = Device.create(w.root.public_key, w.origin, now=now, stale_policy=policy)
    dev.apply_update(w.records, 0, w.checkpoint(ts), now)
    return dev


def tablet_world(**grant: int) -> tuple[World, bytes]:
    w = World()
    seq = w.grant(w.tablet.public_key, "operator", "tablet-07", **grant)
    return w, w.records[seq]


def ask(dev: Device, w: World, grant: bytes, *, now: int, signed_at: int) -> tuple[bool, str | None]:
    auth = messages.make_auth(grant, w.tablet, dev.public_key, dev.challenge(), signed_at)
    v = dev.check(auth, now)
    return v.accepted, v.reason


# --- a skewed device clock ------------------------------------------------------------

SKEWS = [-DAY - 1, -DAY, -HOUR, -300, 0, 300, HOUR, DAY, DAY + 1]


@pytest.mark.parametrize("skew", SKEWS)
def test_skewed_device_against_an_honest_tablet(skew: int) -> None:
    """The tablet signs at the true time; the device judges at its own. Beyond
    300 s of skew every credential is refused (clock-skew): fail closed."""
    w, grant = tablet_world()
    dev = synced_device(w, now=T + skew)  # the sync itself does not depend on the clock
    assert dev.size == w.size
    accepted, reason = ask(dev, w, grant, now=T + skew, signed_at=T)
    if abs(skew) <= 300:
        assert (accepted, reason) == (True, None)
    else:
        assert (accepted, reason) == (False, "clock-skew")


@pytest.mark.parametrize("skew", SKEWS)
def test_skewed_device_and_tablet_agree_freshness_decides(skew: int) -> None:
    """Tablet and device share the same wrong clock (the tablet set it from the device):
    the auth window passes, and the checkpoint's age on the device's clock decides.
    A clock a day or more off (either way) makes the device stale: refused."""
    w, grant = tablet_world()
    dev = synced_device(w, now=T + skew)
    accepted, reason = ask(dev, w, grant, now=T + skew, signed_at=T + skew)
    stale = abs(skew) > DAY  # max_staleness is 24 h, inclusive
    assert dev.is_stale(T + skew) is stale
    assert (accepted, reason) == ((False, "stale") if stale else (True, None))


@pytest.mark.parametrize("skew", [-HOUR, HOUR])
def test_skew_shifts_expiry(skew: int) -> None:
    """A credential valid until T + 30 min: a device an hour fast refuses it early; one
    an hour slow honours it for an hour after it expired (bounded by the skew)."""
    w, grant = tablet_world(not_after=T + 1800)
    dev = synced_device(w, now=T + skew)
    accepted, reason = ask(dev, w, grant, now=T + skew, signed_at=T + skew)
    assert (accepted, reason) == ((False, "expired") if skew > 0 else (True, None))
    if skew < 0:  # really expired 30 min ago, still accepted on the slow clock
        assert ask(dev, w, grant, now=T + 2 * 1800 + skew, signed_at=T + 2 * 1800 + skew) == (True, None)


def test_a_device_clock_jumping_back_never_accepts_an_older_checkpoint() -> None:
    w, _ = tablet_world()
    dev = synced_device(w, ts=T, now=T)
    with pytest.raises(TimestampRegression):
        dev.apply_update([], dev.size, w.checkpoint(T - HOUR), T - DAY)
    assert dev.checkpoint_time == T


# --- a checkpoint from the future -------------------------------------------------------


@pytest.mark.parametrize("ahead", [HOUR, 10 * 365 * DAY])
def test_a_future_checkpoint_blocks_honest_ones_until_its_time(ahead: int) -> None:
    w, grant = tablet_world()
    dev = synced_device(w)
    # the log key signs the same tree with a timestamp `ahead` seconds in the future
    dev.apply_update([], dev.size, w.checkpoint(T + ahead), T)
    assert dev.checkpoint_time == T + ahead
    stale = ahead > DAY
    assert dev.is_stale(T) is stale  # staleness is |now - timestamp|: the far future is stale
    assert ask(dev, w, grant, now=T, signed_at=T) == ((False, "stale") if stale else (True, None))
    # meanwhile the tablet is lost and revoked; the honest log signs at the true time
    w.revoke(records.parse(grant).seq, reason=2)
    before = dev.state.snapshot()
    with pytest.raises(TimestampRegression):
        dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T + 60), T + 60)
    assert dev.state.snapshot() == before and dev.evidence[-1].kind == "timestamp-regression"
    if not stale:  # once the true time passes the future timestamp, honest checkpoints are accepted again
        dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T + ahead), T + ahead)
        assert ask(dev, w, grant, now=T + ahead, signed_at=T + ahead) == (False, "revoked")


def test_a_far_future_checkpoint_with_the_accept_policy_keeps_a_revoked_tablet_valid() -> None:
    """The residual risk, pinned: a device with stale_policy=accept that took a checkpoint
    timestamped ten years ahead can learn no revocation for ten years."""
    w, grant = tablet_world()
    dev = synced_device(w, policy="accept")
    dev.apply_update([], dev.size, w.checkpoint(T + 10 * 365 * DAY), T)
    w.revoke(records.parse(grant).seq, reason=2)
    with pytest.raises(TimestampRegression):
        dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T + 60), T + 60)
    auth = messages.make_auth(grant, w.tablet, dev.public_key, dev.challenge(), T + 120)
    v = dev.check(auth, T + 120)
    assert (v.accepted, v.stale) == (True, True)  # accepted (and reported stale) although revoked


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def service(app: Starlette) -> LedgerService:
    svc = app.state.service
    assert isinstance(svc, LedgerService)
    return svc


async def test_a_server_clock_jump_forward_is_kept_as_the_floor_across_restarts(tmp_path: Path) -> None:
    """The server's clock jumps ten years ahead once and comes back: every later
    checkpoint (also after a restart) carries the future timestamp (it never goes
    back), so devices stay synced but stale until the true time catches up."""
    root = signer("root")
    clock = Clock(T)
    async with inprocess_server(tmp_path, root.public_key, "ledger.test.example/jump", clock=clock) as (
        c,
        app,
    ):
        svc = service(app)
        m = Mirror(root, "ledger.test.example/jump", time=T - 100)
        m.genesis()
        m.grant(svc.signer.public_key, "log", "log")
        assert (
            await c.post("/v1/records", content=encoding.pack_records(m.records), headers=MSGPACK)
        ).status_code == 200
        clock.t = T + 10 * 365 * DAY
        m.time = T - 50
        assert (await post(c, [m.grant(os.urandom(32), "operator", "x")])).status_code == 200
        clock.t = T
        m.time = T - 40
        assert (await post(c, [m.grant(os.urandom(32), "operator", "y")])).status_code == 200
        vc = notes.verify_checkpoint((await c.get("/checkpoint")).text, svc.origin, [svc.signer.public_key])
        assert vc.timestamp == T + 10 * 365 * DAY
        data_dir = svc.config.data_dir
    async with inprocess_server(
        tmp_path, root.public_key, "ledger.test.example/jump", clock=clock, data_dir=data_dir
    ) as (
        c,
        app,
    ):
        svc = service(app)
        vc = notes.verify_checkpoint((await c.get("/checkpoint")).text, svc.origin, [svc.signer.public_key])
        assert vc.timestamp == T + 10 * 365 * DAY
        dev = Device.create(root.public_key, svc.origin, now=T)
        raws = encoding.unpack_records((await c.get("/v1/records")).content, max_count=1000)
        r = dev.apply_update(raws, 0, vc.note, T)
        assert r.size == 4 and r.stale


async def post(c: httpx.AsyncClient, raws: list[bytes]) -> httpx.Response:
    return await c.post("/v1/records", content=encoding.pack_records(raws), headers=MSGPACK)


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
        assert (await post(c, m.records)).status_code == 200
        good = list(m.records)

        # inside the window: the revoker revokes tablet-a
        clock.t = m.time = T + 50
        r = await post(c, [m.revoke(a, reason=2, signer=(revoker_seq, oncall))])
        assert r.status_code == 200, r.text
        good = list(m.records)

        # after it: refused unauthorized-signer, nothing appended
        clock.t = T + 150
        head = (m.state.size, m.state.root)
        late = Revoke(head[0], head[1], T + 150, revoker_seq, b, 2)
        late_raw = records.sign(late, oncall)
        r = await post(c, [late_raw])
        assert r.status_code == 403 and r.json()["type"] == "urn:writ:problem:unauthorized-signer", r.text
        assert service(app).size == len(good)

        # a device refuses it too, when a stolen server serves it with a valid log signature
        dev = Device.create(root.public_key, origin, now=T + 150)
        dev.apply_update(good, 0, (await c.get("/checkpoint")).text, T + 150)
        forged = [*good, late_raw]
        note = notes.sign_checkpoint(
            notes.Checkpoint(origin, len(forged), mth([leaf_hash(x) for x in forged])),
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
        r = await post(c, [backdated])
        assert r.status_code == 200, r.text
        m.extend([backdated])
        # ... but not once a record at or after the expiry is in the ledger (time never goes back)
        m.time = T + 150
        assert (await post(c, [m.grant(os.urandom(32), "operator", "later")])).status_code == 200
        again = records.sign(Revoke(m.state.size, m.state.root, T + 99, revoker_seq, cc, 2), oncall)
        r = await post(c, [again])
        assert r.status_code == 422 and r.json()["type"] == "urn:writ:problem:time-regression", r.text
        # the root itself can always revoke
        assert (await post(c, [m.revoke(cc, reason=2)])).status_code == 200
