"""Attacks on the server's resources, and the limits that stop them (issue: unbounded fleet report,
slow request heads, socket and event-stream hoarding).

In process (httpx.ASGITransport): the fleet report is capped and paginated, its counts come from
a running index that agrees with a from-scratch count, and expensive reports are rate-limited
per client while /checkpoint, tiles and /v1/records never are. Against a real ``writ serve``: a
half-sent request head is cut off after the header timeout while GET /checkpoint keeps
answering; one address cannot hold more than its share of sockets or event streams; start-up
logs one line per stage.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.config import Limits
from api.fleet_report import MAX_FLEET_STRAGGLERS, MAX_REVOCATIONS, FleetIndex
from api.service import LedgerService
from ledger import crypto, encoding, messages, records
from ledger.crypto import SeedSigner
from ledger.errors import WritError
from ledger.records import Rotate
from ledger.state import LedgerState
from ledger.storage import MemoryStorage, ReceiptRow
from tests.helpers.server import (
    Mirror,
    inprocess_server,
    running_server,
    start_server,
    stop_server,
    writ_command,
)

ORIGIN = "ledger.example/limits"
MSGPACK = {"content-type": "application/msgpack"}
PROBLEM = "urn:writ:problem:"


def _service(app: Any) -> LedgerService:
    svc = app.state.service
    assert isinstance(svc, LedgerService)
    return svc


async def _post(client: httpx.AsyncClient, raws: list[bytes]) -> None:
    for i in range(0, len(raws), 1000):
        r = await client.post(
            "/v1/records", content=encoding.pack_records(raws[i : i + 1000]), headers=MSGPACK
        )
        assert r.status_code == 200, r.text


def _fleet_mirror(root: SeedSigner, devices: int, revoked_operators: int) -> tuple[Mirror, list[SeedSigner]]:
    """A genesis, ``devices`` device grants, then ``revoked_operators`` operator grants, each revoked."""
    m = Mirror(root, ORIGIN)
    m.genesis()
    keys = [SeedSigner.generate() for _ in range(devices)]
    for i, k in enumerate(keys):
        m.grant(k.public_key, records.ROLE_DEVICE, f"plc-{i:05d}")
    ops = [m.state.size + i for i in range(revoked_operators)]
    for i in range(revoked_operators):
        m.grant(SeedSigner.generate().public_key, records.ROLE_OPERATOR, f"tablet-{i}")
    for seq in ops:
        m.revoke(seq, 2)  # lost
    return m, keys


def _naive_spread(state: LedgerState, receipts: dict[int, ReceiptRow], rev_seq: int) -> tuple[int, int]:
    """(applied, total) counted from scratch: the definition the index must agree with."""
    active = [
        g for g in state.grants.values() if g.role == records.ROLE_DEVICE and not state.is_withdrawn(g.seq)
    ]
    applied = sum(1 for g in active if g.seq in receipts and receipts[g.seq].size > rev_seq)
    return applied, len(active)


# --- the fleet report: caps, pages, running counts ------------------------------------


async def test_fleet_report_with_huge_query_parameters_is_refused(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    m, _ = _fleet_mirror(root, 3, 2)
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, MemoryStorage()) as (client, _app):
        await _post(client, m.records)
        for query in (
            {"revocations": "10000"},
            {"stragglers": "100000"},
            {"stragglers": str(MAX_FLEET_STRAGGLERS + 1)},
            {"limit": "1000000"},
            {"limit": "0"},
            {"after": "x"},
        ):
            r = await client.get("/v1/fleet", params=query)
            assert r.status_code == 400, (query, r.text)
            assert r.json()["type"] == PROBLEM + "bad-request"
        r = await client.get("/v1/fleet/revocations/4", params={"stragglers": "1000"})
        assert r.status_code == 400
        r = await client.get("/v1/fleet/revocations/4", params={"after": "nonsense"})
        assert r.status_code == 400
        r = await client.get("/v1/fleet/revocations/1")  # a grant, not a revocation
        assert r.status_code == 404 and r.json()["type"] == PROBLEM + "not-found"


async def test_fleet_report_of_many_devices_times_many_revocations_stays_bounded(tmp_path: Path) -> None:
    """3,000 devices x 1,000 revocations once made a 137 MB answer: now every page is capped."""
    root = SeedSigner.generate()
    m, _ = _fleet_mirror(root, 300, 150)
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, MemoryStorage()) as (client, _app):
        await _post(client, m.records)
        r = await client.get(
            "/v1/fleet",
            params={"revocations": MAX_REVOCATIONS, "stragglers": MAX_FLEET_STRAGGLERS, "limit": 1000},
        )
        assert r.status_code == 200
        doc = r.json()
        assert len(doc["revocations"]) == MAX_REVOCATIONS < doc["revocations_total"] == 150
        assert all(len(rev["stragglers"]) == MAX_FLEET_STRAGGLERS for rev in doc["revocations"])
        assert all(rev["stragglers_total"] == 300 and rev["total"] == 300 for rev in doc["revocations"])
        # the largest answer any query can get: 1000 devices + 100 x 20 stragglers
        assert len(r.content) < 1_000_000
        newest = [rev["seq"] for rev in doc["revocations"]]
        assert newest == sorted(newest, reverse=True) and newest[0] == m.state.size - 1


async def test_fleet_pages_cover_every_device_and_straggler_once(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    m, keys = _fleet_mirror(root, 57, 1)
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, MemoryStorage()) as (client, app):
        await _post(client, m.records)
        svc = _service(app)
        # some devices catch up past the revocation, some only part-way
        rev_seq = m.state.size - 1
        for i, k in enumerate(keys[:20]):
            size = m.state.size if i % 2 else 3
            receipt = messages.make_receipt(k, 1 + i, size, svc.levels.root(size), int(time.time()))
            r = await client.post("/v1/receipts", content=receipt, headers=MSGPACK)
            assert r.status_code == 200, r.text
        seen: list[int] = []
        after: int | None = None
        while True:
            params: dict[str, Any] = {"limit": 10, "revocations": 0}
            if after is not None:
                params["after"] = after
            doc = (await client.get("/v1/fleet", params=params)).json()
            seen += [d["grant_seq"] for d in doc["devices"]]
            after = doc["next"]
            if after is None:
                break
        assert seen == list(range(1, 58)) and doc["devices_total"] == 57

        names: list[str] = []
        cursor: str | None = None
        while True:
            q: dict[str, Any] = {"stragglers": 7}
            if cursor is not None:
                q["after"] = cursor
            spread = (await client.get(f"/v1/fleet/revocations/{rev_seq}", params=q)).json()
            names += [s["name"] for s in spread["stragglers"]]
            cursor = spread["stragglers_next"]
            if cursor is None:
                break
        assert (spread["applied"], spread["total"], spread["stragglers_total"]) == (10, 57, 47)
        assert len(names) == len(set(names)) == 47
        # furthest behind first: the devices that never sent a receipt, then the part-way ones
        first = (await client.get(f"/v1/fleet/revocations/{rev_seq}", params={"stragglers": 40})).json()
        assert [s["size"] for s in first["stragglers"]][:37] == [None] * 37
        assert [s["size"] for s in first["stragglers"]][37:] == [3, 3, 3]


_KEYS = [SeedSigner.generate().public_key for _ in range(6)]  # few keys: some share grants
_OPS = st.lists(
    st.tuples(st.sampled_from(["grant", "receipt", "revoke", "revoke_key", "sync"]), st.integers(0, 1 << 16)),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_running_fleet_counts_agree_with_a_count_from_scratch(ops: list[tuple[str, int]]) -> None:
    """Grants (several to one key), receipts (going up or down), revocations by grant and by
    key, in any order: after each sync the index's counts equal a from-scratch count."""
    root = SeedSigner.generate()
    m = Mirror(root, ORIGIN, time=1_767_225_600)
    m.genesis()
    index = FleetIndex()
    receipts: dict[int, ReceiptRow] = {}

    def active() -> list[int]:
        return [g.seq for g in m.state.grants.values() if not m.state.is_withdrawn(g.seq)]

    def check() -> None:
        index.sync(m.state, receipts)
        for rev in index.revocations:
            behind = index.not_applied(rev.seq)
            assert (len(index.active) - behind, len(index.active)) == _naive_spread(
                m.state, receipts, rev.seq
            )
            assert len(index.stragglers(rev.seq, None, 1000)) == behind

    for op, n in ops:
        live = active()
        if op == "grant" or not live:
            key = _KEYS[n % len(_KEYS)]
            if not m.state.key_revoked(key):
                m.grant(key, records.ROLE_DEVICE, f"d{n}")
        elif op == "receipt":
            seq = live[n % len(live)]
            row = ReceiptRow(seq, n % (m.state.size + 1), b"\0" * 32, n, b"", n)
            receipts[seq] = row
            index.receipt(row)
        elif op == "revoke":
            m.revoke(live[n % len(live)])
        elif op == "revoke_key":
            m.revoke(m.state.grants[live[n % len(live)]].subject)
        else:
            check()
    check()
    assert index.seen == m.state.size
    # a state that went back (a reload onto less) is rebuilt, not trusted
    short = LedgerState(root.public_key, origin=ORIGIN)
    short.apply_all(m.records[:1])
    index.sync(short, receipts)
    assert index.seen == 1 and not index.active and not index.revocations


