"""Hostile servers against the device CLI (tuf-conformance style).

``python -m device_sim device sync`` runs as a subprocess, exactly as an
integrator's test rig would run firmware, against

- the hostile test log of ``tests/helpers/device.py`` (``FakeLog``) on a real
  uvicorn server, playing every attack of ``tests/test_device_hostile.py``
  (forged, replayed, reordered, truncated, forked, oversized, endless...)
  through the CLI instead of in process, plus a frozen view and a slow loris;
- :class:`reliability.hostile.RawServer`, which writes raw bytes on the
  socket: decompression bombs, redirects to another host, huge headers,
  chunked bodies that never end, status lines that never finish, lying
  Content-Length, wrong content types.

Each time the device refuses (exit 3 for data that fails verification, with
evidence kept; exit 4 for transport failures and HTTP errors, with no
evidence), within its deadline and bounded memory, with one JSON line and no
traceback, and its state directory is byte for byte what it was.

The device processes are independent, so the module runs them all at once
(four at a time) in one fixture; each test then checks its own outcome.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_sim.sources import MAX_CHECKPOINT, MAX_ENTRY_BUNDLE, MAX_SSE_EVENT, SseSource
from ledger import compact, messages, tiles
from ledger.errors import TransportError
from reliability.hostile import (
    GZIP_HEAD,
    GZIP_MIB,
    RawServer,
    Reply,
    chunked,
    deep_json,
    event_stream,
    garbage_entries,
    gzip_bytes,
    gzip_zeros,
    response_head,
    sse_event,
)
from tests.helpers.device import FakeLog, World, serve_in_thread, signer
from tests.helpers.server import writ_command
from tests.test_device_hostile import ATTACKS, NOW, TS, Attack, Ctx, _setup

pytestmark = pytest.mark.e2e

#: the most memory a device may use while refusing a hostile response (peak RSS).
MAX_DEVICE_RSS = 256 * 1024 * 1024
#: the address space the device subprocess gets here (a bomb must not take the machine down).
DEVICE_AS_LIMIT = 1024 * 1024 * 1024
#: the device's per-request deadline in these runs (seconds), and how long a refusal may take.
DEADLINE = 2.0
MAX_SECONDS = 12.0
WORKERS = 4


# --- running the device ------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: dict[str, Any]
    stderr: str
    seconds: float
    max_rss: int  # bytes


def device(*args: str | Path, timeout: float = 60.0, as_limit: int | None = DEVICE_AS_LIMIT) -> Run:
    """``python -m device_sim ARGS`` as a subprocess: exit code, its one JSON line, its peak RSS."""

    def limit() -> None:
        if as_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    t = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-c", _MEASURED, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
    )
    assert p.stdout is not None and p.stderr is not None
    pipes: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda n=n, f=f: pipes.__setitem__(n, f.read()))
        for n, f in (("out", p.stdout), ("err", p.stderr))
    ]
    for th in readers:
        th.start()
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    _, status, usage = os.wait4(p.pid, 0)  # our own wait: this child's rusage
    expired = not timer.is_alive()
    timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    for th in readers:
        th.join()
    p.stdout.close()
    p.stderr.close()
    if expired:
        raise AssertionError(f"the device did not finish within {timeout} s: {args}")
    stderr = pipes["err"].decode(errors="replace")
    # the device's own peak RSS (VmHWM of its own memory map): rusage's ru_maxrss would also
    # count this test process's pages, which a forked child inherits until it execs
    peak = [int(x.split()[1]) for x in stderr.splitlines() if x.startswith(_HWM)]
    stderr = "\n".join(x for x in stderr.splitlines() if not x.startswith(_HWM))
    lines = pipes["out"].decode(errors="replace").strip().splitlines()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, (pipes["out"], stderr[-3000:])
    rss = peak[-1] * 1024 if peak else usage.ru_maxrss * 1024
    return Run(p.returncode, json.loads(lines[0]), stderr, time.monotonic() - t, rss)


_HWM = "WRIT-TEST-VMHWM-KB "
#: ``python -m device_sim ARGS`` that reports its own peak RSS (VmHWM) on stderr as it exits
_MEASURED = f"""
import atexit, runpy, sys

