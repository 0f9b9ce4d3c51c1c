"""``writ demo``: the lost-tablet story on this machine, in one command.

For a newcomer: it makes a DEMO root key (never for production: its
passphrase is printed and stored next to it), a server data directory, starts
the real server (``writ serve`` on 127.0.0.1:8000 or the first free port),
pushes the genesis and the log grant, grants an online ``revoker`` key, runs a
simulated fleet (:mod:`device_sim.fleet`) and an operator tablet, reports the
tablet lost and revokes it with the revoker key, and prints what happened and
where to look: the dashboard, the ``writ audit`` command line, the
``device_sim device`` commands. Then it keeps serving until Ctrl-C
(``--exit-after SECONDS``; ``0`` stops at once after the scenario).

The demo directory (``./writ-demo`` or ``--dir``)::

    demo.json       what the demo made (origin, anchor, the revoker's seq)
    root.key        the DEMO root key file (argon2id, interactive cost)
    PASSPHRASE      its passphrase (0600) -- a demo only
    revoker.key     the online revoker's seed (hex, 0600)
    server/         the server's data directory (writ server init)
    server.log      the server's log
    refusals.png    devices refusing the tablet over time
    events.jsonl    one line per simulated device
    result.json     the fleet's measurement

Running it again reuses the directory (same ledger, a new fleet and tablet);
``--fresh`` wipes a previous demo directory first. A directory that is not a
demo directory is never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ledger import records
from ledger.crypto import SeedSigner
from ledger.errors import TransportError, UsageError

__all__ = ["DEFAULT_DEVICES", "DEFAULT_DIR", "DEMO_ORIGIN", "register", "run_demo"]

DEFAULT_DIR = "writ-demo"
DEFAULT_DEVICES = 300
DEMO_ORIGIN = "demo.writ.example/plant-1"
MARKER = "demo.json"
PASSPHRASE_ENV = "WRIT_DEMO_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def _say(text: str = "") -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    _say("!" * width)
    for x in lines:
        _say(f"! {x.ljust(width - 4)} !")
    _say("!" * width)


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}; run `writ demo --fresh`") from None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, wanted: int) -> int:
    """``wanted`` when free, else the next free one of the hundred after it, else any."""
    for port in range(wanted, min(wanted + 100, 65536)) if wanted > 0 else ():
        if _port_free(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        free: int = s.getsockname()[1]
        return free


# --- the demo directory -------------------------------------------------------------


def _prepare_dir(d: Path, fresh: bool) -> bool:
    """Make or check the demo directory; True when an existing demo is reused."""
    marker = d / MARKER
    if d.exists() and not d.is_dir():
        raise UsageError(f"{d} exists and is not a directory")
    if d.exists() and any(d.iterdir()):
        if not marker.exists():
            raise UsageError(
                f"{d} exists and is not a writ demo directory (no {MARKER}): give another --dir; "
                "nothing was touched"
            )
        if fresh:
            shutil.rmtree(d)
        else:
            return True
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return False


def _create(d: Path, origin: str) -> dict[str, Any]:
    from api.cli import create_data_dir
    from ledger.signers.file import write_key_file

    root = SeedSigner.generate()
    passphrase = secrets.token_urlsafe(12)
    _write_secret(d / "PASSPHRASE", passphrase)
    write_key_file(d / "root.key", root, passphrase.encode(), cost="interactive", label="DEMO root key")
    revoker = SeedSigner.generate()
    _write_secret(d / "revoker.key", revoker.seed().hex())
    server = asyncio.run(create_data_dir(d / "server", root.public_key, origin))
    doc = {
        "warning": "DEMO KEYS: never use them for anything real",
        "origin": origin,
        "anchor": root.public_key.hex(),
        "log_public_key": server["log_public_key"],
        "revoker_public_key": revoker.public_key.hex(),
        "revoker_seq": None,
        "created": int(time.time()),
    }
    (d / MARKER).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def _load(d: Path) -> dict[str, Any]:
    try:
        doc = json.loads((d / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"{d / MARKER} is damaged: run `writ demo --fresh`") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("origin"), str)
        or not isinstance(doc.get("anchor"), str)
    ):
        raise UsageError(f"{d / MARKER} is damaged: run `writ demo --fresh`")
    return doc


# --- the server process ---------------------------------------------------------------


def start_server(d: Path, host: str, port: int) -> tuple[subprocess.Popen[bytes], str]:
    """``writ serve`` on the demo's data directory; returns once GET /checkpoint answers."""
    import httpx

    log = open(d / "server.log", "ab")  # noqa: SIM115 - the child process owns it
    cmd = [sys.executable, "-m", "ledger.cli", "serve", "--data", str(d / "server")]
    cmd += ["--host", host, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # Ctrl-C reaches the demo, which stops the server itself
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = (d / "server.log").read_text(encoding="utf-8", errors="replace")[-1500:]
            raise UsageError(f"the server exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(url + "/checkpoint", timeout=1.0, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise TransportError(f"the server at {url} did not become ready in {READY_TIMEOUT:.0f} s")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait (SIGKILL after STOP_TIMEOUT s)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --- the scenario -----------------------------------------------------------------------


async def _scenario(d: Path, url: str, doc: dict[str, Any], devices: int, seed: int | None) -> dict[str, Any]:
    from ledger.signers.file import load_key_file

    from .fleet import FleetOptions, Integrator, run_lost_tablet

    root = load_key_file(d / "root.key", _read_secret(d / "PASSPHRASE").encode())
    revoker = SeedSigner(bytes.fromhex(_read_secret(d / "revoker.key")))
    integ = Integrator(url, root)
    try:
        did = await integ.ensure_ready(genesis=True)
        if did:
            _say(f"pushed {' and '.join(did)} (log key {integ.log_key.hex()[:16]}…)")
        st = integ.state
        assert st is not None
        seq = doc.get("revoker_seq")
        if not (isinstance(seq, int) and st.grant_active(seq, int(time.time())) is not None):
            pushed = await integ.push(
                [
                    (
                        lambda s, p, t: records.Grant(
                            s, p, t, revoker.public_key, records.ROLE_REVOKER, "", "revoker-demo", 0, 0
                        ),
                        root,
                    )
                ]
            )
            seq = pushed.seqs[0]
            doc["revoker_seq"] = seq
            (d / MARKER).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            _say(f"granted the online revoker key (seq {seq}): it can revoke and nothing else")
        _say(f"starting {devices} simulated devices and an operator tablet…")
        result = await run_lost_tablet(
            integ,
            devices,
            FleetOptions(seed=seed, deadline=120.0),
            revoker=(seq, revoker),
            plot=d / "refusals.png",
            json_events=d / "events.jsonl",
            log=lambda line: _say("  " + line),
        )
    finally:
        integ.close()
    out = result.to_json()
    out["revoker_seq"] = seq
    (d / "result.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def _guide(d: Path, url: str, doc: dict[str, Any], fleet: dict[str, Any]) -> list[str]:
    anchor, origin = doc["anchor"], doc["origin"]
    dev = d / "plc-1"
    return [
        f"export {PASSPHRASE_ENV}=$(cat {d / 'PASSPHRASE'})",
        f"python -m device_sim device init --state {dev} --anchor {anchor} --origin {origin} --name plc-1",
        f"writ grant --server {url} --request {dev / 'enroll.bin'} --role device --name plc-1"
        f" --key {d / 'root.key'} --passphrase-env {PASSPHRASE_ENV}",
        f"python -m device_sim device sync --state {dev} --server {url}",
        f"python -m device_sim device status --state {dev}",
        f"python -m device_sim device receipt --state {dev} --server {url}",
    ]


def _report(d: Path, url: str, doc: dict[str, Any], fleet: dict[str, Any], guide: list[str]) -> None:
    n = fleet["devices"]
    _say()
    _say("What happened")
    _say(f"  1. {n} simulated devices each made a key and an enrollment request; the root granted")
    _say(f"     them and an operator tablet (seq {fleet['tablet_seq']}); every device accepted the")
    _say("     tablet by challenge-response.")
    _say(f"  2. The tablet was reported lost. The online revoker key (seq {fleet['revoker_seq']})")
    _say(f"     signed the revoke (seq {fleet['revoke_seq']}), with the root key still in the safe;")
    _say(f"     the server acknowledged it in {fleet['revoke_ack_ms']} ms.")
    _say(
        f"  3. {'Every' if fleet['all_refused'] else 'NOT every'} device refused the tablet: "
        f"p50 {fleet['refused_p50_s']} s, p99 {fleet['refused_p99_s']} s, max {fleet['refused_max_s']} s"
        " after the acknowledgement"
    )
    _say(
        f"     ({fleet['push']} push, {fleet['connections']} connections,"
        f" {fleet['bytes_per_device']} bytes per device; lower bound here {fleet['lower_bound_s']} s)."
    )
    _say(f"  4. {fleet['receipts']}/{n} devices posted a signed receipt of the head they applied.")
    _say()
    _say("Where to look")
    _say(f"  dashboard:  {url}/")
    _say(f"  fleet:      {url}/v1/fleet")
    _say(f"  audit:      writ audit --server {url} --anchor {doc['anchor']}")
    _say(f"  plot:       {d / 'refusals.png'}")
    _say("  one device of your own:")
    for line in guide:
        _say(f"    {line}")
    _say()


def run_demo(
    directory: Path,
    *,
    devices: int = DEFAULT_DEVICES,
    host: str = "127.0.0.1",
    port: int = 8000,
    exit_after: float | None = None,
    fresh: bool = False,
    seed: int | None = None,
) -> dict[str, Any]:
    """The whole demo (see the module docstring); the JSON the command prints."""
    from .fleet import raise_open_files_limit

    d = directory.absolute()
    reused = _prepare_dir(d, fresh)
    doc = _load(d) if reused else _create(d, DEMO_ORIGIN)
    passphrase = _read_secret(d / "PASSPHRASE")
    _banner(
        [
            "DEMO KEY -- never for production",
            f"root key:   {d / 'root.key'}",
            f"passphrase: {passphrase}   (stored in {d / 'PASSPHRASE'})",
            "Anyone who reads this can sign for this ledger. Make real keys with `writ root init`.",
        ]
    )
    raise_open_files_limit()
    chosen = pick_port(host, port)
    if chosen != port:
        _say(f"port {port} is busy; using {chosen}")
    proc, url = start_server(d, host, chosen)
    _say(f"{'reusing' if reused else 'created'} the demo in {d}; the server runs at {url} (pid {proc.pid})")
    stopped_by = "exit-after"
    try:
        fleet = asyncio.run(_scenario(d, url, doc, devices, seed))
        guide = _guide(d, url, doc, fleet)
        _report(d, url, doc, fleet, guide)
        try:
            if exit_after is None:
                _say("Serving until Ctrl-C…")
                while proc.poll() is None:
                    time.sleep(0.5)
                stopped_by = "server-exited"
            elif exit_after > 0:
                _say(f"Serving for {exit_after:g} s…")
                end = time.monotonic() + exit_after
                while proc.poll() is None and time.monotonic() < end:
                    time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        except KeyboardInterrupt:
            stopped_by = "ctrl-c"
    finally:
        code = stop_server(proc)
    _say(f"the server stopped (exit {code})")
    return {
        "demo": str(d),
        "reused": reused,
        "server": url,
        "server_pid": proc.pid,
        "server_exit": code,
        "stopped": True,
        "stopped_by": stopped_by,
        "dashboard": url + "/",
        "origin": doc["origin"],
        "anchor": doc["anchor"],
        "demo_key": {
            "root_key": str(d / "root.key"),
            "passphrase_file": str(d / "PASSPHRASE"),
            "demo_only": True,
        },
        "revoker": {"seq": fleet["revoker_seq"], "key_file": str(d / "revoker.key")},
        "fleet": fleet,
        "audit": f"writ audit --server {url} --anchor {doc['anchor']}",
        "device_commands": guide,
        "plot": str(d / "refusals.png"),
    }


# --- the command --------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    if args.devices < 1:
        raise UsageError("--devices is at least 1")
    if args.exit_after is not None and args.exit_after < 0:
        raise UsageError("--exit-after is a number of seconds >= 0")
    try:
        return run_demo(
            Path(args.dir),
            devices=args.devices,
            host=args.host,
            port=args.port,
            exit_after=args.exit_after,
            fresh=args.fresh,
            seed=args.seed,
        )
    except OSError as exc:
        raise UsageError(f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or ''})") from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``writ demo``."""
    p = subparsers.add_parser(
        "demo",
        help="the lost-tablet story on this machine: a demo ledger, a server, a simulated fleet",
        description="Make a DEMO root key and ledger, start the server, run a simulated fleet, lose a "
        "tablet and watch every device refuse it. Never for production keys.",
    )
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"the demo directory (default ./{DEFAULT_DIR})")
    p.add_argument(
        "--devices", type=int, default=DEFAULT_DEVICES, help=f"simulated devices ({DEFAULT_DEVICES})"
    )
    p.add_argument("--host", default="127.0.0.1", help="the address the demo server listens on")
    p.add_argument("--port", type=int, default=8000, help="first port to try (8000)")
    p.add_argument(
        "--exit-after",
        type=float,
        metavar="SECONDS",
        help="stop serving after this long (0: right after the scenario); default: until Ctrl-C",
    )
    p.add_argument("--fresh", action="store_true", help="wipe a previous demo directory first")
    p.add_argument("--seed", type=int, help="seed of the simulation's random choices")
    p.set_defaults(handler=cmd_demo)
