"""Dating and signing the server's checkpoints.

A checkpoint's 0x04 timestamp never goes back, not even across a restart
(the last persisted checkpoint's timestamp is the floor: :func:`stored_checkpoint`
reads it back), and is never ahead of the server's clock (protocol revision 1.1,
docs/protocol.md, "Checkpoints"): while
the clock is behind the floor (it jumped back), :meth:`CheckpointSigner.sign`
signs nothing and the caller keeps serving the last note. Publishing (storage,
the event streams, witnesses) is :class:`api.service.LedgerService`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ledger import checkpoints
from ledger.crypto import Signer
from ledger.errors import WritError

from .broadcast import CheckpointEvent

__all__ = ["CheckpointSigner", "stored_checkpoint"]

log = logging.getLogger("writ.api")


def stored_checkpoint(note: str, origin: str, log_key: bytes) -> CheckpointEvent | None:
    """The persisted note signed by ``log_key`` as an event (``None`` if it does not verify)."""
    try:
        vc = checkpoints.verify_checkpoint(note, origin, [log_key])
    except WritError:
        return None
    cp = vc.checkpoint
    return CheckpointEvent(cp.size, cp.root, vc.timestamp or 0, vc.note)


class CheckpointSigner:
    """Signs checkpoints of ``origin`` with ``signer``, dated by ``clock``, never below ``floor``."""

    def __init__(self, origin: str, signer: Signer, clock: Callable[[], float], floor: int) -> None:
        self.origin = origin
        self.signer = signer
        self.clock = clock
        self.floor = floor
        self._behind_logged = False

    def clock_behind(self) -> float:
        """Seconds the clock is behind the last timestamp signed (0 when it is not)."""
        return max(0.0, self.floor - self.clock())

    def sign(self, size: int, root: bytes) -> CheckpointEvent | None:
        """A new checkpoint of (size, root) dated by the clock; ``None`` while the
        clock is behind the last timestamp signed: a timestamp is never below one
        signed before, nor ahead of the clock (protocol revision 1.1: docs/protocol.md, "Checkpoints")."""
        ts = int(self.clock())
        if ts < self.floor:
            if not self._behind_logged:
                self._behind_logged = True
                log.warning(
                    "the clock (%d) is behind the last checkpoint timestamp (%d): serving the last"
                    " checkpoint unchanged until the clock passes it",
                    ts,
                    self.floor,
                )
            return None
        self._behind_logged = False
        note = checkpoints.sign_checkpoint(
            checkpoints.Checkpoint(self.origin, size, root), self.origin, self.signer, ts
        )
        return CheckpointEvent(size, root, ts, note)

    def advance(self, timestamp: int) -> None:
        """``timestamp`` was signed and is durable: no later checkpoint is dated before it."""
        self.floor = max(self.floor, timestamp)
