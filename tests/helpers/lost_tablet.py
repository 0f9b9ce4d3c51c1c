"""The lost-tablet story, built once for every test that tells it.

A ledger (:class:`tests.helpers.device.World`: genesis, the log grant, a
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

``tell_with_the_cli(writ, device, url=..., ...)`` tells the same story with
the real ``writ`` and ``python -m device_sim`` commands against a running
server (devices enrolled and granted, the tablet and an on-call revoker
granted, the tablet revoked by name from the on-call machine, devices synced).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sim.device import Device
from ledger import messages, records
from ledger.crypto import SeedSigner
from tests.helpers.device import T0, World

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


# --- the same story told with the real programs ---------------------------------------------

#: ``writ(*args, code=0, extra_env=None) -> dict``: runs one ``writ`` command, checks its exit
#: code, returns its JSON line; ``device(*args) -> dict`` the same for ``python -m device_sim``.
Run = Callable[..., dict[str, Any]]


@dataclass
class CliStory:
    """What :func:`tell_with_the_cli` did: every command's JSON answer."""

    enrolled: dict[str, dict[str, Any]]  # device name -> `device init`
    granted: dict[str, dict[str, Any]]  # device name -> its `grant`
    tablet_key: dict[str, Any]  # `key init` of the tablet
    tablet: dict[str, Any]  # the tablet's `grant`
    oncall_key: dict[str, Any]  # `key init` of the on-call revoker
    oncall_env: dict[str, str]  # the on-call machine's own WRIT_HOME, and the anchor
    revoke: dict[str, Any]  # THE lost-tablet command
    synced: dict[str, dict[str, Any]]  # device name -> its `device sync` after the revoke


def tell_with_the_cli(
    writ: Run,
    device: Run,
    *,
    url: str,
    anchor: str,
    origin: str,
    root_key: Sequence[object],
    workdir: Path,
    devices: Mapping[str, Path],
    passphrase_env: str,
) -> CliStory:
    """The lost-tablet story on a ledger that has its genesis, with the real commands.

    Each device (name -> state directory) enrolls itself and is granted from
    its request; ``tablet-07`` (``workdir/tablet.key``) is granted role
    operator and an on-call revoker (``workdir/oncall.key``) role revoker,
    both signed with ``root_key`` (the ``--key ...`` options); the on-call
    engineer revokes the tablet by name, reason lost, from their own machine
    (``workdir/oncall-home``, the anchor from ``WRIT_ANCHOR``); every device
    syncs and posts its receipt.
    """
    enrolled: dict[str, dict[str, Any]] = {}
    granted: dict[str, dict[str, Any]] = {}
    for name, state in devices.items():
        enrolled[name] = device(
            "device", "init", "--state", state, "--anchor", anchor, "--origin", origin, "--name", name
        )
        granted[name] = writ(
            "grant", "--server", url, "--request", state / "enroll.bin", "--role", "device", *root_key
        )
    pw = ("--passphrase-env", passphrase_env)
    tablet_key = writ("key", "init", "--out", workdir / "tablet.key", *pw, "--role", "operator")
    tablet = writ(
        "grant", "--server", url, "--subject", tablet_key["public_key"], "--role", "operator",
        "--name", NAME, *root_key,
    )  # fmt: skip
    oncall_key = writ("key", "init", "--out", workdir / "oncall.key", *pw, "--role", "revoker")
    writ(
        "grant", "--server", url, "--subject", oncall_key["public_key"], "--role", "revoker",
        "--name", "oncall", *root_key,
    )  # fmt: skip
    oncall_env = {"WRIT_HOME": str(workdir / "oncall-home"), "WRIT_ANCHOR": anchor}
    revoke = writ(
        "revoke", "--name", NAME, "--reason", "lost", "--revoker-key", workdir / "oncall.key", *pw,
        "--server", url, extra_env=oncall_env,
    )  # fmt: skip
    synced: dict[str, dict[str, Any]] = {}
    for name, state in devices.items():
        synced[name] = device("device", "sync", "--state", state, "--server", url)
        device("device", "receipt", "--state", state, "--server", url)
    return CliStory(enrolled, granted, tablet_key, tablet, oncall_key, oncall_env, revoke, synced)
