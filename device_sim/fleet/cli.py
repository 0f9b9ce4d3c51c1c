"""``python -m device_sim fleet``: the command line of the fleet runs.

``--scenario lost-tablet`` (the default) runs
:func:`~device_sim.fleet.lost_tablet.run_lost_tablet`; ``--scenario
stolen-log-key`` the witness scenario of :mod:`device_sim.scenarios`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ledger.errors import UsageError
from ledger.fileio import raise_open_files_limit
from ledger.verifier import usable_cores

from .. import scenarios
from ..cli import _seconds
from ..sources import DEFAULT_TIMEOUT
from .integrator import Integrator
from .lost_tablet import run_lost_tablet
from .model import (
    DEFAULT_CONNECTIONS,
    HTTP_CLIENTS,
    MAX_PROCESSES,
    OWN_GRANT_MODES,
    PUSH_MODES,
    RECEIPT_MODES,
    FleetOptions,
)

__all__ = ["cmd_fleet", "register"]


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return int(text)


def _processes(text: str) -> int:
    """``auto`` (one per usable core, at most 8) or a count."""
    if text == "auto":
        return max(1, min(usable_cores(), 8, MAX_PROCESSES))
    n = _positive_int(text)
    if n > MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"at most {MAX_PROCESSES}")
    return n


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a share between 0 and 1") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("expected a share between 0 and 1")
    return v


def _uint(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("expected a non-negative integer")
    return int(text)


def cmd_fleet(args: argparse.Namespace) -> dict[str, Any]:
    from ledger.cli.common import normalise_server, open_key
    from ledger.cli.main import EXIT_FAILED, CommandFailed

    server = normalise_server(args.server)
    if args.scenario == "stolen-log-key":  # (witness) device_sim/scenarios.py
        return _stolen_log_key(args, server)
    opts = FleetOptions(
        push=args.push,
        poll_interval=args.poll_interval,
        connections=args.sse_connections,
        seed=args.seed,
        offline=args.offline,
        offline_for=args.offline_for,
        late=args.late,
        late_after=args.late_after,
        drift=args.drift,
        own_grant=args.own_grant,
        receipts=args.receipts,
        deadline=args.deadline,
        timeout=args.timeout,
        tile_cache=not args.no_tile_cache,
        http_client=args.http_client,
        processes=args.processes,
    )
    nofile = raise_open_files_limit()

    def log(line: str) -> None:
        sys.stderr.write(f"fleet: {line}\n")
        sys.stderr.flush()

    with open_key(args) as root:
        integ = Integrator(server, root)
        try:
            result = asyncio.run(
                run_lost_tablet(
                    integ, args.devices, opts, json_events=args.json_events, plot=args.plot, log=log
                )
            )
        finally:
            integ.close()
    out = result.to_json()
    out["open_files_limit"] = nofile
    if not result.all_refused:
        raise CommandFailed(out, EXIT_FAILED)
    return out


def _stolen_log_key(args: argparse.Namespace, server: str) -> dict[str, Any]:
    """(witness) ``--scenario stolen-log-key``: see device_sim/scenarios.py."""
    from ledger.cli.common import open_key
    from ledger.cli.main import EXIT_FAILED, CommandFailed

    if args.log_key is None:
        raise UsageError("--scenario stolen-log-key needs --log-key FILE (the server's DIR/log.key)")
    stolen = scenarios.read_stolen_log_key(args.log_key)
    with open_key(args) as root:
        integ = Integrator(server, root)
        try:
            out = asyncio.run(
                scenarios.run_stolen_log_key(
                    integ,
                    args.devices,
                    log_key=stolen,
                    require_witnesses=args.require_witnesses,
                    max_staleness=args.max_staleness,
                    log=lambda line: print(f"fleet: {line}", file=sys.stderr, flush=True),
                )
            )
        finally:
            integ.close()
    if not out["all_refused"]:
        raise CommandFailed(out, EXIT_FAILED)
    return out


def _description() -> str | None:
    """The first paragraph of :mod:`device_sim.fleet`'s docstring."""
    from .. import fleet

    return fleet.__doc__.split("\n\n")[0] if fleet.__doc__ else None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``fleet`` command (the stable command contract)."""
    from ledger.cli.common import add_key_source

    p = subparsers.add_parser(
        "fleet",
        help="N simulated devices, a lost tablet: measure how fast its revocation reaches them",
        description=_description(),
    )
    p.add_argument("--server", required=True, metavar="URL")
    p.add_argument("--devices", required=True, type=_positive_int, metavar="N")
    add_key_source(p)
    p.add_argument("--push", choices=PUSH_MODES, default="sse", help="how devices hear of updates (sse)")
    p.add_argument(
        "--poll-interval", type=_seconds, default=2.0, metavar="SECONDS", help="with --push poll (2)"
    )
    p.add_argument(
        "--sse-connections",
        "--connections",
        dest="sse_connections",
        type=_positive_int,
        metavar="K",
        help=f"push connections, each feeding a group of devices (default min(N, {DEFAULT_CONNECTIONS});"
        " N = one per device)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="a PNG of the devices refusing over time")
    p.add_argument("--json-events", metavar="FILE", help="one JSON line per device (refusal time, receipt)")
    p.add_argument("--seed", type=_uint, help="seed of the simulation's random choices (not of the keys)")
    p.add_argument(
        "--offline", type=_share, default=0.0, metavar="SHARE", help="devices offline at the revoke"
    )
    p.add_argument("--offline-for", type=_seconds, default=1.0, metavar="SECONDS")
    p.add_argument(
        "--late", type=_share, default=0.0, metavar="SHARE", help="devices booting after the revoke"
    )
    p.add_argument("--late-after", type=_seconds, default=1.0, metavar="SECONDS")
    p.add_argument("--drift", type=_uint, default=0, metavar="SECONDS", help="max clock offset of a device")
    p.add_argument(
        "--own-grant", choices=OWN_GRANT_MODES, default="leaf", help="how a device checks its grant"
    )
    p.add_argument("--receipts", choices=RECEIPT_MODES, default="after", help="when devices post receipts")
    p.add_argument(
        "--no-tile-cache", action="store_true", help="every tile request goes to the server (no edge cache)"
    )
    p.add_argument(
        "--http-client", choices=HTTP_CLIENTS, default="fast", help="the simulator's HTTP transport (fast)"
    )
    p.add_argument(
        "--processes",
        type=_processes,
        default="auto",
        metavar="P",
        help=(
            "lost-tablet: after boot, share the devices among P processes, so the simulator uses every"
            f" core as real devices would (auto: one per core, at most 8; 1: this process only; at most"
            f" {MAX_PROCESSES})"
        ),
    )
    p.add_argument("--deadline", type=_seconds, default=120.0, metavar="SECONDS")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS")
    # (witness) device_sim/scenarios.py
    p.add_argument(
        "--scenario", choices=scenarios.SCENARIOS, default="lost-tablet", help="what to play (lost-tablet)"
    )
    p.add_argument("--log-key", metavar="FILE", help="stolen-log-key: the server's DIR/log.key")
    p.add_argument("--require-witnesses", type=_uint, default=1, metavar="K", help="stolen-log-key: K (1)")
    p.add_argument("--max-staleness", type=_positive_int, default=3, metavar="SECONDS", help="stolen-log-key")
    p.set_defaults(handler=cmd_fleet)