def _report():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                sys.__stderr__.write("\\n{_HWM}" + line.split()[1] + "\\n")
                sys.__stderr__.flush()

atexit.register(_report)
sys.argv[0] = "device_sim"
runpy.run_module("device_sim", run_name="__main__", alter_sys=True)
"""


def sync(d: Path, url: str, *extra: str, now: int = NOW) -> Run:
    return device("device", "sync", "--state", d, "--server", url, "--now", str(now), *extra)


def snapshot(d: Path) -> dict[str, bytes]:
    """The device's state directory, evidence aside."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "evidence.json"}


def evidence(d: Path) -> list[dict[str, Any]]:
    p = d / "evidence.json"
    found: list[dict[str, Any]] = json.loads(p.read_bytes()) if p.exists() else []
    return found


# --- the servers ---------------------------------------------------------------------


class FakeHub:
    """One uvicorn server for many FakeLogs: ``/<id>/...`` goes to log ``id``."""

    def __init__(self) -> None:
        self.logs: dict[str, FakeLog] = {}
        self.url = ""

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        ident, _, rest = scope["path"].lstrip("/").partition("/")
        log = self.logs.get(ident)
        if log is None:
            log = FakeLog(status=404)
        await log.asgi({**scope, "path": "/" + rest}, receive, send)

    def close(self) -> None:
        for log in self.logs.values():
            log.closing = True


def content(w: World, ts: int) -> dict[str, tuple[str, bytes]]:
    """The honest answers of a log serving ``w`` with a checkpoint signed at ``ts``."""
    out = {"checkpoint": ("text/plain; charset=utf-8", w.checkpoint(ts).encode())}
    for n, width in tiles.entries_for_range(0, w.size, w.size):
        first = n * tiles.TILE_WIDTH
        out[tiles.entries_path(n, width)] = (
            "application/octet-stream",
            tiles.encode_entry_bundle(w.records[first : first + width]),
        )
    return out


def head(status: int, *headers: tuple[str, str]) -> bytes:
    return response_head(status, list(headers))


def honest_reply(reply: Reply) -> None:
    status, ctype, body = reply.honest()
    reply.send(head(status, ("Content-Type", ctype), ("Content-Length", str(len(body)))) + body)


def only_on(prefix: str, attack: Callable[[Reply], None]) -> Callable[[Reply], None]:
    """Honest answers, except on paths starting with ``prefix``, which get ``attack``."""

    def run(reply: Reply) -> None:
        if reply.request.path.lstrip("/").startswith(prefix):
            attack(reply)
        else:
            honest_reply(reply)

    return run


# --- one case: set a device up, attack it, record what happened -----------------------


@dataclass
class Outcome:
    ctx: Ctx
    attack: Run
    before: dict[str, bytes]
    after: dict[str, bytes]
    evidence_before: list[dict[str, Any]]
    evidence_after: list[dict[str, Any]]
    requests: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # requests a redirect target received
    honest: Run | None = None


class Bench:
    def __init__(self, root: Path, hub: FakeHub) -> None:
        self.root = root
        self.hub = hub

    def _device(self, ident: str) -> tuple[Ctx, Path]:
        return _setup(self.root / ident)

    def fake(
        self, ident: str, play: Callable[[Ctx], None], *extra: str, honest_after: bool = False
    ) -> Outcome:
        c, d = self._device(ident)
        before, ev = snapshot(d), evidence(d)
        play(c)
        self.hub.logs[ident] = c.log
        try:
            r = sync(d, f"{self.hub.url}/{ident}", "--timeout", str(DEADLINE), *extra)
        finally:
            c.log.closing = True
        out = Outcome(c, r, before, snapshot(d), ev, evidence(d), list(c.log.requests))
        if honest_after:
            honest = FakeLog()
            honest.publish(c.world, TS + 10)
            self.hub.logs[ident] = honest
            out.honest = sync(d, f"{self.hub.url}/{ident}")
        return out

    def raw(
        self,
        ident: str,
        behaviour: Callable[[Reply], None],
        *,
        elsewhere: Callable[[RawServer], Callable[[Reply], None]] | None = None,
        honest_after: bool = False,
    ) -> Outcome:
        c, d = self._device(ident)
        honest = content(c.world, TS + 10)
        before, ev = snapshot(d), evidence(d)
        with (
            RawServer(content=dict(honest), host="127.0.0.2") as other,
            RawServer(behaviour if elsewhere is None else elsewhere(other), dict(honest)) as srv,
        ):
            r = sync(d, srv.url, "--timeout", str(DEADLINE))
        out = Outcome(c, r, before, snapshot(d), ev, evidence(d), srv.paths(), other.paths())
        if honest_after:
            with RawServer(content=honest) as srv:
                out.honest = sync(d, srv.url)
        return out


