"""``writ server init`` and ``writ serve`` (the stable command contract: flags, JSON, exit codes).

``server init --data DIR --anchor HEX32 --origin ORIGIN`` creates DIR, the
log key (``DIR/log.key``, 0600), the SQLite ledger and ``DIR/server.json``,
and prints ``{"log_public_key", "log_vkey", "cosig_vkey"}``.

``serve --data DIR [--host] [--port] [--checkpoint-interval] [limits]`` runs
uvicorn (uvloop, httptools with the connection guards of :mod:`api.connguard`,
one process) until SIGTERM or SIGINT, then ends the event streams, finishes
the appends in flight, and exits 0 within 10 s, printing one JSON line. Every
limit is an option whose default ``--help`` shows (docs/operations.md,
"Limits").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from ledger import checkpoints
from ledger.cli.common import parse_hex
from ledger.errors import LedgerExists, StorageError, UsageError, WritError
from ledger.fileio import raise_open_files_limit
from ledger.storage import Storage
from ledger.storage.sqlite import SqliteStorage

from . import config as cfg

log = logging.getLogger("writ.api")

#: seconds uvicorn waits for in-flight requests after SIGTERM before cancelling them.
GRACEFUL_SHUTDOWN = 5
_DEFAULTS = cfg.Limits()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server = subparsers.add_parser("server", help="manage a ledger server's data directory")
    server_sub = server.add_subparsers(dest="server_command", metavar="COMMAND", parser_class=type(server))
    init = server_sub.add_parser("init", help="create a server data directory, its ledger and its log key")
    init.add_argument("--data", required=True, metavar="DIR", help="the data directory to create")
    init.add_argument("--anchor", required=True, metavar="HEX32", help="the root public key (64 hex digits)")
    init.add_argument(
        "--origin", required=True, metavar="ORIGIN", help="the ledger's origin, e.g. ledger.example/plant-7"
    )
    init.set_defaults(handler=cmd_server_init)

    serve = subparsers.add_parser(
        "serve", help="serve a ledger over HTTP", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    serve.add_argument(
        "--data",
        required=True,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="the data directory (from `writ server init`)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=_port, default=8000, help="the port to listen on")
    serve.add_argument(
        "--checkpoint-interval",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="re-sign the checkpoint at least this often",
    )
    for name, kind, metavar, text in _LIMIT_OPTIONS:
        serve.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(_DEFAULTS, name),
            metavar=metavar,
            help=text,
        )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the server log's level (on stderr; debug adds an access log)",
    )
    serve.add_argument(  # (witness)
        "--witness",
        action="append",
        default=[],
        metavar="URL",
        help="a C2SP tlog-witness to submit every checkpoint to (repeatable)",
    )
    serve.set_defaults(handler=cmd_serve)


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a port is an integer 0..65535") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError("a port is an integer 0..65535")
    return v


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive number") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError("expected a positive number")
    return v


def _header_timeout(text: str) -> float:
    v = _positive(text)
    if v > 60:
        raise argparse.ArgumentTypeError("the header timeout is at most 60 seconds")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return v


#: the ``writ serve`` options that set a :class:`~api.config.Limits` field of the same name:
#: (field, type, metavar, help). Their defaults are the dataclass's (``--help`` shows them).
_LIMIT_OPTIONS: list[tuple[str, Callable[[str], Any], str | None, str]] = [
    ("write_rate", _positive, "PER_SECOND", "POST /v1/records per client address"),
    ("write_burst", _count, None, "POST /v1/records burst per client address"),
    ("receipt_rate", _positive, "PER_SECOND", "POST /v1/receipts per client address"),
    ("receipt_burst", _count, None, "POST /v1/receipts burst per client address"),
    (
        "report_rate",
        _positive,
        "PER_SECOND",
        "GET /v1/fleet and the dashboard per client address (never /checkpoint, tiles, records)",
    ),
    ("report_burst", _count, None, "reports burst per client address"),
    ("max_sse_clients", _count, None, "open /v1/events streams in all"),
    ("max_sse_per_address", _count, None, "open /v1/events streams per client address"),
    (
        "max_connections_per_address",
        _count,
        None,
        "open sockets per peer address (trusted proxies, FORWARDED_ALLOW_IPS, not counted)",
    ),
    ("header_timeout", _header_timeout, "SECONDS", "seconds to send a whole request head (at most 60)"),
    ("keep_alive_timeout", _count, "SECONDS", "seconds an idle keep-alive connection stays open"),
]


def _witness_urls(urls: list[str]) -> tuple[str, ...]:
    """(witness) ``--witness`` URLs: http(s), no query or fragment."""
    for url in urls:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "?" in rest or "#" in rest:
            raise UsageError(f"--witness takes an http(s) URL, not {url[:80]!r}")
    return tuple(dict.fromkeys(u.rstrip("/") for u in urls))


# --- server init --------------------------------------------------------------


async def create_data_dir(
    data_dir: Path, anchor: bytes, origin: str, *, storage: Storage | None = None
) -> dict[str, Any]:
    """Create a server data directory (the implementation of ``writ server init``).

    The ledger goes to ``DIR/ledger.db``, or into ``storage`` when one is given
    (tests that inject a :class:`~ledger.storage.MemoryStorage`).
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(f"--data {data_dir} is a file: give a new (or empty) directory")
    for name in (cfg.LEDGER_DB, cfg.LOG_KEY, cfg.SERVER_JSON):
        if (data_dir / name).exists():
            raise LedgerExists(f"{data_dir / name} exists: {data_dir} already holds a ledger server")
    made_dir = not data_dir.exists()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the data directory {data_dir}: {exc.strerror}") from None
    check_data_dir_writable(data_dir)
    try:
        signer = cfg.create_log_key(data_dir)
        if storage is None:
            sqlite = await SqliteStorage.open(data_dir / cfg.LEDGER_DB, create=True)
            try:
                await sqlite.init(origin, anchor, signer.public_key)
            finally:
                await sqlite.close()
        else:
            await storage.init(origin, anchor, signer.public_key)
        cfg.write_identity(data_dir, cfg.Identity(origin, anchor, signer.public_key))
    except LedgerExists:
        raise  # another `server init` got there first: its files are not ours to remove
    except BaseException as exc:  # nothing half-made stays behind: a retry starts clean
        _remove_partial(data_dir, made_dir)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot create the server in {data_dir}: {exc.strerror or exc}") from None
        raise
    log_vkey, cosig_vkey = checkpoints.checkpoint_vkeys(origin, signer.public_key)
    return {
        "log_public_key": signer.public_key.hex(),
        "log_vkey": log_vkey,
        "cosig_vkey": cosig_vkey,
        "origin": origin,
        "anchor": anchor.hex(),
        "data": str(data_dir),
    }


