"""A C2SP tlog-witness: ``POST /add-checkpoint`` and durable per-log state.

``create_witness_app(config)`` serves one witness key for several logs (each
an origin with one or more trusted log verifier keys: a log key replaced after
a theft can be trusted beside the old one). A request is checked in the order
c2sp.org/tlog-witness gives, each failure with its status:

1. the body is ``old <N>\\n``, at most 63 base64 hash lines, an empty line and
   a checkpoint note, all strictly formed (else 400 ``bad-message``, or
   ``bad-note`` for the note; 413 past :data:`MAX_REQUEST` bytes);
2. the origin is one this witness witnesses (else 404 ``unknown-log``);
3. a trusted log key signed it, and no trusted key's signature is bad
   (else 403 ``untrusted-checkpoint``);
4. the old size is at most the checkpoint's (else 400 ``bad-message``);
5. the old size is the size this witness last cosigned for the origin, 0 if
   it never did (else 409 with ``Content-Type: text/x.tlog.size`` and that
   size as the body);
6. the proof is a valid RFC 6962 consistency proof from the cosigned tree to
   the checkpoint, ``ledger.tree.verify_consistency``; empty from size 0 and
   at equal sizes (else 422 ``bad-proof``);
7. at equal size the root is the cosigned root (else 409 ``fork``).

Then, one compare-and-swap on the stored head (:mod:`api.witness_store`),
durable *before* anything is signed, and the answer: one tlog-cosignature v1
line (type 0x04) whose timestamp never goes back for a log. A request that a
trusted key signed but that fails 6 or 7 is kept as evidence (a log showed
two histories). Requests are rate-limited per client address and, once
their signature verified, per log (at least 20 per second per log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger import checkpoints, notes
from ledger.crypto import Signer
from ledger.errors import (
    BadKeyFile,
    BadMessage,
    BadNote,
    BadProof,
    Fork,
    HttpProblem,
    LedgerExists,
    LedgerMissing,
    UnknownLog,
    UntrustedCheckpoint,
    UsageError,
    WitnessConflict,
    WritError,
)
from ledger.tree import verify_consistency

from . import config as cfg
from .problems import EXCEPTION_HANDLERS, InternalErrorMiddleware, Problem, from_writ_error
from .ratelimit import TokenBuckets
from .routes._common import rate_limit, read_body, take_or_429
from .witness_store import EMPTY_HEAD, LogHead, SqliteWitnessStore, WitnessStore

log = logging.getLogger("writ.witness")

WITNESS_JSON = "witness.json"
WITNESS_KEY = "witness.key"
WITNESS_DB = "witness.db"
#: default rate of add-checkpoint requests per log (the contract asks for at least 20/s).
LOG_RATE = 50.0
#: the largest add-checkpoint body: 64 proof lines and a note with 100 signature lines fit easily.
MAX_REQUEST = 64 * 1024
#: c2sp.org/tlog-witness: a client MUST NOT send more than 63 consistency proof lines.
MAX_PROOF_LINES = 63
TLOG_SIZE = "text/x.tlog.size"
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True, slots=True)
class WitnessLimits:
    max_request: int = MAX_REQUEST
    #: per log, after its signature verified (the contract asks for at least 20/s).
    log_rate: float = LOG_RATE
    log_burst: int = 100
    #: per client address, before anything is verified.
    host_rate: float = 200.0
    host_burst: int = 400
    request_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    data_dir: Path
    #: origin -> the verifier keys trusted for its checkpoints.
    logs: Mapping[str, tuple[notes.Verifier, ...]]
    host: str = "127.0.0.1"
    port: int = 8080
    limits: WitnessLimits = field(default_factory=WitnessLimits)


@dataclass(frozen=True, slots=True)
class WitnessIdentity:
    name: str
    public_key: bytes

    @property
    def vkey(self) -> str:
        return notes.Verifier.create(self.name, notes.SIG_ED25519_COSIGNATURE, self.public_key).vkey()


# --- configuration --------------------------------------------------------------


def parse_log_flag(text: str) -> tuple[str, notes.Verifier]:
    """``ORIGIN=VKEY`` (a signed-note verifier key) or ``ORIGIN=HEX32`` (a Writ log public key)."""
    origin, sep, key = text.partition("=")
    if not sep or not origin or not key:
        raise UsageError("--log is ORIGIN=VKEY (the log's verifier key, as `writ server init` prints it)")
    if "\n" in origin or any(ord(c) < 0x20 for c in origin):
        raise UsageError("an origin has no control characters")
    if len(key) == 64 and all(c in "0123456789abcdefABCDEF" for c in key):
        return origin, checkpoints.checkpoint_verifiers(origin, bytes.fromhex(key))[0]
    try:
        return origin, notes.parse_vkey(key)
    except BadNote as exc:
        raise UsageError(f"bad verifier key for {origin}: {exc.message}") from None


def logs_from_flags(flags: Sequence[str]) -> dict[str, tuple[notes.Verifier, ...]]:
    """Several ``--log`` flags, grouped by origin (one origin may trust several keys)."""
    out: dict[str, list[notes.Verifier]] = {}
    for text in flags:
        origin, verifier = parse_log_flag(text)
        keys = out.setdefault(origin, [])
        if verifier not in keys:
            keys.append(verifier)
    if not out:
        raise UsageError("give at least one --log ORIGIN=VKEY")
    return {o: tuple(v) for o, v in out.items()}


def read_witness_identity(data_dir: Path) -> WitnessIdentity:
    path = data_dir / WITNESS_JSON
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LedgerMissing(f"no {WITNESS_JSON} in {data_dir}: run `writ witness init` first") from None
    except (OSError, ValueError) as exc:
        raise BadKeyFile(f"{path} is unreadable: {type(exc).__name__}") from None
    try:
        ident = WitnessIdentity(str(raw["name"]), bytes.fromhex(str(raw["public_key"])))
        notes.Verifier.create(ident.name, notes.SIG_ED25519_COSIGNATURE, ident.public_key)
    except (KeyError, TypeError, ValueError, BadNote):
        raise BadKeyFile(f"{path} has a bad name or public_key") from None
    return ident


def load_witness_key(data_dir: Path, ident: WitnessIdentity) -> Signer:
    if not (data_dir / WITNESS_KEY).exists():
        raise LedgerMissing(f"no {WITNESS_KEY} in {data_dir}: run `writ witness init` first")
    signer = cfg.load_log_key(data_dir, WITNESS_KEY)
    if signer.public_key != ident.public_key:
        raise BadKeyFile(f"{data_dir / WITNESS_KEY} does not match the public key in {WITNESS_JSON}")
    return signer


async def init_witness_dir(data_dir: Path, name: str) -> dict[str, Any]:
    """Create a witness data directory: its key (0600), ``witness.json`` and the state database."""
    try:
        notes.Verifier.create(name, notes.SIG_ED25519_COSIGNATURE, bytes(32))
    except BadNote as exc:
        raise UsageError(f"bad witness name: {exc.message}") from None
    for fname in (WITNESS_JSON, WITNESS_KEY, WITNESS_DB):
        if (data_dir / fname).exists():
            raise LedgerExists(f"{data_dir / fname} exists: {data_dir} already holds a witness")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    signer = cfg.create_log_key(data_dir, WITNESS_KEY)
    store = await SqliteWitnessStore.open(data_dir / WITNESS_DB, create=True)
    await store.close()
    ident = WitnessIdentity(name, signer.public_key)
    fd = os.open(data_dir / WITNESS_JSON, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"name": name, "public_key": signer.public_key.hex()}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return {
        "witness_public_key": signer.public_key.hex(),
        "witness_vkey": ident.vkey,
        "name": name,
        "data": str(data_dir),
    }


# --- the request ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    """A parsed add-checkpoint request body."""

    old_size: int
    proof: tuple[bytes, ...]
    note: notes.Note
    checkpoint: checkpoints.Checkpoint


def parse_request(body: bytes) -> AddCheckpoint:
    """Parse an add-checkpoint body strictly (raises :class:`BadMessage` or :class:`BadNote`)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadMessage("the request is not UTF-8") from None
    head, sep, note_text = text.partition("\n\n")
    if not sep:
        raise BadMessage("the request has no empty line before the checkpoint")
    lines = head.split("\n")
    first = lines[0]
    if not first.startswith("old ") or not _DECIMAL.fullmatch(first[4:]):
        raise BadMessage("the request starts with 'old <size>' (decimal, no leading zeros)")
    old = int(first[4:])
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise BadMessage(f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof: list[bytes] = []
    for line in lines[1:]:
        try:
            h = base64.b64decode(line.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise BadMessage("a consistency proof line is not base64") from None
        if len(h) != 32 or base64.b64encode(h).decode("ascii") != line:
            raise BadMessage("a consistency proof line is one canonical base64 SHA-256 hash")
        proof.append(h)
    note = notes.parse_note(note_text)
    cp = checkpoints.parse_checkpoint_body(note.body)
    return AddCheckpoint(old, tuple(proof), note, cp)


# --- the witness ------------------------------------------------------------------


class Witness:
    """The add-checkpoint logic over a :class:`~api.witness_store.WitnessStore`."""

    def __init__(
        self,
        name: str,
        signer: Signer,
        logs: Mapping[str, Sequence[notes.Verifier]],
        store: WitnessStore,
        *,
        clock: Callable[[], float] = time.time,
        limits: WitnessLimits | None = None,
    ) -> None:
        self.name = name
        self.signer = signer
        self.logs = {o: tuple(v) for o, v in logs.items()}
        self.store = store
        self.clock = clock
        lim = limits or WitnessLimits()
        self.log_buckets = TokenBuckets(lim.log_rate, lim.log_burst)
        self._locks: dict[str, asyncio.Lock] = {o: asyncio.Lock() for o in self.logs}
        self.vkey = notes.Verifier.create(name, notes.SIG_ED25519_COSIGNATURE, signer.public_key).vkey()

    async def add_checkpoint(self, body: bytes) -> str:
        """Check one request (module docstring, steps 1-7); return the cosignature line(s)."""
        req = parse_request(body)
        cp = req.checkpoint
        verifiers = self.logs.get(cp.origin)
        if verifiers is None:
            raise UnknownLog(f"this witness does not witness {cp.origin[:64]!r}")
        try:
            notes.verify_note(req.note, verifiers)
        except BadNote as exc:
            raise UntrustedCheckpoint(f"no trusted log signature: {exc.message}") from None
        take_or_429(self.log_buckets, cp.origin, "too many checkpoints of this log")
        if req.old_size > cp.size:
            raise BadMessage(f"old size {req.old_size} is larger than the checkpoint size {cp.size}")
        async with self._locks[cp.origin]:
            head = await self.store.head(cp.origin)
            if req.old_size != head.size:
                raise WitnessConflict(f"the witness has cosigned size {head.size}", size=head.size)
            try:
                self._check_consistency(head, req)
            except (BadProof, Fork) as exc:
                await self._keep_evidence(cp.origin, exc, body)
                raise
            ts = min(int(self.clock()), notes.MAX_TIMESTAMP)
            ts = await self.store.advance(cp.origin, head, LogHead(cp.size, cp.root, max(ts, 0)))
        return checkpoints.cosign(cp, self.name, self.signer, ts)

    @staticmethod
    def _check_consistency(head: LogHead, req: AddCheckpoint) -> None:
        cp = req.checkpoint
        if req.old_size == 0 or req.old_size == cp.size:
            if req.proof:
                raise BadProof(f"a proof from size {req.old_size} to {cp.size} is empty")
            if cp.size == head.size and cp.root != head.root:
                raise Fork(f"a different root for the cosigned size {cp.size}", size=cp.size)
            return
        verify_consistency(req.old_size, cp.size, req.proof, head.root, cp.root)

    async def _keep_evidence(self, origin: str, exc: WritError, body: bytes) -> None:
        log.warning("log %s showed an inconsistent checkpoint (%s): %s", origin, exc.type, exc.message)
        try:
            await self.store.put_evidence(origin, exc.type, int(self.clock()), body.decode("utf-8"))
        except WritError as store_exc:
            log.error("could not keep the evidence: %s", store_exc.message)

    async def status(self) -> dict[str, Any]:
        heads = await self.store.heads()
        logs = []
        for origin, verifiers in self.logs.items():
            head = heads.get(origin, EMPTY_HEAD)
            logs.append(
                {
                    "origin": origin,
                    "size": head.size,
                    "root": base64.b64encode(head.root).decode("ascii"),
                    "timestamp": head.timestamp,
                    "log_vkeys": [v.vkey() for v in verifiers],
                }
            )
        return {"name": self.name, "witness_vkey": self.vkey, "logs": logs}


# --- the app ----------------------------------------------------------------------

#: the witness's status for each rejection (c2sp.org/tlog-witness), where it differs from the server's.
STATUS = {
    UnknownLog: 404,
    UntrustedCheckpoint: 403,
    BadMessage: 400,
    BadNote: 400,
    Fork: 409,
    BadProof: 422,
}


def witness_response(exc: WritError) -> Response:
    if isinstance(exc, WitnessConflict):
        # exactly this media type, without the charset Starlette adds to text/*
        return Response(f"{exc.size}\n".encode(), status_code=409, headers={"Content-Type": TLOG_SIZE})
    response = from_writ_error(exc)
    for cls, status in STATUS.items():
        if isinstance(exc, cls):
            response.status_code = status
            break
    return response


def _witness(request: Request) -> Witness:
    w = getattr(request.app.state, "witness", None)
    if not isinstance(w, Witness):
        raise Problem(HttpProblem.OVERLOADED, 503, "the witness is not ready", headers={"Retry-After": "1"})
    return w


async def add_checkpoint(request: Request) -> Response:
    """c2sp.org/tlog-witness add-checkpoint."""

    w = _witness(request)
    lim: WitnessLimits = request.app.state.limits
    rate_limit(request, request.app.state.host_buckets)
    body = await read_body(request, lim.max_request, lim.request_timeout)
    try:
        line = await w.add_checkpoint(body)
    except WritError as exc:
        return witness_response(exc)
    return Response(line.encode("utf-8"), media_type="text/plain; charset=utf-8")


async def healthz(request: Request) -> Response:
    """The witness's name, key and, per log, the latest size it cosigned."""
    w = _witness(request)
    body = json.dumps({"ok": True, **(await w.status())}, separators=(",", ":"))
    return Response(body.encode(), media_type="application/json", headers={"Cache-Control": "no-cache"})


def create_witness_app(
    config: WitnessConfig,
    *,
    store: WitnessStore | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The witness app: state in ``DIR/witness.db`` unless ``store`` is given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            ident = read_witness_identity(config.data_dir)
            signer = load_witness_key(config.data_dir, ident)
            st = store if store is not None else await SqliteWitnessStore.open(config.data_dir / WITNESS_DB)
        except WritError as exc:
            app.state.startup_error = exc
            raise
        app.state.witness = Witness(ident.name, signer, config.logs, st, clock=clock, limits=config.limits)
        log.info("witness %s serving %d log(s)", ident.vkey, len(config.logs))
        try:
            yield
        finally:
            await st.close()

    app = Starlette(
        routes=[
            Route("/add-checkpoint", add_checkpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        middleware=[Middleware(InternalErrorMiddleware)],
    )
    app.state.limits = config.limits
    app.state.host_buckets = TokenBuckets(config.limits.host_rate, config.limits.host_burst)
    return app
