"""The integrator's ``writ`` commands, run in-process against the real server app.

The CLI is synchronous (httpx.Client); the server app runs with its lifespan
in an event loop of its own thread (``tests.helpers.server.inprocess_server``)
and :class:`Bridge` carries each request there. ``ledger.cli.common.client_factory``
points the CLI at it. Hooks on the bridge play a hostile server or a
concurrent writer.

Every flow ends by checking that the records the CLI produced verify byte for
byte under the core's rules (a fresh LedgerState applies them).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from api.main import run
from ledger import checkpoints, encoding, messages, records
from ledger.cli import common
from ledger.cli.root import read_share_file
from ledger.crypto import SeedSigner, sha256
from ledger.mirror import Mirror, default_dir
from ledger.records import Grant
from ledger.signers import load_key_file
from ledger.state import LedgerState
from ledger.tree import leaf_hash, mth
from tests.helpers.keys import PIN, requires_openssh, requires_softhsm, ssh_add_seed
from tests.helpers.server import BASE_URL, inprocess_server

ORIGIN = "ledger.example/plant-7"
PW = "correct horse battery"
T = TypeVar("T")


# --- the in-process server, reached from synchronous code ------------------------------


class LoopThread:
    """An event loop running in its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="asgi-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


Reply = tuple[int, list[tuple[str, str]], bytes]
PreHook = Callable[[str, str, bytes], Reply | None]
PostHook = Callable[[str, str, Reply], Reply]


class Bridge(httpx.BaseTransport):
    """A synchronous transport onto the async in-process app, with hooks."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        path = request.url.raw_path.decode("ascii")
        method = request.method
        reply: Reply | None = None
        for pre in list(self.srv.pre_hooks):
            reply = pre(method, path, body)
            if reply is not None:
                break
        if reply is None:
            reply = self.srv.forward(method, path, dict(request.headers), body)
        for post in self.srv.post_hooks:
            reply = post(method, path, reply)
        status, headers, content = reply
        return httpx.Response(status, headers=headers, content=content, request=request)


@dataclass
class Server:
    lt: LoopThread
    aclient: httpx.AsyncClient
    data_dir: Path
    anchor: bytes
    url: str = BASE_URL
    pre_hooks: list[PreHook] = field(default_factory=list)
    post_hooks: list[PostHook] = field(default_factory=list)

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        async def go() -> Reply:
            r = await self.aclient.request(method, BASE_URL + path, headers=headers, content=body)
            drop = ("content-encoding", "content-length", "transfer-encoding")
            return r.status_code, [(k, v) for k, v in r.headers.items() if k.lower() not in drop], r.content

        return self.lt.run(go())

    def get(self, path: str) -> httpx.Response:
        return self.lt.run(self.aclient.get(path))

    def size(self) -> int:
        size: int = self.get("/v1/ledger").json()["size"]
        return size

    def records(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            page = encoding.unpack_records(self.get(f"/v1/records?start={len(out)}").content, max_count=1000)
            if not page:
                return out
            out.extend(page)

    def state(self) -> LedgerState:
        st = LedgerState(self.anchor)
        for raw in self.records():
            st.apply(raw)
        return st

    def append(self, raws: list[bytes]) -> None:
        r = self.lt.run(
            self.aclient.post(
                "/v1/records",
                content=encoding.pack_records(raws),
                headers={"Content-Type": "application/msgpack"},
            )
        )
        assert r.status_code == 200, r.text

    def log_signer(self) -> SeedSigner:
        doc = json.loads((self.data_dir / "log.key").read_text())
        return SeedSigner(bytes.fromhex(doc["seed"]))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start(anchor) -> Server``: an in-process server the CLI reaches at ``http://writ.test``."""
    lt = LoopThread()
    managers: list[Any] = []
    clients: list[httpx.Client] = []

    def start(anchor: bytes, origin: str = ORIGIN, name: str = "server") -> Server:
        data_dir = tmp_path / name / "data"
        cm = inprocess_server(tmp_path, anchor, origin, data_dir=data_dir)
        aclient, _app = lt.run(cm.__aenter__())
        managers.append(cm)
        srv = Server(lt, aclient, data_dir, anchor)
        bridged = httpx.Client(transport=Bridge(srv))
        clients.append(bridged)

        def factory(base: str) -> httpx.Client:
            if base == BASE_URL:
                return bridged
            real = httpx.Client(timeout=5.0, trust_env=False)
            clients.append(real)
            return real

        common.client_factory = factory
        return srv

    try:
        yield start
    finally:
        common.client_factory = None
        for c in clients:
            c.close()
        for cm in reversed(managers):
            lt.run(cm.__aexit__(None, None, None))
        lt.close()


# --- running the CLI ----------------------------------------------------------------------


@dataclass
class Result:
    code: int
    doc: dict[str, Any]
    err: str


