"""The root key holder's side of the fleet runs: a verified local mirror and strict pushes.

Step 1 of the lost-tablet story (:mod:`device_sim.fleet`): the
:class:`Integrator` syncs and verifies the whole ledger with only the anchor
into a :class:`ledger.mirror.Mirror` (in a temporary directory, removed on
:meth:`Integrator.close`), makes the log grant when it is missing, and
appends records in batches of at most 1000 through the one writer engine
(:class:`ledger.writer.Writer`, strict): each batch is signed on the verified
state, checked on a copy, pushed, re-signed once on ``stale-head``, an
uncertain outcome checked back, and the mirror synced after it, so
``seq``/``prev`` always come from the verified state, never from the server.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import records
from ledger.acceptance import AcceptedView
from ledger.client import Client
from ledger.crypto import Signer
from ledger.errors import InvalidField, UsageError
from ledger.mirror import Mirror
from ledger.records import Genesis, Grant, Revoke
from ledger.state import LedgerState
from ledger.writer import Writer, now_for

__all__ = ["BATCH", "BodyMaker", "Integrator", "Pushed", "grant_maker", "revoke_maker"]

#: records per POST /v1/records (the server's limit).
BATCH = 1000

#: builds a record body from the head it goes on: (seq, prev, time) -> body.
BodyMaker = Callable[[int, bytes, int], records.Body]


@dataclass(frozen=True, slots=True)
class Pushed:
    """Records a push appended, and when the server acknowledged the last batch
    (``time.monotonic()`` taken as its answer arrived)."""

    records: list[bytes]
    seqs: list[int]
    acked_at: float
    post_seconds: float

    @property
    def posted_at(self) -> float:
        """When the last batch's POST was sent (``time.monotonic()``)."""
        return self.acked_at - self.post_seconds


class Integrator:
    """The root key holder's side: a verified local mirror and strict pushes.

    Talks to the server with the one fetch layer's synchronous
    :class:`ledger.client.Client`, through :meth:`ledger.writer.Writer.apush`
    (a worker thread): the POST of a revoke is then timed by a thread that is
    not waiting behind thousands of simulated devices.
    """

    def __init__(self, server: str, root: Signer, *, client: Client | None = None) -> None:
        self.server = server
        self.root = root
        self.client = client if client is not None else Client(server)
        self._owns = client is None
        self.info: dict[str, Any] = {}
        self.mirror: Mirror | None = None
        self.writer: Writer | None = None

    def close(self) -> None:
        """Close the client (when ours) and remove the temporary mirror."""
        mirror, self.mirror, self.writer = self.mirror, None, None
        try:
            if self._owns:
                self.client.close()
        finally:
            if mirror is not None:
                mirror.close()
                shutil.rmtree(mirror.path, ignore_errors=True)

    @property
    def origin(self) -> str:
        return str(self.info["origin"])

    @property
    def anchor(self) -> bytes:
        return self.root.public_key

    @property
    def state(self) -> LedgerState | None:
        """The verified state (None before the first sync)."""
        return None if self.mirror is None else self.mirror.state

    @property
    def view(self) -> AcceptedView | None:
        """The accepted checkpoint (None before the log grant)."""
        return None if self.mirror is None else self.mirror.view

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

    def _writer(self) -> Writer:
        if self.writer is None:
            raise UsageError("sync the integrator first")
        return self.writer

    # -- sync ------------------------------------------------------------------

    async def sync(self) -> None:
        await asyncio.to_thread(self._sync)

    def _sync(self) -> None:
        if self.writer is None:
            self._open()
        self._writer().sync()
        st = self.state
        if st is not None and st.origin not in (None, self.origin):
            raise UsageError(
                f"the ledger's genesis names origin {st.origin!r}, not {self.origin!r} (GET /v1/ledger)"
            )

    def _open(self) -> None:
        """First sync: the server's ledger must be anchored on our root key, with a valid origin."""
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
        self.mirror = Mirror.open(Path(tempfile.mkdtemp(prefix="writ-fleet-")), self.anchor)
        self.writer = Writer(self.mirror, self.client, strict=True)

    # -- writing ---------------------------------------------------------------

    async def push(self, makers: Sequence[tuple[BodyMaker, Signer]]) -> Pushed:
        """Sign and append ``makers`` in order, in batches of at most 1000, each
        through the writer engine (:meth:`ledger.writer.Writer.apush`, strict):
        signed on the verified state, checked on a copy, re-signed once on
        ``stale-head``, an uncertain outcome checked back."""
        writer = self._writer()
        makers = list(makers)
        out: list[bytes] = []
        seqs: list[int] = []
        acked, post_s = 0.0, 0.0
        for i in range(0, len(makers), BATCH):
            chunk = makers[i : i + BATCH]

            def build(
                state: LedgerState, now: int, chunk: list[tuple[BodyMaker, Signer]] = chunk
            ) -> list[bytes]:
                st, raws = state.copy(), []
                for make, signer in chunk:
                    raw = records.sign(make(st.size, st.root, now_for(st, now)), signer)
                    st.apply(raw)
                    raws.append(raw)
                return raws

            p = await writer.apush(build, sync_first=i == 0)
            out += p.records
            seqs += p.seqs
            acked, post_s = p.acked_at, p.acked_at - p.posted_at
        return Pushed(out, seqs, acked, post_s)

    async def ensure_ready(
        self, *, genesis: bool = False, next_root_digest: bytes | None = None
    ) -> list[str]:
        """Sync; make the genesis (only with ``genesis``) and the log grant when
        missing, using ``GET /v1/ledger``'s log key. Returns what it did."""
        await self.sync()
        did: list[str] = []
        st = self.state
        assert st is not None
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