# --- rate limits: expensive reports only ------------------------------------------------


async def test_fleet_report_flood_is_rate_limited_but_checkpoint_tiles_and_records_never(
    tmp_path: Path,
) -> None:
    root = SeedSigner.generate()
    m, _ = _fleet_mirror(root, 300, 2)
    limits = Limits(report_rate=0.01, report_burst=3)
    async with inprocess_server(tmp_path, root.public_key, ORIGIN, MemoryStorage(), limits=limits) as (
        client,
        _app,
    ):
        await _post(client, m.records)
        codes = [(await client.get("/v1/fleet")).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = await client.get("/v1/fleet")
        assert r.status_code == 429
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"] == PROBLEM + "rate-limited" and int(r.headers["retry-after"]) >= 1
        assert (await client.get("/v1/fleet/revocations/302")).status_code == 429
        assert (await client.get("/")).status_code == 429
        for _ in range(60):
            assert (await client.get("/checkpoint")).status_code == 200
            assert (await client.get("/tile/0/000")).status_code == 200
            assert (await client.get("/tile/entries/000")).status_code == 200
            assert (await client.get("/v1/records", params={"start": 0, "limit": 10})).status_code == 200


# --- the dashboard after a rotation, and long straggler lists ------------------------------


def _rotate(m: Mirror, old: SeedSigner, new: SeedSigner) -> bytes:
    seq, prev, t = m.state.size, m.state.root, max(int(time.time()), m.state.last_time)
    body = Rotate(seq, prev, t, new.public_key, None)
    for signer in (old, new):
        raw = records.sign(body, signer)
        with contextlib.suppress(WritError):
            m.state.copy().apply(raw)
            m.extend([raw])
            return raw
    raise AssertionError("neither root signs a rotation")


async def test_dashboard_after_rotation_shows_root_in_force_log_key_hex_and_straggler_count(
    tmp_path: Path,
) -> None:
    old, new = SeedSigner.generate(), SeedSigner.generate()
    m = Mirror(old, ORIGIN)
    m.genesis(crypto.sha256(new.public_key))
    for i in range(30):
        m.grant(SeedSigner.generate().public_key, records.ROLE_DEVICE, f"plc-{i:02d}")
    _rotate(m, old, new)
    m.root = new
    op = m.state.size
    m.grant(SeedSigner.generate().public_key, records.ROLE_OPERATOR, "tablet-9")
    m.revoke(op)
    async with inprocess_server(tmp_path, old.public_key, ORIGIN, MemoryStorage()) as (client, app):
        await _post(client, m.records)
        page = (await client.get("/")).text
        svc = _service(app)
    head = page.split("<h2>", 1)[0]
    assert new.public_key.hex() in head and "since the rotation at seq 31" in head
    assert old.public_key.hex() in head  # still shown, as the anchor
    assert svc.signer.public_key.hex() in head and svc.log_vkey in head
    revs = page.split("<h2>Revocations", 1)[1].split("<h2>", 1)[0]
    assert "30 behind:" in revs and "and 25 more" in revs
    assert f'href="/v1/fleet/revocations/{op + 1}"' in revs and "all 30 stragglers" in revs
    assert revs.count("plc-") == 5


# --- against a real `writ serve` ------------------------------------------------------------


@contextlib.contextmanager
def _socket_from(address: str, url: str) -> Iterator[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((address, 0))
        s.settimeout(10)
        s.connect((host, int(port)))
        yield s
    finally:
        s.close()


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _client_from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=5)


@pytest.mark.e2e
def test_slow_request_head_is_cut_off_and_checkpoint_keeps_answering(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    with running_server(tmp_path, root.public_key, ORIGIN, header_timeout=2) as srv:
        with _socket_from("127.0.0.2", srv.url) as half, _socket_from("127.0.0.2", srv.url) as trickle:
            half.sendall(b"GET /checkpoint HTTP/1.1\r\nHost: writ\r\n")  # never finished
            started = time.monotonic()
            for _ in range(3):
                assert httpx.get(srv.url + "/checkpoint", timeout=2).status_code == 200
                time.sleep(0.3)
            # a byte at a time keeps the socket busy, but the deadline is for the whole head
            trickle.settimeout(0.2)
            cut = b""
            for byte in b"GET /checkpoint HTTP/1.1\r\nX-Slow: " + b"a" * 40:
                try:
                    trickle.sendall(bytes([byte]))
                    cut = trickle.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if cut:
                    break
            trickle_elapsed = time.monotonic() - started
            half.settimeout(10)
            answer = _read_all(half)
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"urn:writ:problem:request-timeout" in answer
        assert 1.5 <= elapsed < 6, elapsed
        assert cut.startswith(b"HTTP/1.1 408 ") and trickle_elapsed < 6, (cut, trickle_elapsed)
        assert httpx.get(srv.url + "/checkpoint", timeout=2).status_code == 200


@pytest.mark.e2e
def test_socket_hoarding_from_one_address_is_capped_and_others_still_served(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    cap = 5
    with (
        running_server(tmp_path, root.public_key, ORIGIN, max_connections_per_address=cap) as srv,
        contextlib.ExitStack() as stack,
    ):
        held = [stack.enter_context(_socket_from("127.0.0.2", srv.url)) for _ in range(cap)]
        time.sleep(0.2)
        with _socket_from("127.0.0.2", srv.url) as over:
            refused = _read_all(over)
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        assert b"urn:writ:problem:overloaded" in refused
        # another address, and the trusted local proxy address, are still served
        with _client_from("127.0.0.3") as other:
            assert other.get(srv.url + "/checkpoint").status_code == 200
        assert httpx.get(srv.url + "/checkpoint", timeout=2).status_code == 200
        # the held sockets still work
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: writ\r\n\r\n")
        assert held[0].recv(4096).startswith(b"HTTP/1.1 200 ")
        held[1].close()
        time.sleep(0.2)
        with _client_from("127.0.0.2") as again:  # a slot came back
            assert again.get(srv.url + "/checkpoint").status_code == 200


def _open_stream(address: str, url: str, stack: contextlib.ExitStack, forwarded: str = "") -> bytes:
    """Open GET /v1/events from ``address``; the status line and headers, and a refusal's body."""
    s = stack.enter_context(_socket_from(address, url))
    xff = f"X-Forwarded-For: {forwarded}\r\n".encode() if forwarded else b""
    s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: writ\r\n" + xff + b"\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    if got.startswith(b"HTTP/1.1 200 "):
        return got
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(4096)
    return head + b"\r\n\r\n" + body


@pytest.mark.e2e
def test_event_stream_hogging_from_one_address_is_capped(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    with running_server(tmp_path, root.public_key, ORIGIN, max_sse_per_address=3) as srv:
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                assert _open_stream("127.0.0.2", srv.url, stack).startswith(b"HTTP/1.1 200 ")
            refused = _open_stream("127.0.0.2", srv.url, stack)
            assert refused.startswith(b"HTTP/1.1 503 "), refused
            assert b"urn:writ:problem:overloaded" in refused
            assert _open_stream("127.0.0.3", srv.url, stack).startswith(b"HTTP/1.1 200 ")
            # behind the trusted proxy (127.0.0.1), each forwarded client is capped on its own,
            # and the proxy's own address is not capped
            proxied = [_open_stream("127.0.0.1", srv.url, stack, "198.51.100.7") for _ in range(4)]
            assert [r[:13] for r in proxied] == [b"HTTP/1.1 200 "] * 3 + [b"HTTP/1.1 503 "]
            assert _open_stream("127.0.0.1", srv.url, stack, "198.51.100.8").startswith(b"HTTP/1.1 200 ")
            for _ in range(4):
                assert _open_stream("127.0.0.1", srv.url, stack).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.3)  # the streams above are closed: their slots come back
        with contextlib.ExitStack() as stack:
            assert _open_stream("127.0.0.2", srv.url, stack).startswith(b"HTTP/1.1 200 ")


@pytest.mark.e2e
def test_server_start_logs_each_stage_and_serve_help_shows_the_limits(tmp_path: Path) -> None:
    root = SeedSigner.generate()
    m, _ = _fleet_mirror(root, 40, 2)
    with running_server(tmp_path, root.public_key, ORIGIN) as srv:
        r = httpx.post(srv.url + "/v1/records", content=encoding.pack_records(m.records), headers=MSGPACK)
        assert r.status_code == 200, r.text
    again = start_server(srv.data_dir)  # a restart re-verifies the 45 records
    assert stop_server(again) == 0
    port = again.url.rsplit(":", 1)[1]
    text = (srv.data_dir.parent / f"serve-{port}.log").read_text(encoding="utf-8")
    stages = [
        "opening the ledger",
        "verifying 45 stored records",
        "verified 45 records in",
        "verified; serving",
    ]
    positions = [text.find(stage) for stage in stages]
    assert -1 not in positions and positions == sorted(positions), text
    assert "open files limit" in text
    out = subprocess.run([*writ_command(), "serve", "--help"], capture_output=True, timeout=30, check=True)
    helptext = " ".join(out.stdout.decode().split())
    for flag, default in (
        ("--header-timeout", "30.0"),
        ("--keep-alive-timeout", "5"),
        ("--max-connections-per-address", "2000"),
        ("--max-sse-per-address", "1000"),
        ("--report-rate", "5.0"),
        ("--report-burst", "50"),
    ):
        assert flag in helptext and f"(default: {default})" in helptext, flag


def test_start_up_audit_progress_is_a_line_every_few_seconds(caplog: pytest.LogCaptureFixture) -> None:
    from api.app import LoadProgress

    now = [0.0]
    progress = LoadProgress(45_000, every=2.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="writ.api"):
        for done in range(5_000, 45_001, 5_000):  # one batch a second
            now[0] += 1.0
            progress(done, 45_000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:-1] == [
        "verifying: 10000 of 45000 records (22%)",
        "verifying: 20000 of 45000 records (44%)",
        "verifying: 30000 of 45000 records (67%)",
        "verifying: 40000 of 45000 records (89%)",
    ]
    assert lines[-1] == "verified 45000 records in 9.0 s"
