"""The lost-tablet run (:mod:`device_sim.fleet`, steps 1 to 6), one function per phase.

:func:`run_lost_tablet` plays the phases in order on one :class:`_Run`:

1. :func:`_grant` — the devices make their keys; the integrator grants them
   and the tablet;
2. :func:`_boot` — the template boots the fleet, every booted device accepts
   the tablet, the devices are shared among the processes (``processes``,
   :mod:`.shards`), the push connections come up;
3. :func:`_revoke` — devices go offline, every device is armed with the
   tablet's auth, and the integrator revokes the tablet;
4. :func:`_wait_refusals` — until every device refuses (or the deadline);
5. :func:`_post_receipts` — the devices' signed receipts;
6. :func:`_report` — the :class:`~device_sim.fleet.model.FleetResult`, its
   events file and its plot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger import crypto, messages, records
from ledger.crypto import SeedSigner, Signer
from ledger.errors import UsageError
from ledger.progress import Stage, stage

from ..measure import rss_kib
from .devices import Fleet
from .integrator import BodyMaker, Integrator, Pushed, grant_maker, revoke_maker
from .model import VERIFIES_PER_DEVICE, FleetOptions, FleetResult, Member
from .plot import plot_refusals

__all__ = ["run_lost_tablet"]


def _verify_rate(seconds: float = 0.25) -> float:
    """Raw single-thread Ed25519 verifications per second on this machine, now
    (:func:`ledger.crypto.verify_rate`, the benchmarks' own measure)."""
    key = SeedSigner.generate()
    items = []
    for i in range(512):
        msg = b"fleet-lower-bound-%d" % i
        items.append((key.public_key, crypto.RECORD_DOMAIN, msg, crypto.sign(key, crypto.RECORD_DOMAIN, msg)))
    rates: list[float] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds or not rates:
        rates.append(crypto.verify_rate(items, 1))
    return max(rates)


def _phase(
    log: Callable[[str], None] | None, label: str, total: int | None = None, *, bar: bool = True
) -> contextlib.AbstractContextManager[Stage]:
    """A phase's progress on stderr (only when the run logs: the command line, not tests)."""
    if log is None:
        return contextlib.nullcontext(Stage())
    return stage(label, total, prefix="fleet: ", bar=bar)


@dataclass(eq=False)
class _Run:
    """What the phases of one run share: its inputs, what each phase made, and
    the times and memory readings the report prints."""

    integrator: Integrator
    fleet: Fleet
    n: int
    opts: FleetOptions
    log: Callable[[str], None] | None
    t_start: float
    rss0: int
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    members: list[Member] = field(default_factory=list)
    tablet: SeedSigner | None = None
    tablet_seq: int = 0
    tablet_record: bytes = b""
    offline: list[Member] = field(default_factory=list)
    late: list[Member] = field(default_factory=list)
    revoke_seq: int = 0
    revoked: Pushed | None = None
    push_bytes: dict[int, int] = field(default_factory=dict)
    #: setup seconds by step (keys, grants, accept_tablet, push_connect, gc_freeze)
    t: dict[str, float] = field(default_factory=dict)
    rss1: int = 0
    rss2: int = 0
    rate0: float = 0.0
    #: CPU seconds of the fleet's processes from the revoke to the last refusal
    cpu0: float = 0.0
    cpu: float = 0.0

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)


