"""The benchmark suite's machinery: results, a real server, pre-signed chains, a raw HTTP client.

Every module returns a :data:`Result` (a JSON-able dict) built with
:func:`module_result` and :func:`figure`; ``bench/report.py`` renders them.
A figure is the median of repeated runs with its spread, beside the limit
measured in the same run and beside the comparable figure of an established
system, with the exact command that reproduces it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from device_sim.server_process import run_writ, start_server, stop_server
from ledger import crypto, encoding, records
from ledger.crypto import SeedSigner
from ledger.records import Genesis, Grant, Revoke, SignedRecord
from ledger.state import LedgerState
from ledger.verifier import usable_cores

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ORIGIN = "bench.writ.example/ledger"
#: a spread (max - min) over this share of the median is called wide (a noisy machine).
WIDE = 0.25
MSGPACK = {"Content-Type": "application/msgpack"}

Result = dict[str, Any]
Figure = dict[str, Any]


# --- configuration ----------------------------------------------------------------------------


@dataclass
class Config:
    """How a module runs: ``quick`` (a few minutes for the suite) or full; where files go."""

    quick: bool = False
    out_dir: Path = DOCS
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="writ-bench-")))
    #: results one module leaves for another in the same suite run (e.g. fleet runs).
    shared: dict[str, Any] = field(default_factory=dict)

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


# --- results ----------------------------------------------------------------------------------


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def stats(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": 0, "values": [], "wide": False}
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    wide = len(vals) > 1 and med != 0 and (hi - lo) / abs(med) > WIDE
    return {
        "median": med,
        "min": lo,
        "max": hi,
        "runs": len(vals),
        "values": [round(v, 4) for v in vals],
        "wide": wide,
    }


def ref(label: str, value: float | None, unit: str, source: str = "measured in this run") -> dict[str, Any]:
    """A limit or a comparable: what it is, its value, where the number comes from."""
    return {"label": label, "value": value, "unit": unit, "source": source}


def figure(
    key: str,
    label: str,
    values: Sequence[float] | float | None,
    unit: str,
    *,
    command: str,
    limit: dict[str, Any] | None = None,
    comparable: dict[str, Any] | None = None,
    target: tuple[str, float] | None = None,
    target_of_limit: float | None = None,
    note: str = "",
) -> Figure:
    """One measured figure.

    ``target`` = (">=" or "<=", value) in the figure's unit; ``target_of_limit``
    = the least acceptable figure / limit ratio (the limit must be given).
    """
    vals = [values] if isinstance(values, int | float) else list(values or [])
    st = stats(vals)
    fig: Figure = {"key": key, "label": label, "unit": unit, **st, "command": command, "note": note}
    med = st["median"]
    if limit is not None:
        lim = dict(limit)
        if med is not None and lim.get("value"):
            lim["ratio"] = _sig(med / float(lim["value"]))
        fig["limit"] = lim
    if comparable is not None:
        comp = dict(comparable)
        if med is not None and comp.get("value"):
            comp["ratio"] = _sig(med / float(comp["value"]))
        fig["comparable"] = comp
    if target is not None:
        op, want = target
        met = None if med is None else (med >= want if op == ">=" else med <= want)
        fig["target"] = {"text": f"{op} {_num(want)} {unit}", "met": met}
    elif target_of_limit is not None:
        ratio = fig.get("limit", {}).get("ratio")
        met = None if ratio is None else ratio >= target_of_limit
        fig["target"] = {"text": f">= {target_of_limit} x the limit", "met": met}
    return fig


def _sig(x: float) -> float:
    """``x`` to 3 significant digits (a ratio of 1e-6 must not print as 0)."""
    return float(f"{x:.3g}")


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:g}"


def module_result(name: str, title: str, command: str) -> Result:
    return {
        "name": name,
        "title": title,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_before": loadavg(),
        "_t0": time.monotonic(),
        "figures": [],
        "tables": [],
        "images": [],
        "notes": [],
        "profiles": [],
    }


def finish(res: Result) -> Result:
    res["duration_s"] = round(time.monotonic() - res.pop("_t0", time.monotonic()), 1)
    res["load_after"] = loadavg()
    return res


def table(title: str, columns: list[str], rows: list[list[Any]], note: str = "") -> dict[str, Any]:
    return {"title": title, "columns": columns, "rows": rows, "note": note}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    try:
        import nacl

        nacl_version = str(getattr(nacl, "__version__", "?"))
    except ImportError:
        nacl_version = "?"
    return {
        "cpu": cpu,
        "cores": usable_cores(),
        "memory_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pynacl": nacl_version,
        "sqlite": __import__("sqlite3").sqlite_version,
    }


def print_result(res: Result) -> None:
    """The figures of one module, for a person at a terminal."""
    print(f"== {res['title']} ({res.get('duration_s', '?')} s, load {res.get('load_before')})")
    for f in res["figures"]:
        med = f["median"]
        val = "n/a" if med is None else _fmt(med)
        spread = "" if f["runs"] < 2 else f"  [{_fmt(f['min'])}..{_fmt(f['max'])}, {f['runs']} runs]"
        wide = "  WIDE SPREAD" if f["wide"] else ""
        print(f"  {f['label']}: {val} {f['unit']}{spread}{wide}")
        if "limit" in f:
            lim = f["limit"]
            ratio = f"  (ratio {lim['ratio']})" if "ratio" in lim else ""
            print(f"      limit: {lim['label']}: {_fmt(lim['value'])} {lim['unit']}{ratio}")
        if "comparable" in f:
            c = f["comparable"]
            print(f"      comparable: {c['label']}: {_fmt(c['value'])} {c['unit']}")
        if "target" in f:
            t = f["target"]
            print(
                f"      target {t['text']}: {'MET' if t['met'] else 'MISSED' if t['met'] is False else '?'}"
            )
    for t in res["tables"]:
        print(f"  -- {t['title']}")
        print("     " + " | ".join(t["columns"]))
        for row in t["rows"]:
            print("     " + " | ".join(str(x) for x in row))
    for n in res["notes"]:
        print(f"  note: {n}")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and abs(v) < 100:
        return f"{v:.3g}"
    if isinstance(v, int | float):
        return f"{v:,.0f}"
    return str(v)


def module_main(
    name: str, run: Callable[[Config], Result], argv: list[str] | None, doc: str | None
) -> Result:
    """The command line of one module run alone: prints its figures, optionally saves its JSON."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--out", type=Path, default=DOCS, help="where plots go (default docs/)")
    ap.add_argument("--json", type=Path, help="also write the result to this JSON file")
    args = ap.parse_args(argv)
    cfg = Config(quick=args.quick, out_dir=args.out)
    try:
        res = finish(run(cfg))
    finally:
        cleanup(cfg)
    print_result(res)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return res


