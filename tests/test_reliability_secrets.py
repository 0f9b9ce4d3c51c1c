"""No private key byte leaves its key file (docs/threats.md: whoever steals the server
or its database, or listens on the wire, gets only public data).

One whole scenario through the real programs: ``writ root init`` with 2-of-3
shares, ``writ serve``, genesis, two devices enrolled and granted from their
requests, a tablet and an on-call revoker granted, the tablet revoked with the
revoker key, device syncs and receipts, the root rotated to its successor
rebuilt from two shares, a grant by the new root, status, audit, log, show,
bundle export, and ``writ root recover`` of the next successor. All client
traffic goes through a recording TCP proxy, and every API route is read once
more through it at the end.

Then every private key of the scenario (root, successor, next successor,
revoker, tablet, log, both devices) is looked for, as raw bytes, hex (both
cases), base64 and base64url (every alignment), in: the SQLite database and
its ``-wal`` (while serving and after), the server's log (run at debug level),
the recorded traffic both ways, every CLI's stdout and stderr, the mirror
directories, the devices' state files, and the bundle. None is found. Key
files and share sheets are 0600; neither the passphrases nor the share words
are ever echoed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from ledger.signers.file import load_key_file
from tests.helpers.lost_tablet import tell_with_the_cli
from tests.helpers.server import running_server, writ_command

pytestmark = pytest.mark.e2e

ORIGIN = "ledger.example/secrets"
PW = "Tr0ub4dor&3 correct horse"
SPW = "share phrase 7f3a"


# --- a recording proxy ---------------------------------------------------------------


@dataclass
class Transcript:
    up: bytearray = field(default_factory=bytearray)  # client -> server
    down: bytearray = field(default_factory=bytearray)  # server -> client


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that keeps every byte of every connection, both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.transcripts: list[Transcript] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                t = Transcript()
                outer.transcripts.append(t)
                client: socket.socket = self.request
                with contextlib.suppress(OSError), socket.create_connection(outer.target) as upstream:
                    pump = threading.Thread(target=_pump, args=(upstream, client, t.down), daemon=True)
                    pump.start()
                    _pump(client, upstream, t.up)
                    pump.join(30)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def bytes_both_ways(self) -> Iterator[tuple[str, bytes]]:
        for i, t in enumerate(self.transcripts):
            yield f"traffic {i} up", bytes(t.up)
            yield f"traffic {i} down", bytes(t.down)


def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
    with contextlib.suppress(OSError):
        while True:
            data = src.recv(65536)
            if not data:
                break
            record += data
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


# --- what a secret looks like ------------------------------------------------------


def _b64_fragments(secret: bytes, alphabet: str) -> list[bytes]:
    """Base64 text that appears whenever ``secret`` is base64-encoded inside any larger
    byte string, whatever its alignment: the whole groups made only of secret bytes."""
    out = []
    for k in range(3):
        enc = base64.b64encode(bytes(k) + secret)
        if alphabet == "url":
            enc = enc.replace(b"+", b"-").replace(b"/", b"_")
        start = 4 if k else 0
        end = 4 * ((k + len(secret)) // 3)
        out.append(enc[start:end])
    return out


def encodings(secret: bytes) -> dict[str, list[bytes]]:
    return {
        "raw": [secret],
        "hex": [secret.hex().encode()],
        "HEX": [secret.hex().upper().encode()],
        "base64": _b64_fragments(secret, "std"),
        "base64url": _b64_fragments(secret, "url"),
    }


def expanded_scalar(seed: bytes) -> bytes:
    """The clamped Ed25519 secret scalar derived from a seed (RFC 8032 5.1.5)."""
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return bytes(h)


@dataclass
class Needle:
    name: str  # e.g. "root seed as base64"
    pattern: bytes


def needles(keys: dict[str, bytes], texts: dict[str, str]) -> list[Needle]:
    out: list[Needle] = []
    for name, seed in keys.items():
        assert len(seed) == 32
        for what, value in (("seed", seed), ("scalar", expanded_scalar(seed))):
            for enc, pats in encodings(value).items():
                out += [Needle(f"{name} {what} as {enc}", p) for p in pats]
    for name, text in texts.items():
        out.append(Needle(name, text.encode()))
    return out


def dechunk(data: bytes) -> bytes:
    """HTTP/1.1 chunk framing removed (approximately: good enough to join split bodies)."""
    return re.sub(rb"\r\n[0-9a-fA-F]{1,8}\r\n", b"", data)


def find_leaks(sources: Iterable[tuple[str, bytes]], pins: list[Needle]) -> list[str]:
    leaks = []
    for where, data in sources:
        for variant in (data, dechunk(data)):
            for n in pins:
                if n.pattern in variant:
                    leaks.append(f"{n.name} found in {where}")
    return sorted(set(leaks))


# --- the scenario ----------------------------------------------------------------------


@dataclass
class Outputs:
    items: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, what: str, data: bytes) -> None:
        self.items.append((what, data))


def test_no_private_key_byte_escapes_a_whole_scenario(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WRIT_HOME": str(tmp_path / "home"),
        "PW": PW,
        "SPW": SPW,
        "WRIT_KDF_COST": "interactive",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("WRIT_ANCHOR", None)
    outputs = Outputs()

    def run(cmd: list[str], code: int = 0, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        p = subprocess.run(
            cmd,
            capture_output=True,
            timeout=120,
            check=False,
            env={**env, **(extra_env or {})},
            stdin=subprocess.DEVNULL,
        )
        outputs.add(f"stdout of {' '.join(cmd[-6:])}", p.stdout)
        outputs.add(f"stderr of {' '.join(cmd[-6:])}", p.stderr)
        assert b"Traceback" not in p.stderr, p.stderr.decode()[-2000:]
        lines = p.stdout.decode().strip().splitlines()
        doc: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        assert p.returncode == code, (cmd, doc, p.stderr.decode()[-2000:])
        return doc

    def writ(*args: object, code: int = 0, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        return run([*writ_command(), *map(str, args)], code, extra_env)

    def device(*args: object) -> dict[str, Any]:
        return run([sys.executable, "-m", "device_sim", *map(str, args)])

    root_key, succ_key, next_key = tmp_path / "root.key", tmp_path / "successor.key", tmp_path / "next.key"
    init = writ(
        "root",
        "init",
        "--out",
        root_key,
        "--passphrase-env",
        "PW",
        "--shares",
        "2-of-3",
        "--shares-out",
        tmp_path / "shares",
        "--share-passphrase-env",
        "SPW",
    )
    anchor = init["anchor"]
    key = ["--key", root_key, "--passphrase-env", "PW"]

    with running_server(
        tmp_path, bytes.fromhex(anchor), ORIGIN, checkpoint_interval=1, log_level="debug"
    ) as srv:
        proxy = RecordingProxy(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
        stdout = _drain(srv.process.stdout)  # only the JSON line; every log line goes to stderr
        url = proxy.url
        try:
            writ("genesis", "--origin", ORIGIN, "--server", url, *key)
            devices = [tmp_path / "plc-1", tmp_path / "plc-2"]
            story = tell_with_the_cli(
                writ, device, url=url, anchor=anchor, origin=ORIGIN, root_key=key, workdir=tmp_path,
                devices={f"plc-{i}": d for i, d in enumerate(devices)}, passphrase_env="PW",
            )  # fmt: skip
            oncall_env = story.oncall_env
            sheets = sorted((tmp_path / "shares").iterdir())
            writ(
                "rotate",
                "--server",
                url,
                "--successor-shares",
                sheets[0],
                sheets[2],
                "--successor-share-passphrase-env",
                "SPW",
                "--out",
                succ_key,
                "--passphrase-env",
                "PW",
                "--shares",
                "2-of-3",
                "--shares-out",
                tmp_path / "shares-next",
                "--share-passphrase-env",
                "SPW",
            )
            writ(
                "grant",
                "--server",
                url,
                "--subject",
                os.urandom(32).hex(),
                "--role",
                "operator",
                "--name",
                "after-rotate",
                "--key",
                succ_key,
                "--passphrase-env",
                "PW",
            )
            for d in devices:
                device("device", "sync", "--state", d, "--server", url)
                device("device", "receipt", "--state", d, "--server", url)
                device("device", "status", "--state", d)
            writ("status", "tablet-07", "--server", url, extra_env=oncall_env)
            writ("audit", "--server", url, "--anchor", anchor, "--json")
            writ("log", "--server", url, "--anchor", anchor)
            writ("show", "1", "--server", url)
            writ("bundle", "export", "--server", url, "--out", tmp_path / "site.bundle")
            next_sheets = sorted((tmp_path / "shares-next").iterdir())
            digest = _digest_from_sheet(next_sheets[0])
            writ(
                "root",
                "recover",
                "--shares",
                next_sheets[1],
                next_sheets[2],
                "--expect-digest",
                digest,
                "--share-passphrase-env",
                "SPW",
                "--out",
                next_key,
                "--passphrase-env",
                "PW",
            )
            api = _read_every_route(url, tmp_path)
            db = srv.data_dir / "ledger.db"
            while_serving = [
                (f"{p.name} while serving", p.read_bytes()) for p in db.parent.glob("ledger.db*")
            ]
        finally:
            proxy.close()
    data_dir = srv.data_dir
    writ("audit", "--data", data_dir, "--anchor", anchor, "--json")
    after = [(f"{p.name} after stopping", p.read_bytes()) for p in data_dir.glob("ledger.db*")]
    assert any("wal" in w for w, _ in while_serving)

    # the private keys of the scenario
    keys = {
        "root": load_key_file(root_key, PW.encode()).seed(),
        "successor": load_key_file(succ_key, PW.encode()).seed(),
        "next successor": load_key_file(next_key, PW.encode()).seed(),
        "revoker": load_key_file(tmp_path / "oncall.key", PW.encode()).seed(),
        "tablet": load_key_file(tmp_path / "tablet.key", PW.encode()).seed(),
        "log": bytes.fromhex(json.loads((data_dir / "log.key").read_text())["seed"]),
    }
    for d in devices:
        keys[d.name] = bytes.fromhex((d / "device.key").read_text().strip())
    assert len(set(keys.values())) == len(keys)
    words = {
        f"share words of {p.parent.name}/{p.name}": _words(p)
        for p in [*sorted((tmp_path / "shares").iterdir()), *sorted((tmp_path / "shares-next").iterdir())]
    }
    pins = needles(keys, {"the key passphrase": PW, "the share passphrase": SPW, **words})

    sources: list[tuple[str, bytes]] = [
        *while_serving,
        *after,
        *proxy.bytes_both_ways(),
        *api,
        *outputs.items,
    ]
    logs = [(f"server log {p.name}", p.read_bytes()) for p in data_dir.parent.glob("serve-*.log")]
    logs.append(("server stdout", bytes(stdout)))
    everything = b"".join(text for _, text in logs)
    assert all(logs) and b"DEBUG" in everything and b"POST /v1/receipts" in everything
    sources += logs
    for home in (tmp_path / "home", tmp_path / "oncall-home"):
        sources += [
            (f"mirror file {p.relative_to(tmp_path)}", p.read_bytes()) for p in home.rglob("*") if p.is_file()
        ]
    for d in devices:
        sources += [
            (f"device file {p.relative_to(tmp_path)}", p.read_bytes())
            for p in d.iterdir()
            if p.name != "device.key"
        ]
    sources.append(("the bundle", (tmp_path / "site.bundle").read_bytes()))
    # the passphrase-protected key files hold their key encrypted only
    for f in ("root.key", "successor.key", "next.key", "oncall.key", "tablet.key"):
        sources += [(f, (tmp_path / f).read_bytes()), (f + ".pub.json", _maybe(tmp_path / (f + ".pub.json")))]

    assert sum(len(t.up) + len(t.down) for t in proxy.transcripts) > 10_000  # the proxy saw the scenario
    assert any(b"POST /v1/receipts" in t.up for t in proxy.transcripts)
    assert find_leaks(sources, pins) == []

    # the scanner itself finds a planted key in every encoding (it is not blind)
    planted = keys["root"]
    for enc, pats in encodings(planted).items():
        blob = b"junk " + (pats[0] if enc == "raw" else pats[-1]) + b" junk"
        assert find_leaks([("planted", blob)], needles({"root": planted}, {})), enc
    b64 = base64.b64encode(b"xy" + planted + b"z")
    assert find_leaks([("planted", b64)], needles({"root": planted}, {}))

    # key files and share sheets: owner only
    secret_files = [
        root_key,
        succ_key,
        next_key,
        tmp_path / "oncall.key",
        tmp_path / "tablet.key",
        data_dir / "log.key",
    ]
    secret_files += [d / "device.key" for d in devices]
    secret_files += [*(tmp_path / "shares").iterdir(), *(tmp_path / "shares-next").iterdir()]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in secret_files}
    assert set(modes.values()) == {"0o600"}, modes


def _drain(pipe: IO[bytes] | None) -> bytearray:
    """Read ``pipe`` to its end in a thread; the bytes so far."""
    buf = bytearray()

    def run() -> None:
        with contextlib.suppress(ValueError, OSError):
            while pipe is not None and (chunk := os.read(pipe.fileno(), 65536)):
                buf.extend(chunk)

    threading.Thread(target=run, daemon=True).start()
    return buf


def _maybe(p: Path) -> bytes:
    return p.read_bytes() if p.exists() else b""


def _words(sheet: Path) -> str:
    """The first eight words of a share sheet's mnemonic, as one would type them."""
    grid = sheet.read_text().split("Words (", 1)[1]
    numbered = sorted((int(n), w) for n, w in re.findall(r"(\d+)\.\s+([a-z]+)", grid))
    assert len(numbered) >= 20
    return " ".join(w for _, w in numbered[:8])