async def _grant(run: _Run) -> None:
    """The devices make their keys and enrollment requests; the integrator
    grants every device (from its own request) and one operator tablet."""
    fleet, n, integrator = run.fleet, run.n, run.integrator
    t0 = time.monotonic()
    run.members = members = fleet.create_devices(n, name_prefix=f"sim-{run.run_id}")
    run.t["keys"] = time.monotonic() - t0
    run.say(f"{n} devices made their keys and enrollment requests in {run.t['keys']:.1f} s")
    run.tablet = tablet = SeedSigner.generate()
    makers: list[tuple[BodyMaker, Signer]] = []
    for raw in fleet.enrollments(members):
        e = messages.parse_enroll(raw)  # verifies the proof of possession
        makers.append((grant_maker(e.subject, records.ROLE_DEVICE, e.name), integrator.root))
    makers.append(
        (grant_maker(tablet.public_key, records.ROLE_OPERATOR, f"tablet-{run.run_id}"), integrator.root)
    )
    t0 = time.monotonic()
    with _phase(run.log, f"granting {n} devices and the tablet", bar=False):
        pushed = await integrator.push(makers)
    run.t["grants"] = time.monotonic() - t0
    for i, m in enumerate(members):
        fleet.set_grant(m, pushed.seqs[i], pushed.records[i])
    run.tablet_seq = pushed.seqs[n]
    run.tablet_record = pushed.records[n]
    run.say(f"granted {n} devices and tablet-{run.run_id} (seq {run.tablet_seq}) in {run.t['grants']:.1f} s")


async def _boot(run: _Run) -> None:
    """The template boots the fleet; every booted device must accept the tablet
    (a real challenge-response); with ``processes`` > 1 the devices are shared
    among forked processes; the push connections come up."""
    fleet, n, tablet = run.fleet, run.n, run.tablet
    assert tablet is not None
    t0 = time.monotonic()
    boot = await fleet.bootstrap()
    t_boot = time.monotonic() - t0
    run.rss1 = rss_kib()
    run.say(f"template synced {boot['size']} records; {n} devices booted in {t_boot:.1f} s")

    t0 = time.monotonic()
    verdicts = await fleet.accept_tablet(run.tablet_record, tablet)
    run.t["accept_tablet"] = time.monotonic() - t0
    booted = sum(1 for m in run.members if not m.late)
    if verdicts.get("accepted", 0) != booted:
        raise UsageError(
            f"not every device accepts the tablet before the revoke: {dict(verdicts)}",
            verdicts=dict(verdicts),
        )
    run.say(f"every booted device accepted the tablet ({run.t['accept_tablet']:.1f} s)")

    if run.opts.processes > 1:
        t0 = time.monotonic()
        await fleet.split(run.opts.processes, run.tablet_record, tablet)
        run.t["split"] = time.monotonic() - t0
        shares = 1 + (len(fleet.shards.children) if fleet.shards is not None else 0)
        run.say(f"the devices shared among {shares} processes in {run.t['split']:.1f} s")
    t0 = time.monotonic()
    await fleet.start_push()
    run.t["push_connect"] = time.monotonic() - t0
    run.say(
        f"{fleet.connections} {run.opts.push} connections ({fleet.model}), {fleet.connections_ready} ready"
        f" in {run.t['push_connect']:.1f} s"
    )
    await asyncio.sleep(0.2)  # the first checkpoint events settle
    run.rate0 = _verify_rate()


async def _revoke(run: _Run, revoker: tuple[int, Signer] | None) -> None:
    """Some devices go offline; every device gets an auth the tablet signed for
    its outstanding challenge; the integrator revokes the tablet, from a
    thread, so that the acknowledgement time is taken when the 200 arrives."""
    fleet, opts, integrator, tablet = run.fleet, run.opts, run.integrator, run.tablet
    assert tablet is not None
    others = [m for m in run.members if m is not fleet.template and not m.late]
    run.offline = fleet.rng.sample(others, round(opts.offline * len(others))) if opts.offline else []
    mine = {m.index for m in fleet.members}  # this process's devices; the others' are told
    await fleet.set_online([m for m in run.offline if m.index in mine], False)
    run.late = [m for m in run.members if m.late]

    st = integrator.state
    assert st is not None
    run.revoke_seq = st.size
    if fleet.shards is not None:
        await fleet.shards.arm(run.revoke_seq, run.offline)
    fleet.arm(run.tablet_record, tablet, run.revoke_seq)
    fleet.mark_bytes()
    maker = revoke_maker(run.tablet_seq, int(records.Reason.LOST), revoker[0] if revoker else 0)
    run.t["setup"] = time.monotonic() - run.t_start
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # the revoking thread gets the GIL back quickly
    # the fleet's long-lived objects (devices, sockets) leave the collector's
    # generations: a full collection over them would stall every device at once
    t0 = time.monotonic()
    gc.collect()
    gc.freeze()
    run.t["gc_freeze"] = time.monotonic() - t0
    run.cpu0 = time.process_time()
    try:
        with _phase(run.log, f"revoking the tablet (seq {run.tablet_seq})", bar=False):
            run.revoked = await integrator.push([(maker, revoker[1] if revoker else integrator.root)])
    finally:
        sys.setswitchinterval(old_switch)
    run.say(
        f"tablet revoked at seq {run.revoke_seq}; acknowledged in {run.revoked.post_seconds * 1000:.0f} ms"
    )


