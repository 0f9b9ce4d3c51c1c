"""The `writ` command contract, end to end: real `writ` processes against a real `writ serve`.

- a rotate whose push outcome is uncertain keeps the new successor's share sheets;
- an audit of a truncated ledger names the first missing seq (``--server`` and ``--data``);
- a PKCS#11 PIN (or a URL password) given on the command line is echoed nowhere;
- a genesis of another root is ``wrong-anchor`` (audit, mirror import), both anchors shown;
- ``writ receipts import`` posts receipts carried from offline sites;
- ``writ serve`` refuses a corrupt ledger with the verification exit status;
- the exit-code table of ``writ --help`` is the one in docs/operations.md;
- every error name a program emits is declared in ``ledger/errors.py``.

A small threaded proxy plays the network between the CLI and the server: it
can drop the answer of a POST after forwarding it and then refuse everything
(a server that accepted the append and died), or serve fewer records than the
checkpoint names (a truncated ledger).
"""

from __future__ import annotations

import ast
import contextlib
import http.server
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger import encoding, errors, messages, records
from ledger.cli.main import EXIT_CODES
from ledger.crypto import SeedSigner
from tests.helpers.keys import SO_PIN, requires_softhsm
from tests.helpers.server import (
    Mirror,
    RunningServer,
    backup_data_dir,
    make_ledger,
    running_server,
    served_records,
    stop_server,
    writ_command,
)

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "ledger.example/plant-7"
PW = "correct horse battery"


# --- running writ -----------------------------------------------------------------------


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err
        lines = out.strip().splitlines()
        assert len(lines) == 1, f"one JSON line on stdout, got {out!r} (stderr {err!r})"
        self.doc: dict[str, Any] = json.loads(lines[0])
        assert "Traceback" not in err, err


