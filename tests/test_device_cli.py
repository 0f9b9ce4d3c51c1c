"""`python -m device_sim device ...` exactly as the command contract says,
run as subprocesses against the test log served by a real uvicorn server."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger import messages, records
from tests.helpers.device import T0, FakeLog, World, free_port, serve_in_thread, signer

NOW = T0 + 1000
TS = T0 + 900


class Server:
    def __init__(self) -> None:
        self.log = FakeLog()

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        await self.log.asgi(scope, receive, send)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Server, str]]:
    s = Server()
    with serve_in_thread(s.app) as url:
        yield s, url
    s.log.closing = True


@pytest.fixture
def log(server: tuple[Server, str]) -> Iterator[FakeLog]:
    server[0].log = FakeLog()
    yield server[0].log
    server[0].log.closing = True


@pytest.fixture
def url(server: tuple[Server, str]) -> str:
    return server[1]


def cli(*args: str | Path) -> tuple[int, dict[str, Any]]:
    p = subprocess.run(
        [sys.executable, "-m", "device_sim", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, (p.stdout, p.stderr)
    return p.returncode, json.loads(lines[0])


def init(tmp_path: Path, w: World, *extra: str) -> tuple[Path, bytes]:
    d = tmp_path / "dev"
    code, out = cli(
        "device", "init", "--state", d, "--anchor", w.root.public_key.hex(), "--origin", w.origin, *extra
    )
    assert code == 0, out
    return d, bytes.fromhex(out["public_key"])


def challenge_and_check(
    d: Path, grant: bytes, key: Any, *extra: str, at: int = NOW, signed_at: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Challenge, answer as the holder of ``key`` (signing at ``signed_at``), check at ``at``."""
    code, out = cli("device", "challenge", "--state", d)
    assert code == 0
    device_key, ch = bytes.fromhex(out["device_key"]), bytes.fromhex(out["challenge"])
    path = d.parent / "auth.bin"
    path.write_bytes(messages.make_auth(grant, key, device_key, ch, at if signed_at is None else signed_at))
    return cli("device", "check", "--state", d, "--auth", path, "--now", str(at), *extra)


def test_init_prints_the_key_and_writes_the_enrollment(tmp_path: Path) -> None:
    w = World()
    d, pub = init(tmp_path, w, "--name", "plc-line3-17", "--now", str(T0))
    assert stat.S_IMODE(os.stat(d / "device.key").st_mode) == 0o600
    enroll = messages.parse_enroll((d / "enroll.bin").read_bytes())
    assert (enroll.subject, enroll.name, enroll.time) == (pub, "plc-line3-17", T0)
    code, out = cli("device", "init", "--state", d, "--anchor", w.root.public_key.hex(), "--origin", w.origin)
    assert (code, out["error"]) == (2, "usage")


def test_sync_challenge_check_revoke(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, pub = init(tmp_path, w)
    w.grant(pub, "device", "plc-17", scope="plant-1/line-3")
    tablet_seq = w.grant(w.tablet.public_key, "operator", "tablet-07", scope="plant-1")
    maint = signer("maint")
    maint_seq = w.grant(maint.public_key, "maintenance", "maint-1")
    log.publish(w, TS)
    code, out = cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))
    assert code == 0, out
    assert (out["size"], out["root"], out["checkpoint_time"]) == (w.size, w.root_at().hex(), TS)

    tablet = w.records[tablet_seq]
    code, out = challenge_and_check(d, tablet, w.tablet)
    assert (code, out["accepted"]) == (0, True)
    # the same auth again: the challenge was single use
    code, out = cli("device", "check", "--state", d, "--auth", d.parent / "auth.bin", "--now", str(NOW))
    assert (code, out) == (1, {**out, "accepted": False, "reason": "bad-challenge"})
    # --role is repeatable and defaults to operator
    assert challenge_and_check(d, w.records[maint_seq], maint)[1]["reason"] == "wrong-role"
    roles = ("--role", "operator", "--role", "maintenance")
    assert challenge_and_check(d, w.records[maint_seq], maint, *roles)[0] == 0
    # clock skew, stale
    code, out = challenge_and_check(d, tablet, w.tablet, signed_at=NOW + 301)
    assert (code, out["reason"]) == (1, "clock-skew")
    code, out = challenge_and_check(d, tablet, w.tablet, at=TS + 86400 + 1)
    assert (code, out["reason"]) == (1, "stale")

    w.revoke(tablet_seq, reason=2)
    log.publish(w, TS + 10)
    code, out = cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))
    assert (code, out["size"]) == (0, w.size)
    code, out = challenge_and_check(d, tablet, w.tablet)
    assert (code, out["accepted"], out["reason"]) == (1, False, "revoked")

    code, out = cli("device", "status", "--state", d, "--now", str(NOW))
    assert code == 0
    assert (out["size"], out["checkpoint_time"], out["revoked"]) == (w.size, TS + 10, {"ids": 1, "keys": 0})
    assert out["grant"]["scope"] == "plant-1/line-3" and out["evidence"] == []