class Writ:
    def __init__(self, capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
        self.capsys = capsys
        self.tmp = tmp

    def __call__(self, *argv: object) -> Result:
        """Run ``writ``; a ``str`` argument is split on spaces, anything else (a Path) is one word."""
        words: list[str] = []
        for a in argv:
            words.extend(a.split() if isinstance(a, str) else [str(a)])
        self.capsys.readouterr()
        code = run(words)
        out, err = self.capsys.readouterr()
        lines = out.strip().splitlines()
        assert len(lines) == 1, f"expected one JSON line on stdout, got {out!r}"
        doc = json.loads(lines[0])
        assert isinstance(doc, dict)
        assert "Traceback" not in err, err
        if code != 0:
            assert doc.get("error"), doc
            assert err.strip(), "an error explains itself on stderr"
        return Result(code, doc, err)

    def ok(self, *argv: object) -> dict[str, Any]:
        r = self(*argv)
        assert r.code == 0, (r.doc, r.err)
        return r.doc


@pytest.fixture
def writ(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Writ:
    monkeypatch.setenv("WRIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PW", PW)
    monkeypatch.setenv("WRIT_KDF_COST", "interactive")
    monkeypatch.delenv("WRIT_ANCHOR", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return Writ(capsys, tmp_path)


@dataclass
class Ledger:
    """A root key made by ``writ root init`` and a ledger opened by ``writ genesis``."""

    srv: Server
    tmp: Path
    root: Path
    anchor: bytes
    digest: bytes | None
    shares: list[str]

    def key(self) -> list[str]:
        return ["--key", str(self.root), "--passphrase-env", "PW"]

    def root_signer(self) -> SeedSigner:
        return load_key_file(self.root, PW.encode())


def init_root(writ: Writ, tmp: Path, *extra: str, shares: bool = True) -> tuple[Path, dict[str, Any]]:
    root = tmp / "root.key"
    args = ["root", "init", "--out", root, "--passphrase-env", "PW", *extra]
    args += ["--shares", "2-of-3", "--shares-out", tmp / "shares"] if shares else ["--no-successor"]
    return root, writ.ok(*args)


@pytest.fixture
def ledger(writ: Writ, servers: Callable[..., Server], tmp_path: Path) -> Ledger:
    root, doc = init_root(writ, tmp_path)
    anchor = bytes.fromhex(doc["anchor"])
    srv = servers(anchor)
    out = writ.ok("genesis --origin", ORIGIN, "--server", srv.url, "--key", root, "--passphrase-env PW")
    assert out["seq"] == 1
    assert out["log_public_key"] == srv.log_signer().public_key.hex()
    return Ledger(srv, tmp_path, root, anchor, bytes.fromhex(doc["next_root_digest"]), doc["shares"])


def enroll_file(path: Path, name: str) -> tuple[SeedSigner, Path]:
    device = SeedSigner.generate()
    path.write_bytes(messages.make_enroll(device, name, int(time.time())))
    return device, path


def assert_verifies(srv: Server) -> LedgerState:
    """Every record on the server verifies under the core's rules from the anchor alone, and the
    CLI's mirror holds the very same bytes."""
    raws = srv.records()
    st = LedgerState(srv.anchor)
    for raw in raws:
        rec = st.apply(raw)
        assert rec.raw == raw
    mirror_dir = default_dir(ORIGIN)
    if (mirror_dir / "state.bin").exists():
        with Mirror.open(mirror_dir, srv.anchor, create=False) as m:
            assert m.read_records() == raws[: m.size]
    return st


# --- flows -----------------------------------------------------------------------------------


def test_root_init_writes_key_shares_and_public_companion(writ: Writ, tmp_path: Path) -> None:
    root, doc = init_root(writ, tmp_path)
    assert stat.S_IMODE(root.stat().st_mode) == 0o600
    pub = json.loads((tmp_path / "root.key.pub.json").read_text())
    assert pub["anchor"] == doc["anchor"] == pub["public_key"]
    assert pub["next_root_digest"] == doc["next_root_digest"]
    assert len(doc["shares"]) == 3
    for p in doc["shares"]:
        assert stat.S_IMODE(Path(p).stat().st_mode) == 0o600
        assert len(read_share_file(p).split()) == 33
    # the successor's private half is nowhere on disk whole: only k sheets rebuild it
    r = writ(
        "root recover --shares",
        doc["shares"][0],
        "--expect-digest",
        doc["next_root_digest"],
        "--out",
        tmp_path / "x.key",
        "--passphrase-env PW",
    )
    assert (r.code, r.doc["error"]) == (1, "bad-shares")
    assert not (tmp_path / "x.key").exists()
    # an explicit --no-successor works, and says what it means
    r2 = writ("root init --out", tmp_path / "lonely.key", "--passphrase-env PW --no-successor")
    assert r2.code == 0 and r2.doc["next_root_digest"] is None
    assert "never be rotated" in r2.err
    # refuses to overwrite
    r3 = writ("root init --out", root, "--passphrase-env PW --no-successor")
    assert (r3.code, r3.doc["error"]) == (2, "usage")


def test_lost_tablet_flow(writ: Writ, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """root init (2-of-3) -> genesis -> grant from an enrollment request -> the on-call engineer
    revokes the lost tablet by name with a revoker key -> status."""
    srv, tmp = ledger.srv, ledger.tmp
    tablet, req = enroll_file(tmp / "tablet.enroll", "tablet-07")
    g = writ.ok("grant --server", srv.url, "--request", req, "--role operator", *ledger.key())
    assert g["name"] == "tablet-07" and g["subject"] == tablet.public_key.hex()

    oncall = writ.ok("key init --out", tmp / "oncall.key", "--passphrase-env PW --role revoker")
    writ.ok(
        "grant --server",
        srv.url,
        "--subject",
        oncall["public_key"],
        "--role revoker --name oncall",
        *ledger.key(),
    )

    # the on-call laptop: its own mirror, the anchor from the environment, never from the server
    monkeypatch.setenv("WRIT_HOME", str(tmp / "oncall-home"))
    monkeypatch.setenv("WRIT_ANCHOR", ledger.anchor.hex())
    before = srv.size()
    r = writ.ok(
        "revoke --name tablet-07 --reason lost --revoker-key",
        tmp / "oncall.key",
        "--passphrase-env PW --server",
        srv.url,
    )
    assert r["seq"] == before and r["target"] == g["seq"] and r["signer"] == g["seq"] + 1
    assert r["reason"] == "lost"
    assert srv.size() == before + 1

    s = writ.ok("status tablet-07 --server", srv.url)
    assert s["status"] == "revoked"
    assert s["revocation"] == {
        "seq": r["seq"],
        "reason": "lost",
        "time": s["revocation"]["time"],
        "signer": g["seq"] + 1,
        "by": "id",
    }
    assert s["devices"] is not None and s["devices"]["total"] == 0

    # again: nothing to revoke, nothing appended
    again = writ(
        "revoke --name tablet-07 --reason lost --revoker-key",
        tmp / "oncall.key",
        "--passphrase-env PW --server",
        srv.url,
    )
    assert (again.code, again.doc["error"]) == (1, "already-revoked")
    assert srv.size() == before + 1

    st = assert_verifies(srv)
    assert st.is_revoked(g["seq"])
    monkeypatch.setenv("WRIT_HOME", str(tmp / "home"))
    assert_verifies(srv)


def test_revoker_flow_needs_a_local_anchor(
    writ: Writ, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = ledger.tmp
    oncall = writ.ok("key init --out", tmp / "oncall.key", "--passphrase-env PW")
    writ.ok(
        "grant --server",
        ledger.srv.url,
        "--subject",
        oncall["public_key"],
        "--role revoker --name oncall",
        *ledger.key(),
    )
    monkeypatch.setenv("WRIT_HOME", str(tmp / "fresh-home"))
    r = writ(
        "revoke 1 --reason retired --revoker-key",
        tmp / "oncall.key",
        "--passphrase-env PW --server",
        ledger.srv.url,
    )
    assert (r.code, r.doc["error"]) == (2, "usage") and "anchor" in r.doc["message"]


def test_root_recover_from_two_shares_then_rotate(writ: Writ, ledger: Ledger) -> None:
    srv, tmp = ledger.srv, ledger.tmp
    assert ledger.digest is not None
    # a wrong digest is refused before anything is written
    wrong = writ(
        "root recover --shares",
        *ledger.shares[:2],
        "--expect-digest",
        "00" * 32,
        "--out",
        tmp / "succ.key",
        "--passphrase-env PW",
    )
    assert (wrong.code, wrong.doc["error"]) == (1, "bad-shares") and not (tmp / "succ.key").exists()

    rec = writ.ok(
        "root recover --shares",
        ledger.shares[0],
        ledger.shares[2],
        "--expect-digest",
        ledger.digest.hex(),
        "--anchor",
        ledger.anchor.hex(),
        "--out",
        tmp / "succ.key",
        "--passphrase-env PW",
    )
    assert sha256(bytes.fromhex(rec["public_key"])) == ledger.digest

    before = srv.size()
    rot = writ.ok(
        "rotate --server",
        srv.url,
        "--successor-key",
        tmp / "succ.key",
        "--passphrase-env PW --shares 2-of-3 --shares-out",
        tmp / "shares2",
    )
    assert rot["seq"] == before and rot["new_root"] == rec["public_key"]
    assert len(rot["shares"]) == 3 and rot["next_root_digest"]
    pub = json.loads((tmp / "succ.key.pub.json").read_text())
    assert pub["anchor"] == ledger.anchor.hex() and pub["next_root_digest"] == rot["next_root_digest"]

    # the new root signs; the old one is refused, nothing appended
    writ.ok(
        "grant --server",
        srv.url,
        "--subject",
        "aa" * 32,
        "--role operator --name after --key",
        tmp / "succ.key",
        "--passphrase-env PW",
    )
    size = srv.size()
    old = writ("grant --server", srv.url, "--subject", "bb" * 32, "--role operator --name x", *ledger.key())
    assert (old.code, old.doc["error"]) == (1, "unauthorized-signer")
    assert srv.size() == size
    # the old successor cannot rotate twice; the new sheets rotate again (from shares)
    again = writ(
        "rotate --server", srv.url, "--successor-key", tmp / "succ.key", "--passphrase-env PW --no-successor"
    )
    assert (again.code, again.doc["error"]) == (1, "unauthorized-signer")
    third = writ.ok(
        "rotate --server",
        srv.url,
        "--successor-shares",
        *rot["shares"][1:],
        "--out",
        tmp / "third.key",
        "--passphrase-env PW --no-successor",
    )
    assert sha256(bytes.fromhex(third["new_root"])).hex() == rot["next_root_digest"]
    assert third["next_root_digest"] is None
    st = assert_verifies(srv)
    assert st.root_key == bytes.fromhex(third["new_root"]) and st.pending_digest is None
    writ.ok(
        "grant --server",
        srv.url,
        "--subject",
        "cc" * 32,
        "--role operator --name third --key",
        tmp / "third.key",
        "--passphrase-env PW",
    )


def test_air_gapped_flow(writ: Writ, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, tmp = ledger.srv, ledger.tmp
    bundle = tmp / "usb" / "ledger.bundle"
    bundle.parent.mkdir()
    exp = writ.ok("bundle export --server", srv.url, "--out", bundle)
    assert exp["records"] == exp["size"] == srv.size()

    # the offline machine: no server (a client factory that refuses every connection)
    common.client_factory, online = None, common.client_factory
    monkeypatch.setenv("WRIT_HOME", str(tmp / "offline-home"))
    vault = tmp / "vault"
    imp = writ.ok("mirror import", bundle, "--anchor", ledger.anchor.hex(), "--mirror", vault)
    assert imp["size"] == srv.size() and imp["origin"] == ORIGIN
    _, req = enroll_file(tmp / "plc.enroll", "plc-line3-17")
    out = tmp / "usb" / "signed.records"
    s1 = writ.ok(
        "sign --offline --mirror",
        vault,
        "--out",
        out,
        "grant --request",
        req,
        "--role device --scope plant-7/line-3",
        *ledger.key(),
    )
    s2 = writ.ok(  # the brief's order: the kind's arguments, then --mirror and --out
        "sign --offline grant --subject",
        "dd" * 32,
        "--role operator --name tablet-09",
        *ledger.key(),
        "--mirror",
        vault,
        "--out",
        out,
    )
    s3 = writ.ok(
        "sign --offline --mirror",
        vault,
        "--out",
        out,
        "revoke --name tablet-09 --reason superseded",
        *ledger.key(),
    )
    assert (s1["seq"], s2["seq"], s3["seq"]) == (2, 3, 4) and s3["records"] == 3
    size = srv.size()
    assert size == 2  # nothing reached the server

    # back online: push, then pushing again is harmless
    common.client_factory = online
    monkeypatch.setenv("WRIT_HOME", str(tmp / "home"))
    p = writ.ok("push --server", srv.url, out)
    assert p["seq"] == 4 and p["appended"] == 3 and srv.size() == 5
    again = writ.ok("push --server", srv.url, out)
    assert again["already_published"] is True and srv.size() == 5
    st = assert_verifies(srv)
    assert st.grants_named("plc-line3-17")[0].scope == "plant-7/line-3"

    # a newer bundle extends the offline mirror (from --start, overlapping is checked)
    newer = tmp / "usb" / "newer.bundle"
    writ.ok("bundle export --server", srv.url, "--start", 1, "--out", newer)
    common.client_factory = None
    ext = writ.ok("mirror import", newer, "--mirror", vault)
    assert ext["size"] == 5 and ext["imported"] == 3
    # a stale signed file no longer extends the mirror: refused, nothing written
    stale = writ(
        "sign --offline --mirror",
        vault,
        "--out",
        out,
        "grant --subject",
        "ee" * 32,
        "--role operator --name late",
        *ledger.key(),
    )
    assert (stale.code, stale.doc["error"]) == (1, "stale-head")
    common.client_factory = online


def test_offline_genesis_then_push(writ: Writ, servers: Callable[..., Server], tmp_path: Path) -> None:
    root, doc = init_root(writ, tmp_path)
    srv = servers(bytes.fromhex(doc["anchor"]))
    log_key = srv.log_signer().public_key.hex()
    out = tmp_path / "genesis.records"
    online, common.client_factory = common.client_factory, None
    g = writ.ok(
        "sign --offline --out",
        out,
        "genesis --origin",
        ORIGIN,
        "--log-key",
        log_key,
        "--key",
        root,
        "--passphrase-env PW",
    )
    assert (g["seq"], g["records"], g["next_root_digest"]) == (1, 2, doc["next_root_digest"])
    common.client_factory = online
    assert srv.size() == 0
    p = writ.ok("push --server", srv.url, out)
    assert p["appended"] == 2 and srv.size() == 2
    st = assert_verifies(srv)
    assert st.active_keys(records.ROLE_LOG) == [bytes.fromhex(log_key)]
    assert writ.ok("audit --server", srv.url, "--anchor", doc["anchor"])["size"] == 2


def test_tampered_bundle_leaves_the_offline_mirror_unchanged(writ: Writ, ledger: Ledger) -> None:
    tmp = ledger.tmp
    good = tmp / "good.bundle"
    writ.ok("bundle export --server", ledger.srv.url, "--out", good)
    b = messages.parse_bundle(good.read_bytes())
    recs = list(b.records)
    bad_rec = bytearray(recs[1])
    bad_rec[-1] ^= 1
    recs[1] = bytes(bad_rec)
    bad = tmp / "bad.bundle"
    bad.write_bytes(messages.make_bundle(b.start, recs, b.checkpoint))
    r = writ("mirror import", bad, "--anchor", ledger.anchor.hex(), "--mirror", tmp / "vault")
    assert (r.code, r.doc["error"], r.doc["seq"]) == (3, "bad-signature", 1)
    assert not (tmp / "vault" / "state.bin").exists()
    evidence = list((tmp / "vault" / "evidence").glob("*.json"))
    assert evidence and json.loads(evidence[0].read_text())["kind"] == "bad-signature"


def test_audit_ok_then_tampered_database(writ: Writ, ledger: Ledger) -> None:
    srv = ledger.srv
    for i in range(3):
        writ.ok(
            "grant --server",
            srv.url,
            "--subject",
            f"{i + 1:02x}" * 32,
            "--role operator --name",
            f"op-{i}",
            *ledger.key(),
        )
    a = writ.ok("audit --server", srv.url, "--anchor", ledger.anchor.hex())
    assert a["ok"] is True and a["size"] == 5 and a["checkpoint"]["size"] == 5
    assert a["records_by_kind"] == {"genesis": 1, "grant": 4, "revoke": 0, "rotate": 0}
    d = writ.ok("audit --data", srv.data_dir, "--anchor", ledger.anchor.hex(), "--json")
    assert d["root"] == a["root"] and d["size"] == 5
    # the wrong anchor: a configuration mistake, named as such (not tampering), both anchors shown
    w = writ("audit --server", srv.url, "--anchor", "11" * 32)
    assert (w.code, w.doc["error"], w.doc["seq"]) == (3, "wrong-anchor", 0)
    assert w.doc["anchor"] == "11" * 32 and w.doc["genesis_root"] == ledger.anchor.hex()
    assert "11" * 32 in w.doc["message"] and ledger.anchor.hex() in w.doc["message"]

    db = sqlite3.connect(srv.data_dir / "ledger.db")
    (raw,) = db.execute("SELECT raw FROM records WHERE seq = 3").fetchone()
    flipped = bytearray(raw)
    flipped[-1] ^= 0x01  # the last byte of the signature
    db.execute("UPDATE records SET raw = ? WHERE seq = 3", (bytes(flipped),))
    db.commit()
    db.close()
    t = writ("audit --data", srv.data_dir, "--anchor", ledger.anchor.hex())
    assert (t.code, t.doc["error"], t.doc["seq"]) == (3, "bad-signature", 3)
    assert "Traceback" not in t.err


def _backup_copy(srv: Server, dest: Path) -> Path:
    """A consistent copy of the server's database in ``dest`` (as the backup script makes it)."""
    dest.mkdir()
    src = sqlite3.connect(srv.data_dir / "ledger.db")
    dst = sqlite3.connect(dest / "ledger.db")
    src.backup(dst)
    src.close()
    dst.close()
    return dest


def test_audit_data_refuses_a_stored_leaf_hash_that_serve_refuses(
    writ: Writ, ledger: Ledger, tmp_path: Path
) -> None:
    """One routine for both: a backup whose stored leaf hash is not its record's fails the audit."""
    copy = _backup_copy(ledger.srv, tmp_path / "backup")
    assert writ.ok("audit --data", copy, "--anchor", ledger.anchor.hex())["size"] == 2
    db = sqlite3.connect(copy / "ledger.db")
    db.execute("UPDATE records SET leaf_hash = ? WHERE seq = 1", (b"\x00" * 32,))
    db.commit()
    db.close()
    t = writ("audit --data", copy, "--anchor", ledger.anchor.hex())
    assert (t.code, t.doc["error"], t.doc["seq"]) == (3, "leaf-hash-mismatch", 1)
    assert "Traceback" not in t.err


def test_audit_data_of_a_truncated_ledger_names_the_first_missing_seq(
    writ: Writ, ledger: Ledger, tmp_path: Path
) -> None:
    for i in range(4):
        writ.ok(
            "grant --server",
            ledger.srv.url,
            "--subject",
            f"{i + 1:02x}" * 32,
            "--role operator --name",
            f"t-{i}",
            *ledger.key(),
        )
    copy = _backup_copy(ledger.srv, tmp_path / "backup")  # 6 records, checkpoint of size 6
    db = sqlite3.connect(copy / "ledger.db")
    db.execute("DELETE FROM records WHERE seq >= 4")
    db.commit()
    db.close()
    t = writ("audit --data", copy, "--anchor", ledger.anchor.hex())
    assert (t.code, t.doc["seq"]) == (3, 4)
    # and when the head row was cut back too, the signed checkpoint still names what is missing
    db = sqlite3.connect(copy / "ledger.db")
    db.execute("UPDATE head SET size = 4, root = ?", (mth([leaf_hash(r) for r in ledger.srv.records()[:4]]),))
    db.commit()
    db.close()
    t = writ("audit --data", copy, "--anchor", ledger.anchor.hex())
    assert (t.code, t.doc["seq"]) == (3, 4)


def test_audit_data_opens_read_only_and_creates_no_side_files(
    writ: Writ, ledger: Ledger, tmp_path: Path
) -> None:
    copy = _backup_copy(ledger.srv, tmp_path / "backup")
    (copy / "ledger.db").chmod(0o444)
    copy.chmod(0o555)  # a read-only mount, as far as a non-root auditor can tell
    try:
        d = writ.ok("audit --data", copy, "--anchor", ledger.anchor.hex())
        assert d["size"] == 2
        assert sorted(p.name for p in copy.iterdir()) == ["ledger.db"]  # no -wal, no -shm
    finally:
        copy.chmod(0o755)


def test_show_and_log_explain_the_history(writ: Writ, ledger: Ledger) -> None:
    srv = ledger.srv
    writ.ok(
        "grant --server", srv.url, "--subject", "ab" * 32, "--role operator --name tablet-07", *ledger.key()
    )
    writ.ok("revoke --server", srv.url, "2 --reason key_compromise", *ledger.key())
    one = writ.ok("show 2 --server", srv.url, "--anchor", ledger.anchor.hex())
    (g,) = one["records"]
    assert g["kind"] == "grant" and g["name"] == "tablet-07" and g["revoked"]["reason"] == "key_compromise"
    assert one["verified"] is True
    log = writ.ok("log --data", srv.data_dir, "--name tablet-07")
    assert [e["kind"] for e in log["records"]] == ["grant", "revoke"] and log["verified"] is False
    assert "revoked tablet-07" in log["records"][1]["summary"]
    only = writ.ok("log --server", srv.url, "--kind grant --limit 1")
    assert [e["seq"] for e in only["records"]] == [2]


# --- backends ----------------------------------------------------------------------------------


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_root_signs(writ: Writ, ledger: Ledger, softhsm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = ledger.srv
    monkeypatch.setenv("PIN", PIN)
    imp = writ.ok(
        "key import-token --key",
        ledger.root,
        "--passphrase-env PW --pkcs11",
        softhsm,
        "--pin-env PIN --label root",
    )
    assert imp["public_key"] == ledger.anchor.hex()
    uri = f"{softhsm};object=root"
    g = writ.ok(
        "grant --server",
        srv.url,
        "--subject",
        "12" * 32,
        "--role operator --name hsm --pkcs11",
        uri,
        "--pin-env PIN --anchor",
        ledger.anchor.hex(),
    )
    assert g["seq"] == 2
    monkeypatch.setenv("BADPIN", "9999")
    size = srv.size()
    bad = writ(
        "grant --server",
        srv.url,
        "--subject",
        "13" * 32,
        "--role operator --name x --pkcs11",
        uri,
        "--pin-env BADPIN --anchor",
        ledger.anchor.hex(),
    )
    assert (bad.code, bad.doc["error"]) == (1, "token-error") and "9999" not in bad.err + json.dumps(bad.doc)
    assert srv.size() == size
    assert_verifies(srv)


@pytest.mark.e2e
@requires_openssh
def test_ssh_agent_root_signs(writ: Writ, ledger: Ledger, ssh_agent: str, short_tmp: Path) -> None:
    from ledger.signers import fingerprint

    ssh_add_seed(ssh_agent, short_tmp, ledger.root_signer().seed())
    fp = fingerprint(ledger.anchor)
    g = writ.ok(
        "grant --server",
        ledger.srv.url,
        "--subject",
        "14" * 32,
        "--role operator --name agent --ssh-agent",
        fp,
        "--anchor",
        ledger.anchor.hex(),
    )
    r = writ.ok(
        "revoke --server",
        ledger.srv.url,
        "--subject",
        "14" * 32,
        "--reason retired --ssh-agent",
        fp,
        "--anchor",
        ledger.anchor.hex(),
    )
    assert (g["seq"], r["seq"], r["target"]) == (2, 3, "14" * 32)
    missing = writ(
        "grant --server",
        ledger.srv.url,
        "--subject",
        "15" * 32,
        "--role operator --name x --ssh-agent",
        fingerprint(b"\x01" * 32),
        "--anchor",
        ledger.anchor.hex(),
    )
    assert (missing.code, missing.doc["error"]) == (1, "agent-error")
    assert_verifies(ledger.srv)


# --- the concurrent writer and the hostile server ------------------------------------------------


def _grant_on_head(srv: Server, root: SeedSigner, name: str) -> bytes:
    st = srv.state()
    body = Grant(
        st.size,
        st.root,
        max(int(time.time()), st.last_time),
        SeedSigner.generate().public_key,
        "operator",
        "",
        name,
        0,
        0,
    )
    return records.sign(body, root)


def test_stale_head_is_resynced_and_resigned_once(writ: Writ, ledger: Ledger) -> None:
    srv = ledger.srv
    root = ledger.root_signer()
    fired: list[int] = []

    def someone_else(method: str, path: str, body: bytes) -> Reply | None:
        if method == "POST" and path.startswith("/v1/records") and not fired:
            fired.append(1)
            srv.append([_grant_on_head(srv, root, "concurrent")])
        return None

    writ.ok("grant --server", srv.url, "--subject", "1b" * 32, "--role operator --name tablet", *ledger.key())
    srv.pre_hooks.append(someone_else)
    r = writ("revoke --server", srv.url, "--name tablet --reason superseded", *ledger.key())
    assert r.code == 0 and "re-synced" in r.err
    assert fired and r.doc["seq"] == 4 and r.doc["target"] == 2 and srv.size() == 5  # re-signed on top

    # a writer that always wins: refused cleanly after one retry, nothing of ours appended
    def always(method: str, path: str, body: bytes) -> Reply | None:
        if method == "POST" and path.startswith("/v1/records"):
            srv.append([_grant_on_head(srv, root, f"busy-{srv.size()}")])
        return None

    srv.pre_hooks[:] = [always]
    before = srv.size()
    s = writ("grant --server", srv.url, "--subject", "16" * 32, "--role operator --name mine", *ledger.key())
    assert (s.code, s.doc["error"]) == (1, "stale-head")
    srv.pre_hooks.clear()
    st = assert_verifies(srv)
    assert srv.size() == before + 2 and not st.grants_named("mine")


def _tamper_records(index: int) -> PostHook:
    def post(method: str, path: str, reply: Reply) -> Reply:
        status, headers, content = reply
        if method == "GET" and path.startswith("/v1/records") and status == 200:
            raws = encoding.unpack_records(content, max_count=1000)
            start = int(path.split("start=")[1].split("&")[0])
            if start <= index < start + len(raws):
                b = bytearray(raws[index - start])
                b[-1] ^= 1
                raws[index - start] = bytes(b)
            return status, headers, encoding.pack_records(raws)
        return reply

    return post


def test_hostile_server_forged_record_refused_before_signing(
    writ: Writ, ledger: Ledger, tmp_path: Path
) -> None:
    srv = ledger.srv
    writ.ok("grant --server", srv.url, "--subject", "17" * 32, "--role operator --name a", *ledger.key())
    srv.post_hooks.append(_tamper_records(2))
    a = writ("audit --server", srv.url, "--anchor", ledger.anchor.hex())
    assert (a.code, a.doc["error"], a.doc["seq"]) == (3, "bad-signature", 2)
    # a fresh signing tool (new mirror) refuses to sign on top of it; nothing pushed
    before = srv.size()
    g = writ(
        "grant --server",
        srv.url,
        "--subject",
        "18" * 32,
        "--role operator --name b --mirror",
        tmp_path / "fresh",
        *ledger.key(),
    )
    assert (g.code, g.doc["error"], g.doc["seq"]) == (3, "bad-signature", 2)
    assert srv.size() == before


def test_fork_and_rollback_are_refused(writ: Writ, ledger: Ledger) -> None:
    srv = ledger.srv
    old_note = srv.get("/checkpoint").text
    writ.ok("grant --server", srv.url, "--subject", "19" * 32, "--role operator --name c", *ledger.key())
    mirror_dir = default_dir(ORIGIN)
    state_before = (mirror_dir / "state.bin").read_bytes()

    def serve(note: str) -> PreHook:
        def pre(method: str, path: str, body: bytes) -> Reply | None:
            if path == "/checkpoint":
                return 200, [("content-type", "text/plain; charset=utf-8")], note.encode()
            return None

        return pre

    # rollback: a properly signed but older checkpoint
    srv.pre_hooks.append(serve(old_note))
    r = writ("status c --server", srv.url)
    assert (r.code, r.doc["error"]) == (3, "rollback")
    # fork: the log key signs another tree of the same size
    size = srv.size()
    forged = checkpoints.sign_checkpoint(
        checkpoints.Checkpoint(ORIGIN, size, b"\x42" * 32), ORIGIN, srv.log_signer(), int(time.time()) + 5
    )
    srv.pre_hooks[:] = [serve(forged)]
    f = writ("grant --server", srv.url, "--subject", "1a" * 32, "--role operator --name d", *ledger.key())
    assert (f.code, f.doc["error"]) == (3, "fork")
    srv.pre_hooks.clear()
    assert srv.size() == size
    assert (mirror_dir / "state.bin").read_bytes() == state_before  # the mirror kept its view
    # a rewritten history: the next record is root-signed but does not extend what the mirror holds
    root = ledger.root_signer()
    srv.append([_grant_on_head(srv, root, "next")])
    st = srv.state()
    other = records.sign(
        Grant(st.size - 1, b"\x07" * 32, st.last_time, b"\x08" * 32, "operator", "", "other", 0, 0), root
    )

    def rewrite(method: str, path: str, reply: Reply) -> Reply:
        status, headers, content = reply
        if method == "GET" and path.startswith("/v1/records") and status == 200:
            raws = encoding.unpack_records(content, max_count=1000)
            return status, headers, encoding.pack_records([other, *raws[1:]])
        return reply

    srv.post_hooks.append(rewrite)
    w = writ("status c --server", srv.url)
    assert (w.code, w.doc["error"], w.doc["seq"]) == (3, "fork", st.size - 1)
    srv.post_hooks.clear()
    assert (mirror_dir / "state.bin").read_bytes() == state_before
    kinds = {json.loads(p.read_text())["kind"] for p in (mirror_dir / "evidence").glob("*.json")}
    assert {"rollback", "fork"} <= kinds
    assert writ.ok("status c --server", srv.url)["status"] == "active"  # the honest server again


# --- every error: one line on stderr, JSON on stdout, an exit code, nothing appended --------------


def test_error_cases(writ: Writ, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, tmp = ledger.srv, ledger.tmp
    writ.ok("grant --server", srv.url, "--subject", "21" * 32, "--role operator --name twin", *ledger.key())
    writ.ok("grant --server", srv.url, "--subject", "22" * 32, "--role operator --name twin", *ledger.key())
    writ.ok("grant --server", srv.url, "--subject", "20" * 32, "--role operator --name gone", *ledger.key())
    writ.ok("revoke --server", srv.url, "4 --reason lost", *ledger.key())
    monkeypatch.setenv("WRONG", "not the passphrase")
    monkeypatch.setenv("EMPTY", "")
    tampered = tmp / "tampered.enroll"
    _, req = enroll_file(tmp / "ok.enroll", "plc")
    data = bytearray(req.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    (tmp / "other").mkdir()
    other, _ = init_root(writ, tmp / "other", shares=False)
    base = ["--server", srv.url]
    key = ledger.key()
    cases: list[tuple[str, list[object], int, str]] = [
        ("already revoked", ["revoke", *base, "4 --reason lost", *key], 1, "already-revoked"),
        ("name revoked", ["revoke", *base, "--name gone --reason lost", *key], 1, "already-revoked"),
        ("unknown name", ["revoke", *base, "--name nobody --reason lost", *key], 2, "unknown-name"),
        (
            "ambiguous name",
            ["revoke", *base, "--name twin --reason lost", *key],
            2,
            "ambiguous-name",
        ),
        ("unknown target", ["revoke", *base, "999 --reason lost", *key], 1, "unknown-target"),
        ("not a grant", ["revoke", *base, "0 --reason lost", *key], 1, "unknown-target"),
        ("bad reason", ["revoke", *base, "3 --reason bored", *key], 2, "usage"),
        (
            "wrong passphrase",
            [
                "grant",
                *base,
                "--subject",
                "23" * 32,
                "--role operator --name w --key",
                ledger.root,
                "--passphrase-env WRONG",
            ],
            1,
            "wrong-passphrase",
        ),
        (
            "no passphrase",
            ["grant", *base, "--subject", "23" * 32, "--role operator --name w --key", ledger.root],
            2,
            "usage",
        ),
        (
            "empty passphrase",
            [
                "grant",
                *base,
                "--subject",
                "23" * 32,
                "--role operator --name w --key",
                ledger.root,
                "--passphrase-env EMPTY",
            ],
            2,
            "usage",
        ),
        (
            "bad hex",
            ["grant", *base, "--subject", "zz" * 32, "--role operator --name h", *key],
            2,
            "usage",
        ),
        (
            "short hex",
            ["grant", *base, "--subject", "ab" * 31, "--role operator --name h", *key],
            2,
            "usage",
        ),
        (
            "bad role",
            ["grant", *base, "--subject", "24" * 32, "--role Admin! --name r", *key],
            2,
            "invalid-field",
        ),
        (
            "name too long",
            ["grant", *base, "--subject", "24" * 32, "--role operator --name", "n" * 65, *key],
            2,
            "invalid-field",
        ),
        (
            "not the root",
            [
                "grant",
                *base,
                "--subject",
                "25" * 32,
                "--role operator --name o --key",
                other,
                "--passphrase-env PW --anchor",
                ledger.anchor.hex(),
            ],
            1,
            "unauthorized-signer",
        ),
        (
            "grant the root",
            ["grant", *base, "--subject", ledger.anchor.hex(), "--role operator --name r", *key],
            1,
            "invalid-field",
        ),
        (
            "forged request",
            ["grant", *base, "--request", tampered, "--role device", *key],
            3,
            "bad-message",
        ),
        ("two targets", ["revoke", *base, "3 --name twin --reason lost", *key], 2, "usage"),
        ("no key", ["grant", *base, "--subject", "26" * 32, "--role operator --name k"], 2, "usage"),
        (
            "missing key file",
            [
                "grant",
                *base,
                "--subject",
                "26" * 32,
                "--role operator --name k --key",
                tmp / "nope.key",
                "--passphrase-env PW",
            ],
            1,
            "bad-key-file",
        ),
        ("second genesis", ["genesis", *base, "--origin", ORIGIN, *key], 1, "misplaced-genesis"),
        ("bad flag", ["grant --frobnicate"], 2, "usage"),
        ("bad url", ["status x --server ftp://x"], 2, "usage"),
        (
            "unreachable",
            ["grant --server http://127.0.0.1:9 --subject", "27" * 32, "--role operator --name u", *key],
            4,
            "unreachable",
        ),
        ("status unknown", ["status nobody", *base], 2, "unknown-name"),
    ]
    for label, argv, code, error in cases:
        before = srv.size()
        r = writ(*argv)
        assert (r.code, r.doc["error"]) == (code, error), (label, r.doc, r.err)
        assert len(r.err.strip().splitlines()) >= 1, label
        assert srv.size() == before, label
        assert PW not in r.err and "not the passphrase" not in r.err, label


def test_ambiguous_name_lists_the_candidates(writ: Writ, ledger: Ledger) -> None:
    srv = ledger.srv
    for b in ("31", "32"):
        writ.ok("grant --server", srv.url, "--subject", b * 32, "--role operator --name twin", *ledger.key())
    before = srv.size()
    r = writ("revoke --server", srv.url, "--name twin --reason lost", *ledger.key())
    assert (r.code, r.doc["error"]) == (2, "ambiguous-name")
    assert [c["seq"] for c in r.doc["candidates"]] == [2, 3]
    assert srv.size() == before
    st = writ.ok("status twin --server", srv.url)
    assert [c["status"] for c in st["credentials"]] == ["active", "active"]


def test_push_of_a_bad_file_appends_nothing(writ: Writ, ledger: Ledger) -> None:
    tmp = ledger.tmp
    (tmp / "garbage.records").write_bytes(b"\x93\x01\x02")
    r = writ("push --server", ledger.srv.url, tmp / "garbage.records")
    assert (r.code, r.doc["error"]) == (3, "bad-message")
    # a correctly signed record whose signature was altered: caught locally, never sent
    root = ledger.root_signer()
    raw = bytearray(_grant_on_head(ledger.srv, root, "x"))
    raw[-1] ^= 1
    (tmp / "bad.records").write_bytes(encoding.pack_records([bytes(raw)]))
    posted: list[str] = []
    ledger.srv.pre_hooks.append(lambda m, p, b: posted.append(p) if m == "POST" else None)
    r2 = writ("push --server", ledger.srv.url, tmp / "bad.records")
    assert (r2.code, r2.doc["error"]) == (1, "bad-signature") and not posted
    assert ledger.srv.size() == 2


def test_key_commands(writ: Writ, tmp_path: Path) -> None:
    k = writ.ok("key init --out", tmp_path / "op.key", "--passphrase-env PW --role operator")
    p = writ.ok("key public", tmp_path / "op.key")
    assert p["public_key"] == k["public_key"] and p["ssh_fingerprint"].startswith("SHA256:")
    assert stat.S_IMODE((tmp_path / "op.key").stat().st_mode) == 0o600
    r = writ("key public", tmp_path / "missing.key")
    assert (r.code, r.doc["error"]) == (1, "bad-key-file")


def test_human_output_on_a_terminal(writ: Writ, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a terminal on stderr: progress, tables; names are text, never rich markup."""
    import io

    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(common, "console", lambda: Console(file=screen, force_terminal=True, width=200))
    srv = ledger.srv
    writ.ok(
        "grant --server",
        srv.url,
        "--subject",
        "41" * 32,
        "--role operator --name [/oops][red]x",
        *ledger.key(),
    )
    writ.ok("revoke --server", srv.url, "2 --reason lost", *ledger.key())
    s = writ.ok("status 2 --server", srv.url)
    assert s["name"] == "[/oops][red]x" and s["status"] == "revoked"
    writ.ok("log --server", srv.url, "--anchor", ledger.anchor.hex())
    a = writ.ok("audit --server", srv.url, "--anchor", ledger.anchor.hex())
    assert a["size"] == 4
    text = screen.getvalue()
    assert "[/oops][red]x" in text and "audit OK" in text and "revoked at seq 3" in text


def test_lost_answer_is_not_a_second_append(writ: Writ, ledger: Ledger) -> None:
    """The append went through but the answer was lost (a 503 from a proxy, a timeout): the CLI
    re-syncs, finds its own bytes in the ledger, and neither fails nor signs a second grant."""
    srv = ledger.srv

    def lose(method: str, path: str, reply: Reply) -> Reply:
        if method == "POST" and reply[0] == 200:
            return (
                503,
                [("content-type", "application/problem+json")],
                b'{"type": "urn:writ:problem:overloaded"}',
            )
        return reply

    srv.post_hooks.append(lose)
    r = writ("grant --server", srv.url, "--subject", "51" * 32, "--role operator --name once", *ledger.key())
    assert r.code == 0 and r.doc["seq"] == 2 and "answer was lost" in r.err
    srv.post_hooks.clear()
    assert srv.size() == 3 and len(assert_verifies(srv).grants_named("once")) == 1


def test_offline_rotate_from_sheets(writ: Writ, ledger: Ledger) -> None:
    srv, tmp = ledger.srv, ledger.tmp
    bundle, vault, out = tmp / "l.bundle", tmp / "vault", tmp / "rotate.records"
    writ.ok("bundle export --server", srv.url, "--out", bundle)
    writ.ok("mirror import", bundle, "--anchor", ledger.anchor.hex(), "--mirror", vault)
    assert ledger.digest is not None
    assert writ.ok("mirror status --mirror", vault)["pending_digest"] == ledger.digest.hex()
    r = writ.ok(
        "sign --offline --mirror", vault, "--out", out, "rotate --successor-shares", *ledger.shares[1:],
        "--new-key-out", tmp / "new-root.key", "--passphrase-env PW --shares 2-of-3 --shares-out", tmp / "s2",
    )  # fmt: skip
    assert r["seq"] == 2 and len(r["shares"]) == 3
    assert srv.size() == 2
    writ.ok("push --server", srv.url, out)
    st = assert_verifies(srv)
    new_pub = json.loads((tmp / "new-root.key.pub.json").read_text())
    assert st.root_key == bytes.fromhex(new_pub["public_key"]) and new_pub["anchor"] == ledger.anchor.hex()
    assert st.pending_digest is not None and st.pending_digest.hex() == r["next_root_digest"]


def test_offline_sign_of_a_grant_in_force_writes_nothing(writ: Writ, ledger: Ledger) -> None:
    """``writ sign grant`` rerun by a script: the grant is already in the ledger, so no file."""
    srv, tmp = ledger.srv, ledger.tmp
    args = ["--subject", "71" * 32, "--role operator --name again", *ledger.key()]
    g = writ.ok("grant --server", srv.url, *args)
    out = tmp / "again.records"
    r = writ.ok("sign --server", srv.url, "--out", out, "grant", *args)
    assert r["existing"] is True and r["seq"] == g["seq"] and not out.exists()
    assert srv.size() == g["seq"] + 1


def test_in_process_runs_give_ctrl_c_back(writ: Writ, ledger: Ledger) -> None:
    """A landed command ignores SIGINT until it has printed; ``run`` then restores the handler
    (only ``main``, about to exit, keeps ignoring it)."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    writ.ok(
        "grant --server", ledger.srv.url, "--subject", "72" * 32, "--role operator --name back", *ledger.key()
    )
    assert signal.getsignal(signal.SIGINT) is before and before is not signal.SIG_IGN