# gzip bombs


def endless_gzip(reply: Reply) -> None:
    """``Content-Encoding: gzip``, chunked, inflating to 4 GiB (4 MB on the wire), never ending."""
    reply.send(
        head(
            200,
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Encoding", "gzip"),
            ("Transfer-Encoding", "chunked"),
        )
        + chunked(GZIP_HEAD)
    )
    for _ in range(256):  # 16 MiB of zeros per chunk of 16 KiB
        if reply.closing:
            return
        reply.send(chunked(GZIP_MIB * 16))
    reply.send(b"0\r\n\r\n")


#: 4 GiB of zeros, gzipped twice: a few KB on the wire.
NESTED_BOMB = gzip_bytes(gzip_zeros(4096))


def nested_gzip(reply: Reply) -> None:
    reply.send(
        head(
            200,
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Encoding", "gzip, gzip"),
            ("Content-Length", str(len(NESTED_BOMB))),
        )
        + NESTED_BOMB
    )


# framing


def huge_header(reply: Reply) -> None:
    reply.send(
        head(200, ("Content-Type", "text/plain"), ("X-Pad", "a" * (8 << 20)), ("Content-Length", "2")) + b"ok"
    )


def many_headers(reply: Reply) -> None:
    headers = [("Content-Type", "text/plain")] + [(f"X-H{i}", "b" * 64) for i in range(100_000)]
    reply.send(response_head(200, [*headers, ("Content-Length", "2")]) + b"ok")


def header_never_ends(reply: Reply) -> None:
    reply.send(b"HTTP/1.1 200 OK\r\nX-Pad: ")
    for _ in range(100_000):
        if reply.closing:
            return
        reply.send(b"c" * 4096)


def chunked_forever(reply: Reply) -> None:
    _, ctype, body = reply.honest()
    reply.send(head(200, ("Content-Type", ctype), ("Transfer-Encoding", "chunked")))
    for _ in range(1_000_000):
        if reply.closing:
            return
        reply.send(chunked(body or b"x"))


def chunked_forever_slowly(reply: Reply) -> None:
    reply.send(head(200, ("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")))
    for _ in range(10_000):
        if reply.closing:
            return
        reply.send(chunked(b"a"))
        time.sleep(0.1)


def status_line_slowly(reply: Reply) -> None:
    for ch in b"HTTP/1.1 200 OK\r\n":
        if reply.closing:
            return
        reply.send(bytes([ch]))
        time.sleep(0.5)


def content_length_lie(reply: Reply) -> None:
    _, ctype, body = reply.honest()
    reply.send(head(200, ("Content-Type", ctype), ("Content-Length", str(len(body) + 1000))) + body)
    reply.sock.shutdown(2)


def content_length_1tb(reply: Reply) -> None:
    reply.send(head(200, ("Content-Type", "text/plain"), ("Content-Length", str(10**12))) + b"x" * 1000)


def close_at_once(reply: Reply) -> None:
    reply.sock.shutdown(2)


def not_http(reply: Reply) -> None:
    reply.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    reply.sock.shutdown(2)


def two_content_lengths(reply: Reply) -> None:
    _, ctype, body = reply.honest()
    reply.send(
        head(200, ("Content-Type", ctype), ("Content-Length", str(len(body))), ("Content-Length", "3")) + body
    )


def redirect_to(status: int) -> Callable[[RawServer], Callable[[Reply], None]]:
    def make(other: RawServer) -> Callable[[Reply], None]:
        def run(reply: Reply) -> None:
            reply.send(head(status, ("Location", other.url + reply.request.path), ("Content-Length", "0")))

        return run

    return make


def redirect_loop(reply: Reply) -> None:
    reply.send(head(302, ("Location", reply.request.path), ("Content-Length", "0")))