def _remove_partial(data_dir: Path, made_dir: bool) -> None:
    for name in (cfg.SERVER_JSON, cfg.LEDGER_DB, cfg.LEDGER_DB + "-wal", cfg.LEDGER_DB + "-shm", cfg.LOG_KEY):
        with contextlib.suppress(OSError):
            (data_dir / name).unlink()
    if made_dir:
        with contextlib.suppress(OSError):
            data_dir.rmdir()


def check_data_dir_writable(data_dir: Path) -> None:
    """The server writes its ledger (SQLite and its WAL) in DIR: prove it can, before anything
    else, so that an unwritable directory is reported as such (never as a port problem)."""
    probe = data_dir / f".writ-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
        db = data_dir / cfg.LEDGER_DB
        if db.exists():
            os.close(os.open(db, os.O_RDWR))
    except OSError as exc:
        raise StorageError(
            f"the data directory {data_dir} is not writable ({exc.strerror}): the server keeps its"
            " ledger there; fix its permissions or mount"
        ) from None


def cmd_server_init(args: argparse.Namespace) -> dict[str, Any]:
    anchor = parse_hex(args.anchor, 32, "--anchor (the root public key)")
    origin = cfg.parse_origin(args.origin)
    return asyncio.run(create_data_dir(Path(args.data), anchor, origin))


