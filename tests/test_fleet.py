"""The simulated fleet (the device_sim.fleet package) against the real server and a hostile one.

Scenarios, small N: the lost tablet over SSE (relay and one-socket-per-device
models) and by polling; devices offline during the revoke and late starters
catching up; a server restart while the revoke is pushed; a site synced only
by sync bundles; clock drift; the ``fleet`` command as the command contract runs
it; and a hostile log against which every device of a small fleet refuses
and keeps its evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_sim.fleet import (
    DEFAULT_CONNECTIONS,
    FastTransport,
    Fleet,
    FleetOptions,
    FleetResult,
    Integrator,
    Member,
    TileCache,
    percentile,
    run_lost_tablet,
)
from device_sim.fleet.integrator import grant_maker
from device_sim.fleet.shards import _Child, connections_for
from ledger import encoding, messages, records
from ledger.client import Client
from ledger.crypto import SeedSigner, sha256
from ledger.errors import (
    BadMessage,
    BadSignature,
    Fork,
    Rollback,
    TransportError,
    UntrustedCheckpoint,
    UsageError,
    VerificationError,
    WritError,
)
from ledger.signers.file import write_key_file
from tests.helpers.device import T0, FakeLog, World, signer
from tests.helpers.server import RunningServer, running_server, start_server, stop_server

ORIGIN = "fleet.test.example/plant-9"
ROOT = SeedSigner(sha256(b"writ-fleet-tests/root"))
KEYS = {
    "devices",
    "all_refused",
    "refused_p50_s",
    "refused_p99_s",
    "refused_max_s",
    "bytes_per_device",
    "receipts",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real `writ serve` with a genesis and the log grant, shared by the scenarios."""
    with running_server(
        tmp_path_factory.mktemp("fleet"), ROOT.public_key, ORIGIN, checkpoint_interval=2, log_level="warning"
    ) as srv:
        integ = Integrator(srv.url, ROOT)
        try:
            assert asyncio.run(integ.ensure_ready(genesis=True)) == ["genesis", "log-grant"]
        finally:
            integ.close()
        yield srv


async def _lost_tablet(url: str, n: int, opts: FleetOptions, **kw: object) -> FleetResult:
    integ = Integrator(url, ROOT)
    try:
        return await run_lost_tablet(integ, n, opts, **kw)  # type: ignore[arg-type]
    finally:
        integ.close()


def _revocation(url: str, seq: int) -> dict[str, Any]:
    doc = httpx.get(url + "/v1/fleet", timeout=10).json()
    [rev] = [r for r in doc["revocations"] if r["seq"] == seq]
    return dict(rev)


def _assert_all_refused(r: FleetResult, n: int) -> dict[str, Any]:
    j = r.to_json()
    assert j.keys() >= KEYS
    assert j["devices"] == n
    assert j["refusal_reasons"] == {"revoked": n}, j
    assert j["all_refused"] is True
    assert j["receipts"] == n
    assert j["evidence"] == 0 and j["refused_updates"] == 0
    assert j["bootstrap"] == "template"
    assert 0 <= j["refused_p50_s"] <= j["refused_p99_s"] <= j["refused_max_s"]
    assert j["bytes_per_device"] > 0
    return j


# --- the lost tablet ----------------------------------------------------------------------


@pytest.mark.e2e
async def test_lost_tablet_over_sse_every_device_refuses_and_posts_a_receipt(server: RunningServer) -> None:
    r = await _lost_tablet(server.url, 120, FleetOptions(connections=30, seed=1, deadline=30))
    j = _assert_all_refused(r, 120)
    assert j["push"] == "sse" and j["push_model"] == "relay" and j["connections"] == 30
    assert j["refused_p99_s"] < 3.0
    assert j["lower_bound_s"] > 0 and j["verifies_per_device"] == 5
    # the server's own account of the spread, from the receipts
    rev = _revocation(server.url, int(j["revoke_seq"]))
    assert rev["applied"] == 120 and rev["reason"] == "lost"


@pytest.mark.e2e
async def test_one_event_stream_per_device(server: RunningServer) -> None:
    r = await _lost_tablet(server.url, 25, FleetOptions(connections=25, seed=2, deadline=30))
    j = _assert_all_refused(r, 25)
    assert j["push_model"] == "per-device" and j["connections"] == 25
    assert j["refused_p99_s"] < 3.0