def mislabelled(ctype: str) -> Callable[[Reply], None]:
    def run(reply: Reply) -> None:
        status, _, body = reply.honest()
        reply.send(head(status, ("Content-Type", ctype), ("Content-Length", str(len(body)))) + body)

    return run


def fixed(status: int, ctype: str, body: bytes) -> Callable[[Reply], None]:
    def run(reply: Reply) -> None:
        reply.send(head(status, ("Content-Type", ctype), ("Content-Length", str(len(body)))) + body)

    return run


def slow(c: Ctx) -> None:
    c.log.slow = True


@dataclass(frozen=True)
class RawAttack:
    name: str
    behaviour: Callable[[Reply], None]
    error: str
    on: str = "checkpoint"


RAW_ATTACKS = [
    RawAttack("huge-header-8MiB", huge_header, "unreachable"),
    RawAttack("100k-headers", many_headers, "unreachable"),
    RawAttack("header-never-ends", header_never_ends, "unreachable"),
    RawAttack("chunked-forever-checkpoint", chunked_forever, "response-too-large"),
    RawAttack("chunked-forever-tiles", chunked_forever, "response-too-large", on="tile/entries"),
    RawAttack("chunked-forever-slowly", chunked_forever_slowly, "unreachable"),
    RawAttack("status-line-slowly", status_line_slowly, "unreachable"),
    RawAttack("content-length-lie", content_length_lie, "unreachable"),
    RawAttack("content-length-1TB", content_length_1tb, "response-too-large"),
    RawAttack("close-at-once", close_at_once, "unreachable"),
    RawAttack("not-http", not_http, "unreachable"),
    RawAttack("two-content-lengths", two_content_lengths, "unreachable"),
    RawAttack("gzip-bomb-checkpoint", endless_gzip, "response-too-large"),
    RawAttack("gzip-bomb-tiles", endless_gzip, "response-too-large", on="tile/entries"),
]
REDIRECTS = [301, 302, 303, 307, 308]
CONTENT_TYPES = ["text/html", "application/json", "image/png", ""]
PORTAL = b"<!doctype html><html><body><form>Log in to the hotel Wi-Fi</form></body></html>"
PROBLEM_200 = b'{"type": "urn:writ:problem:overloaded", "status": 503}'


def cases(b: Bench) -> dict[str, Callable[[], Outcome]]:
    out: dict[str, Callable[[], Outcome]] = {}
    for a in ATTACKS:
        name = "fake-" + a.play.__name__
        again = a.play.__name__ in ("forged_record", "endless_body")
        out[name] = partial(b.fake, name, a.play, honest_after=again)
    out["slow-loris"] = partial(b.fake, "slow-loris", slow)
    for ra in RAW_ATTACKS:
        name = "raw-" + ra.name
        out[name] = partial(
            b.raw, name, only_on(ra.on, ra.behaviour), honest_after=ra.name.startswith("gzip")
        )
    out["raw-nested-gzip-bomb"] = lambda: b.raw("raw-nested-gzip-bomb", nested_gzip)
    for st in REDIRECTS:
        out[f"redirect-{st}"] = partial(b.raw, f"redirect-{st}", honest_reply, elsewhere=redirect_to(st))
    out["redirect-loop-tiles"] = lambda: b.raw("redirect-loop-tiles", only_on("tile/", redirect_loop))
    for ct in CONTENT_TYPES:
        out[f"ctype-{ct or 'none'}"] = partial(b.raw, f"ctype-{ct or 'none'}", mislabelled(ct))
    out["captive-portal"] = lambda: b.raw(
        "captive-portal", only_on("checkpoint", fixed(200, "text/html", PORTAL))
    )
    out["problem-200"] = lambda: b.raw(
        "problem-200", only_on("checkpoint", fixed(200, "application/problem+json", PROBLEM_200))
    )
    out["baseline"] = lambda: b.raw("baseline", honest_reply)
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome | BaseException]]:
    hub = FakeHub()
    with serve_in_thread(hub.app) as url:
        hub.url = url
        bench = Bench(tmp_path_factory.mktemp("hostile"), hub)
        todo = cases(bench)

        def one(fn: Callable[[], Outcome]) -> Outcome | BaseException:
            try:
                return fn()
            except BaseException as exc:  # reported by the test of that case
                return exc

        with ThreadPoolExecutor(WORKERS) as pool:
            results = dict(zip(todo, pool.map(one, todo.values()), strict=True))
        hub.close()
        yield results