# --- serve --------------------------------------------------------------------


class _HideTracebacks(logging.Filter):
    """uvicorn logs a failed lifespan startup with its traceback; we report it as JSON instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Traceback"))


def _server_class() -> type[Any]:
    import uvicorn

    class WritServer(uvicorn.Server):
        """uvicorn, plus: end the SSE streams first on shutdown, and exit 0 on a signal."""

        signals_seen: list[int]

        async def shutdown(self, sockets: Any = None) -> None:
            service = getattr(getattr(self.config.app, "state", None), "service", None)
            if service is not None:
                service.begin_shutdown()
            await super().shutdown(sockets=sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            self.signals_seen = []
            with super().capture_signals():
                try:
                    yield
                finally:
                    self.signals_seen = list(self._captured_signals)
                    self._captured_signals.clear()  # exit 0 with a JSON line, not by re-raising

    return WritServer


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    from .app import create_app
    from .connguard import TrustedProxies, guarded_protocol

    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir} is not a directory: run `writ server init --data {data_dir}` first")
    ident = cfg.read_identity(data_dir)  # clear errors before uvicorn starts
    cfg.load_log_key(data_dir)
    if not (data_dir / cfg.LEDGER_DB).exists():
        raise UsageError(f"no {cfg.LEDGER_DB} in {data_dir}: run `writ server init` first")
    check_data_dir_writable(data_dir)
    limits = cfg.Limits(**{name: getattr(args, name) for name, *_ in _LIMIT_OPTIONS})
    config = cfg.ServerConfig(
        data_dir=data_dir,
        host=args.host,
        port=args.port,
        checkpoint_interval=args.checkpoint_interval,
        limits=limits,
        witnesses=_witness_urls(args.witness),  # (witness)
    )
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(config)
    uconfig = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        workers=1,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        log_level=args.log_level,
        log_config=None,  # every log line, access log included, goes to stderr: stdout is for JSON
        access_log=args.log_level == "debug",
        proxy_headers=True,
        server_header=False,
        backlog=4096,
        timeout_keep_alive=limits.keep_alive_timeout,
    )
    trusted = TrustedProxies(uconfig.forwarded_allow_ips)
    app.state.trusted_proxies = trusted
    uconfig.http = guarded_protocol(
        header_timeout=limits.header_timeout,
        max_per_address=limits.max_connections_per_address,
        trusted=trusted,
    )
    # event streams hold a socket each: allow up to 65536 open files (within the hard limit)
    nofile = raise_open_files_limit(65536)
    log.info("open files limit %s", nofile if nofile >= 0 else "unknown")
    server = _server_class()(uconfig)
    hide = _HideTracebacks()
    uv_log = logging.getLogger("uvicorn.error")
    uv_log.addFilter(hide)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when the app cannot start or it cannot bind
        startup_error = getattr(app.state, "startup_error", None)
        if isinstance(startup_error, WritError):
            raise startup_error from None
        raise UsageError(
            f"could not serve on {args.host}:{args.port} (exit {exc.code}; see the log above)"
        ) from None
    finally:
        uv_log.removeFilter(hide)
    startup_error = getattr(app.state, "startup_error", None)
    if isinstance(startup_error, WritError):
        raise startup_error
    if not server.started:
        raise UsageError(f"the server did not start on {args.host}:{args.port} (see the log above)")
    service = getattr(app.state, "service", None)
    sigs = [signal.Signals(s).name for s in getattr(server, "signals_seen", [])]
    return {
        "stopped": True,
        "signal": sigs[0] if sigs else None,
        "origin": ident.origin,
        "size": service.size if service is not None else None,
        "pid": os.getpid(),
    }
