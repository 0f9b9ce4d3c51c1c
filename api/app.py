"""The Starlette application: ``create_app(config)``.

The lifespan opens the storage (``DIR/ledger.db`` unless one is injected),
reads the identity and the log key from the data directory, loads and audits
the whole ledger (refusing to start on :class:`~ledger.errors.CorruptLedger`,
logging the first bad seq), and starts the :class:`~api.service.LedgerService`
(single writer, checkpoint task, SSE fan-out). Routes are in ``api/routes/``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware

from ledger.crypto import Signer
from ledger.errors import CorruptLedger, WritError
from ledger.storage import Storage
from ledger.storage.sqlite import SqliteStorage

from . import config as cfg
from .connguard import TrustedProxies
from .metrics import Metrics
from .problems import EXCEPTION_HANDLERS, InternalErrorMiddleware
from .ratelimit import AddressCounts, TokenBuckets
from .routes import ROUTES
from .service import LedgerService
from .witnessing import Witnessing

log = logging.getLogger("writ.api")


def create_app(
    config: cfg.ServerConfig,
    *,
    storage: Storage | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The server app for ``config``; ``storage`` overrides ``DIR/ledger.db`` (tests
    inject a :class:`~ledger.storage.MemoryStorage`), ``clock`` the wall clock
    (record ``time-in-future``, checkpoint timestamps, receipt times)."""

    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            ident = cfg.read_identity(config.data_dir)
            signer = cfg.load_log_key(config.data_dir)
            lock = cfg.lock_data_dir(config.data_dir)
        except WritError as exc:
            app.state.startup_error = exc
            raise
        try:
            service = await _start(app, config, ident, signer, storage, clock, metrics)
            witnessing = _start_witnessing(service, config, clock)  # (witness)
            try:
                yield
            finally:
                if witnessing is not None:  # (witness)
                    await witnessing.close()
                await service.close()
        finally:
            cfg.unlock_data_dir(lock)

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        middleware=[Middleware(InternalErrorMiddleware, metrics=metrics)],
    )
    app.state.config = config
    app.state.metrics = metrics
    app.state.clock = clock
    lim = config.limits
    app.state.write_buckets = TokenBuckets(lim.write_rate, lim.write_burst)
    app.state.receipt_buckets = TokenBuckets(lim.receipt_rate, lim.receipt_burst)
    app.state.report_buckets = TokenBuckets(lim.report_rate, lim.report_burst)
    app.state.sse_per_address = AddressCounts(lim.max_sse_per_address)
    # the proxies whose X-Forwarded-For is believed (``writ serve`` sets uvicorn's); in
    # process, none: every client is capped
    app.state.trusted_proxies = TrustedProxies("")
    return app


def _start_witnessing(
    service: LedgerService, config: cfg.ServerConfig, clock: Callable[[], float]
) -> Witnessing | None:
    """(witness) Submit checkpoints to ``config.witnesses`` and collect their cosignatures."""
    if not config.witnesses:
        return None
    witnessing = Witnessing(service, config.witnesses, clock=clock)
    service.witnessing = witnessing
    witnessing.start()
    return witnessing


async def _start(
    app: Starlette,
    config: cfg.ServerConfig,
    ident: cfg.Identity,
    signer: Signer,
    storage: Storage | None,
    clock: Callable[[], float],
    metrics: Metrics,
) -> LedgerService:
    """Open the storage, load and audit the ledger, start the service.

    Each stage logs one line (opening, verifying with progress, serving), so an
    operator whose server takes a minute to re-verify a large ledger sees why."""
    log.info("opening the ledger %s", "(injected storage)" if storage is not None else config.ledger_db)
    try:
        store = storage if storage is not None else await SqliteStorage.open(config.ledger_db)
    except WritError as exc:
        app.state.startup_error = exc
        raise
    try:
        head = await store.head()
        log.info("verifying %d stored records (every signature, every rule)", head.size)
        service = await LedgerService.start(
            config=config,
            ident=ident,
            storage=store,
            signer=signer,
            clock=clock,
            metrics=metrics,
            progress=LoadProgress(head.size),
        )
        service.fleet.sync(service.state, service.receipts)  # the fleet report's counts, once
    except BaseException as exc:
        if isinstance(exc, WritError):
            app.state.startup_error = exc
        if isinstance(exc, CorruptLedger):
            log.error(
                "refusing to serve a corrupt ledger: first bad seq %s (%s): %s",
                exc.seq,
                exc.cause,
                exc.message,
            )
        with contextlib.suppress(Exception):
            await store.close()
        raise
    app.state.service = service
    log.info(
        "verified; serving %s: %d records, root %s, log key %s",
        ident.origin,
        service.size,
        service.root.hex(),
        ident.log_public_key.hex(),
    )
    return service


class LoadProgress:
    """Logs the start-up audit's progress: a line every ``every`` seconds, and the total time."""

    def __init__(
        self, total: int, *, every: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = total
        self.every = every
        self.clock = clock
        self.started = clock()
        self.last = self.started

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done >= total:
            log.info("verified %d records in %.1f s", done, now - self.started)
        elif now - self.last >= self.every:
            pct = 100.0 * done / total if total else 100.0
            log.info("verifying: %d of %d records (%.0f%%)", done, total, pct)
        else:
            return
        self.last = now