@pytest.mark.e2e
async def test_lost_tablet_by_polling(server: RunningServer) -> None:
    opts = FleetOptions(
        push="poll", poll_interval=0.4, connections=10, seed=3, deadline=30, own_grant="proof"
    )
    r = await _lost_tablet(server.url, 40, opts)
    j = _assert_all_refused(r, 40)
    assert j["push"] == "poll" and j["poll_interval_s"] == 0.4 and j["own_grant"] == "proof"
    assert j["refused_p99_s"] < 0.4 + 2.0


@pytest.mark.e2e
async def test_offline_devices_and_late_starters_catch_up(server: RunningServer) -> None:
    opts = FleetOptions(connections=10, seed=4, offline=0.25, offline_for=1.0, late=0.1, late_after=0.5)
    integ = Integrator(server.url, ROOT)
    seen: dict[str, list[Member]] = {}

    def spy(fleet: Fleet) -> None:
        seen["members"] = fleet.members

    try:
        r = await run_lost_tablet(integ, 60, opts, before_revoke=spy)
    finally:
        integ.close()
    j = _assert_all_refused(r, 60)
    assert j["late"] == 6 and j["offline"] == 13  # 10 % of 59, then 25 % of the 53 booted
    # a device that was not listening refused only once it was back (offline) or booted (late)
    lat = sorted(r.latencies)
    assert lat[-13] >= 1.0 and lat[-19] >= 0.5
    # each of them fetched by itself the tiles it lacked (the late ones: the whole ledger)
    assert sum(1 for m in seen["members"] if m.own_bytes > 0) == 19


@pytest.mark.e2e
async def test_server_restart_while_the_revoke_is_pushed(tmp_path: Path) -> None:
    with running_server(
        tmp_path, ROOT.public_key, ORIGIN, checkpoint_interval=2, log_level="warning"
    ) as first:
        integ = Integrator(first.url, ROOT)
        await integ.ensure_ready(genesis=True)
        port = int(first.url.rsplit(":", 1)[1])
        restarted: list[RunningServer] = []

        async def restart(fleet: Fleet) -> None:
            await asyncio.to_thread(stop_server, first)
            await asyncio.sleep(0.3)  # the streams break; the devices back off
            restarted.append(
                await asyncio.to_thread(
                    start_server, first.data_dir, port=port, checkpoint_interval=2, log_level="warning"
                )
            )
            # the revoke goes out at once: streams still reconnecting catch up from Last-Event-ID

        opts = FleetOptions(connections=8, seed=5, backoff=(0.2, 1.0), deadline=30)
        try:
            r = await run_lost_tablet(integ, 40, opts, before_revoke=restart)
        finally:
            integ.close()
            for srv in restarted:
                assert stop_server(srv) == 0
        j = _assert_all_refused(r, 40)
        assert j["push_errors"] >= 8  # every stream broke and reconnected


# --- a site with no network: sync bundles -----------------------------------------------


@pytest.mark.e2e
async def test_a_site_synced_only_by_bundles(server: RunningServer) -> None:
    integ = Integrator(server.url, ROOT)
    await integ.ensure_ready()
    async with Fleet(server.url, ROOT.public_key, ORIGIN, FleetOptions(connections=5, seed=6)) as fleet:
        ms = fleet.create_devices(24)
        tablet = SeedSigner.generate()
        makers = [
            (_grant(e.subject, "device", e.name), ROOT)
            for e in map(messages.parse_enroll, fleet.enrollments())
        ]
        pushed = await integ.push([*makers, (_grant(tablet.public_key, "operator", "tablet-bundle"), ROOT)])
        for i, m in enumerate(ms):
            fleet.set_grant(m, pushed.seqs[i], pushed.records[i])
        tablet_seq, tablet_rec = pushed.seqs[-1], pushed.records[-1]
        await fleet.bootstrap()
        assert await fleet.accept_tablet(tablet_rec, tablet) == {"accepted": 24}
        site, connected = ms[16:], ms[:16]
        await fleet.set_online(site, False)
        await fleet.start_push(connected)
        revoke_seq = integ.state.size if integ.state else -1
        fleet.arm(tablet_rec, tablet, revoke_seq)
        await integ.push([(lambda s, p, t: records.Revoke(s, p, t, 0, tablet_seq, 2), ROOT)])
        async with asyncio.timeout(20):
            while fleet.pending > len(site):
                await asyncio.sleep(0.05)

        # the technician's USB stick: records and checkpoint from the read paths
        async with httpx.AsyncClient(base_url=server.url) as c:
            note = (await c.get("/checkpoint")).text
            size = int(note.split("\n")[1])
            raws: list[bytes] = []
            while len(raws) < size:
                page = await c.get("/v1/records", params={"start": len(raws), "limit": 1000})
                raws += encoding.unpack_records(page.content, max_count=1000, error=VerificationError)
        start = ms[16].device.size
        honest = messages.make_bundle(start, raws[start:size], note)
        # a tampered stick first: the revoke's signature broken
        bad = list(raws[start:size])
        k = revoke_seq - start
        bad[k] = bad[k][:-1] + bytes([bad[k][-1] ^ 1])
        for res in fleet.apply_bundle(messages.make_bundle(start, bad, note), site):
            assert isinstance(res, BadSignature)
        for m in site:
            assert m.device.size == start and m.device.evidence[-1].kind == "bad-signature"
            assert m.pending is not None  # still waiting: nothing applied
        for res in fleet.apply_bundle(honest, site):
            assert not isinstance(res, WritError), res
        assert fleet.pending == 0
        assert {m.reason for m in ms} == {"revoked"}
        assert await fleet.post_receipts() == 24  # the site's receipts carried back
    integ.close()


