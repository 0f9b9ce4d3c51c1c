"""The stolen log key (docs/witness.md): what witnesses stop and what they do not.

The attacker holds the log's key (and the server). The tablet was revoked
and a real witness (api/witness.py, driven with spec-text requests) cosigned
the tree holding the revoke. The attacker then:

- freezes devices on the tree before the revoke, re-signed with fresh log
  timestamps (and the old witness cosignature copied on, since it still
  verifies for that tree): a device requiring no witness is fooled and
  accepts the revoked tablet; a device requiring one refuses (its view is
  only as fresh as the witness's last word on it), and the witness refuses
  to cosign the old tree again;
- shows half of the fleet the frozen tree and the other half the real one
  (a split view): with ``K = 1`` every device refuses the tablet, and a
  device that saw the real tree and is then shown the old one refuses the
  rollback and keeps both signed notes as evidence.
"""

from __future__ import annotations

import asyncio

import pytest

from api.witness import Witness
from api.witness_store import MemoryWitnessStore
from device_sim.device import Device
from ledger import checkpoints, notes, records
from ledger.errors import Rollback
from tests.helpers.device import T0, World, signer
from tests.helpers.witness import spec_body

WNAME = "witness.example/w1"
DAY = 86400
T1 = T0 + 1000  # the tablet is granted, everything witnessed
T2 = T1 + 60  # the tablet is revoked, the witness cosigns the new tree
T3 = T1 + DAY + 3600  # the attack: long after the witness's last word on the old tree


class Story:
    def __init__(self) -> None:
        self.w = World()
        self.wkey = signer("witness-1")
        self.w.grant(self.wkey.public_key, records.ROLE_WITNESS, WNAME)
        self.clock = [float(T1)]
        self.witness = Witness(
            WNAME,
            self.wkey,
            {self.w.origin: checkpoints.checkpoint_verifiers(self.w.origin, self.w.log.public_key)[:1]},
            MemoryWitnessStore(),
            clock=lambda: self.clock[0],
        )
        self.witnessed = 0
        self.devices: dict[str, Device] = {}
        for k in (0, 1):
            for half in ("a", "b"):
                name = f"k{k}-{half}"
                d = Device.create(
                    self.w.root.public_key, self.w.origin, now=T0, require_witnesses=k, name=name
                )
                self.w.grant(d.public_key, records.ROLE_DEVICE, name)
                self.devices[name] = d
        self.tablet_seq = self.w.grant(self.w.tablet.public_key, records.ROLE_OPERATOR, "tablet-07")
        self.frozen_size = 0  # the tree before the revoke
        self.frozen_note = ""  # its witnessed note, at T1

    def cosigned(self, ts: int, size: int | None = None) -> str:
        """The log's note of ``size`` at ``ts``, submitted to the witness; with its cosignature."""
        n = self.w.size if size is None else size
        note = self.w.checkpoint(ts, n)
        self.clock[0] = ts
        body = spec_body(
            self.witnessed,
            self.w.levels.consistency_proof(self.witnessed, n) if 0 < self.witnessed < n else [],
            note,
        )
        line = asyncio.run(self.witness.add_checkpoint(body))
        self.witnessed = n
        return notes.add_signatures(note, [line])

    def sync(self, name: str, note: str, now: int, size: int | None = None) -> None:
        d = self.devices[name]
        n = self.w.size if size is None else size
        d.apply_update(self.w.records[d.size : n], d.size, note, now)

    def check(self, name: str, now: int) -> tuple[bool, str | None]:
        d = self.devices[name]
        ch = d.challenge()
        auth = self.w.auth(self.w.records[self.tablet_seq], self.w.tablet, d.public_key, ch, now)
        v = d.check(auth, now)
        return v.accepted, v.reason


@pytest.fixture
def story() -> Story:
    s = Story()
    note = s.cosigned(T1)
    for name in s.devices:
        s.sync(name, note, T1)
        assert s.check(name, T1 + 5) == (True, None)
    # the tablet is lost: the revoke is appended and witnessed
    s.frozen_size, s.frozen_note = s.w.size, note
    s.w.revoke(s.tablet_seq, reason=2)
    s.cosigned(T2)
    return s


def _frozen(s: Story, ts: int) -> str:
    """The attacker's note: the pre-revoke tree, log-signed at ``ts``, the old cosignature copied on."""
    size = s.frozen_size
    old = notes.parse_note(s.frozen_note)
    cosig = [sig.line() for sig in old.signatures if sig.name == WNAME]
    return notes.add_signatures(s.w.checkpoint(ts, size), cosig)


def test_stolen_log_key_freezing_a_device_fools_k0_and_is_refused_with_a_witness(story: Story) -> None:
    s = story
    size = s.frozen_size
    frozen = _frozen(s, T3)
    # the witness will not vouch for the old tree again: it has seen the revoke
    with pytest.raises(Exception) as refused:
        asyncio.run(s.witness.add_checkpoint(spec_body(size, [], s.w.checkpoint(T3, size))))
    assert type(refused.value).__name__ == "WitnessConflict"
    for name in ("k0-a", "k1-a"):
        s.sync(name, frozen, T3, size)
        assert s.devices[name].size == size
    # K = 0: the fresh log timestamp is all it has; it is fooled
    assert s.check("k0-a", T3 + 5) == (True, None)
    # K = 1: as fresh as the witness's last cosignature of that tree (T1): stale, refused
    assert s.check("k1-a", T3 + 5) == (False, "stale")


def test_stolen_log_key_split_view_every_device_requiring_a_witness_refuses(story: Story) -> None:
    s = story
    size = s.frozen_size
    honest = s.cosigned(T3)  # the real log re-signs; the witness cosigns the real tree
    frozen = _frozen(s, T3)
    for name in ("k0-a", "k1-a"):
        s.sync(name, frozen, T3, size)
    for name in ("k0-b", "k1-b"):
        s.sync(name, honest, T3)
    verdicts = {name: s.check(name, T3 + 5) for name in s.devices}
    assert verdicts == {
        "k0-a": (True, None),  # fooled: the reason to turn witnesses on
        "k0-b": (False, "revoked"),
        "k1-a": (False, "stale"),
        "k1-b": (False, "revoked"),
    }
    # the attacker now shows the frozen tree to the half that saw the real one
    for name in ("k1-b", "k0-b"):
        d = s.devices[name]
        before = (d.size, d.root)
        with pytest.raises(Rollback):
            s.sync(name, _frozen(s, T3 + 10), T3 + 10, size)
        assert (d.size, d.root) == before
        ev = d.evidence[-1]
        assert ev.kind == "rollback" and len(ev.notes) == 2


def test_with_the_real_tree_cosigned_again_a_k1_device_is_fresh(story: Story) -> None:
    """The control: the same device, shown the real witnessed tree, is fresh and refuses as revoked."""
    s = story
    s.sync("k1-a", s.cosigned(T3), T3)
    assert s.check("k1-a", T3 + 5) == (False, "revoked")