def test_check_refusal_reasons_by_cli(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, _ = init(tmp_path, w)
    secret = signer("secret")
    log.publish(w, TS)
    assert cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))[0] == 0
    unpublished = w.grant_record(secret.public_key, "operator", "secret")
    assert challenge_and_check(d, unpublished, secret)[1]["reason"] == "unpublished"
    code, out = cli("device", "check", "--state", d, "--auth", tmp_path / "missing", "--now", str(NOW))
    assert (code, out["error"]) == (2, "usage")


def test_sync_from_a_bundle(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    for i in range(5):
        w.grant(signer(f"op{i}").public_key, "operator", f"op{i}")
    d, _ = init(tmp_path, w)
    bundle = tmp_path / "sync.bundle"
    bundle.write_bytes(w.bundle(0, TS))
    code, out = cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW))
    assert (code, out["size"], out["root"]) == (0, w.size, w.root_at().hex())
    # the same data over HTTP gives the same head; nothing more to apply
    log.publish(w, TS)
    code, out = cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))
    assert (code, out["size"], out["appended"]) == (0, w.size, 0)
    # a forged bundle: exit 3, state untouched
    before = (d / "state.bin").read_bytes()
    w.grant(signer("late").public_key, "operator", "late")
    recs = list(w.records)
    recs[-1] = recs[-1][:-1] + bytes([recs[-1][-1] ^ 1])
    bundle.write_bytes(messages.make_bundle(0, recs, w.checkpoint(TS + 1)))
    code, out = cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW))
    assert (code, out["error"]) == (3, "bad-signature") and out["detail"]
    assert (d / "state.bin").read_bytes() == before


def test_hostile_server_exit_3_state_untouched(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, _ = init(tmp_path, w)
    log.publish(w, TS)
    assert cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))[0] == 0
    before = (d / "state.bin").read_bytes()
    accepted = log.note
    log.publish(w, TS + 5, w.size - 1)  # a replayed older checkpoint
    code, out = cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))
    assert (code, out["error"]) == (3, "rollback") and isinstance(out["detail"], str)
    assert (d / "state.bin").read_bytes() == before
    w.grant(signer("x").public_key, "operator", "x")
    log.publish(w, TS + 6)
    log.records[-1] = log.records[-1][:-2] + b"\x00\x00"
    code, out = cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))
    assert (code, out["error"]) == (3, "bad-signature")
    assert (d / "state.bin").read_bytes() == before
    code, out = cli("device", "status", "--state", d, "--now", str(NOW))
    kinds = [e["kind"] for e in out["evidence"]]
    assert kinds == ["rollback", "bad-signature"]
    assert out["evidence"][0]["notes"] == [accepted, w.checkpoint(TS + 5, w.size - 2)]


def test_unreachable_and_http_errors_exit_4(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, _ = init(tmp_path, w)
    code, out = cli("device", "sync", "--state", d, "--server", f"http://127.0.0.1:{free_port()}")
    assert (code, out["error"]) == (4, "unreachable")
    log.status = 503
    code, out = cli("device", "sync", "--state", d, "--server", url)
    assert (code, out["error"], out["status"]) == (4, "http-error", 503)
    log.status = None
    log.slow = True
    t = time.monotonic()
    code, out = cli("device", "sync", "--state", d, "--server", url, "--timeout", "0.5")
    assert (code, out["error"]) == (4, "unreachable") and time.monotonic() - t < 5


def test_receipt(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, pub = init(tmp_path, w)
    log.publish(w, TS)
    assert cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))[0] == 0
    code, out = cli("device", "receipt", "--state", d, "--server", url)
    assert (code, out["error"]) == (2, "usage")  # no grant yet
    seq = w.grant(pub, "device", "plc-17")
    log.publish(w, TS + 1)
    assert cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))[0] == 0
    code, out = cli("device", "receipt", "--state", d, "--server", url, "--now", str(NOW))
    assert (code, out["error"], out["problem"]) == (4, "http-error", "unknown-device")
    log.device_keys[seq] = pub
    code, out = cli("device", "receipt", "--state", d, "--server", url, "--now", str(NOW))
    assert code == 0 and out["accepted"] is True and out["device_grant_seq"] == seq
    r = log.receipts[-1]
    assert (r.device_grant_seq, r.size, r.root, r.time) == (seq, w.size, w.root_at(), NOW)


