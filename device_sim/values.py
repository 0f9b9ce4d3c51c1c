"""A device's value types: what it is installed with, the grants of its own
key, what one accepted update changed, and what a source hands it.

Kept apart from :mod:`device_sim.device` (the device) and
:mod:`device_sim.update` (one update, verified as it arrives), which both use
them; :mod:`device_sim.device` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ledger import credential, messages, records
from ledger.acceptance import AcceptedView
from ledger.crypto import SeedSigner
from ledger.errors import BadMessage, UsageError, WritError

__all__ = [
    "DEFAULT_MAX_STALENESS",
    "STALE_POLICIES",
    "DeviceConfig",
    "OwnGrant",
    "SyncResult",
    "UpdateLike",
]

DEFAULT_MAX_STALENESS = credential.DEFAULT_MAX_STALENESS
STALE_POLICIES = ("refuse", "accept")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """What the device is installed with. ``keep_roles`` None keeps every
    grant (a CLI device can afford it); a fleet keeps ``{"operator"}``."""

    anchor: bytes
    origin: str
    max_staleness: int = DEFAULT_MAX_STALENESS
    stale_policy: str = "refuse"
    keep_roles: frozenset[str] | None = None
    require_witnesses: int = 0

    def __post_init__(self) -> None:
        if type(self.anchor) is not bytes or len(self.anchor) != 32:
            raise UsageError("the anchor is a 32-byte Ed25519 public key")
        try:
            records.check_origin(self.origin)
        except WritError:
            raise UsageError("the origin is 1..128 bytes with no spaces, '+' or control characters") from None
        if type(self.max_staleness) is not int or self.max_staleness < 0:
            raise UsageError("max_staleness is a number of seconds >= 0")
        if self.stale_policy not in STALE_POLICIES:
            raise UsageError(f"stale_policy is one of {', '.join(STALE_POLICIES)}")
        if type(self.require_witnesses) is not int or self.require_witnesses < 0:
            raise UsageError("require_witnesses is a count >= 0")

    def to_list(self) -> list[Any]:
        roles = None if self.keep_roles is None else sorted(self.keep_roles)
        return [
            self.anchor,
            self.origin,
            self.max_staleness,
            self.stale_policy,
            roles,
            self.require_witnesses,
        ]

    @classmethod
    def from_list(cls, f: Any) -> DeviceConfig:
        if type(f) is not list or len(f) != 6:
            raise BadMessage("damaged device config")
        roles = f[4]
        if roles is not None and (type(roles) is not list or not all(type(r) is str for r in roles)):
            raise BadMessage("damaged device config")
        try:
            return cls(f[0], f[1], f[2], f[3], None if roles is None else frozenset(roles), f[5])
        except UsageError:
            raise BadMessage("damaged device config") from None


@dataclass(frozen=True, slots=True)
class OwnGrant:
    """A ``device`` grant of this device's own key, found in the ledger."""

    seq: int
    scope: str
    name: str

    def to_list(self) -> list[Any]:
        return [self.seq, self.scope, self.name]


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one accepted update changed."""

    size: int
    root: bytes
    checkpoint_time: int | None
    previous_size: int
    stale: bool
    #: a bundle not newer than the device: the size of its checkpoint (nothing was applied)
    nothing_new: int | None = None

    @property
    def appended(self) -> int:
        return self.size - self.previous_size

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size,
            "root": self.root.hex(),
            "checkpoint_time": self.checkpoint_time,
            "appended": self.appended,
            "stale": self.stale,
            "nothing_new": self.nothing_new is not None,
        }
        if self.nothing_new is not None:
            out["bundle_size"] = self.nothing_new
            out["note"] = (
                f"nothing new: the bundle's checkpoint (size {self.nothing_new}) is not newer than "
                f"this device's (size {self.size}); its overlapping records match what the device applied"
            )
        return out


def view_to_list(v: AcceptedView | None) -> list[Any] | None:
    return None if v is None else v.to_list()


def view_from_list(f: Any) -> AcceptedView | None:
    return None if f is None else AcceptedView.from_list(f)


def grants_from_list(f: Any) -> list[OwnGrant]:
    if type(f) is not list:
        raise BadMessage("damaged own grants in the device state")
    out = []
    for g in f:
        if type(g) is not list or len(g) != 3 or type(g[0]) is not int or type(g[1]) is not str:
            raise BadMessage("damaged own grants in the device state")
        if type(g[2]) is not str:
            raise BadMessage("damaged own grants in the device state")
        out.append(OwnGrant(g[0], g[1], g[2]))
    return out


class UpdateLike(Protocol):
    """What a source yields (:class:`device_sim.sources.Update`)."""

    @property
    def start(self) -> int: ...

    @property
    def records(self) -> list[bytes]: ...

    @property
    def note(self) -> str: ...


def named_enrollment(signer: SeedSigner, name: str | None, who: str, now: int) -> tuple[str, bytes]:
    """The label (``name``, or ``WHO-<key prefix>``) and the signed enrollment request a
    new device or holder key asks to be granted under; a name that cannot be a grant's
    name is a :class:`UsageError` before anything is written."""
    label = name if name is not None else f"{who}-{signer.public_key.hex()[:8]}"
    try:
        records.check_text("name", label, records.MAX_NAME)
        return label, messages.make_enroll(signer, label, now)
    except WritError:
        raise UsageError(f"the {who} name is 0..64 bytes of text with no control characters") from None
