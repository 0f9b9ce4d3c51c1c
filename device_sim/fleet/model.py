"""What a fleet run is made of: its options, its members and its measurement."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ledger.errors import UsageError

from ..device import DEFAULT_MAX_STALENESS, Device
from ..measure import percentile
from ..sources import DEFAULT_TIMEOUT

__all__ = [
    "DEFAULT_CONNECTIONS",
    "HTTP_CLIENTS",
    "MAX_PROCESSES",
    "OWN_GRANT_MODES",
    "PUSH_MODES",
    "RECEIPT_MODES",
    "VERIFIES_PER_DEVICE",
    "Clock",
    "FleetOptions",
    "FleetResult",
    "Member",
]

#: push connections when not given: min(N, this).
DEFAULT_CONNECTIONS = 500
#: Ed25519 verifications one revocation costs a device: the revoke record, the
#: checkpoint's 0x01 and 0x04 signatures, the tablet's grant record and its auth.
VERIFIES_PER_DEVICE = 5
PUSH_MODES = ("sse", "poll")
#: the most processes a fleet is shared among.
MAX_PROCESSES = 64
OWN_GRANT_MODES = ("leaf", "proof")
RECEIPT_MODES = ("after", "during")
HTTP_CLIENTS = ("fast", "httpx")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class FleetOptions:
    """How a fleet runs. Shares are of the devices, the template (device 0) excepted."""

    push: str = "sse"
    poll_interval: float = 2.0
    #: push connections; None: min(N, DEFAULT_CONNECTIONS). N: one per device.
    connections: int | None = None
    seed: int | None = None
    max_staleness: int = DEFAULT_MAX_STALENESS
    #: each device's clock is off by a uniform integer in [-drift, drift] seconds.
    drift: int = 0
    #: share of the booted devices (after the late ones are drawn) offline at the
    #: revoke, back ``offline_for`` s after the ack (they catch up through the tiles).
    offline: float = 0.0
    offline_for: float = 1.0
    #: share of devices that boot ``late_after`` s after the ack and sync from genesis.
    late: float = 0.0
    late_after: float = 1.0
    own_grant: str = "leaf"
    receipts: str = "after"
    #: seconds to wait, after the ack, for every device to refuse.
    deadline: float = 60.0
    timeout: float = DEFAULT_TIMEOUT
    backoff: tuple[float, float] = (0.5, 5.0)
    #: HTTP connections of the shared client (tiles, proofs, receipts).
    http_connections: int = 64
    #: serve the (immutable) tiles through a shared edge cache (:class:`TileCache`).
    tile_cache: bool = True
    #: "fast": :class:`FastTransport` under httpx; "httpx": httpx's own (httpcore) transport.
    http_client: str = "fast"
    #: processes the booted devices are shared among (:mod:`device_sim.fleet.shards`).
    processes: int = 1

    def __post_init__(self) -> None:
        if self.push not in PUSH_MODES:
            raise UsageError(f"push is one of {', '.join(PUSH_MODES)}")
        if self.own_grant not in OWN_GRANT_MODES:
            raise UsageError(f"own_grant is one of {', '.join(OWN_GRANT_MODES)}")
        if self.http_client not in HTTP_CLIENTS:
            raise UsageError(f"http_client is one of {', '.join(HTTP_CLIENTS)}")
        if self.receipts not in RECEIPT_MODES:
            raise UsageError(f"receipts is one of {', '.join(RECEIPT_MODES)}")
        if not 0 <= self.offline <= 1 or not 0 <= self.late <= 1 or self.offline + self.late > 1:
            raise UsageError("offline and late are shares between 0 and 1 (together at most 1)")
        if self.connections is not None and self.connections < 1:
            raise UsageError("connections is at least 1")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise UsageError(f"processes is between 1 and {MAX_PROCESSES}")
        if not self.poll_interval > 0 or not self.deadline > 0:
            raise UsageError("poll_interval and deadline are positive")


@dataclass(slots=True, eq=False)
class Member:
    """One simulated device and what the harness knows about it."""

    index: int
    device: Device
    drift: int = 0
    online: bool = True
    late: bool = False
    grant_seq: int | None = None
    grant_record: bytes | None = None
    #: the auth the tablet signed, before the revoke, for this device's outstanding challenge.
    pending: bytes | None = None
    refused_at: float | None = None
    reason: str | None = None
    receipt_size: int | None = None
    receipt_error: str | None = None
    #: bytes this device fetched by itself (catch-up, late boot, own proofs).
    own_bytes: int = 0

    @property
    def public_key(self) -> bytes:
        return self.device.public_key


@dataclass
class FleetResult:
    """The measurement (see :meth:`to_json` for the keys printed)."""

    devices: int
    latencies: list[float]
    reasons: dict[str, int]
    refused_before_ack: int
    bytes_per_device: float
    receipts: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_refused(self) -> bool:
        return len(self.latencies) == self.devices and self.reasons.get("revoked", 0) == self.devices

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def r(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 4)

        out: dict[str, Any] = {
            "devices": self.devices,
            "all_refused": self.all_refused,
            "refused_p50_s": r(percentile(lat, 50)),
            "refused_p99_s": r(percentile(lat, 99)),
            "refused_max_s": r(lat[-1]) if lat else None,
            "bytes_per_device": round(self.bytes_per_device),
            "receipts": self.receipts,
            "refused": len(lat),
            "refusal_reasons": dict(sorted(self.reasons.items())),
            "refused_before_ack": self.refused_before_ack,
        }
        out.update(self.extra)
        return out
