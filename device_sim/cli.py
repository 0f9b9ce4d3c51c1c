"""`python -m device_sim`: one simulated device whose state is a directory.

The commands, flags, JSON outputs and exit codes are the conformance
contract (stable flags, JSON and exit codes). Every command prints one JSON object on
stdout and never a traceback for a user error:

    0  success (check: accepted)
    1  refused (check), or another failure
    2  usage: bad flags, bad hex, not an initialised state directory
    3  verification failed: the data (or the server) failed a protocol rule,
       or is evidence of a rollback or a fork; the state is left as it was
    4  the server could not be reached or answered with an HTTP error

Command groups register through ``register(subparsers)``: this module
registers ``device``, :mod:`device_sim.fleet` registers ``fleet``; both are
imported by name, so a broken group fails loudly instead of vanishing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from ledger.cli.main import EXIT_FAILED, CommandFailed, emit, exit_code
from ledger.errors import HTTPStatusError, Interrupted, IOFailure, StorageError, UsageError, WritError
from ledger.redact import redact, redact_fields

from .device import DEFAULT_MAX_STALENESS, STALE_POLICIES, Device, SyncResult, atomic_write

__all__ = ["build_parser", "main", "register", "run"]

Handler = Callable[[argparse.Namespace], dict[str, Any] | None]

#: per-request deadline of the network commands (seconds); as device_sim.sources.DEFAULT_TIMEOUT.
DEFAULT_TIMEOUT = 10.0

MAX_AUTH_FILE = 4096


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _hex32(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected 64 hex digits") from None
    if len(raw) != 32:
        raise argparse.ArgumentTypeError("expected 32 bytes (64 hex digits)")
    return raw


def _uint(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("expected a non-negative integer")
    return int(text)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds") from None
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError("expected 0 < seconds <= 3600")
    return v


def _now(args: argparse.Namespace) -> int:
    now: int | None = getattr(args, "now", None)
    return now if now is not None else int(time.time())


# --- handlers -----------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> dict[str, Any]:
    dev = Device.create(
        args.anchor,
        args.origin,
        directory=args.state,
        name=args.name,
        now=_now(args),
        max_staleness=args.max_staleness,
        stale_policy=args.stale_policy,
        require_witnesses=args.require_witnesses,
    )
    return {"public_key": dev.public_key.hex(), "enroll": str(Path(args.state) / "enroll.bin")}


async def _sync(dev: Device, args: argparse.Namespace, now: int) -> SyncResult:
    from ledger.client import AsyncClient  # only the network commands pay for importing httpx

    from .sources import BundleSource, HttpSource, sync

    if args.bundle is not None:
        return await sync(dev, BundleSource(args.bundle), now)
    async with AsyncClient(args.server, timeout=args.timeout) as http:
        return await sync(dev, HttpSource(http.http, args.server, timeout=args.timeout), now)


def cmd_sync(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    dev = Device.load(args.state)
    now = _now(args)
    out = asyncio.run(_sync(dev, args, now)).to_json()
    if args.bundle is not None:
        out["receipt"] = _bundle_receipt(dev, Path(args.bundle), now)
    return out


def _bundle_receipt(dev: Device, bundle: Path, now: int) -> str | None:
    """A device synced from a bundle (a site with no network path) leaves its signed receipt
    beside the bundle, ``BUNDLE.<key>.receipt``; `writ receipts import` posts it later."""
    if dev.own_grant is None:
        return None
    path = bundle.with_name(f"{bundle.name}.{dev.public_key.hex()[:16]}.receipt")
    try:
        atomic_write(path, dev.receipt(now), 0o644)
    except (OSError, StorageError) as exc:  # a read-only stick: the sync itself succeeded
        why = exc.message if isinstance(exc, StorageError) else exc.strerror
        sys.stderr.write(f"device_sim: the receipt could not be written beside the bundle: {why}\n")
        return None
    return str(path)


def cmd_challenge(args: argparse.Namespace) -> dict[str, Any]:
    dev = Device.load(args.state)
    out = {"challenge": dev.challenge().hex(), "device_key": dev.public_key.hex()}
    if args.out is not None:  # the same JSON, for `holder answer --challenge-file`
        atomic_write(Path(args.out), (json.dumps(out) + "\n").encode(), 0o644)
    return out


def _challenge_of(args: argparse.Namespace) -> tuple[bytes, bytes]:
    """(challenge, device key): from ``--challenge``/``--device-key`` or ``--challenge-file``."""
    if args.challenge_file is None:
        if args.challenge is None or args.device_key is None:
            raise UsageError("give --challenge HEX32 and --device-key HEX32, or --challenge-file FILE")
        return args.challenge, args.device_key
    if args.challenge is not None or args.device_key is not None:
        raise UsageError("give --challenge-file FILE, or --challenge and --device-key, not both")
    try:
        with open(args.challenge_file, "rb") as f:
            doc = json.loads(f.read(4096))
        return _hex32(doc["challenge"]), _hex32(doc["device_key"])
    except OSError as exc:
        raise UsageError(f"cannot read {args.challenge_file}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, argparse.ArgumentTypeError):
        raise UsageError(
            f"{args.challenge_file} is not what `device challenge --out` writes "
            '({"challenge": HEX32, "device_key": HEX32})'
        ) from None


def cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    dev = Device.load(args.state)
    try:
        with open(args.auth, "rb") as f:
            auth = f.read(MAX_AUTH_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {args.auth}: {exc.strerror}") from None
    verdict = dev.check(auth, _now(args), args.role or ["operator"])
    if not verdict.accepted:
        raise CommandFailed(verdict.to_json(), EXIT_FAILED)
    return verdict.to_json()


async def _post_receipt(url: str, body: bytes, timeout: float) -> tuple[int, Any]:
    from ledger.client import AsyncClient

    from .sources import MAX_REPLY

    async with AsyncClient(url.rstrip("/"), timeout=timeout) as http:
        return await http.post("v1/receipts", body, "application/msgpack", cap=MAX_REPLY)


def cmd_receipt(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    dev = Device.load(args.state)
    body = dev.receipt(_now(args))
    status, answer = asyncio.run(_post_receipt(args.server, body, args.timeout))
    if status != 200 or not isinstance(answer, dict):
        t = answer.get("type") if isinstance(answer, dict) else None
        raise HTTPStatusError(
            f"the server refused the receipt (HTTP {status})",
            status=status,
            problem=t.rsplit(":", 1)[-1] if isinstance(t, str) else None,
        )
    out: dict[str, Any] = dict(answer)
    out.setdefault("size", dev.size)
    out["root"] = dev.root.hex()
    return out


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    return Device.load(args.state).status(_now(args))


# --- holder, device agent and sshd enforcement --------------------------------
# (docs/ssh.md; the holder is a technician's tablet, the agent keeps a device
# current, authorized-keys is sshd's AuthorizedKeysCommand)


def cmd_holder_init(args: argparse.Namespace) -> dict[str, Any]:
    from .holder import Holder

    h = Holder.create(args.state, name=args.name, now=_now(args))
    return {
        "subject": h.subject.hex(),
        "ssh_public_key": h.ssh_public_key,
        "name": h.name,
        "enroll": str(Path(args.state) / "enroll.bin"),
        "ssh_key": str(Path(args.state) / "id_ed25519"),
    }


def cmd_holder_answer(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from . import holder as hmod

    h = hmod.Holder.load(args.state)
    if args.grant is not None:
        try:
            with open(args.grant, "rb") as f:
                data = f.read(hmod.MAX_GRANT_FILE + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {args.grant}: {exc.strerror}") from None
        if len(data) > hmod.MAX_GRANT_FILE:
            raise UsageError(f"{args.grant} is larger than {hmod.MAX_GRANT_FILE} bytes")
        cands = hmod.read_grant_file(data, h.subject)
    else:
        cands = asyncio.run(hmod.fetch_grants(args.server, h.subject, timeout=args.timeout))
    chosen = hmod.pick_grant(cands, args.role)
    if chosen.status not in (None, "active"):
        sys.stderr.write(
            f"device_sim: note: grant {chosen.seq} is {chosen.status}; the device will refuse it\n"
        )
    challenge, device_key = _challenge_of(args)
    auth = h.answer(chosen.raw, challenge, device_key, _now(args))
    from .device import atomic_write

    atomic_write(Path(args.out), auth, 0o644)
    out: dict[str, Any] = {"out": str(args.out), "grant_seq": chosen.seq, "role": chosen.role}
    if args.server is not None:
        out["grant_file"] = str(h.keep_grant(chosen.raw))
    if chosen.status is not None:
        out["grant_status"] = chosen.status
    return out


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from .agent import Agent, agent_lock, run_until_signal

    dev = Device.load(args.state)
    with agent_lock(Path(args.state)):
        agent = Agent(
            dev,
            args.server,
            push=args.push,
            poll_interval=args.poll_interval,
            timeout=args.timeout,
            backoff=(min(0.5, args.max_backoff), args.max_backoff),
        )
        asyncio.run(run_until_signal(agent))
    return {"stopped": True, "size": dev.size, "root": dev.root.hex(), "applied": agent.applied}


def cmd_authorized_keys(args: argparse.Namespace) -> dict[str, Any] | None:
    """sshd's AuthorizedKeysCommand: plain lines, never a write."""
    from ledger.credential import accepted_grants
    from ledger.sshkey import format_public_key

    dev = Device.load(args.state)
    now = _now(args)
    fresh = dev.freshness()
    if fresh.is_stale(now) and fresh.policy != "accept":
        age = "never synced" if fresh.checkpoint_time is None else f"{now - fresh.checkpoint_time} s old"
        sys.stderr.write(
            f"device_sim: the device's view is stale ({age}, limit {fresh.max_staleness} s):"
            " no key is accepted until the agent catches up\n"
        )
        return None
    grants = accepted_grants(
        dev.state, now=now, roles=args.role or ["operator"], device_scope=dev.scope, freshness=fresh
    )
    lines = [format_public_key(g.subject, f"writ:{g.seq}:{g.name}") for g in grants]
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    return None