def _grant(subject: bytes, role: str, name: str) -> Callable[[int, bytes, int], records.Body]:
    return lambda s, p, t: records.Grant(s, p, t, subject, role, "", name, 0, 0)


# --- the integrator's pushes go through the one writer engine ---------------------------------


class _LosingClient(Client):
    """The integrator's client whose POST lands but whose answer is lost on the way back."""

    posts = 0

    def post_records(self, raws: list[bytes]) -> dict[str, Any]:
        self.posts += 1
        super().post_records(raws)
        raise TransportError("the answer was lost")


class _RacingClient(Client):
    """Before the integrator's first POST lands, another writer appends a record."""

    def __init__(self, server: str, other: Integrator) -> None:
        super().__init__(server)
        self.other: Integrator | None = other
        self.posts = 0

    def post_records(self, raws: list[bytes]) -> dict[str, Any]:
        self.posts += 1
        if self.other is not None:
            other, self.other = self.other, None
            asyncio.run(
                other.push([(grant_maker(SeedSigner.generate().public_key, "device", "racer"), ROOT)])
            )
        return super().post_records(raws)


@pytest.mark.e2e
async def test_a_lost_answer_to_the_integrators_push_is_checked_back_not_sent_twice(
    server: RunningServer,
) -> None:
    client = _LosingClient(server.url)
    integ = Integrator(server.url, ROOT, client=client)
    try:
        await integ.ensure_ready()
        size = integ.state.size if integ.state is not None else -1
        key = SeedSigner.generate().public_key
        pushed = await integ.push([(grant_maker(key, "device", "lost-answer"), ROOT)])
        assert client.posts == 1  # checked back, never re-sent
        assert pushed.seqs == [size] and integ.state is not None and integ.state.size == size + 1
        mirror = integ.mirror.path if integ.mirror is not None else None
        assert mirror is not None and mirror.is_dir()
    finally:
        integ.close()
        client.close()
    assert not mirror.exists()  # the integrator's temporary mirror is removed on close


@pytest.mark.e2e
async def test_another_writer_between_sync_and_push_makes_the_integrator_re_sign_once(
    server: RunningServer,
) -> None:
    other = Integrator(server.url, ROOT)
    await other.ensure_ready()
    client = _RacingClient(server.url, other)
    integ = Integrator(server.url, ROOT, client=client)
    try:
        await integ.ensure_ready()
        size = integ.state.size if integ.state is not None else -1
        pushed = await integ.push([(grant_maker(SeedSigner.generate().public_key, "device", "raced"), ROOT)])
        assert client.posts == 2  # stale-head, re-synced, re-signed on the new head
        assert pushed.seqs == [size + 1]  # the racer's record took seq ``size``
    finally:
        integ.close()
        other.close()
        client.close()


# --- the command --------------------------------------------------------------------------