def outcome(outcomes: dict[str, Outcome | BaseException], ident: str) -> Outcome:
    o = outcomes[ident]
    if isinstance(o, BaseException):
        raise o
    return o


def assert_refused(o: Outcome, code: int, error: str) -> None:
    r = o.attack
    assert (r.code, r.out["error"]) == (code, error), r.out
    assert isinstance(r.out.get("detail"), str) and r.out["detail"]
    assert o.after == o.before, "the device state changed"
    assert r.seconds < MAX_SECONDS, f"took {r.seconds:.1f} s"
    assert r.max_rss < MAX_DEVICE_RSS, f"peak RSS {r.max_rss >> 20} MiB"
    if code == 4:  # a transport failure is not evidence against the log
        assert o.evidence_after == o.evidence_before
    else:
        assert o.evidence_after[-1]["kind"] == error and len(o.evidence_after) == len(o.evidence_before) + 1
    if o.honest is not None:  # and the device still syncs from an honest log
        assert (o.honest.code, o.honest.out["size"]) == (0, o.ctx.world.size), o.honest.out


# --- the tests -----------------------------------------------------------------------------


def test_baseline_the_raw_server_is_an_honest_log(outcomes: dict[str, Outcome | BaseException]) -> None:
    o = outcome(outcomes, "baseline")
    assert (o.attack.code, o.attack.out["size"]) == (0, o.ctx.world.size), o.attack.out
    assert o.attack.max_rss < MAX_DEVICE_RSS


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.play.__name__)
def test_fake_log_attacks_through_the_cli(
    outcomes: dict[str, Outcome | BaseException], attack: Attack
) -> None:
    o = outcome(outcomes, "fake-" + attack.play.__name__)
    assert_refused(o, 4 if issubclass(attack.error, TransportError) else 3, attack.error.type)


def test_slow_loris_through_the_cli_is_cut_at_the_deadline(
    outcomes: dict[str, Outcome | BaseException],
) -> None:
    o = outcome(outcomes, "slow-loris")
    assert_refused(o, 4, "unreachable")
    assert o.attack.seconds < DEADLINE + 5


@pytest.mark.parametrize("attack", RAW_ATTACKS, ids=lambda a: a.name)
def test_raw_attacks_are_refused_in_time_and_memory(
    outcomes: dict[str, Outcome | BaseException], attack: RawAttack
) -> None:
    o = outcome(outcomes, "raw-" + attack.name)
    assert_refused(o, 4, attack.error)
    if attack.error == "response-too-large" and attack.name.startswith("gzip"):
        assert o.attack.out["limit"] == (MAX_CHECKPOINT if attack.on == "checkpoint" else MAX_ENTRY_BUNDLE)


def test_nested_gzip_bomb_is_capped_too(outcomes: dict[str, Outcome | BaseException]) -> None:
    assert len(NESTED_BOMB) < 16 * 1024
    assert_refused(outcome(outcomes, "raw-nested-gzip-bomb"), 4, "response-too-large")


@pytest.mark.parametrize("status", REDIRECTS)
def test_redirect_to_another_host_is_not_followed(
    outcomes: dict[str, Outcome | BaseException], status: int
) -> None:
    """The other host serves a perfectly valid ledger; the device must still not go
    there on the word of a redirect, and nobody there hears from it."""
    o = outcome(outcomes, f"redirect-{status}")
    assert_refused(o, 4, "http-error")
    assert o.attack.out["status"] == status and o.elsewhere == []


def test_redirect_loop_on_tiles_is_not_followed(outcomes: dict[str, Outcome | BaseException]) -> None:
    o = outcome(outcomes, "redirect-loop-tiles")
    assert_refused(o, 4, "http-error")
    assert o.attack.out["status"] == 302
    assert len(o.requests) <= 1 + 4  # the checkpoint, then at most one round of tile requests


