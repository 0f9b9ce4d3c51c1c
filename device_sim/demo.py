"""``writ demo``: the lost-tablet story on this machine, in one command.

For a newcomer: it makes a DEMO root key (never for production: its
passphrase is printed and stored next to it), runs ``writ server init``,
starts the real server (``writ serve`` on 127.0.0.1:8000 or the first free
port) as a child process, pushes the genesis and the log grant, grants an
online ``revoker`` key, runs a simulated fleet (:mod:`device_sim.fleet`) and an
operator tablet, reports the tablet lost and revokes it with the revoker key,
and prints what happened and where to look. Then it keeps serving until
Ctrl-C or SIGTERM (``--exit-after SECONDS``; ``0`` stops at once after the
scenario), and only while it serves does it print the dashboard's address.

Like a device, the demo never imports the server: ``writ server init`` and
``writ serve`` run as other programs (:mod:`device_sim.server_process`). On
Ctrl-C, SIGTERM or SIGHUP it stops its server (SIGTERM, then SIGKILL after
15 s) before it exits, so no server is left holding the data directory's lock.

The follow-up commands it prints run as printed, from any directory and
without an activated venv: ``writ`` is the absolute path of the script beside
this interpreter, ``python`` this interpreter, every file an absolute path,
and the signing tool's mirror (``--mirror``) lives in the demo directory.

The demo directory (``./writ-demo`` or ``--dir``)::

    demo.json       what the demo made (origin, anchor, the revoker's seq)
    root.key        the DEMO root key file (argon2id, interactive cost)
    PASSPHRASE      its passphrase (0600) -- a demo only
    revoker.key     the online revoker's key file (the same passphrase), for
                    ``writ revoke --revoker-key``
    server/         the server's data directory (writ server init)
    server.log      the server's log
    refusals.png    devices refusing the tablet over time
    events.jsonl    one line per simulated device
    result.json     the fleet's measurement
    mirror/         the verified mirror the printed ``writ`` commands sign on
    plc-N/          devices made by the printed commands

Running it again reuses the directory (same ledger, a new fleet and tablet);
``--fresh`` wipes a previous demo directory first. A directory that is not a
demo directory is never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from ledger import records
from ledger.crypto import SeedSigner
from ledger.errors import BadKeyFile, UsageError
from ledger.fileio import create_private
from ledger.signers.file import load_key_file, read_public_key, write_key_file

from . import server_process

__all__ = ["DEFAULT_DEVICES", "DEFAULT_DIR", "DEMO_ORIGIN", "register", "run_demo"]

DEFAULT_DIR = "writ-demo"
DEFAULT_DEVICES = 300
DEMO_ORIGIN = "demo.writ.example/plant-1"
MARKER = "demo.json"
PASSPHRASE_ENV = "WRIT_DEMO_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
#: the signals that end the demo (after it stopped its server).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _say(text: str = "") -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    _say("!" * width)
    for x in lines:
        _say(f"! {x.ljust(width - 4)} !")
    _say("!" * width)


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}; run `writ demo --fresh`") from None


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
    root = SeedSigner.generate()
    passphrase = secrets.token_urlsafe(12)
    create_private(d / "PASSPHRASE", passphrase.encode() + b"\n")
    write_key_file(d / "root.key", root, passphrase.encode(), cost="interactive", label="DEMO root key")
    revoker = SeedSigner.generate()
    write_key_file(
        d / "revoker.key", revoker, passphrase.encode(), cost="interactive", label="DEMO revoker key"
    )
    code, server, err = server_process.run_writ(
        "server", "init", "--data", str(d / "server"), "--anchor", root.public_key.hex(), "--origin", origin
    )
    if code != 0:
        raise UsageError(f"writ server init failed: {server.get('message') or err.strip()[-500:]}")
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
    try:
        read_public_key(d / "revoker.key")
    except (BadKeyFile, OSError):
        raise UsageError(
            f"{d / 'revoker.key'} is not a key file (an older demo made it): run `writ demo --fresh`"
        ) from None
    return doc


# --- the server process and the signals ----------------------------------------------


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt (also through asyncio)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_signals() -> Iterator[None]:
    """Turn the first of SIGINT/SIGTERM/SIGHUP into an exception (later ones are
    ignored, so stopping the server is never cut short); restore the handlers after."""

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread has signals
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _how(exc: KeyboardInterrupt) -> str:
    return exc.args[0] if isinstance(exc, Stopped) else "ctrl-c"


# --- what to type next -----------------------------------------------------------------


def _q(x: str | Path) -> str:
    return shlex.quote(str(x))


def writ_exe() -> str:
    """``writ`` as a user can type it from anywhere: the script beside this interpreter."""
    return " ".join(_q(w) for w in server_process.writ_command())


def device_exe() -> str:
    """``python -m device_sim`` with this interpreter."""
    return f"{_q(sys.executable)} -m device_sim"


def _serve_command(d: Path, host: str, port: int) -> str:
    return f"{writ_exe()} serve --data {_q(d / 'server')} --host {host} --port {port}"


# --- the scenario -----------------------------------------------------------------------


async def _scenario(d: Path, url: str, doc: dict[str, Any], devices: int, seed: int | None) -> dict[str, Any]:
    from .fleet import FleetOptions, Integrator, run_lost_tablet

    passphrase = _read_secret(d / "PASSPHRASE").encode()
    root = load_key_file(d / "root.key", passphrase)
    revoker = load_key_file(d / "revoker.key", passphrase)
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


def _guide(d: Path, url: str, doc: dict[str, Any]) -> list[str]:
    """The lost-tablet story with a device and a tablet of the reader's own: every line
    runs as printed (absolute paths; the passphrase comes from the first line); the last
    one is the device refusing the revoked tablet (exit 1)."""
    n = 1
    while (d / f"plc-{n}").exists() or (d / f"my-tablet-{n}").exists():
        n += 1
    name, dev, anchor = f"plc-{n}", d / f"plc-{n}", doc["anchor"]
    tname, tab = f"my-tablet-{n}", d / f"my-tablet-{n}"
    writ, device = writ_exe(), device_exe()
    ledger = f"--server {url} --anchor {anchor} --mirror {_q(d / 'mirror')}"
    pw = f"--passphrase-env {PASSPHRASE_ENV}"
    root = f"--key {_q(d / 'root.key')} {pw}"
    challenge = f"{device} device challenge --state {_q(dev)} --out {_q(d / 'challenge.json')}"
    answer = f"{device} holder answer --state {_q(tab)} --challenge-file {_q(d / 'challenge.json')}"
    check = f"{device} device check --state {_q(dev)} --auth {_q(d / 'auth.bin')}"
    return [
        f'export {PASSPHRASE_ENV}="$(cat {_q(d / "PASSPHRASE")})"',
        # a device of your own, enrolled and granted
        f"{device} device init --state {_q(dev)} --anchor {anchor} --origin {doc['origin']} --name {name}",
        f"{writ} grant {ledger} --request {_q(dev / 'enroll.bin')} --role device --name {name} {root}",
        # a technician's tablet: its own key (an OpenSSH key), enrolled and granted
        f"{device} holder init --state {_q(tab)} --name {tname}",
        f"{writ} grant {ledger} --request {_q(tab / 'enroll.bin')} --role operator {root}",
        f"{device} device sync --state {_q(dev)} --server {url}",
        f"{device} device receipt --state {_q(dev)} --server {url}",
        # the tablet answers the device's challenge: accepted
        challenge,
        f"{answer} --server {url} --out {_q(d / 'auth.bin')}",
        check,
        # the tablet is lost: the online revoker revokes it (its key file, never the root)
        f"{writ} revoke {ledger} --name {tname} --reason lost --revoker-key {_q(d / 'revoker.key')} {pw}",
        f"{device} device sync --state {_q(dev)} --server {url}",
        f"{writ} status {tname} {ledger}",
        challenge,
        f"{answer} --grant {_q(tab / 'grant.bin')} --out {_q(d / 'auth.bin')}",
        f'{check}    # exit 1: {{"accepted": false, "reason": "revoked"}}',
    ]


def _audit_command(url: str, doc: dict[str, Any]) -> str:
    return f"{writ_exe()} audit --server {url} --anchor {doc['anchor']}"


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
    _say(f"  audit:   {_audit_command(url, doc)}")
    _say(f"  plot:    {d / 'refusals.png'}")
    _say(f"  data:    {d / 'result.json'}, {d / 'events.jsonl'}")
    _say()
    _say("Try it yourself: a device of your own (each line runs as printed, from any directory)")
    for line in guide:
        _say(f"    {line}")
    _say()


def _serve(proc: Any, url: str, exit_after: float | None) -> str:
    """Keep serving (the dashboard's address is printed now, while it is true); how it ended."""
    where = f"dashboard {url}/ and the fleet at {url}/v1/fleet"
    if exit_after is None:
        _say(f"Serving {where} until Ctrl-C…")
        end = float("inf")
    else:
        _say(f"Serving {where} for {exit_after:g} s…")
        end = time.monotonic() + exit_after
    while proc.poll() is None:
        left = end - time.monotonic()
        if left <= 0:
            return "exit-after"
        time.sleep(min(0.5, left))
    return "server-exited"


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
    from ledger.fileio import raise_open_files_limit

    d = directory.absolute()
    reused = _prepare_dir(d, fresh)
    doc = _load(d) if reused else _create(d, DEMO_ORIGIN)
    passphrase = _read_secret(d / "PASSPHRASE")
    _banner(
        [
            "DEMO KEY -- never for production",
            f"root key:    {d / 'root.key'}",
            f"revoker key: {d / 'revoker.key'}",
            f"passphrase:  {passphrase}   (of both; stored in {d / 'PASSPHRASE'})",
            "Anyone who reads this can sign for this ledger. Make real keys with `writ root init`.",
        ]
    )
    raise_open_files_limit()
    chosen = server_process.pick_port(host, port)
    if chosen != port:
        _say(f"port {port} is busy; using {chosen}")
    serve = _serve_command(d, host, chosen)
    with _stop_signals():
        srv = server_process.start_server(
            d / "server",
            host=host,
            port=chosen,
            log=d / "server.log",
            stdout_to_log=True,
            new_session=True,  # a terminal's Ctrl-C reaches the demo, which stops the server itself
            ready_timeout=READY_TIMEOUT,
            log_level="warning",
        )
        url, proc = srv.url, srv.process
        try:
            made = "reusing" if reused else "created"
            _say(f"{made} the demo in {d}; the server runs at {url} (pid {proc.pid})")
            fleet = asyncio.run(_scenario(d, url, doc, devices, seed))
            guide = _guide(d, url, doc)
            _report(d, url, doc, fleet, guide)
            stopped_by = "exit-after"
            if exit_after != 0:
                try:
                    stopped_by = _serve(proc, url, exit_after)
                except KeyboardInterrupt as exc:
                    stopped_by = _how(exc)
        except KeyboardInterrupt:
            _say(f"interrupted: stopping the server (pid {proc.pid})…")
            raise
        finally:
            code = server_process.stop_server(proc, timeout=STOP_TIMEOUT)
    _say(f"the server stopped (exit {code}); the dashboard is gone with it. To serve this demo again:")
    _say(f"    {serve}")
    return {
        "demo": str(d),
        "reused": reused,
        "server": url,
        "server_pid": proc.pid,
        "server_exit": code,
        "stopped": True,
        "stopped_by": stopped_by,
        "serve_command": serve,
        "origin": doc["origin"],
        "anchor": doc["anchor"],
        "demo_key": {
            "root_key": str(d / "root.key"),
            "passphrase_file": str(d / "PASSPHRASE"),
            "passphrase_env": PASSPHRASE_ENV,
            "demo_only": True,
        },
        "revoker": {"seq": fleet["revoker_seq"], "key_file": str(d / "revoker.key")},
        "fleet": fleet,
        "audit": _audit_command(url, doc),
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