def cleanup(cfg: Config) -> None:
    import shutil

    shutil.rmtree(cfg.work, ignore_errors=True)


# --- pre-signed chains ------------------------------------------------------------------------


class Chain:
    """Records signed by ``root`` on a private verified state: the integrator's mirror.

    Records are applied with the signature pre-checked (they were signed just
    now), so making 100,000 costs signing only.
    """

    def __init__(self, root: SeedSigner, origin: str = ORIGIN) -> None:
        self.root = root
        self.origin = origin
        self.state = LedgerState(root.public_key, origin=origin)
        self.open_grants: list[int] = []
        self._n = 0

    def _add(self, body: records.Body) -> SignedRecord:
        raw = records.sign(body, self.root)
        return self.state.apply(raw, prechecked=(self.root.public_key, True))

    def _head(self) -> tuple[int, bytes, int]:
        st = self.state
        return st.size, st.root, max(int(time.time()), st.last_time)

    def genesis(self) -> SignedRecord:
        s, p, t = self._head()
        return self._add(Genesis(s, p, t, self.origin, self.root.public_key, None))

    def grant(self, subject: bytes, role: str, name: str) -> SignedRecord:
        s, p, t = self._head()
        rec = self._add(Grant(s, p, t, subject, role, "", name, 0, 0))
        if role in (records.ROLE_DEVICE, records.ROLE_OPERATOR):
            self.open_grants.append(s)
        return rec

    def revoke(self, target: int | bytes, reason: int = int(records.Reason.LOST)) -> SignedRecord:
        s, p, t = self._head()
        return self._add(Revoke(s, p, t, 0, target, reason))

    def next(self) -> SignedRecord:
        """The next record of a plausible history: device grants, every 10th a revoke."""
        self._n += 1
        if self._n % 10 == 0 and self.open_grants:
            return self.revoke(self.open_grants.pop(0))
        i = self.state.size
        subject = crypto.sha256(self.root.public_key + b"subject" + i.to_bytes(8, "big"))
        return self.grant(subject, records.ROLE_DEVICE, f"dev-{i}")

    def make(self, n: int) -> list[bytes]:
        return [self.next().raw for _ in range(n)]