async def _wait_refusals(run: _Run) -> None:
    """The offline and late devices come back when due; wait until every device
    refuses the tablet, at most ``deadline`` s."""
    fleet, opts, revoked = run.fleet, run.opts, run.revoked
    assert revoked is not None
    acked = revoked.acked_at
    mine = {m.index for m in fleet.members}
    offline = [m for m in run.offline if m.index in mine]
    fleet.schedule_late(offline, max(0.0, opts.offline_for - (time.monotonic() - acked)))
    fleet.schedule_late(
        [m for m in run.late if m.index in mine], max(0.0, opts.late_after - (time.monotonic() - acked))
    )
    with _phase(
        run.log, f"waiting until every device refuses the tablet (at most {opts.deadline:g} s)", bar=False
    ):
        waits = [fleet.wait_refused(opts.deadline)]
        if fleet.shards is not None:
            at = {"offline_at": acked + opts.offline_for, "late_at": acked + opts.late_after}
            waits.append(fleet.shards.wait(**at, deadline=opts.deadline))
        done = all(await asyncio.gather(*waits))
    run.t["propagation"] = time.monotonic() - acked
    run.say(
        f"{'every' if done else 'NOT every'} device refused the tablet within"
        f" {run.t['propagation']:.2f} s of the ack"
    )
    run.push_bytes = fleet.push_bytes()
    run.cpu = time.process_time() - run.cpu0 + (fleet.shards.cpu_s if fleet.shards is not None else 0.0)
    run.rss2 = rss_kib() + (fleet.shards.rss_kib if fleet.shards is not None else 0)


async def _post_receipts(run: _Run) -> None:
    """Every device that applied the revoke posts its signed receipt."""
    t0 = time.monotonic()
    with _phase(run.log, f"posting receipts from {run.n} devices"):
        posts = [run.fleet.post_receipts()]
        if run.fleet.shards is not None:
            posts.append(run.fleet.shards.receipts())
        receipts = sum(await asyncio.gather(*posts))
    run.say(f"{receipts} receipts accepted by the server")
    run.t["receipts"] = time.monotonic() - t0