@pytest.mark.e2e
def test_fleet_command_as_conformance_runs_it(server: RunningServer, tmp_path: Path) -> None:
    key = tmp_path / "root.key"
    write_key_file(key, ROOT, b"fleet test passphrase", cost="interactive")
    png, events = tmp_path / "refusals.png", tmp_path / "events.jsonl"
    env = {**os.environ, "FLEET_PASS": "fleet test passphrase"}
    cmd = [sys.executable, "-m", "device_sim", "fleet", "--server", server.url, "--devices", "20"]
    cmd += ["--key", str(key), "--passphrase-env", "FLEET_PASS", "--plot", str(png)]
    cmd += ["--push", "sse", "--sse-connections", "5", "--json-events", str(events), "--seed", "7"]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode().strip().splitlines()
    assert len(out) == 1
    doc = json.loads(out[0])
    assert doc.keys() >= KEYS
    assert doc["devices"] == 20 and doc["all_refused"] is True and doc["receipts"] == 20
    assert isinstance(doc["refused_p50_s"], float) and isinstance(doc["bytes_per_device"], int)
    assert doc["open_files_limit"] != 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert len(lines) == 20 and {x["reason"] for x in lines} == {"revoked"}
    assert b"Traceback" not in proc.stderr
    # piped: each long phase announces itself with one line as it starts
    err = proc.stderr.decode()
    for phase in (
        "granting 20 devices",
        "revoking the tablet",
        "waiting until every device",
        "posting receipts",
    ):
        assert f"fleet: {phase}" in err, err


def _processes_running(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a fleet's forked children keep their parent's)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
    return pids


@pytest.mark.e2e
def test_fleet_command_shares_the_devices_among_processes(server: RunningServer, tmp_path: Path) -> None:
    key = tmp_path / "root.key"
    write_key_file(key, ROOT, b"fleet test passphrase", cost="interactive")
    events = tmp_path / "events-shared.jsonl"
    env = {**os.environ, "FLEET_PASS": "fleet test passphrase"}
    cmd = [sys.executable, "-m", "device_sim", "fleet", "--server", server.url, "--devices", "45"]
    cmd += ["--key", str(key), "--passphrase-env", "FLEET_PASS", "--processes", "3", "--seed", "8"]
    cmd += ["--sse-connections", "9", "--offline", "0.2", "--late", "0.1", "--offline-for", "0.5"]
    cmd += ["--late-after", "0.5", "--json-events", str(events)]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"Traceback" not in proc.stderr
    assert "shared among 3 processes" in proc.stderr.decode()
    doc = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    # every device, whichever process ran it, refused and posted its receipt
    assert doc["devices"] == 45 and doc["all_refused"] is True and doc["receipts"] == 45
    assert doc["refusal_reasons"] == {"revoked": 45} and doc["evidence"] == 0
    assert doc["processes"] == 3 and doc["connections"] == 9 and doc["push_model"] == "relay"
    assert doc["late"] == 4 and doc["offline"] == 8
    assert doc["lower_bound_parallel_s"] <= doc["lower_bound_s"]
    assert doc["bytes_per_device"] > 0
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(45))
    assert {x["reason"] for x in lines} == {"revoked"} and all(x["receipt_size"] for x in lines)
    # the devices offline at the revoke, or booting late, refused only once back
    assert sorted(x["refused_s"] for x in lines)[-12] >= 0.5
    assert _processes_running(str(events)) == []  # the children exited with the run


