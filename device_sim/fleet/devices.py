"""The simulated fleet: N devices in one asyncio process (:mod:`device_sim.fleet`).

:class:`Fleet` creates the devices, boots them from one template
(:mod:`.owngrant`), runs the push connections (:mod:`.relay`), hands each
update to every listening device, arms the tablet's auths and times each
device's refusal, posts the devices' receipts and computes the
:class:`~device_sim.fleet.model.FleetResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import httpx

from ledger import messages, records
from ledger.acceptance import Evidence
from ledger.client import AsyncClient
from ledger.crypto import Signer
from ledger.errors import BadMessage, TransportError, UsageError, VerificationError, WritError

from ..device import Device
from ..measure import percentile
from ..sources import MAX_REPLY, BundleSource, HttpSource, Update, sync
from .cache import TileCache
from .model import DEFAULT_CONNECTIONS, Clock, FleetOptions, FleetResult, Member
from .owngrant import device_grants, verify_own_by_leaf, verify_own_by_proof
from .relay import Relay
from .shards import Shards, connections_for
from .transport import FastTransport

__all__ = ["Fleet"]


class Fleet:
    """N simulated devices in this process (see the module docstring).

    Typical use: :meth:`create_devices`, grant them (:func:`run_lost_tablet`
    does it with an :class:`Integrator`), :meth:`bootstrap`,
    :meth:`accept_tablet`, :meth:`start_push`, then :meth:`arm` the tablet's
    auths and revoke; :meth:`wait_refused`, :meth:`post_receipts`,
    :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        anchor: bytes,
        origin: str,
        options: FleetOptions | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        sse_client: httpx.AsyncClient | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.anchor = anchor
        self.origin = origin
        self.options = options if options is not None else FleetOptions()
        self.clock = clock
        self.rng = random.Random(self.options.seed)
        lim = httpx.Limits(
            max_connections=self.options.http_connections,
            max_keepalive_connections=self.options.http_connections,
        )
        self._owned: list[httpx.AsyncClient] = []
        self.tile_cache: TileCache | None = None
        if client is None:
            transport: httpx.AsyncBaseTransport = (
                FastTransport(max_connections=self.options.http_connections)
                if self.options.http_client == "fast"
                else httpx.AsyncHTTPTransport(limits=lim)
            )
            if self.options.tile_cache:
                transport = self.tile_cache = TileCache(transport)
            client = httpx.AsyncClient(transport=transport, trust_env=False)
            self._owned.append(client)
        self.client = client
        #: the one fetch layer's async face over ``client`` (the fast transport and tile cache under it)
        self.http = AsyncClient(self.url, http=client, timeout=self.options.timeout)
        self._sse_client = sse_client
        self.members: list[Member] = []
        self.relays: list[Relay] = []
        self.template: Member | None = None
        self.bootstrap_bytes = 0
        self.source_errors = 0
        self._revoke_seq: int | None = None
        self._armed = 0
        self._done = asyncio.Event()
        self._receipt_tasks: set[asyncio.Task[bool]] = set()
        self._push_bytes0: dict[int, int] = {}
        self._listening0: dict[int, int] = {}
        self._own_bytes0: dict[int, int] = {}
        self._late_tasks: set[asyncio.Task[None]] = set()
        self._frozen_bytes: dict[int, int] | None = None
        self.timings: dict[str, float] = {}
        #: devices another process of this fleet runs (:meth:`split`), and those processes
        self.remote: list[Member] = []
        self.shards: Shards | None = None

    @property
    def sse_client(self) -> httpx.AsyncClient:
        """The client of the event streams: one connection per stream, no pool limit to wait on."""
        if self._sse_client is None:
            n = len(self.relays) + 16
            transport: httpx.AsyncBaseTransport = (
                FastTransport(max_connections=None)
                if self.options.http_client == "fast"
                else httpx.AsyncHTTPTransport(
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)
                )
            )
            self._sse_client = httpx.AsyncClient(transport=transport, trust_env=False)
            self._owned.append(self._sse_client)
        return self._sse_client

    def now(self, m: Member | None = None) -> int:
        return int(self.clock()) + (m.drift if m is not None else 0)

    async def close(self) -> None:
        await self.stop_push()
        if self.shards is not None:
            await self.shards.close()
        for t in [*self._receipt_tasks, *self._late_tasks]:
            t.cancel()
        for t in [*self._receipt_tasks, *self._late_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in self._owned:
            await c.aclose()
        self._owned.clear()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- devices -----------------------------------------------------------------

    def create_devices(self, n: int, *, name_prefix: str = "sim") -> list[Member]:
        """``n`` new devices, each with its own key and enrollment request.
        Device 0 of the fleet is the template; the shares of late and offline
        devices are drawn among the others."""
        if n < 1:
            raise UsageError("a fleet has at least one device")
        now = self.now()
        opts = self.options
        first = len(self.members)
        new = []
        for i in range(first, first + n):
            dev = Device.create(
                self.anchor,
                self.origin,
                name=f"{name_prefix}-{i:05d}",
                now=now,
                max_staleness=opts.max_staleness,
                keep_roles={records.ROLE_OPERATOR},
            )
            drift = self.rng.randint(-opts.drift, opts.drift) if opts.drift else 0
            new.append(Member(i, dev, drift))
        self.members.extend(new)
        if self.template is None:
            self.template = self.members[0]
        others = [m for m in new if m is not self.template]
        n_late = round(opts.late * len(others))
        for m in self.rng.sample(others, n_late):
            m.late, m.online = True, False
        return new

    def adopt(self, members: Sequence[Member]) -> None:
        """Run these (booted) members: a process of a split fleet (:mod:`.shards`)."""
        self.members = list(members)
        self.template = None

    async def split(self, processes: int, grant_record: bytes, tablet: Signer) -> None:
        """Share the booted devices among ``processes`` processes (:mod:`.shards`):
        this one keeps the first share, a forked child runs each other share.
        Call it after :meth:`accept_tablet` and before :meth:`start_push`."""
        if self.shards is not None or self.relays:
            raise UsageError("a fleet is split once, before its push connections start")
        if processes > 1 and len(self.members) > 1:
            self.shards = Shards.fork(self, min(processes, len(self.members)), grant_record, tablet)

    @property
    def everyone(self) -> list[Member]:
        """Every device of the fleet, this process's and the other processes' (by index)."""
        return sorted([*self.members, *self.remote], key=lambda m: m.index)

    def enrollments(self, members: Iterable[Member] | None = None) -> list[bytes]:
        return [m.device.enroll_request for m in (self.members if members is None else members)]

    def set_grant(self, m: Member, seq: int, record: bytes) -> None:
        """What the integrator hands the device with its grant (the enrollment answer)."""
        m.grant_seq, m.grant_record = seq, record

    # -- bootstrap ---------------------------------------------------------------

    async def bootstrap(self) -> dict[str, Any]:
        """The template syncs the whole ledger from genesis and verifies it; the
        other devices (late starters excepted) start from a copy of its state
        and verify their own grant. Raises what the template refused."""
        tpl = self.template
        if tpl is None:
            raise UsageError("create devices first")
        t0 = time.monotonic()
        src = HttpSource(self.client, self.url, timeout=self.options.timeout, parallel=8)
        now = self.now(tpl)
        try:
            upd = await src.fetch(tpl.device.size)
        except VerificationError as exc:
            tpl.device.add_evidence(Evidence.from_error(exc, observed_at=now, notes=(src.last_note,)))
            raise
        tpl.device.apply(upd, now)
        self.bootstrap_bytes = src.bytes_received
        found = device_grants(upd)  # the same scan each device's own sync makes for its key
        del upd
        t1 = time.monotonic()
        st, accepted = tpl.device.state, tpl.device.view
        rest = [m for m in self.members if m is not tpl and not m.late]
        for k, m in enumerate(rest):
            m.device.state = st.copy()
            m.device.view = accepted
            if k % 256 == 255:
                await asyncio.sleep(0)
        failed: Counter[str] = Counter()
        if self.options.own_grant == "proof":
            sem = asyncio.Semaphore(self.options.http_connections)

            async def one(m: Member) -> None:
                async with sem:
                    try:
                        await verify_own_by_proof(m, found, self.http)
                    except WritError as exc:
                        failed[exc.type] += 1

            await asyncio.gather(*(one(m) for m in rest))
        else:
            for k, m in enumerate(rest):
                try:
                    verify_own_by_leaf(m, found)
                except WritError as exc:
                    failed[exc.type] += 1
                if k % 256 == 255:
                    await asyncio.sleep(0)
        for m in rest:
            m.grant_record = None  # verified; the device keeps only its OwnGrant
        self.timings["template_s"] = t1 - t0
        self.timings["copies_s"] = time.monotonic() - t1
        if failed:
            raise BadMessage(
                f"{sum(failed.values())} devices could not verify their own grant: {dict(failed)}",
                failures=dict(failed),
            )
        return {"size": st.size, "template_bytes": self.bootstrap_bytes, "device_grants": len(found)}

    # -- the tablet ----------------------------------------------------------------

    async def accept_tablet(self, grant_record: bytes, tablet: Signer) -> Counter[str]:
        """Challenge-response with every booted device; the verdicts' reasons
        (``accepted`` when accepted)."""
        out: Counter[str] = Counter()
        for k, m in enumerate(self.members):
            if m.late:
                continue
            dev = m.device
            ch = dev.challenge()
            auth = messages.make_auth(grant_record, tablet, dev.public_key, ch, self.now())
            v = dev.check(auth, self.now(m))
            out["accepted" if v.accepted else str(v.reason)] += 1
            if k % 256 == 255:
                await asyncio.sleep(0)
        return out

    def arm(self, grant_record: bytes, tablet: Signer, revoke_seq: int) -> None:
        """Give every device an auth the tablet signs now for a fresh
        challenge; each device checks it once it has applied record
        ``revoke_seq`` (the revoke about to be pushed)."""
        self._revoke_seq = revoke_seq
        self._done.clear()
        self._armed = 0
        for m in self.members:
            dev = m.device
            ch = dev.challenge()
            m.pending = messages.make_auth(grant_record, tablet, dev.public_key, ch, self.now())
            m.refused_at = m.reason = None
            self._armed += 1
        for m in self.members:
            self._after_apply(m)  # a device that is somehow there already

    def _after_apply(self, m: Member) -> None:
        if m.pending is None or self._revoke_seq is None or m.device.size <= self._revoke_seq:
            return
        auth, m.pending = m.pending, None
        verdict = m.device.check(auth, self.now(m))
        m.refused_at = time.monotonic()
        m.reason = "accepted" if verdict.accepted else str(verdict.reason)
        self._armed -= 1
        if self._armed == 0:
            self._done.set()
        if self.options.receipts == "during":
            task = asyncio.get_running_loop().create_task(self._post_receipt(m))
            self._receipt_tasks.add(task)
            task.add_done_callback(self._receipt_tasks.discard)

    # -- updates -------------------------------------------------------------------

    def deliver(self, members: Iterable[Member], upd: Update) -> int:
        """Each online member applies ``upd`` itself (all or nothing; a refusal
        keeps its evidence). Returns how many applied it."""
        n = 0
        for m in members:
            dev = m.device
            if not m.online or dev.size < upd.start:
                continue  # not listening, or behind this update: the next one (or a catch-up) covers it
            if dev.view is not None and dev.view.note == upd.note:
                continue  # byte for byte the checkpoint it accepted already
            try:
                dev.apply(upd, self.now(m))
            except VerificationError:
                self.source_errors += 1
                continue
            n += 1
            self._after_apply(m)
        return n

    def evidence_from_source(
        self, members: Iterable[Member], exc: VerificationError, src: HttpSource
    ) -> None:
        """Data a relay could not even decode: each online device keeps the evidence."""
        for m in members:
            if m.online and not m.late:
                m.device.add_evidence(
                    Evidence.from_error(
                        exc, observed_at=self.now(m), notes=(src.last_note,), data=src.last_bad
                    )
                )

    async def sync_member(self, m: Member) -> Any:
        """One device syncs by itself through the tiles; returns its SyncResult,
        or the WritError it raised (evidence kept for verification failures)."""
        src = HttpSource(self.client, self.url, timeout=self.options.timeout)
        try:
            res = await sync(m.device, src, self.now(m))
        except WritError as exc:
            return exc
        finally:
            m.own_bytes += src.bytes_received
        self._after_apply(m)
        return res

    async def sync_all(self, members: Iterable[Member] | None = None, *, concurrency: int = 32) -> list[Any]:
        """:meth:`sync_member` for each member (default all), in order."""
        ms = list(self.members if members is None else members)
        sem = asyncio.Semaphore(concurrency)

        async def one(m: Member) -> Any:
            async with sem:
                return await self.sync_member(m)

        return list(await asyncio.gather(*(one(m) for m in ms)))

    def apply_bundle(self, data: bytes, members: Iterable[Member]) -> list[Any]:
        """A sync bundle (docs/protocol.md, "Sync bundles") carried to a site: each device applies it
        with the rules of any other update. Returns results or errors."""
        out: list[Any] = []
        for m in members:
            try:
                upd = BundleSource.parse(data)
                res: Any = m.device.apply(upd, self.now(m))
            except VerificationError as exc:
                if exc.type == "bad-message":
                    m.device.add_evidence(Evidence.from_error(exc, observed_at=self.now(m), data=data))
                out.append(exc)
                continue
            self._after_apply(m)
            out.append(res)
        return out

    async def set_online(self, members: Iterable[Member], online: bool = True) -> None:
        """Take devices off the network, or bring them back: a device coming
        back (or booting late) catches up through the tiles by itself, then
        listens to its push connection again."""
        ms = list(members)
        if not online:
            for m in ms:
                m.online = False
            return
        sem = asyncio.Semaphore(self.options.http_connections)

        async def back(m: Member) -> None:
            async with sem:
                for attempt in range(20):
                    res = await self.sync_member(m)
                    if not isinstance(res, TransportError):
                        break
                    await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
                m.late = False
                m.online = True
                if m.device.own_grant is None and m.grant_seq is not None:
                    self.source_errors += 1

        await asyncio.gather(*(back(m) for m in ms))

    # -- push ------------------------------------------------------------------------

    @property
    def model(self) -> str:
        if not self.relays:
            return "none"
        per_device = all(len(r.members) == 1 for r in self.relays)
        if self.shards is not None:
            per_device = per_device and self.shards.per_device
        return "per-device" if per_device else "relay"

    @property
    def connections(self) -> int:
        """Push connections, this process's and the other processes'."""
        return len(self.relays) + (self.shards.connections if self.shards is not None else 0)

    @property
    def connections_ready(self) -> int:
        """Push connections that delivered an update (the others' as they started)."""
        ready = sum(1 for r in self.relays if r.ready.is_set())
        return ready + (self.shards.ready if self.shards is not None else 0)

    @property
    def push_errors(self) -> int:
        return sum(r.errors for r in self.relays) + int(self.remote_total("push_errors"))

    @property
    def updates_refused(self) -> int:
        """Updates a device refused (:attr:`source_errors`), over every process."""
        return self.source_errors + int(self.remote_total("source_errors"))

    @property
    def evidence_count(self) -> int:
        return sum(len(m.device.evidence) for m in self.members) + int(self.remote_total("evidence"))

    def remote_total(self, key: str) -> float:
        """A figure the other processes reported (:meth:`Shards.total_of`), 0 when none."""
        return self.shards.total_of(key) if self.shards is not None else 0

    async def start_push(
        self, members: Sequence[Member] | None = None, *, wait: float = 60.0, connections: int | None = None
    ) -> None:
        """One push connection per group of devices (``connections``, default
        FleetOptions.connections, else min(N, DEFAULT_CONNECTIONS)); returns once
        each has delivered its first update (or ``wait`` s passed). The other
        processes of a split fleet open theirs (:mod:`.shards`) in proportion."""
        ms = list(self.members if members is None else members)
        if self.shards is not None and members is None and connections is None:
            connections = connections_for(self.shards.total, len(ms), self.options.connections)
            await self.shards.start()
        k = connections or self.options.connections or min(len(ms), DEFAULT_CONNECTIONS)
        k = max(1, min(k, len(ms)))
        size = math.ceil(len(ms) / k)
        groups = [ms[i : i + size] for i in range(0, len(ms), size)]
        base = len(self.relays)
        new = [Relay(self, base + i, g) for i, g in enumerate(groups)]
        self.relays.extend(new)
        loop = asyncio.get_running_loop()
        for r in new:
            r.task = loop.create_task(r.run_sse() if self.options.push == "sse" else r.run_poll())
        waiting = [r for r in new if any(m.online and not m.late for m in r.members)]
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asyncio.gather(*(r.ready.wait() for r in waiting))

    async def stop_push(self) -> None:
        tasks = [r.task for r in self.relays if r.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for r in self.relays:
            r.task = None

    def push_bytes(self) -> dict[int, int]:
        return {r.index: r.bytes_received for r in self.relays}

    def freeze_bytes(self) -> None:
        """The relays' bytes counted from :meth:`mark_bytes` to now (the end of the propagation)."""
        self._frozen_bytes = self.push_bytes()

    # -- the measurement ---------------------------------------------------------------

    def schedule_late(self, members: Sequence[Member], delay: float) -> None:
        """Bring ``members`` online (catch-up or first boot) ``delay`` s from now."""

        async def later() -> None:
            await asyncio.sleep(delay)
            await self.set_online(members)

        if members:
            task = asyncio.get_running_loop().create_task(later())
            self._late_tasks.add(task)
            task.add_done_callback(self._late_tasks.discard)

    async def wait_ready(self, timeout: float) -> bool:
        """Until every push connection with a listening device has delivered
        an update since its last error (a reconnection)."""
        waiting = [r for r in self.relays if r.task is not None and r.online]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(r.ready.wait() for r in waiting))
        except TimeoutError:
            return False
        return True

    @property
    def pending(self) -> int:
        """Armed devices that have not yet checked the tablet after the revoke."""
        return self._armed

    async def wait_refused(self, timeout: float) -> bool:
        """Until every armed device has checked the tablet after the revoke."""
        if self._armed == 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._done.wait()
        except TimeoutError:
            return False
        return True

    async def _post_receipt(self, m: Member) -> bool:
        try:
            body = m.device.receipt(self.now(m))
        except WritError as exc:
            m.receipt_error = exc.type
            return False
        for attempt in range(8):
            try:
                status, answer = await self.http.post(
                    "v1/receipts", body, "application/msgpack", cap=MAX_REPLY
                )
            except TransportError as exc:
                m.receipt_error = exc.type
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            if status == 200 and isinstance(answer, dict) and answer.get("accepted") is True:
                m.receipt_size, m.receipt_error = m.device.size, None
                return True
            t = answer.get("type") if isinstance(answer, dict) else None
            m.receipt_error = t.rsplit(":", 1)[-1] if isinstance(t, str) else f"http-{status}"
            if status not in (429, 503):
                return False
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        return False

    async def post_receipts(self, members: Iterable[Member] | None = None, *, concurrency: int = 32) -> int:
        """Each member that applied the revoke (or every member, with no revoke
        armed) posts its signed receipt; returns how many the server accepted."""
        todo = [
            m
            for m in (self.members if members is None else members)
            if m.device.own_grant is not None
            and (self._revoke_seq is None or m.device.size > self._revoke_seq)
            and m.receipt_size != m.device.size
        ]
        if self._receipt_tasks:
            await asyncio.gather(*list(self._receipt_tasks), return_exceptions=True)
            todo = [m for m in todo if m.receipt_size != m.device.size]
        it = iter(todo)

        async def worker() -> None:
            for m in it:
                await self._post_receipt(m)

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(todo))))))
        return sum(1 for m in self.members if m.receipt_size is not None)

    def result(
        self,
        acked_at: float,
        *,
        posted_at: float | None = None,
        push_bytes: dict[int, int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> FleetResult:
        """The measurement since :meth:`mark_bytes`; ``push_bytes`` a
        :meth:`push_bytes` snapshot taken at the end of the propagation.
        With ``posted_at`` (when the revoke's POST left), the same
        percentiles measured from then are added (they include the time the
        server took to acknowledge, which a busy server may spend pushing
        the very update to the devices)."""
        everyone = self.everyone
        lat: list[float] = []
        before = 0
        reasons: Counter[str] = Counter()
        for m in everyone:
            if m.refused_at is None:
                reasons["not-refused"] += 1
                continue
            reasons[str(m.reason)] += 1
            if m.reason == "accepted":
                continue
            dt = m.refused_at - acked_at
            if dt < 0:
                before += 1
            lat.append(max(0.0, dt))
        n = len(everyone)
        more = dict(extra or {})
        if posted_at is not None:
            since = sorted(m.refused_at - posted_at for m in everyone if m.refused_at is not None)
            for p in (50, 99):
                v = percentile(since, p)
                more[f"refused_since_post_p{p}_s"] = None if math.isnan(v) else round(v, 4)
            more["refused_since_post_max_s"] = round(since[-1], 4) if since else None
        total = self.bytes_since_mark(push_bytes) + self.remote_total("bytes")
        return FleetResult(
            n,
            lat,
            dict(reasons),
            before,
            total / n if n else 0.0,
            sum(1 for m in everyone if m.receipt_size is not None),
            more,
        )

    def bytes_since_mark(self, push_bytes: dict[int, int] | None = None) -> float:
        """This process's bytes of the propagation since :meth:`mark_bytes`: each
        relay's (to ``push_bytes``, else :meth:`freeze_bytes`, else now) once per
        device listening to it then, and what each device fetched by itself."""
        total = 0.0
        if push_bytes is not None:
            now_bytes = push_bytes
        else:
            now_bytes = self._frozen_bytes if self._frozen_bytes is not None else self.push_bytes()
        for r in self.relays:
            delta = now_bytes.get(r.index, 0) - self._push_bytes0.get(r.index, 0)
            total += delta * self._listening0.get(r.index, r.online)
        total += sum(m.own_bytes - self._own_bytes0.get(m.index, 0) for m in self.members)
        return total

    def mark_bytes(self) -> None:
        """Start counting the bytes of the propagation from here (a relay's
        bytes count once for each device listening to it now)."""
        self._push_bytes0 = self.push_bytes()
        self._listening0 = {r.index: r.online for r in self.relays}
        self._own_bytes0 = {m.index: m.own_bytes for m in self.members}

    def events_json(self, acked_at: float) -> list[dict[str, Any]]:
        """One line per device (the other processes' as they reported), by index."""
        mine = [
            {
                "index": m.index,
                "public_key": m.public_key.hex(),
                "grant_seq": m.device.own_grant.seq if m.device.own_grant else None,
                "refused_s": None if m.refused_at is None else round(m.refused_at - acked_at, 6),
                "reason": m.reason,
                "size": m.device.size,
                "receipt_size": m.receipt_size,
                "receipt_error": m.receipt_error,
                "evidence": [e.kind for e in m.device.evidence],
                "drift": m.drift,
            }
            for m in self.members
        ]
        if self.shards is None:
            return mine
        return sorted([*mine, *self.shards.events()], key=lambda e: int(e["index"]))
