"""The log side of witnessing: ``writ serve --witness URL [--witness URL ...]``.

For each witness URL one background task submits the latest checkpoint the
log signed (every append and every periodic re-sign) with
c2sp.org/tlog-witness ``add-checkpoint``: ``old`` is the size the witness
last cosigned (learnt from a ``409 text/x.tlog.size`` answer, 0 at first) and
the consistency proof comes from the server's own tree. At most one request
per witness is in flight and it always carries the newest checkpoint, so a
busy log never queues requests; a witness that is down or slow is retried
with backoff and never delays an append or a read (nothing waits for it).

A cosignature line is kept only when it verifies under a key granted role
``witness`` in the ledger (under the grant's name, the key name of the line):
a line from an unknown or ungranted key is dropped, so a misbehaving witness
can never make a device refuse the served note. Cosignatures are kept per
witness for the tree (size and root) they cover, so they stay on the note
through the log's periodic re-signs of the same tree; when new ones arrive,
the served checkpoint (``GET /checkpoint``, ``/v1/events``) is the log's note
plus every cosignature held for its tree, and the event streams are woken.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ledger import notes, records
from ledger.client import AsyncClient
from ledger.errors import BadNote, TransportError, UsageError, WritError

from .broadcast import CheckpointEvent

if TYPE_CHECKING:
    from .service import LedgerService

log = logging.getLogger("writ.api.witnessing")

#: how the log names itself to witnesses.
USER_AGENT = "writ-log/0.1"
#: seconds one add-checkpoint request may take.
REQUEST_TIMEOUT = 5.0
#: the longest answer read from a witness.
MAX_ANSWER = 16 * 1024
#: backoff after a failure: first and longest wait, in seconds.
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
#: 409 size answers followed for one checkpoint before backing off.
MAX_CONFLICTS = 3
#: seconds between two submissions to one witness (its rate limit allows at least 20 per second).
MIN_INTERVAL = 0.1


def _retry_after(value: str | None) -> float:
    """A 429's ``Retry-After`` in seconds (1 when absent or not a number), at most :data:`BACKOFF_MAX`."""
    try:
        return min(BACKOFF_MAX, max(0.1, float(value or "1")))
    except ValueError:
        return 1.0


@dataclass(slots=True)
class _Cosig:
    body: str
    line: str
    timestamp: int


