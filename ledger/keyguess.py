"""The key guess of :meth:`ledger.state.LedgerState.apply_all`: ahead of the
rules, from the records alone, the key each record will be checked under, so
that a run's signatures can be checked in parallel. A guess is a hint only:
``apply`` uses a pre-check for the key it decides on and nothing else. Pure
code, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import crypto, records
from .errors import WritError
from .records import Envelope, Kind

if TYPE_CHECKING:
    from .state import LedgerState

__all__ = ["KeyGuess", "PrecheckItem"]


#: what a signature pre-check takes: (public key, domain, message, signature).
PrecheckItem = tuple[bytes, bytes, bytes, bytes]


class KeyGuess:
    """Guesses, from the records alone and ahead of the rules, the key each
    record of a run will be checked under: the root in force (a genesis sets
    it to the anchor, a rotate to its ``new_root``), or for a revoke with a
    signer the subject of that revoker grant (already applied, or earlier in
    the run). A guess is only ever a hint for :meth:`LedgerState.apply`."""

    __slots__ = ("added", "anchor", "revokers", "root")

    def __init__(self, state: LedgerState) -> None:
        self.anchor = state.anchor
        self.root = state.root_key
        self.revokers = state.revokers
        self.added: dict[int, bytes] = {}  # revoker grants in the run, not applied yet

    def span(self, raws: Sequence[bytes]) -> tuple[list[Envelope | None], list[PrecheckItem | None]]:
        envs: list[Envelope | None] = []
        out: list[PrecheckItem | None] = []
        for raw in raws:
            try:
                env = records.parse(raw)
            except WritError:
                envs.append(None)
                out.append(None)
                continue
            envs.append(env)
            key: bytes | None
            e = env.extra
            if env.kind is Kind.GENESIS:
                key = self.root = self.anchor
            elif env.kind is Kind.ROTATE:
                key = self.root = e[0] if type(e[0]) is bytes and len(e[0]) == 32 else None
            elif env.kind is Kind.REVOKE and env.signer != 0:
                key = self.revokers.get(env.signer) or self.added.get(env.signer)
            else:
                key = self.root
                if env.kind is Kind.GRANT and e[1] == records.ROLE_REVOKER and type(e[0]) is bytes:
                    self.added[env.seq] = e[0]
            out.append(None if key is None else (key, crypto.RECORD_DOMAIN, env.body_bytes, env.signature))
        return envs, out
