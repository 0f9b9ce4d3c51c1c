"""Issue #10, the whole story: a stolen log key dates a checkpoint far in the future.

Before protocol revision 1.1 a device accepted it, made it its timestamp
floor, and then refused every honest checkpoint as ``timestamp-regression``,
even after the integrator replaced the log key and revoked the stolen
tablet: the revoked tablet stayed accepted. Now every verifier (devices, the
signing tool's mirror, the auditor) refuses a checkpoint dated more than
300 s ahead of its clock (``future-checkpoint``), keeps it as evidence, and
leaves its floor alone, so the integrator's fix reaches every device.

The parties are real: two in-process ``writ serve`` apps (the old log key's
and its replacement's), devices synced over HTTP with ``device_sim``'s own
source, and a hostile log (the thief, holding the stolen key) built from the
test fixtures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from device_sim.device import Device
from device_sim.sources import HttpSource, sync
from ledger import audit, checkpoints, notes, records
from ledger.crypto import SeedSigner
from ledger.errors import FutureCheckpoint, UntrustedCheckpoint
from ledger.mirror import Mirror as LocalMirror
from ledger.state import LedgerState
from ledger.tree import leaf_hash, mth
from tests.helpers.device import T0, FakeLog, World, signer
from tests.helpers.lost_tablet import LostTablet, ask
from tests.helpers.server import BASE_URL, Clock, Mirror, inprocess_server, post_records, service
from tests.helpers.sources import ListSource

T = T0 + 5000  # the true time
CENTURY = 100 * 365 * 86400
ORIGIN = "ledger.test.example/story"
THIEF = "http://thief.test"


def thief_note(raws: Sequence[bytes], key: SeedSigner, ts: int) -> str:
    cp = checkpoints.Checkpoint(ORIGIN, len(raws), mth([leaf_hash(r) for r in raws]))
    return checkpoints.sign_checkpoint(cp, ORIGIN, key, ts)


async def test_stolen_log_key_far_future_checkpoint_then_key_replaced_devices_refuse_the_tablet(
    tmp_path: Path,
) -> None:
    root, tablet = signer("root"), signer("tablet-07")
    clock = Clock(T)
    m = Mirror(root, ORIGIN, time=T - 100)
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, clock=clock) as (c1, app1):
        stolen = service(app1).signer  # the log key the thief copied
        assert isinstance(stolen, SeedSigner)
        m.genesis()
        log_seq = m.state.size
        m.grant(stolen.public_key, "log", "log")
        tablet_seq = m.state.size
        m.grant(tablet.public_key, "operator", "tablet-07")
        assert (await post_records(c1, m.records)).status_code == 200
        grant = m.records[tablet_seq]

        # a fleet: a device with a state directory, one in memory, one with the accept policy
        devices = [
            Device.create(root.public_key, ORIGIN, directory=tmp_path / "plc-1", now=T),
            Device.create(root.public_key, ORIGIN, now=T),
            Device.create(root.public_key, ORIGIN, now=T, stale_policy="accept"),
        ]
        for dev in devices:
            await sync(dev, HttpSource(c1, BASE_URL), T)
            assert ask(dev, grant, tablet, now=T) == (True, None)
        honest_note = (await c1.get("/checkpoint")).text
        old_records = list(m.records)

    # 1. the thief serves the honest records under a checkpoint dated a century ahead
    thief = FakeLog(records=old_records, note=thief_note(old_records, stolen, T + CENTURY))
    async with thief.client() as tc:
        for dev in devices:
            with pytest.raises(FutureCheckpoint):
                await sync(dev, HttpSource(tc, THIEF), T + 10)
            assert dev.checkpoint_time is not None and dev.checkpoint_time <= T + 300
            assert dev.evidence[-1].kind == "future-checkpoint"
            assert dev.evidence[-1].notes == (honest_note, thief.note)
    thief.closing = True
    assert Device.load(tmp_path / "plc-1").evidence[-1].kind == "future-checkpoint"
    # the signing tool's mirror and the auditor refuse it too
    with LocalMirror.open(tmp_path / "mirror", root.public_key) as mirror:
        with pytest.raises(FutureCheckpoint):
            mirror.sync(ListSource(old_records, thief.note), now=T + 10)
        assert mirror.view is None and mirror.size == 0
    audited = LedgerState(root.public_key, origin=ORIGIN)
    audited.apply_all(old_records)
    with pytest.raises(FutureCheckpoint):
        audit.check_checkpoint(audited, thief.note, now=T + 10)

    # 2. the integrator replaces the log key (a new server, docs/operations.md) and revokes the tablet
    clock.t = T + 600
    m.time = T + 550
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, clock=clock) as (c2, app2):
        new_log = service(app2).signer
        assert (await post_records(c2, old_records)).status_code == 200
        m.revoke(stolen.public_key, reason=int(records.Reason.KEY_COMPROMISE))
        m.grant(new_log.public_key, "log", "log-2")
        m.revoke(tablet_seq, reason=int(records.Reason.LOST))
        assert (await post_records(c2, m.records[len(old_records) :])).status_code == 200
        assert m.state.is_revoked(log_seq) is False and m.state.key_revoked(stolen.public_key)

        # 3. the devices catch up with the new key's honest checkpoint and refuse the tablet
        for dev in devices:
            r = await sync(dev, HttpSource(c2, BASE_URL), T + 600)
            assert (r.size, r.checkpoint_time, r.stale) == (len(m.records), T + 600, False)
            assert ask(dev, grant, tablet, now=T + 600) == (False, "revoked")
        assert Device.load(tmp_path / "plc-1").size == len(m.records)
        with LocalMirror.open(tmp_path / "mirror", root.public_key) as mirror:
            assert mirror.sync(
                ListSource(m.records, (await c2.get("/checkpoint")).text), now=T + 600
            ).size == len(m.records)

    # 4. the stolen key signs nothing the devices take any more, even dated honestly
    thief2 = FakeLog(records=list(m.records), note=thief_note(m.records, stolen, T + 700))
    async with thief2.client() as tc:
        for dev in devices:
            with pytest.raises(UntrustedCheckpoint):
                await sync(dev, HttpSource(tc, THIEF), T + 700)
            assert ask(dev, grant, tablet, now=T + 700) == (False, "revoked")
    thief2.closing = True


def test_witness_device_applies_a_revocation_without_cosignatures_but_is_not_fresh() -> None:
    """1.1: a device requiring a witness applies the records under a log-signed
    checkpoint at once (the revocation is not held back) but refuses every
    credential as stale until the cosignature arrives."""
    w = World()
    wit = signer("witness")
    w.grant(wit.public_key, "witness", "witness.example/w")
    story = LostTablet.build(w)
    other = signer("tablet-08")
    other_seq = w.grant(other.public_key, "operator", "tablet-08")
    dev = Device.create(w.root.public_key, w.origin, now=T, require_witnesses=1)

    def cosigned(ts: int) -> str:
        cp = checkpoints.Checkpoint(w.origin, w.size, w.root_at())
        return notes.add_signatures(w.checkpoint(ts), [checkpoints.cosign(cp, "witness.example/w", wit, ts)])

    dev.apply_update(w.records, 0, cosigned(T), T)
    assert not dev.is_stale(T)
    assert ask(dev, w.records[other_seq], other, now=T) == (True, None)
    story.revoke()
    r = dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(T + 10), T + 10)  # no cosignature
    assert r.size == w.size and r.stale and dev.state.is_revoked(story.seq)
    assert story.ask(dev, now=T + 10) == (False, "revoked")
    assert ask(dev, w.records[other_seq], other, now=T + 10) == (False, "stale")
    dev.apply_update([], dev.size, cosigned(T + 20), T + 20)  # the cosignature arrives
    assert ask(dev, w.records[other_seq], other, now=T + 20) == (True, None)