class WitnessPeer:
    """What the log knows about one witness."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.name: str | None = None
        self.state = "pending"
        self.error: str | None = None
        self.size: int | None = None  # the size the witness last cosigned, as far as the log knows
        self.cosigned_size: int | None = None
        self.cosigned_at: int | None = None  # the witness's own timestamp on its latest cosignature
        self.granted = False
        self.wake = asyncio.Event()
        self.submitted: CheckpointEvent | None = None
        self.retry_after: float | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "name": self.name,
            "state": self.state,
            "granted": self.granted,
            "size": self.size,
            "cosigned_size": self.cosigned_size,
            "cosigned_at": self.cosigned_at,
            "age": None if self.cosigned_at is None else max(0, int(now) - self.cosigned_at),
            "error": self.error,
        }


class Witnessing:
    """Collects witness cosignatures for a :class:`~api.service.LedgerService`."""

    def __init__(
        self,
        service: LedgerService,
        urls: Sequence[str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = REQUEST_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.peers = [WitnessPeer(u) for u in dict.fromkeys(urls)]
        self.clock = clock
        self.timeout = timeout
        self._transport = transport
        self._client: AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cosigs: dict[bytes, _Cosig] = {}  # witness public key -> its latest cosignature
        self._base: CheckpointEvent = service.checkpoint  # the latest note as the log signed it

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        # the one fetch layer's async face: a total deadline and a byte cap per request
        self._client = AsyncClient(transport=self._transport, timeout=self.timeout, user_agent=USER_AGENT)
        self._base = self.service.checkpoint
        for peer in self.peers:
            peer.wake.set()
            self._tasks.append(asyncio.create_task(self._run(peer), name=f"writ-witness-{peer.url}"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [p.to_json(now) for p in self.peers]

    # -- the served note -----------------------------------------------------------------

    def on_signed(self, event: CheckpointEvent) -> CheckpointEvent:
        """The log signed ``event``: submit it, and serve it with the cosignatures held for its tree."""
        self._base = event
        for peer in self.peers:
            peer.wake.set()
        return self._merged(event)

    def _merged(self, base: CheckpointEvent) -> CheckpointEvent:
        body = notes.parse_note(base.note).body
        lines = [c.line for c in self._cosigs.values() if c.body == body]
        if not lines:
            return base
        try:
            note = notes.add_signatures(base.note, lines)
        except BadNote:  # cannot happen for lines that verified; serve the log's note rather than fail
            log.exception("could not add cosignatures to the checkpoint")
            return base
        return CheckpointEvent(base.size, base.root, base.timestamp, note)

    def _witness_keys(self) -> dict[tuple[str, bytes], notes.Verifier]:
        state = self.service.state
        out: dict[tuple[str, bytes], notes.Verifier] = {}
        for g in state.grants.values():
            if g.role != records.ROLE_WITNESS or state.is_revoked(g.seq) or state.key_revoked(g.subject):
                continue
            try:
                v = notes.Verifier.create(g.name, notes.SIG_ED25519_COSIGNATURE, g.subject)
            except BadNote:
                continue
            out[(v.name, v.key_id)] = v
        return out

    def _accept_lines(self, peer: WitnessPeer, base: CheckpointEvent, text: str) -> int:
        """Keep the verified cosignature lines of an answer; returns how many."""
        body = notes.parse_note(base.note).body
        keys = self._witness_keys()
        kept = 0
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for raw in lines[: notes.MAX_SIGNATURES]:
            try:
                sig = notes.parse_signature_line(raw)
            except BadNote:
                continue
            peer.name = sig.name
            v = keys.get((sig.name, sig.key_id))
            if v is None:
                continue
            try:
                ts = v.verify(body.encode("utf-8"), sig.payload)
            except BadNote:
                log.warning("witness %s sent a cosignature that does not verify", peer.url)
                continue
            if ts is None:
                continue
            old = self._cosigs.get(v.public_key)
            if old is not None and old.body == body and old.timestamp >= ts:
                continue
            self._cosigs[v.public_key] = _Cosig(body, sig.line(), ts)
            peer.cosigned_size, peer.cosigned_at = base.size, ts
            kept += 1
        peer.granted = kept > 0 or any(n == peer.name for n, _ in keys)
        return kept

    def _publish(self) -> None:
        """Serve the current note with its cosignatures, if it changed."""
        base = self._base
        merged = self._merged(base)
        if merged.note != self.service.checkpoint.note and self.service.checkpoint.size == base.size:
            self.service.serve_cosigned(merged)

    # -- one witness ------------------------------------------------------------------------

    async def _run(self, peer: WitnessPeer) -> None:
        backoff = BACKOFF_MIN
        while True:
            await peer.wake.wait()
            peer.wake.clear()
            base = self._base
            if peer.submitted is base:
                continue
            try:
                ok = await self._submit(peer, base)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the task: report it and back off
                log.exception("witness %s: submission failed", peer.url)
                peer.state, peer.error, ok = "error", f"{type(exc).__name__}", False
            if ok:
                backoff = BACKOFF_MIN
                await asyncio.sleep(MIN_INTERVAL)  # a busy log submits at most 1/MIN_INTERVAL per second
                continue
            if peer.retry_after is not None:  # the witness said when (429): no exponential backoff
                wait, peer.retry_after = peer.retry_after, None
            else:
                wait, backoff = backoff, min(BACKOFF_MAX, backoff * 2)
            await asyncio.sleep(wait)
            peer.wake.set()

    async def _submit(self, peer: WitnessPeer, base: CheckpointEvent) -> bool:
        for _ in range(MAX_CONFLICTS):
            old = peer.size or 0
            if old > base.size:
                peer.state = "ahead"
                peer.error = f"the witness cosigned size {old}, larger than this ledger's {base.size}"
                return False
            try:
                proof = [] if old in (0, base.size) else self.service.levels.consistency_proof(old, base.size)
            except WritError as exc:
                peer.state, peer.error = "error", exc.message
                return False
            body = (
                f"old {old}\n"
                + "".join(base64.b64encode(h).decode("ascii") + "\n" for h in proof)
                + "\n"
                + base.note
            ).encode("utf-8")
            try:
                status, headers, text = await self._post(peer.url + "/add-checkpoint", body)
            except TransportError as exc:
                peer.state, peer.error = "down", exc.message
                return False
            if status == 200:
                peer.size = base.size
                peer.submitted = base
                kept = self._accept_lines(peer, base, text)
                if kept:
                    peer.state, peer.error = "ok", None
                elif peer.granted:
                    peer.state, peer.error = (
                        "bad-cosignature",
                        "its cosignature does not verify under its grant",
                    )
                else:
                    peer.state = "ungranted"
                    peer.error = (
                        "no cosignature under a key granted role witness in the ledger (grant its key)"
                    )
                if kept:
                    self._publish()
                return True
            if status == 409 and headers.get("content-type", "").split(";")[0].strip() == "text/x.tlog.size":
                size_text = text.strip()
                if not size_text.isdigit() or len(size_text) > 19:
                    peer.state, peer.error = "error", "a 409 answer without a size"
                    return False
                peer.size = int(size_text)
                continue
            if status == 429:
                peer.retry_after = _retry_after(headers.get("retry-after"))
            peer.state = "conflict" if status == 409 else "refused"
            peer.error = f"HTTP {status}: {text[:200]}"
            return False
        peer.state, peer.error = "error", "the witness's size keeps changing"
        return False

    async def _post(self, url: str, body: bytes) -> tuple[int, httpx.Headers, str]:
        """One ``add-checkpoint`` exchange: (status, headers, text); a witness that cannot be
        reached, is too slow or answers too much raises :class:`TransportError` (it is down)."""
        client = self._client
        if client is None:
            raise TransportError("witnessing is not started")
        try:
            status, headers, data = await client.exchange(
                "POST",
                url,
                cap=MAX_ANSWER,
                headers={"Content-Type": "text/plain; charset=utf-8"},
                content=body,
            )
        except UsageError as exc:  # a URL no request can go to: the witness is down for us
            raise TransportError(f"{url}: {exc.message}") from None
        return status, headers, data.decode("utf-8", "replace")