def _report(run: _Run, rate: float, json_events: str | Path | None, plot: str | Path | None) -> FleetResult:
    """The measurement, with the run's model and costs; the events file and the plot."""
    fleet, opts, n, revoked = run.fleet, run.opts, run.n, run.revoked
    assert revoked is not None
    rss0, rss1, rss2 = run.rss0, run.rss1, run.rss2
    processes = 1 + (len(fleet.shards.children) if fleet.shards is not None else 0)
    extra: dict[str, Any] = {
        "bootstrap": "template",
        "push": opts.push,
        "push_model": fleet.model,
        "connections": fleet.connections,
        "processes": processes,
        "poll_interval_s": opts.poll_interval if opts.push == "poll" else None,
        "offline": len(run.offline),
        "late": len(run.late),
        "drift_s": opts.drift,
        "own_grant": opts.own_grant,
        "http_client": opts.http_client,
        "receipts_posted": opts.receipts,
        "revoke_seq": run.revoke_seq,
        "tablet_seq": run.tablet_seq,
        "ledger_size": run.revoke_seq + 1,
        "revoke_ack_ms": round(revoked.post_seconds * 1000, 1),
        "verifies_per_device": VERIFIES_PER_DEVICE,
        "verify_rate_per_s": round(rate),
        "lower_bound_s": round(VERIFIES_PER_DEVICE * n / rate, 3),
        "lower_bound_parallel_s": round(VERIFIES_PER_DEVICE * n / rate / processes, 3),
        "setup_s": round(run.t["setup"], 2),
        "setup_detail_s": {
            "keys": round(run.t["keys"], 2),
            "grants": round(run.t["grants"], 2),
            "template": round(fleet.timings.get("template_s", 0.0), 2),
            "copies_and_own_grants": round(fleet.timings.get("copies_s", 0.0), 2),
            "accept_tablet": round(run.t["accept_tablet"], 2),
            "split": round(run.t.get("split", 0.0), 2),
            "push_connect": round(run.t["push_connect"], 2),
            "gc_freeze": round(run.t["gc_freeze"], 2),
        },
        "template_bytes": fleet.bootstrap_bytes,
        "tile_cache": None
        if fleet.tile_cache is None
        else {
            "hits": fleet.tile_cache.hits + int(fleet.remote_total("tile_hits")),
            "origin_fetches": fleet.tile_cache.misses + int(fleet.remote_total("tile_misses")),
        },
        "propagation_window_s": round(run.t["propagation"], 3),
        "propagation_cpu_s": round(run.cpu, 3),
        "propagation_cpu_per_device_ms": round(run.cpu * 1000 / n, 4),
        "verify_ms": round(1000 / rate, 4),
        "receipts_s": round(run.t["receipts"], 2),
        "rss_mib": round(rss_kib() / 1024, 1),
        "rss_per_device_kib": round((rss1 - rss0) / n, 2) if rss0 and rss1 else None,
        # with processes: what the children's RSS grew by after the fork is added
        "rss_per_device_with_push_kib": round((rss2 - rss0) / n, 2) if rss0 and rss2 else None,
        "refused_updates": fleet.updates_refused,
        "push_errors": fleet.push_errors,
        "evidence": fleet.evidence_count,
    }
    acked = revoked.acked_at
    result = fleet.result(acked, posted_at=revoked.posted_at, push_bytes=run.push_bytes, extra=extra)
    if json_events is not None:
        with open(json_events, "w", encoding="utf-8") as f:
            for ev in fleet.events_json(acked):
                f.write(json.dumps(ev) + "\n")
    if plot is not None:
        plot_refusals(result, plot)
        result.extra["plot"] = str(plot)
    return result


async def run_lost_tablet(
    integrator: Integrator,
    n: int,
    options: FleetOptions | None = None,
    *,
    revoker: tuple[int, Signer] | None = None,
    before_revoke: Callable[[Fleet], Any] | None = None,
    json_events: str | Path | None = None,
    plot: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> FleetResult:
    """The whole story against ``integrator``'s server (see :mod:`device_sim.fleet`).

    ``revoker`` = (seq of a ``revoker`` grant, its key) signs the revoke
    instead of the root. ``before_revoke(fleet)`` is called (and awaited when
    it returns a coroutine) once the push connections are up, just before
    the devices are armed and the tablet revoked (tests restart the server
    there).
    """
    opts = options if options is not None else FleetOptions()
    t_start = time.monotonic()
    rss0 = rss_kib()
    await integrator.ensure_ready()
    fleet = Fleet(integrator.server, integrator.anchor, integrator.origin, opts)
    try:
        run = _Run(integrator, fleet, n, opts, log, t_start, rss0)
        await _grant(run)
        await _boot(run)
        if before_revoke is not None:
            res = before_revoke(fleet)
            if asyncio.iscoroutine(res):
                await res
        await _revoke(run, revoker)
        await _wait_refusals(run)
        await _post_receipts(run)
        rate = max(run.rate0, _verify_rate())  # the best this machine did: a lower bound
        await fleet.stop_push()
        if fleet.shards is not None:
            await fleet.shards.report(run.revoked.acked_at if run.revoked is not None else 0.0)
        return _report(run, rate, json_events, plot)
    finally:
        gc.unfreeze()
        await fleet.close()
