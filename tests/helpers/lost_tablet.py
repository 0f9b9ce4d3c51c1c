"""The lost-tablet story, built once for every test that tells it.

A ledger (:class:`tests.device_fixtures.World`: genesis, the log grant, a
revoker), an operator tablet granted on it, devices synced to it, the tablet
revoked, the devices refusing it. Tests build the parts they need here
instead of each writing the same genesis-grant-revoke sequence:

``story = LostTablet.build(**window)``
    a new :class:`World` with the tablet (``world.tablet``) granted role
    ``operator`` as ``tablet-07``; ``window`` is ``not_before`` /
    ``not_after`` / ``scope``. ``story.seq`` is the grant's seq,
    ``story.grant`` its record bytes.
``story.revoke(reason=Reason.LOST, by_revoker=False)``
    publishes the revocation (by the root, or by the world's revoker grant).
``story.device(ts=..., now=..., **create)``
    a :class:`~device_sim.device.Device` synced to the world's head under a
    checkpoint dated ``ts``.
``story.ask(dev, now=..., signed_at=None)`` / :func:`ask`
    the tablet presents its credential to ``dev``: ``(accepted, reason)``.
``story.auth(device_key, challenge, at)``
    the tablet's auth message, for checks without a device
    (:func:`ledger.credential.check_credential`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from device_sim.device import Device
from ledger import messages, records
from ledger.crypto import SeedSigner
from tests.device_fixtures import T0, World

NAME = "tablet-07"
T = T0 + 1000  # a time after every record of a new World


def ask(
    dev: Device, grant: bytes, key: SeedSigner, *, now: int, signed_at: int | None = None
) -> tuple[bool, str | None]:
    """``key`` presents ``grant`` to ``dev`` (signed at ``signed_at``, default ``now``)."""
    auth = messages.make_auth(
        grant, key, dev.public_key, dev.challenge(), now if signed_at is None else signed_at
    )
    v = dev.check(auth, now)
    return v.accepted, v.reason


@dataclass
class LostTablet:
    world: World
    seq: int

    @classmethod
    def build(cls, world: World | None = None, *, name: str = NAME, **window: Any) -> LostTablet:
        w = world if world is not None else World()
        return cls(w, w.grant(w.tablet.public_key, records.ROLE_OPERATOR, name, **window))

    @property
    def tablet(self) -> SeedSigner:
        return self.world.tablet

    @property
    def grant(self) -> bytes:
        return self.world.records[self.seq]

    def revoke(self, reason: int = records.Reason.LOST, *, by_revoker: bool = False) -> int:
        return self.world.revoke(self.seq, int(reason), by_revoker=by_revoker)

    def device(self, *, ts: int = T, now: int = T, **create: Any) -> Device:
        w = self.world
        dev = Device.create(w.root.public_key, w.origin, now=now, **create)
        dev.apply_update(w.records, 0, w.checkpoint(ts), now)
        return dev

    def sync(self, dev: Device, *, ts: int, now: int) -> None:
        w = self.world
        dev.apply_update(w.records[dev.size :], dev.size, w.checkpoint(ts), now)

    def ask(self, dev: Device, *, now: int, signed_at: int | None = None) -> tuple[bool, str | None]:
        return ask(dev, self.grant, self.tablet, now=now, signed_at=signed_at)

    def auth(self, device_key: bytes, challenge: bytes, at: int) -> bytes:
        return messages.make_auth(self.grant, self.tablet, device_key, challenge, at)
