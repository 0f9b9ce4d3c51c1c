"""``writ witness init`` and ``writ witness serve`` (docs/witness.md).

``witness init --data DIR --name KEYNAME`` creates DIR, the witness key
(``DIR/witness.key``, 0600), ``DIR/witness.json`` and the state database, and
prints ``{"witness_public_key", "witness_vkey", ...}``: grant the public key
role ``witness`` under the name KEYNAME for devices to count its cosignatures.

``witness serve --data DIR --log ORIGIN=LOG_VKEY [--log ...]`` serves
``POST /add-checkpoint`` (c2sp.org/tlog-witness) until SIGTERM or SIGINT.
``--log`` may repeat, for several logs and for several keys of one log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ledger.errors import UsageError, WritError
from ledger.fileio import raise_open_files_limit

from . import witness as wit
from .cli import _port, _positive, _server_class


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = subparsers.add_parser(
        "witness",
        help="run a C2SP tlog-witness for one or more ledgers",
        description="A C2SP tlog-witness: cosigns only checkpoints consistent with the latest it "
        "cosigned for each log (docs/witness.md).",
    )
    sub = w.add_subparsers(dest="witness_command", metavar="COMMAND", parser_class=type(w))
    init = sub.add_parser(
        "init",
        help="create a witness data directory and its key",
        description="Create DIR with the witness's key (0600) and its state; prints its verifier key.",
    )
    init.add_argument("--data", required=True, metavar="DIR", help="the data directory to create")
    init.add_argument(
        "--name", required=True, metavar="KEYNAME", help="the witness's key name, e.g. witness.example/w1"
    )
    init.set_defaults(handler=cmd_witness_init)

    serve = sub.add_parser(
        "serve",
        help="serve POST /add-checkpoint",
        description="Serve POST /add-checkpoint (c2sp.org/tlog-witness) for the logs given with --log.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "--data",
        required=True,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="the data directory (from `writ witness init`)",
    )
    serve.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="ORIGIN=LOG_VKEY",
        help="a log to witness and a key trusted for it (repeatable, also for one origin)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=_port, default=8080, help="the TCP port to listen on")
    serve.add_argument(
        "--log-rate",
        type=_positive,
        default=wit.LOG_RATE,
        metavar="PER_SECOND",
        help="add-checkpoint requests per second per log (at least 20)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the witness log's level (on stderr)",
    )
    serve.set_defaults(handler=cmd_witness_serve)


def cmd_witness_init(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(wit.init_witness_dir(Path(args.data), args.name))


def cmd_witness_serve(args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir} is not a directory: run `writ witness init --data {data_dir}` first")
    logs = wit.logs_from_flags(args.log)
    if args.log_rate < 20:
        raise UsageError("--log-rate is at least 20 per second (a log re-signs often)")
    ident = wit.read_witness_identity(data_dir)  # clear errors before uvicorn starts
    wit.load_witness_key(data_dir, ident)
    if not (data_dir / wit.WITNESS_DB).exists():
        raise UsageError(f"no {wit.WITNESS_DB} in {data_dir}: run `writ witness init` first")
    config = wit.WitnessConfig(
        data_dir=data_dir,
        logs=logs,
        host=args.host,
        port=args.port,
        limits=wit.WitnessLimits(log_rate=args.log_rate, log_burst=max(100, int(args.log_rate * 2))),
    )
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = wit.create_witness_app(config)
    uconfig = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        lifespan="on",
        workers=1,
        timeout_graceful_shutdown=5,
        log_level=args.log_level,
        log_config=None,
        access_log=args.log_level == "debug",
        server_header=False,
    )
    raise_open_files_limit()
    server = _server_class()(uconfig)
    try:
        server.run()
    except SystemExit as exc:
        startup_error = getattr(app.state, "startup_error", None)
        if isinstance(startup_error, WritError):
            raise startup_error from None
        raise UsageError(f"could not serve on {args.host}:{args.port} (exit {exc.code})") from None
    startup_error = getattr(app.state, "startup_error", None)
    if isinstance(startup_error, WritError):
        raise startup_error
    if not server.started:
        raise UsageError(f"the witness did not start on {args.host}:{args.port} (see the log above)")
    return {"stopped": True, "name": ident.name, "pid": os.getpid()}