@pytest.mark.e2e
def test_fleet_command_refuses_a_key_that_is_not_the_anchor(server: RunningServer, tmp_path: Path) -> None:
    key = tmp_path / "other.key"
    write_key_file(key, SeedSigner.generate(), b"other passphrase", cost="interactive")
    cmd = [sys.executable, "-m", "device_sim", "fleet", "--server", server.url, "--devices", "3"]
    cmd += ["--key", str(key), "--passphrase-env", "FLEET_PASS"]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        env={**os.environ, "FLEET_PASS": "other passphrase"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"] == "usage"
    assert b"Traceback" not in proc.stderr


# --- against a test log: drift and a hostile server -----------------------------------------

URL = "http://log.test"
NOW = T0 + 1000
TS = T0 + 900


@dataclass
class Site:
    world: World
    log: FakeLog
    fleet: Fleet
    members: list[Member]
    tablet_seq: int
    clock: list[float]

    @property
    def tablet_record(self) -> bytes:
        return self.world.records[self.tablet_seq]


async def _site(n: int, opts: FleetOptions) -> Site:
    w = World()
    tablet_seq = w.grant(w.tablet.public_key, "operator", "tablet-07")
    log = FakeLog()
    clock = [float(NOW)]
    fleet = Fleet(URL, w.root.public_key, w.origin, opts, client=log.client(), clock=lambda: clock[0])
    ms = fleet.create_devices(n)
    for m in ms:
        seq = w.grant(m.public_key, "device", f"plc-{m.index}")
        fleet.set_grant(m, seq, w.records[seq])
    log.publish(w, TS)
    await fleet.bootstrap()
    return Site(w, log, fleet, ms, tablet_seq, clock)


async def test_clock_drift_within_the_skew_window_changes_nothing() -> None:
    s = await _site(12, FleetOptions(drift=250, seed=8))
    try:
        assert {m.drift for m in s.members} != {0}
        assert await s.fleet.accept_tablet(s.tablet_record, s.world.tablet) == {"accepted": 12}
        s.fleet.arm(s.tablet_record, s.world.tablet, s.world.size)
        s.world.revoke(s.tablet_seq)
        s.log.publish(s.world, TS + 5)
        for res in await s.fleet.sync_all():
            assert not isinstance(res, WritError), res
        assert {m.reason for m in s.members} == {"revoked"}
    finally:
        await s.fleet.close()


async def test_clock_drift_beyond_the_skew_window_is_refused_as_such() -> None:
    s = await _site(6, FleetOptions(drift=5000, seed=9))
    try:
        verdicts = await s.fleet.accept_tablet(s.tablet_record, s.world.tablet)
        far = sum(1 for m in s.members if abs(m.drift) > 300)
        assert far > 0 and verdicts["clock-skew"] == far
    finally:
        await s.fleet.close()


def _flip(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 1])


def forged_record(s: Site) -> None:
    s.log.publish(s.world, TS + 1)
    s.log.records[-1] = _flip(s.log.records[-1])


def rollback(s: Site) -> None:
    s.log.publish(s.world, TS + 5, s.world.size - 2)


def fork(s: Site) -> None:
    other = World(tag="-fork")
    while other.size < s.world.size - 1:
        other.grant(signer(f"fork-{other.size}").public_key, "device", "fork")
    s.log.publish(other, TS + 5, s.world.size - 1)


def checkpoint_by_an_ungranted_key(s: Site) -> None:
    s.log.publish(s.world, TS + 5)
    s.log.note = s.world.checkpoint(TS + 5, key=signer("mallory"))


@dataclass(frozen=True)
class Attack:
    play: Callable[[Site], None]
    error: type[WritError]


ATTACKS = [
    Attack(forged_record, BadSignature),
    Attack(rollback, Rollback),
    Attack(fork, Fork),
    Attack(checkpoint_by_an_ungranted_key, UntrustedCheckpoint),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.play.__name__)
async def test_hostile_log_every_device_refuses_and_keeps_evidence(attack: Attack) -> None:
    s = await _site(8, FleetOptions(seed=10))
    try:
        before = [(m.device.size, m.device.root, m.device.view) for m in s.members]
        assert await s.fleet.accept_tablet(s.tablet_record, s.world.tablet) == {"accepted": 8}
        s.fleet.arm(s.tablet_record, s.world.tablet, s.world.size)
        s.world.revoke(s.tablet_seq)  # the honest history: the tablet is revoked
        attack.play(s)
        results = await s.fleet.sync_all()
        for m, res, b in zip(s.members, results, before, strict=True):
            assert isinstance(res, attack.error), res
            assert (m.device.size, m.device.root, m.device.view) == b  # nothing moved
            assert m.device.evidence and m.device.evidence[-1].kind == attack.error.type
            assert m.pending is not None
        # the honest log again: the revoke arrives and every device refuses the tablet
        s.log.tamper = None
        s.log.publish(s.world, TS + 10)
        for res in await s.fleet.sync_all():
            assert not isinstance(res, WritError), res
        assert {m.reason for m in s.members} == {"revoked"}
    finally:
        await s.fleet.close()


async def test_frozen_checkpoint_hides_the_revoke_until_the_devices_go_stale() -> None:
    s = await _site(8, FleetOptions(seed=11, max_staleness=600))
    try:
        s.world.revoke(s.tablet_seq)  # appended, but the log keeps serving the old checkpoint
        s.log.publish(s.world, TS, s.world.size - 1)
        assert await s.fleet.accept_tablet(s.tablet_record, s.world.tablet) == {"accepted": 8}
        s.clock[0] = TS + 601  # the frozen checkpoint is now older than max_staleness
        for res in await s.fleet.sync_all():
            assert not isinstance(res, WritError)
        assert await s.fleet.accept_tablet(s.tablet_record, s.world.tablet) == {"stale": 8}
        assert all(m.device.is_stale(s.fleet.now(m)) for m in s.members)
    finally:
        await s.fleet.close()


