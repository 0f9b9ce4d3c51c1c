"""The device agent (``device run``) and ``device authorized-keys``.

In process against the hostile test log: the agent applies each push, posts
receipts, falls back to polling when the event stream is missing, and
refuses bad data without touching its state. As real processes against a
real ``writ serve``: it survives a server restart, exits 0 within 5 s of
SIGTERM with its state whole, and refuses a second agent on one directory.
``authorized-keys`` prints exactly the keys the device would accept now
(the same verdict as ``device check``), fails closed on a stale view and
never writes the state.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.sshd import agent_applied
from device_sim.agent import Agent
from device_sim.device import Device
from ledger import records, sshkey
from ledger.crypto import SeedSigner
from tests.helpers.device import T0, FakeLog, Reply, World
from tests.helpers.server import Mirror, running_server, start_server, stop_server

NOW = T0 + 1000
TS = T0 + 900
ORIGIN = "ledger.example/agent"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _agent(dev: Device, log: FakeLog, **kw: Any) -> tuple[Agent, io.StringIO]:
    out = io.StringIO()
    opts: dict[str, Any] = {"backoff": (0.01, 0.05), "poll_interval": 0.05, **kw}
    agent = Agent(dev, "http://log.test", client=log.client(), log=out, clock=Clock(NOW), **opts)
    return agent, out


def _events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def _device(tmp_path: Path, w: World) -> tuple[Device, int]:
    dev = Device.create(w.root.public_key, w.origin, directory=tmp_path / "plc", now=T0)
    seq = w.grant(dev.public_key, "device", "plc-17", scope="plant-7/line-3")
    return dev, seq


async def test_agent_applies_each_push_logs_it_and_posts_receipts(tmp_path: Path) -> None:
    w = World()
    dev, dseq = _device(tmp_path, w)
    log = FakeLog()
    log.device_keys[dseq] = dev.public_key
    log.publish(w, TS)
    agent, out = _agent(dev, log)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: dev.size == w.size and log.receipts)
        tablet = w.grant(w.tablet.public_key, "operator", "tablet-07")
        log.publish(w, TS + 1)
        await _until(lambda: dev.size == w.size)
        w.revoke(tablet)
        log.publish(w, TS + 2)
        await _until(lambda: dev.state.is_revoked(tablet) and log.receipts[-1].size == w.size)
        receipts, lines = len(log.receipts), len(_events(out))
        log.publish(w, TS + 3)  # the server re-signs its checkpoint: fresher, nothing new
        await _until(lambda: dev.checkpoint_time == TS + 3)
        await asyncio.sleep(0.1)
        assert (len(log.receipts), len(_events(out))) == (receipts, lines)  # no receipt storm, no noise
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    applied = [e for e in _events(out) if e["event"] == "applied"]
    assert [e["size"] for e in applied][-2:] == [w.size - 1, w.size]
    assert {e["via"] for e in applied} <= {"sse", "poll"} and applied[-1]["via"] == "sse"
    assert Device.load(tmp_path / "plc").state.is_revoked(tablet)  # on disk, not only in memory


class NoEvents(FakeLog):
    """A log behind a proxy that does not pass event streams."""

    async def reply(self, method: str, path: str, headers: httpx.Headers, content: bytes) -> Reply:
        if path.strip("/") == "v1/events":
            self.requests.append(path)
            return Reply(404, b"not found")
        return await super().reply(method, path, headers, content)


async def test_agent_falls_back_to_polling_when_the_event_stream_is_missing(tmp_path: Path) -> None:
    w = World()
    dev, _ = _device(tmp_path, w)
    log = NoEvents()
    log.publish(w, TS)
    agent, out = _agent(dev, log)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: any(e["event"] == "polling" for e in _events(out)))
        seq = w.grant(w.tablet.public_key, "operator", "tablet-07")
        log.publish(w, TS + 1)
        await _until(lambda: dev.size == seq + 1)
        asked = log.requests.count("/v1/events")
        await asyncio.sleep(0.3)
        assert log.requests.count("/v1/events") == asked  # polling now, not hammering the stream
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_forked_checkpoint_is_refused_and_the_state_kept(tmp_path: Path) -> None:
    w = World()
    dev, _ = _device(tmp_path, w)
    log = FakeLog()
    log.publish(w, TS)
    agent, out = _agent(dev, log)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: dev.size == w.size)
        before = (tmp_path / "plc" / "state.bin").read_bytes()
        log.note = w.checkpoint(TS + 1, root=b"\x66" * 32)  # same size, another root
        log.notify()
        await _until(lambda: any(e["event"] == "refused" for e in _events(out)))
        assert (tmp_path / "plc" / "state.bin").read_bytes() == before
        assert any(e.kind == "fork" for e in Device.load(tmp_path / "plc").evidence)
        seq = w.grant(w.tablet.public_key, "operator", "tablet-07")
        log.publish(w, TS + 2)  # the honest log again: followed as before
        await _until(lambda: dev.size == seq + 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    refused = next(e for e in _events(out) if e["event"] == "refused")
    assert refused["error"] == "fork"


async def test_a_full_disk_mid_apply_changes_nothing_and_the_agent_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import device_sim.device as device_mod

    w = World()
    dev, _ = _device(tmp_path, w)
    log = FakeLog()
    log.publish(w, TS)
    # the retry comes a quarter of a second later at the soonest: the failed attempt's state can be read
    agent, out = _agent(dev, log, backoff=(0.5, 1.0))
    real = device_mod.atomic_write
    failures = [1]

    def full_disk(path: Path, data: bytes, mode: int = 0o600) -> None:
        if path.name == "state.bin" and failures:
            failures.pop()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, mode)

    before = (tmp_path / "plc" / "state.bin").read_bytes()
    monkeypatch.setattr(device_mod, "atomic_write", full_disk)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: any(e["event"] == "io-error" for e in _events(out)))
        assert (tmp_path / "plc" / "state.bin").read_bytes() == before  # the old state, whole
        await _until(lambda: dev.size == w.size)  # the next attempt goes through
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert Device.load(tmp_path / "plc").size == w.size


# --- real processes ------------------------------------------------------------------


def _run_agent(state: Path, url: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "device_sim",
                "device",
                "run",
                "--state",
                str(state),
                "--server",
                url,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )


def _post(url: str, raws: list[bytes]) -> None:
    from ledger import encoding

    r = httpx.post(
        url + "/v1/records",
        content=encoding.pack_records(raws),
        headers={"Content-Type": "application/msgpack"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


@pytest.mark.e2e
def test_device_run_survives_a_server_restart_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    root = SeedSigner(b"\x05" * 32)
    with running_server(tmp_path, root.public_key, ORIGIN) as srv:
        m = Mirror(root, ORIGIN)
        m.genesis()
        m.grant(srv.log_public_key, records.ROLE_LOG, "log")
        _post(srv.url, m.records)
        state = tmp_path / "plc"
        subprocess.run(
            [sys.executable, "-m", "device_sim", "device", "init", "--state", str(state),
             "--anchor", root.public_key.hex(), "--origin", ORIGIN],
            check=True, capture_output=True,
        )  # fmt: skip
        log = tmp_path / "agent.log"
        agent = _run_agent(state, srv.url, log, "--max-backoff", "0.5")
        try:
            agent_applied(log, 2)
            second = _run_agent(state, srv.url, tmp_path / "second.log")
            out, _ = second.communicate(timeout=30)
            assert second.returncode == 2 and json.loads(out)["error"] == "usage"  # one agent per device

            stop_server(srv)  # the server goes away (an upgrade, a reboot)
            time.sleep(0.5)
            again = start_server(srv.data_dir, port=int(srv.url.rsplit(":", 1)[1]))
            try:
                m.grant(b"\x42" * 32, records.ROLE_OPERATOR, "tablet-07")
                _post(again.url, m.records[-1:])
                agent_applied(log, 3)
            finally:
                stop_server(again)
        finally:
            t = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            out, _ = agent.communicate(timeout=10)
            assert time.monotonic() - t < 5.0
        assert agent.returncode == 0
        assert json.loads(out) == {**json.loads(out), "stopped": True, "size": 3}
        events = [json.loads(x)["event"] for x in log.read_text().splitlines()]
        assert "unreachable" in events or "disconnected" in events
        assert events[-1] == "stopped"
        assert Device.load(state).size == 3  # the state is whole


# --- authorized-keys -----------------------------------------------------------------


def _keys(state: Path, *extra: object) -> tuple[int, list[str], str]:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_sim",
            "device",
            "authorized-keys",
            "--state",
            str(state),
            *map(str, extra),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in p.stderr
    return p.returncode, p.stdout.splitlines(), p.stderr


def _synced_device(tmp_path: Path, w: World, *init: str) -> Path:
    d = tmp_path / "plc"
    subprocess.run(
        [sys.executable, "-m", "device_sim", "device", "init", "--state", str(d),
         "--anchor", w.root.public_key.hex(), "--origin", w.origin, *init],
        check=True, capture_output=True,
    )  # fmt: skip
    dev_key = Device.load(d).public_key
    w.grant(dev_key, "device", "plc-17", scope="plant-7/line-3")
    return d


def _sync(d: Path, w: World) -> None:
    bundle = d.parent / "site.bundle"
    bundle.write_bytes(w.bundle(0, TS))
    subprocess.run(
        [sys.executable, "-m", "device_sim", "device", "sync", "--state", str(d), "--bundle", str(bundle),
         "--now", str(NOW)],
        check=True, capture_output=True,
    )  # fmt: skip


def _key(i: int) -> bytes:
    return SeedSigner(bytes([i]) * 32).public_key


def test_authorized_keys_prints_exactly_the_credentials_the_device_accepts(tmp_path: Path) -> None:
    w = World()
    d = _synced_device(tmp_path, w)
    ok = w.grant(_key(1), "operator", "tablet-07", scope="plant-7")
    admin = w.grant(_key(2), "admin", "admin-1")
    revoked = w.grant(_key(3), "operator", "tablet-lost")
    w.revoke(revoked)
    by_key = w.grant(_key(4), "operator", "tablet-stolen")
    w.revoke(_key(4))
    w.grant(_key(5), "operator", "tablet-expired", not_after=NOW - 1)
    w.grant(_key(6), "operator", "tablet-later", not_before=NOW + 3600)
    w.grant(_key(7), "operator", "tablet-other-site", scope="plant-9")
    expiring = w.grant(_key(8), "operator", "tablet-expiring", not_after=NOW + 60)
    _sync(d, w)
    before = (d / "state.bin").read_bytes(), os.stat(d / "state.bin").st_mtime_ns, sorted(os.listdir(d))

    code, lines, _ = _keys(d, "--now", NOW)
    assert code == 0
    assert lines == [
        sshkey.format_public_key(_key(1), f"writ:{ok}:tablet-07"),
        sshkey.format_public_key(_key(8), f"writ:{expiring}:tablet-expiring"),
    ]
    assert lines[0].split(" ")[0] == "ssh-ed25519"
    assert _keys(d, "--now", NOW + 60)[1] == lines[:1]  # expired at not_after, no record needed
    assert _keys(d, "--now", NOW, "--role", "admin")[1] == [
        sshkey.format_public_key(_key(2), f"writ:{admin}:admin-1")
    ]
    assert by_key not in [int(x.split(":")[1]) for x in lines]
    # sshd runs it on every login: it never writes the device's state
    after = (d / "state.bin").read_bytes(), os.stat(d / "state.bin").st_mtime_ns, sorted(os.listdir(d))
    assert after == before


def test_authorized_keys_fails_closed_on_a_stale_view(tmp_path: Path) -> None:
    w = World()
    d = _synced_device(tmp_path, w, "--max-staleness", "600")
    w.grant(_key(1), "operator", "tablet-07")
    _sync(d, w)
    assert len(_keys(d, "--now", NOW)[1]) == 1
    code, lines, err = _keys(d, "--now", TS + 601)
    assert (code, lines) == (0, []) and "stale" in err


def test_authorized_keys_under_the_accept_policy_keeps_answering_when_stale(tmp_path: Path) -> None:
    w = World()
    d = _synced_device(tmp_path, w, "--max-staleness", "600", "--stale-policy", "accept")
    w.grant(_key(1), "operator", "tablet-07")
    _sync(d, w)
    assert len(_keys(d, "--now", TS + 601)[1]) == 1


def test_authorized_keys_of_a_device_never_synced_prints_nothing(tmp_path: Path) -> None:
    w = World()
    d = _synced_device(tmp_path, w)
    code, lines, err = _keys(d)
    assert (code, lines) == (0, []) and "never synced" in err


def test_authorized_keys_of_no_device_is_an_error_not_a_key(tmp_path: Path) -> None:
    code, lines, _ = _keys(tmp_path / "nothing")
    assert code == 2 and len(lines) == 1 and json.loads(lines[0])["error"] == "usage"


# --- deploy/ --------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _unit(name: str, key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in (DEPLOY / name).read_text().splitlines()
        if line.startswith(key + "=")
    ]


def test_the_agent_unit_parses_runs_device_run_and_is_confined(tmp_path: Path) -> None:
    from device_sim.cli import build_parser

    (exec_start,) = _unit("writ-device-agent.service", "ExecStart")
    argv = exec_start.split()
    assert argv[:3] == ["/opt/writ/.venv/bin/python", "-m", "device_sim"]
    args = build_parser(with_fleet=False).parse_args(
        [a.replace("${WRIT_SERVER}", "https://ledger.example") for a in argv[3:]]
    )
    assert (args.device_command, args.state, args.push) == ("run", "/var/lib/writ-device", "sse")
    assert _unit("writ-device-agent.service", "User") == ["writ-device"]
    assert _unit("writ-device-agent.service", "ProtectSystem") == ["strict"]
    assert _unit("writ-device-agent.service", "ReadWritePaths") == ["/var/lib/writ-device"]
    assert _unit("writ-device-agent.service", "IPAddressDeny") == ["any"]
    wrapper = (DEPLOY / "writ-authorized-keys").read_text()
    assert "device authorized-keys --state /var/lib/writ-device" in wrapper
    assert os.access(DEPLOY / "writ-authorized-keys", os.X_OK)
    assert subprocess.run(["sh", "-n", str(DEPLOY / "writ-authorized-keys")], check=False).returncode == 0
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit was not parsed")
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(DEPLOY / "writ-device-agent.service")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    # neither /opt/writ nor the writ-device user exist on the test machine
    problems = [
        ln
        for ln in out.stderr.decode().splitlines()
        if ln.strip()
        and "is not executable" not in ln
        and "writ-device" not in ln
        and "No such file" not in ln
    ]
    assert problems == [], problems


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["operator", "admin"]),
            st.sampled_from(["", "plant-7", "plant-7/line-3", "plant-9"]),
            st.sampled_from([(0, 0), (0, NOW - 1), (0, NOW + 60), (NOW + 60, 0)]),
            st.sampled_from([None, "id", "key"]),
        ),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_authorized_keys_lists_exactly_what_device_check_accepts(
    grants: list[tuple[str, str, tuple[int, int], str | None]], stale: bool
) -> None:
    from ledger import credential, messages
    from ledger.crypto import sha256

    w = World()
    dev = Device.create(w.root.public_key, w.origin, now=T0, signer=SeedSigner(sha256(b"plc")))
    w.grant(dev.public_key, "device", "plc-17", scope="plant-7/line-3")
    keys: dict[int, SeedSigner] = {}
    for i, (role, scope, (nb, na), revoke) in enumerate(grants):
        key = SeedSigner(sha256(b"holder" + bytes([i])))
        seq = w.grant(key.public_key, role, f"h{i}", scope=scope, not_before=nb, not_after=na)
        keys[seq] = key
        if revoke == "id":
            w.revoke(seq)
        elif revoke == "key":
            w.revoke(key.public_key)
    dev.apply_update(w.records, 0, w.checkpoint(TS), NOW)
    now = TS + dev.config.max_staleness + 1 if stale else NOW
    listed = {
        g.seq
        for g in credential.accepted_grants(
            dev.state, now=now, roles=["operator"], device_scope=dev.scope, freshness=dev.freshness()
        )
    }
    accepted = set()
    for seq, key in keys.items():
        auth = messages.make_auth(w.records[seq], key, dev.public_key, dev.challenge(), now)
        if dev.check(auth, now).accepted:
            accepted.add(seq)
    assert listed == accepted