# --- a real server ----------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    pid: int
    data_dir: Path
    chain: Chain
    log_public_key: bytes
    handle: Any

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def post_records(url: str, raws: list[bytes], client: httpx.Client | None = None) -> dict[str, Any]:
    body = encoding.pack_records(raws)
    if client is None:
        r = httpx.post(url + "/v1/records", content=body, headers=MSGPACK, timeout=60)
    else:
        r = client.post(url + "/v1/records", content=body, headers=MSGPACK, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/records: {r.status_code} {r.text[:300]}")
    doc: dict[str, Any] = r.json()
    return doc


@contextlib.contextmanager
def ledger_server(
    work: Path, *, n_records: int = 0, seed: bytes | None = None, **flags: Any
) -> Iterator[Served]:
    """``writ server init`` + the real ``writ serve`` (SQLite, fsync) on a free port, with a
    genesis, the log grant and ``n_records`` more records already appended (batches of 1000).

    ``flags`` are ``writ serve`` options; the write rate limit is lifted unless given."""
    root = SeedSigner(seed if seed is not None else os.urandom(32))
    data = Path(tempfile.mkdtemp(prefix="serve-", dir=work)) / "data"
    code, doc, err = run_writ(
        "server", "init", "--data", str(data), "--anchor", root.public_key.hex(), "--origin", ORIGIN
    )
    if code != 0:
        raise RuntimeError(f"writ server init failed: {doc} {err}")
    flags.setdefault("write_rate", 1_000_000)
    flags.setdefault("write_burst", 1_000_000)
    flags.setdefault("log_level", "warning")
    log_public_key = bytes.fromhex(doc["log_public_key"])
    srv = start_server(data, **flags)
    try:
        chain = Chain(root)
        first = [chain.genesis().raw, chain.grant(log_public_key, records.ROLE_LOG, "log").raw]
        post_records(srv.url, first)
        with httpx.Client() as client:
            left = n_records
            while left > 0:
                k = min(1000, left)
                post_records(srv.url, chain.make(k), client)
                left -= k
        yield Served(srv.url, srv.process.pid, data, chain, log_public_key, srv)
    finally:
        stop_server(srv.process, timeout=20)


# --- processes --------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def run_json(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, log: Path | None = None
) -> dict[str, Any]:
    """Run a command that prints one JSON document as its last stdout line (stderr to ``log``)."""
    with open(log, "ab") if log is not None else contextlib.nullcontext() as err:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err if err is not None else subprocess.PIPE,
            timeout=timeout,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    lines = proc.stdout.decode().strip().splitlines()
    try:
        doc: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        doc = {}
    doc.setdefault("_exit", proc.returncode)
    if proc.returncode != 0 and not doc.get("devices"):
        if log is not None:
            doc["_stderr"] = log.read_text(errors="replace")[-2000:]
        elif proc.stderr:
            doc["_stderr"] = proc.stderr.decode()[-2000:]
    return doc


def python_exe() -> str:
    return sys.executable


# --- a minimal HTTP/1.1 client (cheap enough to load a server from one Python process) ---------


