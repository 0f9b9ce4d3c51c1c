"""deploy/nginx/writ.conf, for real: Debian's nginx in front of a real ``writ serve``.

nginx runs as a plain subprocess of the test (never as a system service) with a
throw-away prefix: its own nginx.conf wrapping the site file rendered with this
test's listen port, upstream and cache directory, and every temp path, log and
pid file under ``tmp_path``. Skipped, with the reason, when nginx is missing.

What it shows: full tiles and entry bundles are served from nginx's cache (the
first fetch a MISS, then HITs with the same bytes, still HITs after the server
is stopped); ``/checkpoint`` passes through less than 2 s stale; writes, receipts
and the SSE stream pass through; nginx's own refusals (too large, too fast,
upstream down) are RFC 9457 problems like the server's.

The rest of deploy/ is checked too: the backup script copies a ledger that is
being written to, audits the copy, and the copy restores into a server that
starts on it; the systemd units parse (``systemd-analyze verify``) and their
``writ serve`` command line parses; the Dockerfile copies only paths that exist
(no Docker engine here to build it) and the shell scripts parse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from api.main import build_parser
from device_sim.server_process import stop_server as stop_process
from ledger import checkpoints, encoding, messages, records
from ledger.crypto import SeedSigner
from tests.helpers.server import (
    Mirror,
    RunningServer,
    free_port,
    make_ledger,
    running_server,
    start_server,
    stop_server,
    writ_command,
)

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "deploy" / "nginx" / "writ.conf"
ORIGIN = "ledger.example/plant-7"
MSGPACK = {"Content-Type": "application/msgpack"}


def _find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


NGINX = _find_nginx()

pytestmark = pytest.mark.e2e
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")


# --- running nginx --------------------------------------------------------------


class Nginx(NamedTuple):
    url: str
    prefix: Path
    process: subprocess.Popen[bytes]


def render_site(listen: str, upstream: str, cache_dir: Path) -> str:
    """deploy/nginx/writ.conf with its three placeholders filled in (as its header says)."""
    text = SITE.read_text(encoding="utf-8")
    for placeholder in ("__LISTEN__", "__UPSTREAM__", "__CACHE_DIR__"):
        assert placeholder in text, f"{SITE} lost its {placeholder} placeholder"
    return (
        text.replace("__LISTEN__", listen)
        .replace("__UPSTREAM__", upstream)
        .replace("__CACHE_DIR__", str(cache_dir))
    )


def _main_conf(prefix: Path, site: Path) -> str:
    # As root, nginx's workers would drop to `nobody`, who cannot enter pytest's 0700 tmp dirs.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {kind}_temp_path {prefix / 'temp' / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        "    default_type application/octet-stream;\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}"
        f"    include {site};\n"
        "}\n"
    )


@contextlib.contextmanager
def running_nginx(tmp: Path, upstream_url: str, *, edits: dict[str, str] | None = None) -> Iterator[Nginx]:
    """nginx with the rendered site on a free loopback port, proxying to ``upstream_url``
    (``edits``: exact replacements in the site, to scale a limit down to a test's size)."""
    assert NGINX is not None
    prefix = tmp / f"nginx-{free_port()}"
    (prefix / "temp").mkdir(parents=True)
    (prefix / "cache").mkdir()
    port = free_port()
    site = prefix / "writ.conf"
    text = render_site(f"127.0.0.1:{port}", upstream_url.removeprefix("http://"), prefix / "cache")
    for old, new in (edits or {}).items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    site.write_text(text, encoding="utf-8")
    conf = prefix / "nginx.conf"
    conf.write_text(_main_conf(prefix, site), encoding="utf-8")
    cmd = [NGINX, "-c", str(conf), "-p", str(prefix) + "/", "-g", f"daemon off; pid {prefix / 'nginx.pid'};"]
    check = subprocess.run([*cmd, "-t"], capture_output=True, timeout=20, check=False)
    assert check.returncode == 0, check.stderr.decode()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"nginx exited with {proc.returncode}: {err}")
            try:
                httpx.get(url + "/healthz", timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx did not start listening") from None
                time.sleep(0.05)
        yield Nginx(url, prefix, proc)
    finally:
        stop_process(proc, signal.SIGQUIT, timeout=10)  # graceful: workers finish their requests
        if proc.stderr is not None:
            proc.stderr.close()


# --- the ledger -----------------------------------------------------------------


class Deployment(NamedTuple):
    server: RunningServer
    proxy: Nginx
    mirror: Mirror
    root: SeedSigner


def post_records(base: str, raws: list[bytes]) -> dict[str, Any]:
    r = httpx.post(base + "/v1/records", content=encoding.pack_records(raws), headers=MSGPACK, timeout=20)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def push_ledger(base: str, root: SeedSigner, log_key: bytes, n_grants: int) -> Mirror:
    """Genesis, the log grant and ``n_grants`` grants, POSTed through ``base`` in two batches."""
    raws = make_ledger(root, ORIGIN, log_key, n_grants)
    mirror = Mirror(root, ORIGIN)
    mirror.extend(raws)
    half = len(raws) // 2
    post_records(base, raws[:half])
    doc = post_records(base, raws[half:])
    assert doc["size"] == len(raws)
    assert doc["root"] == mirror.state.root.hex()
    return mirror


@contextlib.contextmanager
def deployment(tmp: Path, n_grants: int) -> Iterator[Deployment]:
    root = SeedSigner.generate()
    with (
        running_server(tmp, root.public_key, ORIGIN, checkpoint_interval=3600) as srv,
        running_nginx(tmp, srv.url) as proxy,
    ):
        mirror = push_ledger(proxy.url, root, srv.log_public_key, n_grants)
        yield Deployment(srv, proxy, mirror, root)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """300 grants (302 records: one full tile and a partial one) pushed through nginx."""
    with deployment(tmp_path_factory.mktemp("nginx"), 300) as d:
        yield d


def tile_headers(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, r.headers.get("x-cache-status")


# --- tests ----------------------------------------------------------------------


@needs_nginx
def test_full_tile_is_a_miss_then_a_hit_with_the_same_bytes(deployed: Deployment) -> None:
    upstream = httpx.get(deployed.server.url + "/tile/0/000", timeout=5)
    assert upstream.status_code == 200 and len(upstream.content) == 256 * 32
    first = httpx.get(deployed.proxy.url + "/tile/0/000", timeout=5)
    second = httpx.get(deployed.proxy.url + "/tile/0/000", timeout=5)
    assert tile_headers(first) == (200, "MISS")
    assert tile_headers(second) == (200, "HIT")
    assert first.content == second.content == upstream.content
    # the server's immutable Cache-Control reaches clients unchanged
    assert second.headers["cache-control"] == "public, max-age=31536000, immutable"
    # a query string is not a way around the cache
    busted = httpx.get(deployed.proxy.url + "/tile/0/000?nocache=1", timeout=5)
    assert tile_headers(busted) == (200, "HIT")
    assert busted.content == upstream.content


@needs_nginx
def test_entry_bundle_is_cached_and_holds_the_records(deployed: Deployment) -> None:
    first = httpx.get(deployed.proxy.url + "/tile/entries/000", timeout=5)
    second = httpx.get(deployed.proxy.url + "/tile/entries/000", timeout=5)
    assert tile_headers(first) == (200, "MISS")
    assert tile_headers(second) == (200, "HIT")
    assert first.content == second.content
    # uint16 length-prefixed records, the first 256 of the ledger
    out, data = [], first.content
    while data:
        n = int.from_bytes(data[:2], "big")
        out.append(data[2 : 2 + n])
        data = data[2 + n :]
    assert out == deployed.mirror.records[:256]


@needs_nginx
def test_tile_beyond_the_tree_is_404_and_not_cached(deployed: Deployment) -> None:
    for _ in range(2):
        r = httpx.get(deployed.proxy.url + "/tile/0/005", timeout=5)
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers.get("x-cache-status") == "MISS"


@needs_nginx
def test_checkpoint_through_nginx_is_current_and_less_than_2s_stale(deployed: Deployment) -> None:
    proxy, srv = deployed.proxy.url, deployed.server.url
    via = httpx.get(proxy + "/checkpoint", timeout=5)
    direct = httpx.get(srv + "/checkpoint", timeout=5)
    assert via.status_code == 200
    assert via.text == direct.text
    assert via.headers["cache-control"] == "no-cache, max-age=2"
    vc = checkpoints.verify_checkpoint(via.text, ORIGIN, [srv_log_key(deployed)])
    assert (vc.checkpoint.size, vc.checkpoint.root) == (
        deployed.mirror.state.size,
        deployed.mirror.state.root,
    )

    # a write moves the head; for the 1 s of the micro-cache (in nginx's whole seconds: less
    # than 2 s of wall time) nginx may still say the old one, after it never
    m = deployed.mirror
    grant = m.grant(SeedSigner.generate().public_key, records.ROLE_OPERATOR, "cp-check")
    post_records(proxy, [grant])
    time.sleep(2.05)
    after = httpx.get(proxy + "/checkpoint", timeout=5)
    assert (
        checkpoints.verify_checkpoint(after.text, ORIGIN, [srv_log_key(deployed)]).checkpoint.size
        == m.state.size
    )


def srv_log_key(d: Deployment) -> bytes:
    return d.server.log_public_key


@needs_nginx
def test_writes_and_receipts_pass_through_uncached(deployed: Deployment) -> None:
    proxy, m = deployed.proxy.url, deployed.mirror
    device = SeedSigner.generate()
    grant = m.grant(device.public_key, records.ROLE_DEVICE, "plc-line3-17")
    doc = post_records(proxy, [grant])
    assert doc == {
        "size": m.state.size,
        "root": m.state.root.hex(),
        "appended": 1,
        "first_seq": m.state.size - 1,
    }
    assert "x-cache-status" not in httpx.post(proxy + "/v1/records", content=b"\x90", headers=MSGPACK).headers

    receipt = messages.make_receipt(device, m.state.size - 1, m.state.size, m.state.root, int(time.time()))
    r = httpx.post(proxy + "/v1/receipts", content=receipt, headers=MSGPACK, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": True, "device_grant_seq": m.state.size - 1, "size": m.state.size}

    # a stale write is the server's own 409 problem, passed on unchanged
    stale = records.sign(
        records.Grant(1, bytes(32), int(time.time()), device.public_key, "operator", "", "x", 0, 0),
        deployed.root,
    )
    r = httpx.post(proxy + "/v1/records", content=encoding.pack_records([stale]), headers=MSGPACK, timeout=5)
    assert r.status_code == 409
    assert r.json()["type"] == "urn:writ:problem:stale-head"
    assert r.json()["size"] == m.state.size


def read_event(lines: Iterator[str]) -> dict[str, Any]:
    """The next SSE event (comments and retry fields skipped) as {"event", "id", "data"}."""
    ev: dict[str, Any] = {"event": None, "id": None, "data": []}
    for line in lines:
        if line == "":
            if ev["event"] is not None or ev["data"]:
                return ev
            continue
        if line.startswith(":") or line.startswith("retry:"):
            continue
        field, _, value = line.partition(": ")
        if field == "data":
            ev["data"].append(value)
        else:
            ev[field] = value
    raise EOFError("the stream ended")


@needs_nginx
def test_sse_events_arrive_through_nginx(deployed: Deployment) -> None:
    proxy, m = deployed.proxy.url, deployed.mirror
    size = m.state.size
    with (
        httpx.Client(timeout=httpx.Timeout(5.0)) as client,
        client.stream("GET", proxy + "/v1/events?records=1", headers={"Last-Event-ID": str(size)}) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        hello = read_event(lines)  # the current checkpoint, at once
        assert (hello["event"], hello["id"]) == ("checkpoint", str(size))

        grant = m.grant(SeedSigner.generate().public_key, records.ROLE_OPERATOR, "sse-check")
        sent = time.monotonic()
        post_records(proxy, [grant])
        rec = read_event(lines)
        cp = read_event(lines)
        elapsed = time.monotonic() - sent
    assert rec["event"] == "records"
    body = json.loads("".join(rec["data"]))
    assert body["start"] == size and len(body["records"]) == 1
    assert cp["event"] == "checkpoint" and cp["id"] == str(size + 1)
    note = "\n".join(cp["data"]) + "\n"
    assert (
        checkpoints.verify_checkpoint(note, ORIGIN, [srv_log_key(deployed)]).checkpoint.root == m.state.root
    )
    assert elapsed < 2.0, f"the event took {elapsed:.2f} s through nginx (buffered?)"


@needs_nginx
def test_nginx_refusals_are_problem_json(tmp_path: Path, deployed: Deployment) -> None:
    # too large: nginx stops it before the server reads a byte
    r = httpx.post(deployed.proxy.url + "/v1/records", content=b"\x00" * (1024 * 1024 + 1), headers=MSGPACK)
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:writ:problem:payload-too-large"

    # too fast: a burst of writes from one address (a fresh nginx: its own counters)
    with running_nginx(tmp_path, deployed.server.url) as fresh, httpx.Client(timeout=5) as client:
        codes = []
        for _ in range(140):
            resp = client.post(
                fresh.url + "/v1/records", content=b"x", headers={"Content-Type": "text/plain"}
            )
            codes.append(resp.status_code)
            if resp.status_code == 429:
                break
        assert codes[0] == 415  # the server's own answer, passed through
        assert codes[-1] == 429, codes
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["type"] == "urn:writ:problem:rate-limited"
        assert "this address" in resp.json()["detail"]  # nginx's refusal, not the server's
        assert len(codes) > 100  # the burst allowance came first
        # reads are never rate limited by nginx
        assert client.get(fresh.url + "/v1/records?start=0&limit=1").status_code == 200


@needs_nginx
def test_tiles_come_from_the_cache_when_the_server_is_down(tmp_path: Path) -> None:
    with deployment(tmp_path, 254) as d:  # exactly 256 records: one full tile
        proxy = d.proxy.url
        assert tile_headers(httpx.get(proxy + "/tile/0/000", timeout=5)) == (200, "MISS")
        cached = httpx.get(proxy + "/tile/0/000", timeout=5)
        bundle = httpx.get(proxy + "/tile/entries/000", timeout=5).content
        assert tile_headers(cached) == (200, "HIT")

        assert stop_server(d.server) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(d.server.url + "/tile/0/000", timeout=2)

        again = httpx.get(proxy + "/tile/0/000", timeout=5)
        assert tile_headers(again) == (200, "HIT")
        assert again.content == cached.content
        entries = httpx.get(proxy + "/tile/entries/000", timeout=5)
        assert tile_headers(entries) == (200, "HIT")
        assert entries.content == bundle

        # the checkpoint is not kept beyond its micro-cache: with the server down, a 503 problem
        time.sleep(2.05)
        down = httpx.get(proxy + "/checkpoint", timeout=10)
        assert down.status_code == 503
        assert down.json()["type"] == "urn:writ:problem:unavailable"


@needs_nginx
def test_report_flood_through_nginx_is_rate_limited_but_checkpoint_tiles_and_records_are_not(
    tmp_path: Path, deployed: Deployment
) -> None:
    with running_nginx(tmp_path, deployed.server.url) as fresh, httpx.Client(timeout=5) as client:
        codes = []
        for _ in range(120):
            r = client.get(fresh.url + "/v1/fleet", params={"limit": 1, "revocations": 0})
            codes.append(r.status_code)
            if r.status_code == 429:
                break
        assert codes[0] == 200 and codes[-1] == 429, codes
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "urn:writ:problem:rate-limited"
        for _ in range(120):
            assert client.get(fresh.url + "/checkpoint").status_code == 200
            assert client.get(fresh.url + "/tile/0/000").status_code == 200
            assert client.get(fresh.url + "/v1/records?start=0&limit=5").status_code == 200


def _open_events(url: str, stack: contextlib.ExitStack) -> int:
    """Open GET /v1/events through nginx on a raw socket (kept open by ``stack``); its status."""
    host, port = url.removeprefix("http://").split(":")
    sock = stack.enter_context(socket.create_connection((host, int(port)), timeout=10))
    sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: writ\r\n\r\n")
    head = b""
    while b"\r\n" not in head:
        head += sock.recv(4096)
    return int(head.split(b" ", 2)[1])


@needs_nginx
def test_event_stream_hogging_through_nginx_is_capped_per_address(
    tmp_path: Path, deployed: Deployment
) -> None:
    # the shipped cap is 500 streams per address; the same directive, scaled down to 3
    edits = {"limit_conn writ_sse 500;": "limit_conn writ_sse 3;"}
    with running_nginx(tmp_path, deployed.server.url, edits=edits) as proxy, contextlib.ExitStack() as stack:
        assert [_open_events(proxy.url, stack) for _ in range(3)] == [200, 200, 200]
        assert _open_events(proxy.url, stack) == 429
        r = httpx.get(proxy.url + "/checkpoint", timeout=5)  # everything else still answers
        assert r.status_code == 200


def test_nginx_site_times_out_slow_heads_and_caps_each_address() -> None:
    text = SITE.read_text(encoding="utf-8")

    def seconds(directive: str) -> int:
        (value,) = [
            ln.split()[1].rstrip(";") for ln in text.splitlines() if ln.strip().startswith(directive + " ")
        ]
        assert value.endswith("s"), (directive, value)
        return int(value[:-1])

    assert 0 < seconds("client_header_timeout") <= 60
    assert 0 < seconds("client_body_timeout") <= 60
    assert 0 < seconds("keepalive_timeout") <= 75
    caps = [ln.split()[1:3] for ln in text.splitlines() if ln.strip().startswith("limit_conn writ_")]
    conn = {int(n.rstrip(";")) for zone, n in caps if zone == "writ_conn"}
    sse = {int(n.rstrip(";")) for zone, n in caps if zone == "writ_sse"}
    assert conn and min(conn) >= 1000 and sse and min(sse) >= 500  # a plant behind one NAT never hits them
    assert "limit_conn_status 429;" in text
    # reports are rate limited; /checkpoint, tiles and /v1/records never by the report zone
    blocks = text.split("\n    location ")[1:]  # the server block's locations
    limited = [b.split("{", 1)[0].strip() for b in blocks if "limit_req zone=writ_reports" in b]
    assert limited == ["/v1/fleet", "= /"]


# --- the rest of deploy/ ---------------------------------------------------------

DEPLOY = REPO / "deploy"


def _unit_value(unit: str, key: str) -> str:
    values = [
        line.split("=", 1)[1]
        for line in (DEPLOY / unit).read_text(encoding="utf-8").splitlines()
        if line.startswith(key + "=")
    ]
    assert len(values) == 1, (unit, key, values)
    return values[0]


def _env_file() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "writ.env").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_backup_script_copies_a_live_ledger_audits_it_and_the_copy_restores(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    stop = threading.Event()
    with running_server(tmp_path, root.public_key, ORIGIN) as srv:
        mirror = push_ledger(srv.url, root, srv.log_public_key, 300)
        lock = threading.Lock()

        failures: list[str] = []

        def keep_writing() -> None:  # appends go on during the backup (under the server's rate limit)
            with httpx.Client(timeout=10) as client:
                while not stop.wait(0.03):
                    with lock:
                        raw = mirror.grant(SeedSigner.generate().public_key, records.ROLE_OPERATOR, "busy")
                    r = client.post(
                        srv.url + "/v1/records", content=encoding.pack_records([raw]), headers=MSGPACK
                    )
                    if r.status_code != 200:
                        failures.append(r.text)
                        return

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            backups = tmp_path / "backups"
            env = {
                **os.environ,
                "WRIT_DATA": str(srv.data_dir),
                "WRIT_BACKUP_DIR": str(backups),
                "WRIT_BIN": writ_command()[0],
                "WRIT_PYTHON": sys.executable,
            }
            done = subprocess.run(
                [str(DEPLOY / "writ-backup.sh")], env=env, capture_output=True, timeout=60, check=False
            )
        finally:
            stop.set()
            writer.join(10)
        assert done.returncode == 0, done.stderr.decode()
        assert failures == []
        live_size = httpx.get(srv.url + "/healthz", timeout=5).json()["size"]

    (db,) = backups.glob("ledger-*.db")
    (report,) = backups.glob("ledger-*.audit.json")
    audit = json.loads(report.read_text(encoding="utf-8"))
    assert audit["ok"] is True and audit["origin"] == ORIGIN
    assert 302 <= audit["size"] <= live_size
    assert (backups / "log.key").stat().st_mode & 0o777 == 0o600
    assert (backups / "server.json").read_bytes() == (srv.data_dir / "server.json").read_bytes()
    assert not (backups / "server.lock").exists()
    assert not list(backups.glob(".incoming-*")), "the work directory was left behind"

    # restore into a new data directory: the three files, and nothing of the old WAL
    restored = tmp_path / "restored" / "data"
    restored.mkdir(parents=True, mode=0o700)
    shutil.copy2(db, restored / "ledger.db")
    shutil.copy2(backups / "server.json", restored / "server.json")
    shutil.copy2(backups / "log.key", restored / "log.key")
    back = start_server(restored)
    try:
        assert httpx.get(back.url + "/healthz", timeout=5).json() == {"ok": True, "size": audit["size"]}
        cp = checkpoints.verify_checkpoint(
            httpx.get(back.url + "/checkpoint").text, ORIGIN, [back.log_public_key]
        )
        assert cp.checkpoint.root.hex() == audit["root"]
        assert back.log_public_key == srv.log_public_key
    finally:
        assert stop_server(back) == 0


def test_systemd_units_parse_and_their_serve_command_line_is_valid(tmp_path: Path) -> None:
    argv = _unit_value("writ.service", "ExecStart").split()
    assert argv[0] == "/opt/writ/.venv/bin/writ"
    opts = _env_file()["WRIT_SERVE_OPTS"].split()
    assert argv[-1] == "$WRIT_SERVE_OPTS"
    args = build_parser().parse_args([*argv[1:-1], *opts])  # every flag exists, every value parses
    assert (args.command, args.data, args.host, args.port) == ("serve", "/var/lib/writ", "127.0.0.1", 8000)
    assert _unit_value("writ.service", "KillSignal") == "SIGTERM"
    assert _unit_value("writ.service", "ReadWritePaths") == "/var/lib/writ"
    assert _unit_value("writ.service", "EnvironmentFile") == "/etc/writ/writ.env"
    assert _unit_value("writ-backup.service", "ExecStart") == "/opt/writ/deploy/writ-backup.sh"
    for key in ("WRIT_DATA", "WRIT_BACKUP_DIR", "WRIT_BIN", "FORWARDED_ALLOW_IPS"):
        assert key in _env_file()

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units were not parsed")
    units = [DEPLOY / u for u in ("writ.service", "writ-backup.service", "writ-backup.timer")]
    out = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)], capture_output=True, timeout=60, check=False
    )
    lines = [ln for ln in out.stderr.decode().splitlines() if ln.strip()]
    # /opt/writ is not installed on the test machine; anything else (an unknown key, a bad
    # value, a bad section) is a finding
    problems = [ln for ln in lines if "is not executable" not in ln]
    assert problems == [], problems


def test_dockerfile_copies_only_paths_that_exist_and_the_scripts_parse() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    copies = [ln.split()[1:] for ln in text.splitlines() if ln.startswith("COPY ")]
    assert copies
    for words in copies:
        sources = [w for w in words if not w.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), f"the Dockerfile copies {src}, which does not exist"
            assert f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], f"{src} is ignored"
    assert "FROM python:3.11-slim" in text
    assert "USER writ" in text and "VOLUME /var/lib/writ" in text and "EXPOSE 8000" in text
    assert "/healthz" in text
    for script in ("docker-entrypoint.sh", "writ-backup.sh"):
        path = DEPLOY / script
        assert os.access(path, os.X_OK), f"{script} is not executable"
        check = subprocess.run(["sh", "-n", str(path)], capture_output=True, timeout=10, check=False)
        assert check.returncode == 0, check.stderr.decode()
    entry = (DEPLOY / "docker-entrypoint.sh").read_text(encoding="utf-8")
    assert "exec writ serve --data /var/lib/writ --host 0.0.0.0 --port 8000" in entry


def test_docker_entrypoint_runs_writ_commands_and_refuses_to_serve_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "writ").write_text('#!/bin/sh\necho "writ $*"\n', encoding="utf-8")
    (fake / "writ").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ.get('PATH', '')}"}

    def entry(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(DEPLOY / "docker-entrypoint.sh"), *args],
            env=env,
            capture_output=True,
            timeout=10,
            check=False,
        )

    init = entry(
        "server", "init", "--data", "/var/lib/writ", "--anchor", "00" * 32, "--origin", "a.example/b"
    )
    assert (init.returncode, init.stdout.decode()) == (
        0,
        f"writ server init --data /var/lib/writ --anchor {'00' * 32} --origin a.example/b\n",
    )
    if Path("/var/lib/writ/server.json").exists():
        pytest.skip("this machine has a real /var/lib/writ: not testing the serve branch")
    serve = entry("serve", "--checkpoint-interval", "5")
    assert serve.returncode == 2 and serve.stdout == b""
    assert b"server init --data /var/lib/writ" in serve.stderr