@pytest.mark.parametrize("ctype", CONTENT_TYPES)
def test_wrong_content_type_on_honest_bytes_changes_nothing(
    outcomes: dict[str, Outcome | BaseException], ctype: str
) -> None:
    """Only the bytes are trusted, and only once they verify: honest bytes under any
    content type sync; the label neither helps nor hurts."""
    o = outcome(outcomes, f"ctype-{ctype or 'none'}")
    assert (o.attack.code, o.attack.out["size"]) == (0, o.ctx.world.size), o.attack.out


def test_captive_portal_html_is_refused_as_a_bad_note(outcomes: dict[str, Outcome | BaseException]) -> None:
    """A 200 text/html page where the checkpoint should be: exit 3, evidence kept, state unchanged."""
    assert_refused(outcome(outcomes, "captive-portal"), 3, "bad-note")


def test_problem_json_with_status_200_is_not_a_checkpoint(
    outcomes: dict[str, Outcome | BaseException],
) -> None:
    assert_refused(outcome(outcomes, "problem-200"), 3, "bad-note")


def test_frozen_view_through_the_cli_syncs_but_goes_stale(tmp_path: Path) -> None:
    """The log keeps serving the checkpoint the device has (no new signature for two
    days): nothing to refuse, but the device reports itself stale and refuses
    credentials under its default policy."""
    c, d = _setup(tmp_path)
    later = TS + 2 * 86400
    hub = FakeHub()
    hub.logs["frozen"] = c.log  # it serves the accepted checkpoint, signed at TS
    with serve_in_thread(hub.app) as url:
        r = sync(d, url + "/frozen", now=later)
    c.log.closing = True
    assert r.code == 0 and (r.out["size"], r.out["appended"], r.out["stale"]) == (c.have, 0, True)
    status = device("device", "status", "--state", d, "--now", str(later)).out
    assert status["stale"] is True and status["staleness"] == 2 * 86400
    ch = device("device", "challenge", "--state", d).out
    grant = c.world.records[c.have - 1]  # the tablet's grant
    auth = tmp_path / "auth.bin"
    key, challenge = bytes.fromhex(ch["device_key"]), bytes.fromhex(ch["challenge"])
    auth.write_bytes(messages.make_auth(grant, c.world.tablet, key, challenge, later))
    r = device("device", "check", "--state", d, "--auth", auth, "--now", str(later))
    assert (r.code, r.out["accepted"], r.out["reason"]) == (1, False, "stale")


def test_the_integrator_cli_against_a_nested_gzip_bomb() -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (DEVICE_AS_LIMIT, DEVICE_AS_LIMIT))

    with RawServer(nested_gzip) as srv:
        p = subprocess.run(
            [*writ_command(), "audit", "--server", srv.url, "--anchor", "00" * 32, "--json"],
            capture_output=True,
            timeout=60,
            check=False,
            preexec_fn=limit,
        )
    assert b"Traceback" not in p.stderr, p.stderr.decode()[-1500:]
    out = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert (p.returncode, out["error"]) == (4, "response-too-large"), out


# --- hostile ledger data behind honest framing (unsigned sizes, malformed events) ---------


def _tile_paths(srv: RawServer) -> list[str]:
    return [p for p in srv.paths() if p.startswith("/tile/")]


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-device", "synced-device"])
def test_claimed_256000_by_an_unknown_key_with_endless_garbage_tiles(tmp_path: Path, fresh: bool) -> None:
    """The log claims 256,000 records under a key nobody granted and would
    serve garbage tiles forever: one tile is fetched, its first record
    refused (exit 3, evidence), the state untouched."""
    c, d = _setup(tmp_path / "synced")
    if fresh:
        d = tmp_path / "fresh"
        w = c.world
        r = device("device", "init", "--state", d, "--anchor", w.root.public_key.hex(), "--origin", w.origin)
        assert r.code == 0
    note = c.world.checkpoint(TS + 1, 256_000, root=bytes(32), key=signer("mallory"))
    before = snapshot(d)
    content = {"checkpoint": ("text/plain; charset=utf-8", note.encode())}
    with RawServer(garbage_entries(), content) as srv:
        r = sync(d, srv.url, "--timeout", str(DEADLINE))
    assert r.code == 3 and isinstance(r.out["message"], str), r.out
    assert len(_tile_paths(srv)) == 1, srv.paths()
    assert snapshot(d) == before and evidence(d)[-1]["kind"] == r.out["error"]
    assert r.max_rss < MAX_DEVICE_RSS


