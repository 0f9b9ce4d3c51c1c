"""`python -m device_sim`: one simulated device whose state is a directory.

The commands, flags, JSON outputs and exit codes are the conformance
contract (CONFORMANCE.md, "Device"). Every command prints one JSON object on
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

Handler = Callable[[argparse.Namespace], dict[str, Any]]

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
    import httpx  # only the network commands pay for importing httpx

    from .sources import BundleSource, HttpSource, sync

    if args.bundle is not None:
        return await sync(dev, BundleSource(args.bundle), now)
    async with httpx.AsyncClient() as client:
        return await sync(dev, HttpSource(client, args.server, timeout=args.timeout), now)


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
    return {"challenge": dev.challenge().hex(), "device_key": dev.public_key.hex()}


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
    import httpx

    from .sources import post_bytes

    async with httpx.AsyncClient() as client:
        return await post_bytes(
            client, url.rstrip("/") + "/v1/receipts", body, "application/msgpack", timeout=timeout
        )


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
    src.add_argument("--bundle", metavar="FILE", help="a sync bundle (PROTOCOL section 7)")
    now(p)
    timeout(p)
    p.set_defaults(handler=cmd_sync)

    p = sub.add_parser("challenge", help="issue a fresh challenge for the next check")
    state(p)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m device_sim", description="Simulated Writ field devices.")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser),
    )
    from . import fleet  # fleet imports this module: its group is added at call time

    for register_group in (register, fleet.register):
        register_group(sub)
    return parser


def _error_json(exc: WritError) -> dict[str, Any]:
    """The one error shape of every command, ``writ``'s too: ``{"error", "message", ...}``
    (plus the same text as ``detail``, for older readers)."""
    out = redact_fields(exc.to_json())  # a message may quote a URI
    out.setdefault("detail", out["message"])
    return out


def run(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            raise UsageError("a command is required (see python -m device_sim --help)")
        emit(handler(args))
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