@pytest.mark.parametrize(
    "args",
    [
        ["device", "init", "--state", "X", "--anchor", "zz", "--origin", "o"],
        ["device", "init", "--state", "X", "--anchor", "00" * 32, "--origin", "o", "--stale-policy", "maybe"],
        ["device", "sync", "--state", "X"],
        ["device", "bogus"],
        ["device"],
    ],
    ids=["bad-hex", "bad-policy", "no-source", "unknown-command", "no-subcommand"],
)
def test_usage_errors_exit_2_with_json(tmp_path: Path, args: list[str]) -> None:
    code, out = cli(*[str(tmp_path / "dev") if a == "X" else a for a in args])
    assert (code, out["error"]) == (2, "usage")


def test_cli_against_writ_serve(tmp_path: Path) -> None:
    """The device commands against the real server process (`writ serve`)."""
    import httpx

    from ledger import encoding
    from tests.helpers.server import Mirror, running_server

    root = signer("root")
    origin = "ledger.test.example/cli"
    with running_server(tmp_path, root.public_key, origin) as srv:
        d = tmp_path / "dev"
        code, out = cli("device", "init", "--state", d, "--anchor", root.public_key.hex(), "--origin", origin)
        assert code == 0
        pub = bytes.fromhex(out["public_key"])
        m = Mirror(root, origin)
        m.genesis()
        m.grant(srv.log_public_key, "log", "log")
        m.grant(messages.parse_enroll((d / "enroll.bin").read_bytes()).subject, "device", "plc-1")
        tablet = signer("tablet")
        tablet_grant = m.grant(tablet.public_key, "operator", "tablet-07")

        def push(raws: list[bytes]) -> None:
            r = httpx.post(
                srv.url + "/v1/records",
                content=encoding.pack_records(raws),
                headers={"content-type": "application/msgpack"},
            )
            assert r.status_code == 200, r.text

        push(m.records)
        code, out = cli("device", "sync", "--state", d, "--server", srv.url)
        assert (code, out["size"], out["root"]) == (0, m.state.size, m.state.root.hex()), out
        now = int(time.time())
        assert challenge_and_check(d, tablet_grant, tablet, at=now)[0] == 0
        code, out = cli("device", "receipt", "--state", d, "--server", srv.url)
        assert (code, out["accepted"], out["size"]) == (0, True, m.state.size), out
        push([m.revoke(records.parse(tablet_grant).seq, reason=2)])
        assert cli("device", "sync", "--state", d, "--server", srv.url)[0] == 0
        code, out = challenge_and_check(d, tablet_grant, tablet, at=int(time.time()))
        assert (code, out["reason"]) == (1, "revoked")
        assert pub == bytes.fromhex(cli("device", "status", "--state", d)[1]["public_key"])


# --- issue classes: hostile sizes, overlaps, old sticks, other ledgers, receipts on the stick ---


def _error(code: int, out: dict[str, Any], want_code: int, want: str) -> None:
    """One error shape everywhere: {"error": TYPE, "message": TEXT} (and the same text as "detail")."""
    assert (code, out["error"]) == (want_code, want), out
    assert isinstance(out["message"], str) and out["message"] and out["detail"] == out["message"]


def test_huge_checkpoint_size_is_a_clean_exit_3(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, _ = init(tmp_path, w)
    log.publish(w, TS)
    assert cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))[0] == 0
    before = (d / "state.bin").read_bytes()
    for key in (w.log, signer("mallory")):
        log.requests.clear()
        log.note = w.checkpoint(TS + 1, 2**63 - 1, root=bytes(32), key=key)
        code, out = cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))
        _error(code, out, 3, "fork" if key is w.log else "untrusted-checkpoint")
        assert (d / "state.bin").read_bytes() == before
        assert len([p for p in log.requests if p.startswith("/tile/")]) <= 4
    # a fresh device: it cannot check the signature first, and still fetches one tile at most
    fresh, _ = init(tmp_path / "fresh", w)
    log.requests.clear()
    code, out = cli("device", "sync", "--state", fresh, "--server", url, "--now", str(NOW))
    _error(code, out, 3, "untrusted-checkpoint")
    assert len([p for p in log.requests if p.startswith("/tile/")]) == 1