@pytest.mark.parametrize("records_event", [True, False], ids=["records-event", "tiles"])
async def test_a_forged_record_pushed_over_sse_is_refused_by_every_device(records_event: bool) -> None:
    """With or without a records event: without one the relay fetches tiles,
    verified by a member's dry run before more are fetched, so a forged record
    stops the relay's download too."""
    s = await _site(9, FleetOptions(seed=12, connections=3, backoff=(0.01, 0.05)))
    s.log.events_records = records_event
    s.fleet._sse_client = s.log.client()
    try:
        await s.fleet.start_push(wait=5)
        assert await s.fleet.wait_ready(5)
        have = s.world.size
        s.fleet.arm(s.tablet_record, s.world.tablet, have)
        s.world.revoke(s.tablet_seq)
        forged_record(s)
        async with asyncio.timeout(5):
            while not all(m.device.evidence for m in s.members):
                await asyncio.sleep(0.01)
        assert all(m.device.size == have for m in s.members)
        assert {m.device.evidence[-1].kind for m in s.members} == {"bad-signature"}
        if not records_event:  # refused by the relay's dry run: never handed to the devices
            assert s.fleet.source_errors == 0 and sum(r.errors for r in s.fleet.relays) >= 1
        s.log.publish(s.world, TS + 10)
        assert await s.fleet.wait_refused(5)
        assert {m.reason for m in s.members} == {"revoked"}
    finally:
        await s.fleet.close()
        s.log.closing = True
        s.log.notify()
        await s.fleet.sse_client.aclose()


# --- small pieces -------------------------------------------------------------------------


async def test_a_fleet_process_that_fails_or_goes_away_is_an_error_not_a_hang() -> None:
    mine, theirs = socket.socketpair()
    child = _Child(2**22 + 12345, mine, [])  # no such child process: nothing to reap
    theirs.sendall(b'{"error": "bad-message", "message": "undecodable event"}\n')
    with pytest.raises(BadMessage, match="undecodable event"):
        await child.call("start")
    theirs.close()
    with pytest.raises(TransportError, match="went away"):
        await asyncio.wait_for(child.call("wait"), 5)
    await child.close()
    assert child.exited