class RawHttp:
    """One keep-alive HTTP/1.1 connection over asyncio streams; bodies by Content-Length."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        #: bytes of the last response's status line and headers.
        self.last_head_bytes = 0

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            await self.connect()
        assert self.writer is not None and self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        self.writer.write(head.encode("latin-1") + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        self.last_head_bytes = len(raw)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v.strip())
            elif k == "connection" and v.strip().lower() == "close":
                close = True
            elif k == "transfer-encoding":
                raise RuntimeError("RawHttp reads Content-Length bodies only")
        data = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


# --- profiles (py-spy) ------------------------------------------------------------------------


def pyspy_exe() -> str | None:
    """py-spy, from PATH or beside this interpreter (``pip install py-spy``); None when missing."""
    import shutil

    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('fn')} ({path})"


#: frames that every stack of a thread or a command shares: not worth an inclusive row.
_GENERIC = (
    "threading.py",
    "concurrent/futures/thread.py",
    "asyncio/runners.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "ledger/cli/main.py",
    "api/main.py",
    "api/cli.py",
    "(writ)",
    "<frozen",
    "asyncio/events.py",
    "asyncio/base_events.py",
    "runpy.py",
)

#: what a stack of ``writ serve`` is doing, by the first frame found in it.
SERVER_ROLES: list[tuple[str, str]] = [
    ("_connection_worker_thread", "SQLite thread (aiosqlite: SQL, commit, fsync)"),
    ("ledger.verify_worker", "signature-check worker processes (Ed25519, ahead of the rules)"),
    ("_verify_group", "verification (parse, rules, tree: writer thread, or loop for <=16 1-record POSTs)"),
    ("Runner.run", "event loop (HTTP, routing, JSON, checkpoint signing, SSE)"),
    # py-spy cannot always unwind through uvloop's C frames: a stack that starts at a
    # callback of the loop is still the event loop
    ("uvicorn/", "event loop (HTTP, routing, JSON, checkpoint signing, SSE)"),
    ("starlette/", "event loop (HTTP, routing, JSON, checkpoint signing, SSE)"),
    ("asyncio/", "event loop (HTTP, routing, JSON, checkpoint signing, SSE)"),
    ("api/", "event loop (HTTP, routing, JSON, checkpoint signing, SSE)"),
]


def summarize_pyspy(
    raw_path: Path, top: int = 14, roles: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Self and inclusive sample shares per function from ``py-spy record -f raw`` output,
    and the share of each role (the first ``roles`` substring found in a stack)."""
    self_: dict[str, int] = {}
    incl: dict[str, int] = {}
    by_role: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for line in raw_path.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [_frame_name(f) for f in stack.split(";") if f]
            if not frames:
                continue
            self_[frames[-1]] = self_.get(frames[-1], 0) + n
            for f in set(frames):
                if not any(g in f for g in _GENERIC):
                    incl[f] = incl.get(f, 0) + n
            if roles is not None:
                label = next((lab for sub, lab in roles if sub in stack), "other")
                by_role[label] = by_role.get(label, 0) + n

    def share(d: dict[str, int], k: int) -> list[list[Any]]:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return [[name, f"{100 * v / total:.1f}%" if total else "?"] for name, v in best]

    out: dict[str, Any] = {"samples": total, "self": share(self_, top), "inclusive": share(incl, top)}
    if roles is not None:
        out["roles"] = share(by_role, len(by_role))
    return out


def _record(exe: str, rate: int, out: Path) -> list[str]:
    """``py-spy record`` at ``rate`` into ``out`` (raw format), child processes included
    (the signature-check workers)."""
    return [exe, "record", "--subprocesses", "--rate", str(rate), "--format", "raw", "--output", str(out)]