def test_bundle_with_a_forged_overlap_is_a_fork(tmp_path: Path) -> None:
    w = World()
    d, _ = init(tmp_path, w)
    for i in range(3):
        w.grant(signer(f"op-{i}").public_key, "operator", f"op-{i}")
    w.revoke(4)
    bundle = tmp_path / "site.bundle"
    bundle.write_bytes(w.bundle(0, TS))
    assert cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW))[0] == 0
    before = (d / "state.bin").read_bytes()
    forged = list(w.records)
    forged[6] = records.sign(records.Revoke(6, w.root_at(6), w.time, 0, 3, 2), w.root)  # another target
    w.grant(signer("new").public_key, "operator", "new")
    bundle.write_bytes(messages.make_bundle(0, [*forged, w.records[-1]], w.checkpoint(TS + 1)))
    code, out = cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW))
    _error(code, out, 3, "fork")
    assert (d / "state.bin").read_bytes() == before
    status = cli("device", "status", "--state", d, "--now", str(NOW))[1]
    assert status["evidence"][-1]["kind"] == "fork"


def test_old_bundle_is_nothing_new_exit_0(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, _ = init(tmp_path, w)
    old = tmp_path / "old.bundle"
    old.write_bytes(w.bundle(0, TS - 50))
    w.grant(signer("a").public_key, "operator", "a")
    log.publish(w, TS)
    assert cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW))[0] == 0
    before = (d / "state.bin").read_bytes()
    code, out = cli("device", "sync", "--state", d, "--bundle", old, "--now", str(NOW))
    assert code == 0 and out["nothing_new"] is True and out["appended"] == 0, out
    assert (out["size"], out["bundle_size"]) == (w.size, w.size - 1) and "nothing new" in out["note"]
    assert (d / "state.bin").read_bytes() == before
    # over HTTP the same older checkpoint is a rollback
    log.publish(w, TS + 5, w.size - 1)
    _error(*cli("device", "sync", "--state", d, "--server", url, "--now", str(NOW)), 3, "rollback")


def test_another_ledger_says_wrong_ledger_or_wrong_anchor(tmp_path: Path, log: FakeLog, url: str) -> None:
    w = World()
    d, _ = init(tmp_path, w)
    other = World(origin="ledger.other.example/site-9")
    bundle = tmp_path / "other.bundle"
    bundle.write_bytes(other.bundle(0, TS))
    code, out = cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW))
    _error(code, out, 3, "wrong-ledger")
    assert "ledger.other.example/site-9" in out["message"] and w.origin in out["message"]
    # a device installed with another anchor, pointed at this server
    mine = signer("my-root").public_key
    code, out = cli(
        "device", "init", "--state", tmp_path / "d2", "--anchor", mine.hex(), "--origin", w.origin
    )
    log.publish(w, TS)
    code, out = cli("device", "sync", "--state", tmp_path / "d2", "--server", url, "--now", str(NOW))
    _error(code, out, 3, "wrong-anchor")
    assert mine.hex() in out["message"] and w.root.public_key.hex() in out["message"]


def test_bundle_sync_writes_the_signed_receipt_beside_the_bundle(tmp_path: Path) -> None:
    """A USB-only site: the receipt (the exact POST /v1/receipts message) rides back on the stick."""
    w = World()
    d, pub = init(tmp_path, w)
    stick = tmp_path / "stick"
    stick.mkdir()
    bundle = stick / "ledger.bundle"
    bundle.write_bytes(w.bundle(0, TS))
    code, out = cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW))
    assert code == 0 and out["receipt"] is None  # no device grant yet: nothing to sign for
    seq = w.grant(pub, "device", "plc-1")
    bundle.write_bytes(w.bundle(0, TS + 1))
    code, out = cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW))
    path = stick / f"ledger.bundle.{pub.hex()[:16]}.receipt"
    assert code == 0 and out["receipt"] == str(path), out
    r = messages.parse_receipt(path.read_bytes())
    r.verify(pub)
    assert (r.device_grant_seq, r.size, r.root, r.time) == (seq, w.size, w.root_at(), NOW)
    # an old stick brought back: nothing new, and still a receipt of the device's head
    path.unlink()
    bundle.write_bytes(w.bundle(0, TS - 1, w.size - 1))
    code, out = cli("device", "sync", "--state", d, "--bundle", bundle, "--now", str(NOW + 1))
    assert code == 0 and out["nothing_new"] is True and out["receipt"] == str(path)
    assert messages.parse_receipt(path.read_bytes()).size == w.size