@pytest.mark.parametrize(
    ("n", "processes", "connections"), [(1000, 2, None), (1001, 2, None), (45, 3, 9), (30, 2, 30)]
)
def test_processes_open_as_many_push_connections_as_one_would(
    n: int, processes: int, connections: int | None
) -> None:
    size = -(-n // processes)
    shares = [min(size, n - i) for i in range(0, n, size)]
    total = sum(connections_for(n, share, connections) for share in shares)
    want = connections or min(n, DEFAULT_CONNECTIONS)
    assert abs(total - want) <= 1


def test_percentile_is_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50.0 and percentile(xs, 99) == 99.0 and percentile(xs, 100) == 100.0
    assert percentile([3.0], 99) == 3.0


@pytest.mark.parametrize(
    "kw",
    [
        {"push": "carrier-pigeon"},
        {"offline": 0.8, "late": 0.5},
        {"connections": 0},
        {"own_grant": "trust"},
        {"processes": 0},
        {"processes": 65},
    ],
)
def test_bad_options_are_usage_errors(kw: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        FleetOptions(**kw)  # type: ignore[arg-type]


# --- the simulator's HTTP plumbing --------------------------------------------------------


async def test_tile_cache_fetches_each_tile_once_and_never_caches_the_checkpoint() -> None:
    origin: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        origin.append(request.url.path)
        await asyncio.sleep(0.01)
        if request.url.path == "/tile/entries/x/001":
            return httpx.Response(404, content=b"gone")
        return httpx.Response(200, content=request.url.path.encode())

    cache = TileCache(httpx.MockTransport(handler))
    async with httpx.AsyncClient(transport=cache, base_url="http://edge.test") as c:
        tiles = await asyncio.gather(*(c.get("/tile/entries/000.p/7") for _ in range(20)))
        assert {r.content for r in tiles} == {b"/tile/entries/000.p/7"}
        assert (await c.get("/tile/entries/000.p/7")).status_code == 200
        cps = await asyncio.gather(*(c.get("/checkpoint") for _ in range(5)))
        assert all(r.status_code == 200 for r in cps)
        for _ in range(2):
            assert (await c.get("/tile/entries/x/001")).status_code == 404
    assert origin.count("/tile/entries/000.p/7") == 1 and cache.hits == 20
    assert origin.count("/checkpoint") == 5  # /checkpoint is short-lived: always the origin
    assert origin.count("/tile/entries/x/001") == 2  # errors are not kept


@contextlib.asynccontextmanager
async def _tiny_server(handle: Callable[[str, bytes, asyncio.StreamWriter], Any]) -> AsyncIterator[str]:
    """A bare HTTP/1.1 server whose answers ``handle`` writes by hand; every
    connection is closed on the way out."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":")[1])
                body = await reader.readexactly(length)
                if await handle(path, body, writer) == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()
        for w in writers:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await srv.wait_closed()


async def test_fast_transport_speaks_enough_http() -> None:
    never = asyncio.Event()

    async def handle(path: str, body: bytes, w: asyncio.StreamWriter) -> str | None:
        if path == "/length":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        elif path == "/then-close":  # keep-alive announced, then the server drops the connection
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()
            return "close"
        elif path == "/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"data: a\n", b"\n", b"data: b\n\n"):
                w.write(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
            w.write(b"0\r\n\r\n")
        elif path == "/echo":
            w.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif path == "/until-close":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            await w.drain()
            return "close"
        elif path == "/silent":
            await never.wait()
        await w.drain()
        return None

    async with (
        _tiny_server(handle) as url,
        httpx.AsyncClient(transport=FastTransport(max_connections=2), base_url=url) as c,
    ):
        for _ in range(3):
            assert (await c.get("/length")).text == "hello"
        assert (await c.get("/then-close")).text == "ok"
        assert (await c.get("/length")).text == "hello"  # a stale kept-alive connection is replaced
        async with c.stream("GET", "/chunked") as r:
            parts = [p async for p in r.aiter_bytes()]
        assert b"".join(parts) == b"data: a\n\ndata: b\n\n" and len(parts) == 3  # streamed as it came
        r = await c.post("/echo", content=b"\x00\x01 receipt")
        assert r.status_code == 201 and r.content == b"\x00\x01 receipt"
        assert (await c.get("/until-close")).text == "all of it"
        with pytest.raises(httpx.ReadTimeout):
            await c.get("/silent", timeout=0.2)
        assert (await c.get("/length")).text == "hello"  # the pool is not leaking its two slots
        with pytest.raises(httpx.ConnectError):
            await c.get("http://127.0.0.1:1/")
        never.set()


class PoisonedEvents(FakeLog):
    """``poison`` connections in a row get one deeply nested ``records`` event, then end."""

    poison = 0

    async def _events(self, headers: httpx.Headers) -> AsyncIterator[bytes]:
        if self.poison > 0:
            self.poison -= 1
            yield b"event: records\ndata: " + b"[" * 100_000 + b"\n\n"
            return
        async for chunk in super()._events(headers):
            yield chunk


async def test_a_malformed_event_does_not_deafen_the_devices_behind_a_relay() -> None:
    """Once a RecursionError escaped the relay's event client: its task died and
    every device behind it stopped hearing of revokes. Now the relay reports
    the event, reconnects, and the revoke still reaches every device."""
    s = await _site(6, FleetOptions(seed=3, connections=2, backoff=(0.01, 0.05)))
    log = PoisonedEvents(records=s.log.records, note=s.log.note)
    s.fleet._sse_client = log.client()
    try:
        await s.fleet.start_push(wait=5)
        assert await s.fleet.wait_ready(5)
        s.fleet.arm(s.tablet_record, s.world.tablet, s.world.size)
        log.poison = 2
        log.closing = True  # the open streams end; the next connections are poisoned
        log.notify()
        await asyncio.sleep(0.1)
        log.closing = False
        s.world.revoke(s.tablet_seq)
        log.publish(s.world, TS + 10)
        assert await s.fleet.wait_refused(10)
        assert {m.reason for m in s.members} == {"revoked"}
        assert sum(r.errors for r in s.fleet.relays) >= 2 and log.poison == 0
    finally:
        await s.fleet.close()
        log.closing = True
        log.notify()
        await s.fleet.sse_client.aclose()
