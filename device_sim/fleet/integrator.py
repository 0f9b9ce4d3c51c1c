"""The root key holder's side of the fleet runs: a verified local state and strict pushes.

Step 1 of the lost-tablet story (:mod:`device_sim.fleet`): the
:class:`Integrator` syncs and verifies the whole ledger with only the anchor,
makes the log grant when it is missing, and appends records in batches of at
most 1000 whose ``seq``/``prev`` come from its verified
:class:`~ledger.state.LedgerState`, never from the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ledger import acceptance, records
from ledger.acceptance import AcceptedView
from ledger.crypto import Signer
from ledger.errors import BadMessage, InvalidField, StaleHead, UsageError
from ledger.records import Genesis, Grant, Revoke
from ledger.state import LedgerState

__all__ = ["BATCH", "BodyMaker", "Integrator", "Pushed", "grant_maker", "revoke_maker"]

#: records per POST /v1/records (the server's limit).
BATCH = 1000

#: builds a record body from the head it goes on: (seq, prev, time) -> body.
BodyMaker = Callable[[int, bytes, int], records.Body]


@dataclass(frozen=True, slots=True)
class Pushed:
    """Records a push appended, and when the server acknowledged the last batch
    (``time.monotonic()`` taken as its 200 arrived)."""

    records: list[bytes]
    seqs: list[int]
    acked_at: float
    post_seconds: float

    @property
    def posted_at(self) -> float:
        """When the last batch's POST was sent (``time.monotonic()``)."""
        return self.acked_at - self.post_seconds


class Integrator:
    """The root key holder's side: a verified local state and strict pushes.

    Talks to the server with the CLI's synchronous :class:`ledger.cli.common.Client`
    from worker threads (``asyncio.to_thread``): the POST of a revoke is then
    timed by a thread that is not waiting behind thousands of simulated devices.
    """

    def __init__(self, server: str, root: Signer, *, client: Any = None) -> None:
        from ledger.cli.common import Client

        self.server = server
        self.root = root
        self.client = client if client is not None else Client(server)
        self._owns = client is None
        self.info: dict[str, Any] = {}
        self.state: LedgerState | None = None
        self.view: AcceptedView | None = None

    def close(self) -> None:
        if self._owns:
            self.client.close()

    @property
    def origin(self) -> str:
        return str(self.info["origin"])

    @property
    def anchor(self) -> bytes:
        return self.root.public_key

    @property
    def log_key(self) -> bytes:
        lk = self.info.get("log_public_key")
        try:
            key = bytes.fromhex(lk) if isinstance(lk, str) else b""
        except ValueError:
            key = b""
        if len(key) != 32:
            raise UsageError("the server reports no valid log_public_key in GET /v1/ledger")
        return key

    def _state(self) -> LedgerState:
        if self.state is None:
            raise UsageError("sync the integrator first")
        return self.state

    # -- sync ------------------------------------------------------------------

    async def sync(self) -> None:
        await asyncio.to_thread(self._sync)

    def _sync(self) -> None:
        if self.state is None:
            info = self.client.ledger()
            anchor = info.get("anchor")
            if anchor != self.anchor.hex():
                raise UsageError(
                    f"the server's ledger is anchored on {str(anchor)[:16]}…, not on this key"
                    f" ({self.anchor.hex()[:16]}…): give the root key of that ledger"
                )
            origin = info.get("origin")
            try:
                records.check_origin(origin)
            except InvalidField:
                raise UsageError("GET /v1/ledger reports no valid origin") from None
            self.info = info
            self.state = LedgerState(self.anchor, origin=str(origin))
        note = self.client.checkpoint()
        size = acceptance.checkpoint_size(note)
        new = self._state().copy()
        while new.size < size:
            raws = self.client.records(new.size, min(BATCH, size - new.size))
            if not raws:
                raise BadMessage(f"GET /v1/records gave nothing at {new.size} below the checkpoint's {size}")
            new.apply_all(raws[: size - new.size])
        if new.active_keys(records.ROLE_LOG):
            self.view = acceptance.accept(self.view, note, new, now=int(time.time()))
        self.state = new

    # -- writing ---------------------------------------------------------------

    async def push(self, makers: Sequence[tuple[BodyMaker, Signer]]) -> Pushed:
        """Sign and append ``makers`` in order, in batches of at most 1000.

        Each record is checked on a copy of the verified state before it is
        sent; on ``stale-head`` (another writer) the integrator re-syncs and
        re-signs what is left, up to three times."""
        return await asyncio.to_thread(self._push, list(makers))

    def _push(self, makers: list[tuple[BodyMaker, Signer]]) -> Pushed:
        out: list[bytes] = []
        seqs: list[int] = []
        acked = time.monotonic()
        post_s = 0.0
        i, retries = 0, 0
        while i < len(makers):
            chunk = makers[i : i + BATCH]
            st = self._state().copy()
            first = st.size
            raws = []
            for make, signer in chunk:
                t = max(int(time.time()), st.last_time)
                raw = records.sign(make(st.size, st.root, t), signer)
                st.apply(raw)
                raws.append(raw)
            t0 = time.monotonic()
            try:
                answer = self.client.post_records(raws)
            except StaleHead:
                retries += 1
                if retries > 3:
                    raise
                self._sync()
                continue
            acked = time.monotonic()
            post_s = acked - t0
            if answer.get("size") != st.size or answer.get("root") != st.root.hex():
                raise StaleHead(
                    "the server's head after our records is not the one computed from them",
                    size=answer.get("size"),
                )
            self.state = st
            out.extend(raws)
            seqs.extend(range(first, first + len(raws)))
            i += len(chunk)
        return Pushed(out, seqs, acked, post_s)

    async def ensure_ready(
        self, *, genesis: bool = False, next_root_digest: bytes | None = None
    ) -> list[str]:
        """Sync; make the genesis (only with ``genesis``) and the log grant when
        missing, using ``GET /v1/ledger``'s log key. Returns what it did."""
        await self.sync()
        did: list[str] = []
        st = self._state()
        makers: list[tuple[BodyMaker, Signer]] = []
        if st.size == 0:
            if not genesis:
                raise UsageError(
                    "the ledger is empty: push its genesis first (writ genesis --key FILE --origin"
                    f" {self.origin} --server {self.server})"
                )
            origin, anchor = self.origin, self.anchor
            makers.append((lambda s, p, t: Genesis(s, p, t, origin, anchor, next_root_digest), self.root))
            did.append("genesis")
        log_key = self.log_key
        if log_key not in st.active_keys(records.ROLE_LOG):
            makers.append((grant_maker(log_key, records.ROLE_LOG, "log"), self.root))
            did.append("log-grant")
        if makers:
            await self.push(makers)
            await self.sync()
        if self.view is None:
            raise UsageError("the server's checkpoint could not be verified after the log grant")
        return did


def grant_maker(subject: bytes, role: str, name: str, scope: str = "") -> BodyMaker:
    """A grant of ``role`` to ``subject``, valid from the start, never expiring."""
    return lambda s, p, t: Grant(s, p, t, subject, role, scope, name, 0, 0)


def revoke_maker(target: int | bytes, reason: int, signer_seq: int = 0) -> BodyMaker:
    """A revoke of ``target`` (a grant's seq or a key), signed by the grant at ``signer_seq`` (0: root)."""
    return lambda s, p, t: Revoke(s, p, t, signer_seq, target, reason)