@pytest.mark.parametrize("key", ["log", "mallory"])
def test_checkpoint_of_size_2_63_is_a_clean_exit_3(tmp_path: Path, key: str) -> None:
    """Size 2**63-1 was a MemoryError traceback; now it is refused against the
    tree the device could build, with a window of tile requests at most."""
    c, d = _setup(tmp_path)
    honest = content(c.world, TS + 10)
    honest["checkpoint"] = (
        "text/plain; charset=utf-8",
        c.world.checkpoint(TS + 1, 2**63 - 1, root=bytes(32), key=signer(key)).encode(),
    )
    before = snapshot(d)
    with RawServer(content=honest) as srv:
        r = sync(d, srv.url, "--timeout", str(DEADLINE))
    assert (r.code, r.out["error"]) == (3, "fork" if key == "log" else "untrusted-checkpoint"), r.out
    assert r.out["message"] and snapshot(d) == before
    assert len(_tile_paths(srv)) <= 4 and r.max_rss < MAX_DEVICE_RSS


@pytest.mark.parametrize(
    "payload",
    [deep_json(200_000), deep_json(9), '{"start": 0, "records": ["%%%"]}', "x" * (MAX_SSE_EVENT + 1)],
    ids=["deep-nesting", "nine-levels", "bad-base64", "oversized"],
)
async def test_malformed_events_drop_the_connection_and_the_client_recovers(payload: str) -> None:
    """One bad event (a RecursionError once escaped and the client never came
    back): the connection is dropped, reported, and the next one delivers,
    over a real socket."""
    w = World()
    good = sse_event("checkpoint", w.checkpoint(TS).rstrip("\n"))
    behaviour = event_stream([sse_event("records", payload), good], [good])
    errors: list[Exception] = []
    with RawServer(behaviour) as srv:
        async with httpx.AsyncClient() as client:
            sse = SseSource(client, srv.url, records=True, backoff=(0.01, 0.02), on_error=errors.append)
            gen = sse.updates(lambda: w.size)
            try:
                up = await asyncio.wait_for(anext(gen), 20)
            finally:
                await gen.aclose()
    assert up.note == w.checkpoint(TS)
    assert errors and errors[0].__class__.__name__ in ("BadMessage", "ResponseTooLarge"), errors
    assert sse.connections >= 2


def _compact_event(ident: str, data: str) -> bytes:
    return f"id: {ident}\ndata: {data}\n\n".encode("utf-8", "surrogateescape")


_B85_BUNDLE = base64.b85encode(b"\x00\x03abc").decode()


@pytest.mark.parametrize(
    ("ident", "payload"),
    [
        ("0", deep_json(200_000)),
        ("3", json.dumps(base64.b85encode(bytes(200)).decode())),
        ("3", '["...", "x"]'),
        ("3", json.dumps([base64.b85encode(b"\x00\x10ab").decode(), "x"])),
        ("0", json.dumps([_B85_BUNDLE, "x"])),
        ("-1", json.dumps(["", "x"])),
        ("3", '{"records": [], "note": "x"}'),
    ],
    ids=[
        "deep-nesting",
        "delta-without-a-previous-note",
        "not-base85",
        "truncated-bundle",
        "more-records-than-the-size",
        "id-not-a-size",
        "wrong-shape",
    ],
)
async def test_malformed_compact_events_drop_the_connection_and_the_client_recovers(
    ident: str, payload: str
) -> None:
    """The compact format goes through the same bounded decoder: any event
    that does not decode drops the connection, is reported, and the next
    connection delivers, over a real socket."""
    w = World()
    note = w.checkpoint(TS)
    good = _compact_event(str(w.size), compact.encode(None, note, w.size, []))
    behaviour = event_stream([_compact_event(ident, payload), good], [good])
    errors: list[Exception] = []
    with RawServer(behaviour) as srv:
        async with httpx.AsyncClient() as client:
            sse = SseSource(client, srv.url, backoff=(0.01, 0.02), on_error=errors.append)
            gen = sse.updates(lambda: w.size)
            try:
                up = await asyncio.wait_for(anext(gen), 20)
            finally:
                await gen.aclose()
    assert up.note == note
    assert errors and errors[0].__class__.__name__ == "BadMessage", errors
    assert sse.connections >= 2
