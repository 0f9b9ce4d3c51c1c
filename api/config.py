"""Server configuration and the files of a server's data directory.

A data directory holds three files, written by ``writ server init``:

- ``server.json``: ``{"origin": ..., "anchor": HEX32, "log_public_key": HEX32}``;
- ``log.key``: the log's own Ed25519 key (``{"version": 1, "seed": HEX32,
  "public_key": HEX32}``), mode 0600, created with ``O_EXCL``. It is not
  passphrase protected because the server must start unattended; the server
  refuses to start when the file is readable by group or others;
- ``ledger.db``: the SQLite ledger (:class:`ledger.storage.sqlite.SqliteStorage`).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger import records
from ledger.crypto import SeedSigner
from ledger.encoding import MAX_RECORD
from ledger.errors import BadKeyFile, InvalidField, LedgerExists, LedgerMissing, StorageError, UsageError
from ledger.fileio import create_private

SERVER_JSON = "server.json"
LOCK_FILE = "server.lock"
LOG_KEY = "log.key"
LEDGER_DB = "ledger.db"
#: the largest POST /v1/records body: 1000 records of 600 bytes and 16 KiB of framing.
MAX_BATCH = 1000
MAX_BODY = MAX_BATCH * MAX_RECORD + 16 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may ask of the server."""

    max_body: int = MAX_BODY
    max_batch: int = MAX_BATCH
    #: POST /v1/records: a token bucket per client host (requests per second, burst).
    write_rate: float = 50.0
    write_burst: int = 100
    #: POST /v1/receipts: its own bucket per client host (a fleet behind one NAT posts many).
    receipt_rate: float = 2000.0
    receipt_burst: int = 20000
    max_sse_clients: int = 20000
    #: open /v1/events streams per client address (a plant behind one NAT, the fleet
    #: simulation's 500 relay streams stay well below it).
    max_sse_per_address: int = 1000
    #: expensive reports (GET /v1/fleet, its revocation pages, the dashboard): a token
    #: bucket per client host. Never applied to /checkpoint, tiles or /v1/records.
    report_rate: float = 5.0
    report_burst: int = 50
    #: connection level (``writ serve``, api/connguard.py): seconds a client has to send a
    #: whole request head, seconds an idle keep-alive connection stays open, and open
    #: sockets per client address (a trusted proxy's own sockets are not counted).
    header_timeout: float = 30.0
    keep_alive_timeout: int = 5
    max_connections_per_address: int = 2000
    sse_heartbeat: float = 15.0
    #: seconds a request may take before the client gets 503 (the append itself still completes).
    request_timeout: float = 30.0
    #: the longest page of GET /v1/records and the most records an SSE event carries.
    max_page: int = 1000


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    checkpoint_interval: float = 10.0
    limits: Limits = field(default_factory=Limits)
    #: (witness) witness URLs each new checkpoint is submitted to (api/witnessing.py).
    witnesses: tuple[str, ...] = ()

    @property
    def log_key(self) -> Path:
        return self.data_dir / LOG_KEY

    @property
    def ledger_db(self) -> Path:
        return self.data_dir / LEDGER_DB


@dataclass(frozen=True, slots=True)
class Identity:
    """What ``server.json`` says: the ledger this server serves."""

    origin: str
    anchor: bytes
    log_public_key: bytes


def parse_origin(text: str) -> str:
    """A valid origin (docs/protocol.md, "Records"), or a :class:`UsageError`."""
    try:
        return records.check_origin(text)
    except InvalidField as exc:
        raise UsageError(f"bad origin: {exc.message}") from None


def read_identity(data_dir: Path) -> Identity:
    path = data_dir / SERVER_JSON
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LedgerMissing(f"no {SERVER_JSON} in {data_dir}: run `writ server init` first") from None
    except (OSError, ValueError) as exc:
        raise BadKeyFile(f"{path} is unreadable: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise BadKeyFile(f"{path} is not a JSON object")
    try:
        origin = records.check_origin(raw.get("origin"))
        anchor = bytes.fromhex(str(raw.get("anchor")))
        log_pub = bytes.fromhex(str(raw.get("log_public_key")))
    except (InvalidField, ValueError):
        raise BadKeyFile(f"{path} has a bad origin, anchor or log_public_key") from None
    if len(anchor) != 32 or len(log_pub) != 32:
        raise BadKeyFile(f"{path}: anchor and log_public_key are 32 bytes")
    return Identity(origin, anchor, log_pub)


def write_identity(data_dir: Path, ident: Identity) -> None:
    doc = {"origin": ident.origin, "anchor": ident.anchor.hex(), "log_public_key": ident.log_public_key.hex()}
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    create_private(data_dir / SERVER_JSON, data, mode=0o644, exists=LedgerExists, error=StorageError)


def create_log_key(data_dir: Path, filename: str = LOG_KEY) -> SeedSigner:
    """Generate the log key and write it to ``DIR/log.key`` (O_EXCL, 0600).

    (``filename``: the witness keeps its online key in the same format.)"""
    signer = SeedSigner.generate()
    path = data_dir / filename
    doc = {"version": 1, "seed": signer.seed().hex(), "public_key": signer.public_key.hex()}
    data = (json.dumps(doc) + "\n").encode("utf-8")
    create_private(path, data, mode=0o600, exists=LedgerExists, error=StorageError, what="the key ")
    return signer


def load_log_key(data_dir: Path, filename: str = LOG_KEY) -> SeedSigner:
    """Read ``DIR/log.key`` (or ``filename``); refuse a file that group or others may read or write."""
    path = data_dir / filename
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise LedgerMissing(f"no {filename} in {data_dir}: run `writ server init` first") from None
    except OSError as exc:
        raise BadKeyFile(f"cannot open {path}: {type(exc).__name__}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BadKeyFile(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise BadKeyFile(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; an online key must be 0600 (chmod 600 it)"
            )
        try:
            doc: Any = json.loads(f.read(4096))
        except (ValueError, OSError):
            raise BadKeyFile(f"{path} is not a Writ log key file") from None
    try:
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError
        seed = bytes.fromhex(str(doc["seed"]))
        public = bytes.fromhex(str(doc["public_key"]))
        signer = SeedSigner(seed)
    except (KeyError, ValueError, InvalidField):
        raise BadKeyFile(f"{path} is not a Writ log key file") from None
    if signer.public_key != public:
        raise BadKeyFile(f"{path}: the seed does not match its public key")
    return signer


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory's exclusive lock (one server per ledger: the single writer).

    Returns the file descriptor to pass to :func:`unlock_data_dir`; raises
    :class:`StorageError` when another server holds it.
    """
    import fcntl

    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StorageError(f"another server is running on {data_dir}") from None
    return fd


def unlock_data_dir(fd: int) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