def _digest_from_sheet(sheet: Path) -> str:
    m = re.search(r"Successor key digest.*?\n\s+([0-9a-f]{64})", sheet.read_text(), flags=re.DOTALL)
    assert m is not None
    return m.group(1)


def _read_every_route(url: str, tmp_path: Path) -> list[tuple[str, bytes]]:
    """Every read route once (through the proxy), bodies kept."""
    out: list[tuple[str, bytes]] = []
    with httpx.Client(timeout=30) as c:
        ledger = c.get(url + "/v1/ledger").json()
        size = ledger["size"]
        paths = [
            "/",
            "/openapi.json",
            "/metrics",
            "/healthz",
            "/v1/ledger",
            "/v1/fleet",
            "/checkpoint",
            "/v1/records",
            "/v1/credentials?name=tablet-07",
            "/v1/credentials?role=revoker",
            "/v1/credentials/1",
            f"/v1/proof/inclusion?index=1&size={size}",
            f"/v1/proof/consistency?old=2&new={size}",
            f"/tile/entries/000.p/{size}",
            f"/tile/0/000.p/{size}",
            "/v1/nope",
        ]
        for p in paths:
            r = c.get(url + p)
            assert r.status_code < 500, (p, r.status_code)
            out.append((f"GET {p}", r.content))
        with c.stream("GET", url + "/v1/events?records=1", headers={"Last-Event-ID": "0"}) as r:
            buf = b""
            deadline = time.monotonic() + 5
            for chunk in r.iter_bytes():
                buf += chunk
                if b"event: checkpoint" in buf or time.monotonic() > deadline:
                    break
            out.append(("GET /v1/events", buf))
    return out