def _register_enforcement(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``device run`` and ``device authorized-keys``."""
    p = sub.add_parser("run", help="follow the ledger (SSE, else polling) until SIGTERM; post receipts")
    p.add_argument("--state", required=True, metavar="DIR", help="the device's state directory")
    p.add_argument("--server", required=True, metavar="URL")
    p.add_argument("--push", choices=("sse", "poll"), default="sse", help="how to hear of updates (sse)")
    p.add_argument(
        "--poll-interval", type=_seconds, default=30.0, metavar="SECONDS", help="between polls (30)"
    )
    p.add_argument(
        "--max-backoff", type=_seconds, default=15.0, metavar="SECONDS", help="longest retry delay (15)"
    )
    p.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help="deadline per HTTP request (seconds)"
    )
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "authorized-keys", help="sshd AuthorizedKeysCommand: the ssh-ed25519 keys accepted here now"
    )
    p.add_argument("--state", required=True, metavar="DIR", help="the device's state directory")
    p.add_argument("--role", action="append", metavar="ROLE", help="a role to accept (repeatable; operator)")
    p.add_argument("--now", type=_uint, metavar="UNIX", help="fix the device's clock (Unix seconds)")
    p.add_argument("user", nargs="?", help="the login user (sshd's %%u; ignored: grants are per key)")
    p.set_defaults(handler=cmd_authorized_keys)


def register_holder(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``holder`` command group (a technician's tablet)."""
    hp = subparsers.add_parser("holder", help="a credential holder (a technician's tablet) in a directory")
    sub = hp.add_subparsers(dest="holder_command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("init", help="generate the holder key (an OpenSSH key) and its enrollment request")
    p.add_argument("--state", required=True, metavar="DIR", help="the holder's directory")
    p.add_argument("--name", help="the name asked for in the request (default holder-<key prefix>)")
    p.add_argument("--now", type=_uint, metavar="UNIX", help="the request's time (Unix seconds)")
    p.set_defaults(handler=cmd_holder_init)

    p = sub.add_parser("answer", help="answer a device's challenge with the holder's published grant")
    p.add_argument("--state", required=True, metavar="DIR", help="the holder's directory")
    p.add_argument("--challenge", type=_hex32, metavar="HEX32", help="the device's challenge")
    p.add_argument("--device-key", type=_hex32, metavar="HEX32", help="the device's public key")
    p.add_argument(
        "--challenge-file",
        metavar="FILE",
        help="both, as `device challenge --out FILE` wrote them (instead of the two flags above)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", metavar="URL", help="fetch the holder's grant from the ledger server")
    src.add_argument("--grant", metavar="FILE", help="a grant record (or records file, or credential JSON)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the auth message")
    p.add_argument("--role", metavar="ROLE", help="use a grant of this role (default: the newest active)")
    p.add_argument("--now", type=_uint, metavar="UNIX", help="fix the holder's clock (Unix seconds)")
    p.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help="deadline per HTTP request (seconds)"
    )
    p.set_defaults(handler=cmd_holder_answer)


# --- parser -------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``device`` command group."""

    dev = subparsers.add_parser("device", help="one simulated device whose state is a directory")
    sub = dev.add_subparsers(dest="device_command", metavar="COMMAND", parser_class=_Parser)

    def state(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state", required=True, metavar="DIR", help="the device's state directory")

    def now(p: argparse.ArgumentParser) -> None:
        p.add_argument("--now", type=_uint, metavar="UNIX", help="fix the device's clock (Unix seconds)")

    def timeout(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help="deadline per HTTP request (seconds)"
        )

    p = sub.add_parser("init", help="generate the device key and its enrollment request")
    state(p)
    p.add_argument("--anchor", required=True, type=_hex32, metavar="HEX32", help="the root public key")
    p.add_argument("--origin", required=True, help="the ledger's origin")
    p.add_argument("--max-staleness", type=_uint, default=DEFAULT_MAX_STALENESS, metavar="SECONDS")
    p.add_argument("--stale-policy", choices=STALE_POLICIES, default="refuse")
    p.add_argument("--require-witnesses", type=_uint, default=0, metavar="K")
    p.add_argument("--name", help="the name in the enrollment request (default device-<key prefix>)")
    now(p)
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("sync", help="fetch, verify and apply the records and checkpoint it lacks")
    state(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", metavar="URL")
    src.add_argument("--bundle", metavar="FILE", help="a sync bundle (docs/protocol.md, 'Sync bundles')")
    now(p)
    timeout(p)
    p.set_defaults(handler=cmd_sync)

    p = sub.add_parser("challenge", help="issue a fresh challenge for the next check")
    state(p)
    p.add_argument("--out", metavar="FILE", help="also write the JSON printed to FILE (for a holder)")
    p.set_defaults(handler=cmd_challenge)

    p = sub.add_parser("check", help="is the credential in an auth message valid here now?")
    state(p)
    p.add_argument("--auth", required=True, metavar="FILE", help="the auth message answering the challenge")
    p.add_argument("--role", action="append", metavar="ROLE", help="a role to accept (repeatable; operator)")
    now(p)
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("receipt", help="post the signed receipt of the device's head")
    state(p)
    p.add_argument("--server", required=True, metavar="URL")
    now(p)
    timeout(p)
    p.set_defaults(handler=cmd_receipt)

    p = sub.add_parser("status", help="head, checkpoint time, revocations, evidence")
    state(p)
    now(p)
    p.set_defaults(handler=cmd_status)

    _register_enforcement(sub)


def build_parser(*, with_fleet: bool = True) -> argparse.ArgumentParser:
    """The device_sim parser. ``with_fleet=False`` leaves out the fleet group (and its
    import, about 250 ms): ``device authorized-keys`` runs on every SSH login."""
    parser = _Parser(prog="python -m device_sim", description="Simulated Writ field devices.")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser),
    )
    register(sub)
    register_holder(sub)
    if with_fleet:
        from . import fleet  # fleet imports this module: its group is added at call time

        fleet.register(sub)
    return parser


def _error_json(exc: WritError) -> dict[str, Any]:
    """The one error shape of every command, ``writ``'s too: ``{"error", "message", ...}``
    (plus the same text as ``detail``, for older readers)."""
    out = redact_fields(exc.to_json())  # a message may quote a URI
    out.setdefault("detail", out["message"])
    return out


def run(argv: Sequence[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        # the built-in groups need no optional module: sshd runs authorized-keys on every login
        args = build_parser(with_fleet=argv[:1] not in (["device"], ["holder"])).parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            raise UsageError("a command is required (see python -m device_sim --help)")
        result = handler(args)
        if result is not None:  # None: the command printed its own plain-text answer
            emit(result)
        return 0
    except CommandFailed as exc:
        emit(exc.payload)
        return exc.code
    except WritError as exc:
        emit(_error_json(exc))
        sys.stderr.write(f"device_sim: {redact(exc.message)}\n")
        return exit_code(exc)
    except OSError as exc:
        emit(_error_json(IOFailure(f"{exc.strerror or exc} ({getattr(exc, 'filename', '')})")))
        return EXIT_FAILED
    except KeyboardInterrupt:
        emit(_error_json(Interrupted("interrupted")))
        return 130


def main() -> NoReturn:
    sys.exit(run())
