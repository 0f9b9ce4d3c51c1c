"""The one writer engine: sign on a verified state, push, confirm.

Every program that appends records (the ``writ`` commands, the fleet's
integrator) goes through :class:`Writer`:

1. the ledger is synced and verified first (``sync``: the records from
   the server are applied with :meth:`~ledger.state.LedgerState.apply` and
   the checkpoint accepted; anything wrong raises and nothing is signed);
2. the builder signs the intent on top of that verified state, and the
   records are applied to a copy of it: a record the rules refuse is never
   sent (``refuse``);
3. ``POST /v1/records``; on ``stale-head`` (another writer got there first)
   the ledger is re-synced and the intent re-built and re-signed once (the
   builder re-checks that it still makes sense); a second ``stale-head`` is
   refused;
4. when the outcome is uncertain (``stale-head``, or no answer at all: the
   append may have gone through and only its answer been lost) the ledger is
   re-synced and the very records looked for where they were to land; found,
   the push succeeded;
5. after the push the ledger is synced again, which verifies that the
   server kept our bytes.

The engine is synchronous (the CLI calls it directly); :meth:`Writer.apush`
runs it in a worker thread for asyncio programs, so that the time of the
acknowledgement is taken when the answer arrives, not when a busy event loop
gets round to it. It knows nothing of argparse or terminals: the CLI passes
its confirmation prompt, its messages and its refusal as hooks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from .errors import Fork, RecordRejected, StaleHead, TransportError, WritError
from .state import LedgerState

__all__ = ["Builder", "LedgerClient", "Pushed", "VerifiedLedger", "Writer", "check_on_copy", "now_for"]

#: builds the signed records of an intent on top of a verified state at time ``now``
Builder = Callable[[LedgerState, int], list[bytes]]


class VerifiedLedger(Protocol):
    """A verified local copy of the ledger (:class:`ledger.mirror.Mirror`)."""

    @property
    def state(self) -> LedgerState: ...

    @property
    def size(self) -> int: ...

    def read_records(self, start: int = 0, end: int | None = None) -> list[bytes]: ...


class LedgerClient(Protocol):
    """What the writer asks of the server (:class:`ledger.client.Client`)."""

    @property
    def shown(self) -> str: ...

    def post_records(self, raws: list[bytes]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Pushed:
    """What a push did: ``records`` (none: an idempotent retry had nothing to do), the
    state after them, the server's answer, whether it was re-signed after a stale head,
    and when the POST that landed was sent and answered (``time.monotonic()``)."""

    records: list[bytes]
    state: LedgerState
    answer: dict[str, Any]
    retried: bool
    posted_at: float = 0.0
    acked_at: float = 0.0

    @property
    def start(self) -> int:
        """The seq of the first record pushed."""
        return self.state.size - len(self.records)

    @property
    def seqs(self) -> list[int]:
        return list(range(self.start, self.state.size))


def now_for(state: LedgerState, now: int | None = None) -> int:
    """A record's time: max(now, the last record's time)."""
    t = int(time.time()) if now is None else now
    return max(t, state.last_time)


def _raise(exc: WritError) -> NoReturn:
    raise exc


def check_on_copy(
    state: LedgerState, raws: list[bytes], refuse: Callable[[WritError], NoReturn] = _raise
) -> LedgerState:
    """Apply our records to a copy of the verified state; a rule's rejection goes to ``refuse``
    (by default raised) with the message prefixed "refusing to sign: "."""
    new = state.copy()
    for raw in raws:
        try:
            new.apply(raw)
        except RecordRejected as exc:
            exc.message = "refusing to sign: " + exc.message
            refuse(exc)
    return new


def _quiet(message: str) -> None:
    pass


class Writer:
    """Sign on ``ledger`` (verified), push through ``client``, confirm.

    Hooks (all optional): ``sync()`` re-syncs and verifies ``ledger`` from
    ``client`` and raises on anything wrong (default
    ``ledger.sync(client)``); ``confirm(state, raws)`` may refuse before
    anything is sent (the CLI's prompt); ``landed()`` is called as soon as
    the records are known to be appended (the CLI stops honouring Ctrl-C);
    ``say(text)`` gets the explanations; ``refuse(exc)`` gets a refusal of our
    own doing (a record the rules refuse, a head that keeps moving) and must
    raise (default: raises ``exc``). ``strict``: a server whose new head is
    not the one computed from our records, or that the ledger cannot verify
    after the push, raises (:class:`~ledger.errors.Fork`, or what the sync
    raised) instead of a warning: for programs that go on to build on that
    head (the fleet); the CLI, whose records did land, warns."""

    def __init__(
        self,
        ledger: VerifiedLedger,
        client: LedgerClient,
        *,
        sync: Callable[[], object] | None = None,
        confirm: Callable[[LedgerState, list[bytes]], None] | None = None,
        landed: Callable[[], None] | None = None,
        say: Callable[[str], None] = _quiet,
        refuse: Callable[[WritError], NoReturn] = _raise,
        strict: bool = False,
    ) -> None:
        self.ledger = ledger
        self.client = client
        self._sync = sync if sync is not None else self._default_sync
        self.confirm = confirm
        self.landed = landed if landed is not None else (lambda: None)
        self.say = say
        self.refuse = refuse
        self.strict = strict

    def _default_sync(self) -> object:
        sync: Callable[[Any], object] = getattr(self.ledger, "sync")  # noqa: B009 (a Mirror's)
        return sync(self.client)

    def sync(self) -> object:
        """Sync and verify the ledger (a failure raises; nothing is signed)."""
        return self._sync()

    def push(self, build: Builder, *, sync_first: bool = True) -> Pushed:
        """Sync (unless ``sync_first`` is false: the caller just did), build on the verified
        state, check on a copy, confirm, push; see the module's docstring. A builder that
        returns no record has nothing to do (an idempotent retry): nothing is pushed."""
        if sync_first:
            self.sync()
        for attempt in (0, 1):
            state = self.ledger.state
            raws = build(state, now_for(state))
            if not raws:
                return Pushed([], state, {"size": state.size, "root": state.root.hex()}, attempt == 1)
            new = check_on_copy(state, raws, self.refuse)
            if attempt == 0 and self.confirm is not None:
                self.confirm(state, raws)
            posted = time.monotonic()
            try:
                answer = self.client.post_records(raws)
                acked = time.monotonic()
                self.landed()
            except WritError as exc:
                uncertain = exc.type == "stale-head" or isinstance(exc, TransportError)
                if uncertain and self._landed(state.size, raws):
                    # our very records are in the ledger (an answer lost on the way back)
                    self.landed()
                    self.say("writ: the records were appended (the server's answer was lost)")
                    answer = {"size": self.ledger.size, "root": self.ledger.state.root.hex()}
                    return Pushed(raws, new, answer, attempt == 1, posted, time.monotonic())
                if exc.type == "stale-head" and attempt == 0:
                    self.say("writ: the ledger moved on while signing; re-synced, signing again")
                    continue
                if exc.type == "stale-head":
                    self.refuse(
                        StaleHead(
                            "the ledger keeps moving under this command (another writer is busy);"
                            " nothing was appended: run it again"
                        )
                    )
                raise
            size, root = answer.get("size"), answer.get("root")
            if size == new.size and isinstance(root, str) and root != new.root.hex():
                if self.strict:
                    raise Fork("the server's head after our records is not the one computed from them")
                self.say("writ: warning: the server's new root is not the one computed for these records")
            self.after_push()
            return Pushed(raws, new, answer, attempt == 1, posted, acked)
        raise AssertionError("unreachable")  # pragma: no cover

    async def apush(self, build: Builder, *, sync_first: bool = True) -> Pushed:
        """:meth:`push` from a worker thread (for asyncio programs: the fleet)."""
        return await asyncio.to_thread(self.push, build, sync_first=sync_first)

    def _landed(self, start: int, raws: list[bytes]) -> bool:
        """After an uncertain POST: re-sync, and are these exact records at ``start``?"""
        try:
            self.sync()
        except TransportError:
            return False
        end = start + len(raws)
        return self.ledger.size >= end and self.ledger.read_records(start, end) == raws

    def after_push(self) -> None:
        """Bring the ledger up to the new head (verifies the server kept our bytes)."""
        try:
            self._default_sync()
        except WritError as exc:
            if self.strict:
                raise
            self.say(
                "writ: warning: the record was appended, but the mirror could not verify the new head:"
                f" {exc.message}"
            )