def profile_pid(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` on a running process for ``seconds`` (non-blocking sampling)."""
    exe = pyspy_exe()
    if exe is None:
        return None
    return subprocess.Popen(
        [
            *_record(exe, rate, out),
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_command(cmd: list[str], out: Path, rate: int = 250, timeout: float = 600) -> bool:
    """Run ``cmd`` under ``py-spy record``; False when py-spy is missing or failed."""
    exe = pyspy_exe()
    if exe is None:
        return False
    proc = subprocess.run(
        [*_record(exe, rate, out), "--", *cmd],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode == 0 and out.exists()


def profile_block(title: str, summary: dict[str, Any], how: str) -> dict[str, Any]:
    return {"title": title, "how": how, **summary}


def profile_server(
    pid: int, seconds: float, out: Path, load: Callable[[], object], title: str, during: str
) -> dict[str, Any] | None:
    """Sample the server ``pid`` with py-spy for ``seconds`` (to ``out``) while ``load``
    runs; the profile block (``during`` says what the load was), None without py-spy."""
    spy = profile_pid(pid, seconds, out)
    if spy is None:
        return None
    time.sleep(0.3)
    load()
    with contextlib.suppress(Exception):
        spy.wait(30)
    how = f"py-spy record --pid <writ serve> --rate 250 --nonblocking, {during}"
    return profile_block(title, summarize_pyspy(out, roles=SERVER_ROLES), how)


def wait_answering(
    proc: subprocess.Popen[bytes],
    url: str,
    what: str,
    timeout: float,
    ok: Callable[[httpx.Response], bool] = lambda _r: True,
) -> None:
    """Wait until GET ``url`` gets an answer ``ok`` accepts; RuntimeError when ``proc``
    exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if ok(httpx.get(url, timeout=1.0)):
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


# --- nginx (Debian's, run as a plain subprocess from a throw-away prefix) -------------------


def nginx_exe() -> str | None:
    import shutil

    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class Nginx:
    url: str
    static_url: str
    prefix: Path
    process: subprocess.Popen[bytes]

    def worker_pids(self) -> list[int]:
        return children(self.process.pid)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_nginx(work: Path, upstream_url: str, static_dir: Path | None = None) -> Iterator[Nginx]:
    """deploy/nginx/writ.conf (placeholders filled in as its header says) in front of
    ``upstream_url``, one worker, plus a plain static server of ``static_dir`` on another port."""
    exe = nginx_exe()
    if exe is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    prefix = Path(tempfile.mkdtemp(prefix="nginx-", dir=work))
    (prefix / "temp").mkdir()
    (prefix / "cache").mkdir()
    port, static_port = free_port(), free_port()
    site = (REPO / "deploy" / "nginx" / "writ.conf").read_text(encoding="utf-8")
    site = (
        site.replace("__LISTEN__", f"127.0.0.1:{port}")
        .replace("__UPSTREAM__", upstream_url.removeprefix("http://"))
        .replace("__CACHE_DIR__", str(prefix / "cache"))
    )
    (prefix / "writ.conf").write_text(site, encoding="utf-8")
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {k}_temp_path {prefix / 'temp' / k};\n"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    static = ""
    if static_dir is not None:
        static = (
            f"    server {{\n        listen 127.0.0.1:{static_port};\n        root {static_dir};\n"
            "        default_type application/octet-stream;\n"
            "        location = /checkpoint { default_type text/plain; }\n    }\n"
        )
    conf = (
        f"{user}worker_processes 1;\nworker_rlimit_nofile 20000;\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        "events { worker_connections 19000; }\n"
        "http {\n    default_type application/octet-stream;\n    access_log off;\n"
        "    keepalive_requests 1000000;\n"
        f"{temp}    include {prefix / 'writ.conf'};\n{static}}}\n"
    )
    (prefix / "nginx.conf").write_text(conf, encoding="utf-8")
    cmd = [
        exe,
        "-c",
        str(prefix / "nginx.conf"),
        "-p",
        str(prefix) + "/",
        "-g",
        f"daemon off; pid {prefix / 'nginx.pid'};",
    ]
    check = subprocess.run([*cmd, "-t"], capture_output=True, timeout=20, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t: {check.stderr.decode()}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(proc, url + "/healthz", "nginx", 10)
        yield Nginx(url, f"http://127.0.0.1:{static_port}", prefix, proc)
    finally:
        stop_server(proc, signal.SIGQUIT, timeout=10)  # graceful: workers finish their requests