def writ(*args: object, cwd: Path | None = None, timeout: float = 60.0) -> Run:
    """Run ``writ``; a ``str`` argument is split on spaces, anything else (a Path) is one word."""
    words: list[str] = []
    for a in args:
        words.extend(a.split() if isinstance(a, str) else [str(a)])
    proc = subprocess.run(
        [*writ_command(), *words], capture_output=True, timeout=timeout, check=False, cwd=cwd
    )
    return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def ok(*args: object, cwd: Path | None = None) -> dict[str, Any]:
    r = writ(*args, cwd=cwd)
    assert r.code == 0, (r.doc, r.err)
    return r.doc


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment every `writ` process inherits (mirrors under tmp_path, cheap key files)."""
    monkeypatch.setenv("WRIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PW", PW)
    monkeypatch.setenv("ROOT_PASSPHRASE", PW)
    monkeypatch.setenv("ONCALL_PASSPHRASE", PW)
    monkeypatch.setenv("WRIT_KDF_COST", "interactive")
    monkeypatch.delenv("WRIT_ANCHOR", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return tmp_path


def post(url: str, raws: list[bytes]) -> dict[str, Any]:
    r = httpx.post(
        url + "/v1/records",
        content=encoding.pack_records(raws),
        headers={"Content-Type": "application/msgpack"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


@pytest.fixture
def served(env: Path) -> Iterator[tuple[RunningServer, SeedSigner]]:
    """A real server whose ledger holds a genesis, the log grant and four operator grants."""
    root = SeedSigner.generate()
    with running_server(env, root.public_key, ORIGIN) as srv:
        post(srv.url, make_ledger(root, ORIGIN, srv.log_public_key, n_grants=4))
        yield srv, root


# --- a proxy that plays the network ---------------------------------------------------------


class Proxy:
    """Forwards to ``upstream``. ``die_after_post``: the first POST /v1/records is forwarded,
    its answer dropped, and every later request refused (the connection closed unanswered).
    ``records_limit``: ``GET /v1/records`` serves no record at or beyond that seq."""

    def __init__(self, upstream: str, *, die_after_post: bool = False, records_limit: int | None = None):
        self.upstream = upstream
        self.die_after_post = die_after_post
        self.records_limit = records_limit
        self.dead = False
        self.posts = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self, "GET")

            def do_POST(self) -> None:
                proxy.handle(self, "POST")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        if self.dead:
            h.close_connection = True  # no answer at all
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("content-type", "accept")}
        r = httpx.request(method, self.upstream + h.path, content=body, headers=headers, timeout=30)
        content = r.content
        if method == "POST" and h.path.startswith("/v1/records"):
            self.posts += 1
            if self.die_after_post:
                self.dead = True  # the append went through; its answer never comes back
                h.close_connection = True
                return
        if method == "GET" and h.path.startswith("/v1/records") and self.records_limit is not None:
            start = int(re.search(r"start=(\d+)", h.path).group(1))  # type: ignore[union-attr]
            raws = encoding.unpack_records(content, max_count=1000)
            content = encoding.pack_records(raws[: max(0, self.records_limit - start)])
        h.send_response(r.status_code)
        h.send_header("Content-Type", r.headers.get("content-type", "application/octet-stream"))
        h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        h.wfile.write(content)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for p in made:
        p.close()


# --- #7: the rotate's share sheets ------------------------------------------------------------


@contextlib.contextmanager
def successor_ready(env: Path) -> Iterator[tuple[RunningServer, bytes]]:
    """A root with successor sheets (root.key, s1/), a served ledger it opened, and the
    successor recovered from two sheets into succ.key; yields (server, anchor)."""
    init = ok(
        "root init --out", env / "root.key", "--passphrase-env PW --shares 2-of-3 --shares-out", env / "s1"
    )
    anchor = bytes.fromhex(init["anchor"])
    with running_server(env, anchor, ORIGIN) as srv:
        ok("genesis --origin", ORIGIN, "--server", srv.url, "--key", env / "root.key", "--passphrase-env PW")
        ok(
            "root recover --shares", *init["shares"][:2], "--expect-digest", init["next_root_digest"],
            "--anchor", anchor.hex(), "--out", env / "succ.key", "--passphrase-env PW",
        )  # fmt: skip
        yield srv, anchor


def test_rotate_whose_answer_is_lost_keeps_the_new_share_sheets(env: Path, proxies: list[Proxy]) -> None:
    """The server appends the rotate and dies before answering; the check-back fails too. The
    rotate committed to the new sheets' digest, so deleting them would leave a root that can
    never rotate again: they stay, and the error says where they are and how to confirm."""
    with successor_ready(env) as (srv, anchor):
        proxy = Proxy(srv.url, die_after_post=True)
        proxies.append(proxy)
        r = writ(
            "rotate --server", proxy.url, "--successor-key", env / "succ.key", "--passphrase-env PW",
            "--shares 2-of-3 --shares-out", env / "s2",
        )  # fmt: skip
        assert proxy.posts == 1
        assert (r.code, r.doc["error"]) == (4, "unreachable"), (r.doc, r.err)
        kept = r.doc["shares_kept"]
        assert len(kept) == 3 and all(Path(p).is_file() for p in kept)
        assert sorted(kept) == sorted(str(p) for p in (env / "s2").iterdir())
        for text in (r.doc["message"], r.err):
            assert str(env / "s2") in text and "KEPT" in text and "writ log --server" in text

        # the rotate did land: the ledger commits to exactly the kept sheets, which rotate again
        log = ok("log --server", srv.url, "--anchor", anchor.hex(), "--kind rotate")
        assert [e["kind"] for e in log["records"]] == ["rotate"]
        assert log["records"][0]["next_root_digest"] == r.doc["next_root_digest"]
        again = ok(
            "rotate --server", srv.url, "--successor-shares", *kept[:2], "--out", env / "third.key",
            "--passphrase-env PW --no-successor",
        )  # fmt: skip
        assert again["seq"] == 3


def test_rotate_refused_by_the_server_removes_the_unused_sheets(env: Path, proxies: list[Proxy]) -> None:
    """A 4xx answer means nothing was appended: the sheets of a successor nobody committed to go."""
    with successor_ready(env) as (srv, _):
        # a writer that got in first: the rotate is refused (stale-head, twice), nothing appended
        root = load_root(env / "root.key")

        class Racer(Proxy):
            def handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
                if method == "POST":
                    m = Mirror(root, ORIGIN)
                    m.extend(served_records(srv.url))
                    post(srv.url, [m.grant(os.urandom(32), "operator", f"racer-{self.posts}")])
                    self.posts += 1
                super().handle(h, method)

        racer = Racer(srv.url)
        proxies.append(racer)
        r = writ(
            "rotate --server", racer.url, "--successor-key", env / "succ.key", "--passphrase-env PW",
            "--shares 2-of-3 --shares-out", env / "s2",
        )  # fmt: skip
        assert (r.code, r.doc["error"]) == (1, "stale-head"), (r.doc, r.err)
        assert "shares_kept" not in r.doc and not list((env / "s2").glob("share-*"))


def load_root(path: Path) -> SeedSigner:
    from ledger.signers import load_key_file

    signer = load_key_file(path, PW.encode())
    assert isinstance(signer, SeedSigner)
    return signer


# --- #8: a truncated ledger -------------------------------------------------------------------


def test_audit_of_a_truncated_ledger_names_the_first_missing_seq(
    served: tuple[RunningServer, SeedSigner], env: Path, proxies: list[Proxy]
) -> None:
    srv, root = served
    anchor = root.public_key.hex()
    assert ok("audit --server", srv.url, "--anchor", anchor)["size"] == 6

    # --server: the checkpoint names 6 records, the server serves 4
    proxy = Proxy(srv.url, records_limit=4)
    proxies.append(proxy)
    r = writ("audit --server", proxy.url, "--anchor", anchor, "--json")
    assert (r.code, r.doc["error"], r.doc["seq"]) == (3, "rollback", 4), r.doc
    assert "record 4 is missing" in r.doc["message"]

    # --data: the last two rows deleted from a copy of the database
    data = backup_data_dir(srv.data_dir, env / "truncated")
    db = sqlite3.connect(data / "ledger.db")
    db.execute("DELETE FROM records WHERE seq >= 4")
    db.commit()
    db.close()
    r = writ("audit --data", data, "--anchor", anchor, "--json")
    assert r.code == 3 and r.doc["seq"] == 4, r.doc
    # the server's own loader names what is wrong with the stored ledger
    assert (r.doc["error"], r.doc["cause"]) == ("missing-record", "missing-record")


# --- #9: secrets in URIs ------------------------------------------------------------------------

SECRET_PIN = "Zq7-pin-93Xw"


@requires_softhsm
def test_pkcs11_pin_in_the_uri_is_echoed_nowhere(env: Path, softhsm: str) -> None:
    """Every path that echoes a URI: the JSON result, an error naming the token, argparse
    quoting a bad argument, a file name that is a URI, and a password in a server URL."""
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "writ-pin", "--pin", SECRET_PIN,
         "--so-pin", SO_PIN],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    init = ok(
        "root init --out", env / "root.key", "--passphrase-env PW --shares 2-of-3 --shares-out", env / "s"
    )
    uri = f"pkcs11:token=writ-pin?pin-value={SECRET_PIN}"
    recover = ["root recover --shares", *init["shares"][:2], "--expect-digest", init["next_root_digest"]]
    runs = [
        writ(*recover, "--pkcs11", uri, "--label", "successor"),  # success: the URI is in the JSON
        writ(*recover, "--pkcs11", uri.replace("writ-pin", "no-such-token"), "--label", "x"),
        writ(*recover, "--pkcs11", uri, "--label", "successor", "--cost", uri),  # argparse quotes it
        writ(
            "root recover --expect-digest", init["next_root_digest"], "--out", env / "x.key", "--shares", uri
        ),
        writ("key init --out", env / "k.key", "--passphrase-env PW"),
        writ("key import-token --key", env / "k.key", "--passphrase-env PW --pkcs11", uri, "--label k2"),
        writ("audit --anchor", "11" * 32, "--server", f"http://writ:{SECRET_PIN}@127.0.0.1:9"),
    ]
    assert runs[0].code == 0 and runs[0].doc["pkcs11"] == "pkcs11:token=writ-pin?pin-value=REDACTED"
    assert [r.code for r in runs[1:]] == [1, 2, 2, 0, 0, 4], [(r.doc, r.err) for r in runs]
    assert "REDACTED" in runs[2].doc["message"] and "REDACTED" in runs[3].doc["message"]
    assert "writ:REDACTED@" in runs[6].doc["message"]
    for r in runs:
        assert SECRET_PIN not in r.out and SECRET_PIN not in r.err, (r.out, r.err)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("pkcs11:token=writ;object=root?pin-value=4711", "pkcs11:token=writ;object=root?pin-value=REDACTED"),
        (
            "pkcs11:token=a?module-path=/m.so&pin-value=4711",
            "pkcs11:token=a?module-path=/m.so&pin-value=REDACTED",
        ),
        ("https://bob:4711@ledger.example/x", "https://bob:REDACTED@ledger.example/x"),
        (
            "https://ledger.example/v1?api_key=4711&start=3",
            "https://ledger.example/v1?api_key=REDACTED&start=3",
        ),
        (
            "no such share file pkcs11:token=t?PIN-VALUE=4711 here",
            "no such share file pkcs11:token=t?PIN-VALUE=REDACTED here",
        ),
        ("pkcs11:token=writ;object=root;id=%01", "pkcs11:token=writ;object=root;id=%01"),  # nothing secret
        ("grant tablet-07 seq 3, root 0f42…", "grant tablet-07 seq 3, root 0f42…"),
    ],
)
def test_redact_hides_the_secrets_of_uris_and_keeps_the_rest(text: str, shown: str) -> None:
    from ledger.redact import redact

    assert redact(text) == shown and redact(shown) == shown


# --- wrong anchor -----------------------------------------------------------------------------


def test_wrong_anchor_is_named_as_such_in_audit_and_mirror_import(
    served: tuple[RunningServer, SeedSigner], env: Path
) -> None:
    srv, root = served
    wrong = "11" * 32
    for source in (["--server", srv.url], ["--data", srv.data_dir]):
        r = writ("audit", *source, "--anchor", wrong, "--json")
        assert (r.code, r.doc["error"], r.doc["seq"]) == (3, "wrong-anchor", 0), r.doc
        assert (r.doc["anchor"], r.doc["genesis_root"]) == (wrong, root.public_key.hex())
        assert wrong in r.err and root.public_key.hex() in r.err and "bad-signature" not in r.err

    ok("bundle export --server", srv.url, "--anchor", root.public_key.hex(), "--out", env / "l.bundle")
    r = writ("mirror import", env / "l.bundle", "--anchor", wrong, "--mirror", env / "vault")
    assert (r.code, r.doc["error"], r.doc["seq"]) == (3, "wrong-anchor", 0), r.doc
    assert wrong in r.doc["message"] and root.public_key.hex() in r.doc["message"]
    assert not (env / "vault" / "state.bin").exists()
    assert ok("mirror import", env / "l.bundle", "--anchor", root.public_key.hex(), "--mirror", env / "vault")


# --- receipts from offline sites ------------------------------------------------------------


def device_sim(*args: object) -> dict[str, Any]:
    """``python -m device_sim``; a ``str`` argument is split on spaces, a Path is one word."""
    words = [w for a in args for w in (a.split() if isinstance(a, str) else [str(a)])]
    proc = subprocess.run(
        [sys.executable, "-m", "device_sim", *words],
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    doc: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return doc


def test_receipts_of_a_usb_only_site_are_carried_and_imported(env: Path) -> None:
    """A device synced from a bundle leaves its signed receipt beside the bundle; `writ receipts
    import` posts it, so the site is not a straggler forever. Per-file errors are reported."""
    root, stranger = SeedSigner.generate(), SeedSigner.generate()
    with running_server(env, root.public_key, ORIGIN) as srv:
        dev = device_sim(
            "device init --state", env / "plc", "--anchor", root.public_key.hex(), "--origin", ORIGIN
        )
        m = Mirror(root, ORIGIN)
        m.genesis()
        m.grant(srv.log_public_key, records.ROLE_LOG, "log")
        m.grant(bytes.fromhex(dev["public_key"]), records.ROLE_DEVICE, "plc-1")
        post(srv.url, m.records)
        bundle = env / "usb" / "site.bundle"
        bundle.parent.mkdir()
        ok("bundle export --server", srv.url, "--anchor", root.public_key.hex(), "--out", bundle)
        synced = device_sim("device sync --state", env / "plc", "--bundle", bundle)
        good = Path(synced["receipt"])
        assert good.parent == bundle.parent and good.is_file()
        before = httpx.get(srv.url + "/v1/fleet", timeout=10).json()

        forged = env / "forged.receipt"
        forged.write_bytes(messages.make_receipt(stranger, 2, m.state.size, m.state.root, int(time.time())))
        junk = env / "junk.receipt"
        junk.write_bytes(b"not a receipt")
        r = writ("receipts import --server", srv.url, good, forged, junk, env / "missing.receipt")
        assert r.code != 0 and (r.doc["imported"], r.doc["failed"]) == (1, 3), r.doc
        by_file = {Path(x["file"]).name: x for x in r.doc["receipts"]}
        assert by_file[good.name]["accepted"] is True and by_file[good.name]["device_grant_seq"] == 2
        assert by_file["forged.receipt"]["error"] == "bad-signature"
        assert by_file["junk.receipt"]["error"] == "bad-message"
        assert by_file["missing.receipt"]["error"] == "usage"
        assert r.doc["error"] == "bad-signature" and "3 of 4" in r.doc["message"]
        after = httpx.get(srv.url + "/v1/fleet", timeout=10).json()
        assert after != before

        again = ok("receipts import --server", srv.url, good)
        assert (again["imported"], again["failed"]) == (1, 0)


# --- writ serve and exit codes ----------------------------------------------------------------


def test_serve_refuses_a_corrupt_ledger_with_the_verification_status(
    served: tuple[RunningServer, SeedSigner], env: Path
) -> None:
    srv, root = served
    stop_server(srv)
    db = sqlite3.connect(srv.data_dir / "ledger.db")
    (raw,) = db.execute("SELECT raw FROM records WHERE seq = 3").fetchone()
    db.execute("UPDATE records SET raw = ? WHERE seq = 3", (raw[:-1] + bytes([raw[-1] ^ 1]),))
    db.commit()
    db.close()
    proc = subprocess.run(
        [*writ_command(), "serve", "--data", str(srv.data_dir), "--port", "0"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    doc = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert (proc.returncode, doc["error"], doc["seq"]) == (3, "corrupt-ledger", 3), (doc, proc.stderr)
    audit = writ("audit --data", srv.data_dir, "--anchor", root.public_key.hex(), "--json")
    assert (audit.code, audit.doc["seq"]) == (3, 3)


def test_exit_code_table_is_in_help_and_in_the_docs() -> None:
    help_text = subprocess.run(
        [*writ_command(), "--help"], capture_output=True, timeout=30, check=True
    ).stdout.decode()
    docs = (ROOT / "docs" / "operations.md").read_text()
    table = docs[docs.index("## 12. Exit codes") :]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", table, re.M))
    assert {int(k): v for k, v in rows.items()} == dict(EXIT_CODES)
    flat = " ".join(help_text.split())
    for code, meaning in EXIT_CODES:
        assert f"{code} {meaning}" in flat


# --- every error name is declared ------------------------------------------------------------------

#: calls that take an error name, and the position of the name among their arguments
_EMITTERS = {"refuse": 0, "Problem": 0, "problem_response": 0, "Verdict": 1}


def _emitted_names() -> set[tuple[str, str]]:
    """(file, name) for every literal error name in the shipped code: ``"error": "x"`` or
    ``"reason": "x"`` in a dict, ``refuse("x", ...)``, ``Problem("x", ...)``, ``Verdict(False, "x")``."""
    found: set[tuple[str, str]] = set()
    for package in ("ledger", "api", "device_sim"):
        for path in (ROOT / package).rglob("*.py"):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), where)):
                if isinstance(node, ast.Dict):
                    for k, v in zip(node.keys, node.values, strict=True):
                        named = isinstance(k, ast.Constant) and k.value in ("error", "reason")
                        if named and isinstance(v, ast.Constant) and isinstance(v.value, str):
                            found.add((where, v.value))
                elif isinstance(node, ast.Call):
                    fn = node.func
                    name = (
                        fn.id
                        if isinstance(fn, ast.Name)
                        else fn.attr
                        if isinstance(fn, ast.Attribute)
                        else ""
                    )
                    pos = _EMITTERS.get(name)
                    if pos is not None and len(node.args) > pos:
                        a = node.args[pos]
                        if isinstance(a, ast.Constant) and isinstance(a.value, str):
                            found.add((where, a.value))
    return found


def test_every_emitted_error_name_is_registered() -> None:
    # load every module that may define an error class
    import api.app  # noqa: F401
    import device_sim.cli  # noqa: F401
    import ledger.cli.main  # noqa: F401

    registered = errors.registered_names()
    emitted = _emitted_names()
    assert len(emitted) > 10  # the scan finds the emitters
    unregistered = sorted((f, n) for f, n in emitted if n not in registered)
    assert not unregistered, f"emitted error names with no class or enum member: {unregistered}"
    # every class name resolves back to a class; HeadConflict is the protocol's stale-head
    for cls in errors.error_classes():
        assert errors.by_type(cls.type) is not None
    assert issubclass(errors.HeadConflict, errors.StaleHead) and errors.HeadConflict.type == "stale-head"
    assert errors.by_type("stale-head") is errors.StaleHead
    # nginx's problem types are declared too
    nginx = (ROOT / "deploy" / "nginx" / "writ.conf").read_text()
    assert set(re.findall(r"urn:writ:problem:([a-z-]+)", nginx)) <= registered
    # every HTTP-level problem has a title, every credential refusal is in precedence order
    from api.problems import TITLES
    from ledger.credential import REFUSALS

    assert set(errors.HttpProblem) <= set(TITLES)
    assert list(REFUSALS) == list(errors.CredentialRefusal)


def test_device_sim_errors_have_the_same_shape_as_writs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "device_sim", "device", "status", "--state", str(tmp_path / "none")],
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    doc = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert (
        proc.returncode != 0 and isinstance(doc["error"], str) and doc["error"] in errors.registered_names()
    )
    assert doc["message"] and doc["detail"] == doc["message"]
