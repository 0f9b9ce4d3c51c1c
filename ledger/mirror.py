"""A local, verified mirror of one ledger: what a signing tool signs on top of.

A mirror is a directory:

- ``records.bin``: every record, in order, each prefixed by its length as a
  big-endian uint16 (records are at most 600 bytes). Append-only; bytes past
  the committed length (a crash between the append and the state write) are
  ignored and overwritten by the next commit.
- ``state.bin``: the committed head, written atomically (temporary file,
  fsync, rename): ``[1, anchor, origin, records_bytes, LedgerState snapshot,
  accepted view JSON or nil]``.
- ``evidence/``: one JSON file per refused sync (``ledger.acceptance.Evidence``).
- ``lock``: an advisory lock, so two commands never write one mirror at once.

:meth:`Mirror.sync` fetches the checkpoint and the records the mirror lacks,
applies them with :class:`~ledger.state.LedgerState` (the same rules as
everyone, with only the anchor), accepts the checkpoint with
:func:`ledger.acceptance.accept`, and commits; anything that fails raises (a
server that serves another history than the mirror holds is a fork) and
leaves the mirror exactly as it was. :meth:`Mirror.extend` does the same for
a sync bundle carried to an offline machine. The rules live in
``ledger/state.py`` and ``ledger/acceptance.py``; this module only does the I/O.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import acceptance, encoding, records
from .acceptance import AcceptedView, Evidence
from .checkpoints import parse_checkpoint_body
from .errors import (
    BadMessage,
    CorruptLedger,
    Fork,
    RecordRejected,
    Rollback,
    StaleHead,
    StorageError,
    UsageError,
    VerificationError,
    WritError,
)
from .fileio import write_at, write_atomic
from .notes import parse_note
from .state import LedgerState
from .tree import CompactRange, leaf_hash

__all__ = ["PAGE", "LedgerSource", "Mirror", "SyncResult", "default_dir", "origin_of"]

PAGE = 1000
LOCK_TIMEOUT = 30.0
_LEN = struct.Struct(">H")
_FORMAT = 1


class LedgerSource(Protocol):
    """Where a mirror gets data from (the CLI's HTTP client)."""

    def checkpoint(self) -> str: ...

    def records(self, start: int, limit: int) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class SyncResult:
    fetched: int
    size: int
    root: bytes
    checkpoint_time: int | None
    warning: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "fetched": self.fetched,
            "size": self.size,
            "root": self.root.hex(),
            "checkpoint_time": self.checkpoint_time,
        }


def origin_of(note: str) -> str:
    """The origin line of a checkpoint note (unverified: only to choose a directory)."""
    return parse_checkpoint_body(parse_note(note).body).origin


def default_dir(origin: str) -> Path:
    """``$WRIT_HOME/mirrors/<id>`` or ``~/.local/share/writ/mirrors/<id>``,
    ``<id>`` the first 16 hex digits of SHA-256(origin)."""
    home = os.environ.get("WRIT_HOME")
    base = Path(home) if home else Path.home() / ".local" / "share" / "writ"
    return base / "mirrors" / hashlib.sha256(origin.encode("utf-8")).hexdigest()[:16]


class Mirror:
    """An open, locked mirror directory. Use as a context manager."""

    def __init__(
        self,
        path: Path,
        lock_fd: int,
        state: LedgerState,
        view_: AcceptedView | None,
        records_bytes: int,
        *,
        new: bool,
    ) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd
        self.state = state
        self.view = view_
        self.records_bytes = records_bytes
        self.new = new

    # -- open / close ----------------------------------------------------------

    @classmethod
    def open(cls, path: Path, anchor: bytes | None, *, create: bool = True) -> Mirror:
        """Open (or create, for a known ``anchor``) the mirror at ``path``, locked.

        An existing mirror built for another anchor is refused."""
        path = Path(path)
        state_file = path / "state.bin"
        if not state_file.exists():
            if not create:
                raise UsageError(f"no mirror at {path} (writ mirror import, or any command with --server)")
            if anchor is None:
                raise UsageError(
                    f"no mirror at {path} yet and no anchor to verify the ledger with: give --anchor HEX"
                )
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create the mirror directory {path}: {exc.strerror}") from None
        fd = _lock(path / "lock")
        try:
            if state_file.exists():
                st, view_, nbytes = _load(state_file)
                if anchor is not None and st.anchor != anchor:
                    raise UsageError(
                        f"the mirror at {path} is of the ledger with anchor {st.anchor.hex()}, not"
                        f" {anchor.hex()}: give another --mirror DIR (or remove that one)"
                    )
                rec_file = path / "records.bin"
                have = rec_file.stat().st_size if rec_file.exists() else 0
                if have < nbytes:
                    raise CorruptLedger(
                        f"the mirror at {path} is damaged (records.bin is shorter than committed);"
                        " remove the directory to rebuild it from the server"
                    )
                return cls(path, fd, st, view_, nbytes, new=False)
            assert anchor is not None
            return cls(path, fd, LedgerState(anchor), None, 0, new=True)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ---------------------------------------------------------------

    @property
    def anchor(self) -> bytes:
        return self.state.anchor

    @property
    def size(self) -> int:
        return self.state.size

    def read_records(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """Records ``[start, end)`` from ``records.bin``; the whole file is
        checked against the committed root while reading."""
        stop = self.state.size if end is None else end
        if not 0 <= start <= stop <= self.state.size:
            raise UsageError(f"records {start}..{stop} are not in this mirror of {self.state.size}")
        try:
            data = (self.path / "records.bin").read_bytes()[: self.records_bytes]
        except OSError as exc:
            raise CorruptLedger(f"cannot read the mirror's records: {exc.strerror}") from None
        out: list[bytes] = []
        frontier = CompactRange()
        pos = i = 0
        while pos < len(data):
            if pos + 2 > len(data):
                break
            (n,) = _LEN.unpack_from(data, pos)
            raw = data[pos + 2 : pos + 2 + n]
            if len(raw) != n:
                break
            frontier.append(leaf_hash(raw))
            if start <= i < stop:
                out.append(raw)
            pos += 2 + n
            i += 1
        if i != self.state.size or frontier.root() != self.state.root:
            raise CorruptLedger(
                f"the mirror at {self.path} is damaged (its records do not make the committed tree);"
                " remove the directory to rebuild it"
            )
        return out

    # -- verified updates --------------------------------------------------------

    def sync(
        self,
        source: LedgerSource,
        *,
        note: str | None = None,
        progress: Callable[[int], None] | None = None,
        now: int | None = None,
    ) -> SyncResult:
        """Fetch the checkpoint and the records this mirror lacks; verify; commit.

        ``now`` is this machine's clock (default: the system clock), read once
        the records are in: a checkpoint dated more than 300 s ahead of it is
        refused (``future-checkpoint``) and kept as evidence."""
        if note is None:
            note = source.checkpoint()
        try:
            size = acceptance.checkpoint_size(note)
        except WritError as exc:
            self._evidence(exc, note)
            raise
        fetched: list[bytes] = []
        new = self.state.copy()
        executor = ThreadPoolExecutor(2) if size - new.size > 4 * PAGE else None
        try:
            while new.size < size:
                want = min(PAGE, size - new.size)
                page = source.records(new.size, want)[:want]
                if not page:
                    break
                self._apply(new, page, executor, note)
                fetched.extend(page)
                if progress is not None:
                    progress(len(page))
        finally:
            if executor is not None:
                executor.shutdown()
        return self._accept_and_commit(new, fetched, note, int(time.time()) if now is None else now)

    def extend(self, start: int, raws: Sequence[bytes], note: str, *, now: int | None = None) -> SyncResult:
        """Apply a bundle (``raws`` from ``start``, and its checkpoint) on top of this mirror.

        ``now`` is this machine's clock (default: the system clock): a
        checkpoint dated more than 300 s ahead of it is refused."""
        now = int(time.time()) if now is None else now
        if start > self.state.size:
            raise BadMessage(
                f"the bundle starts at {start} but this mirror has {self.state.size} records:"
                f" export a bundle with --start {self.state.size} or lower"
            )
        overlap = self.state.size - start
        if overlap:
            mine = self.read_records(start, min(self.state.size, start + len(raws)))
            for k, (a, b) in enumerate(zip(mine, raws, strict=False)):
                if a != b:
                    exc = Fork(f"the bundle's record {start + k} differs from the mirror's", seq=start + k)
                    self._evidence(exc, note, data=b)
                    raise exc
        new = self.state.copy()
        rest = list(raws[overlap:])
        executor = ThreadPoolExecutor(2) if len(rest) > 4 * PAGE else None
        try:
            for i in range(0, len(rest), PAGE):
                self._apply(new, rest[i : i + PAGE], executor, note)
        finally:
            if executor is not None:
                executor.shutdown()
        return self._accept_and_commit(new, rest, note, now)

    def _apply(
        self, new: LedgerState, page: Sequence[bytes], executor: ThreadPoolExecutor | None, note: str
    ) -> None:
        base = new.size
        try:
            new.apply_all(page, executor=executor)
        except RecordRejected as exc:
            bad = new.size
            data = page[bad - base] if 0 <= bad - base < len(page) else None
            if isinstance(exc, StaleHead):
                # the record at this position does not extend the history this mirror holds
                fork = Fork(
                    f"the record served at {bad} does not extend the verified history ({exc.message})",
                    seq=bad,
                )
                self._evidence(fork, note, data=data)
                raise fork from None
            exc.seq = bad
            exc.detail["seq"] = bad
            self._evidence(exc, note, data=data)
            raise

    def _accept_and_commit(self, new: LedgerState, fetched: list[bytes], note: str, now: int) -> SyncResult:
        warning = None
        if not new.active_keys(records.ROLE_LOG):
            # Bootstrapping (empty ledger, or a genesis without a log grant): no key can
            # sign a checkpoint yet. The records themselves are root-verified.
            if acceptance.checkpoint_size(note) != new.size:
                exc: VerificationError = Rollback(
                    f"the checkpoint names {acceptance.checkpoint_size(note)} records but the server served"
                    f" {new.size}"
                )
                self._evidence(exc, note)
                raise exc
            warning = "no log key is granted yet: the checkpoint cannot be verified (records are)"
            accepted = self.view
        else:
            try:
                accepted = acceptance.accept(self.view, note, new, now=now)
            except WritError as exc:
                self._evidence(exc, note)
                raise
        self._commit(new, fetched, accepted)
        return SyncResult(
            len(fetched), new.size, new.root, accepted.timestamp if accepted is not None else None, warning
        )

    def _commit(self, new: LedgerState, raws: Sequence[bytes], accepted: AcceptedView | None) -> None:
        if new.size == self.state.size and accepted == self.view and not self.new:
            return
        try:
            self._write(new, raws, accepted)
        except OSError as exc:
            raise StorageError(f"cannot write the mirror at {self.path}: {exc.strerror}") from None

    def _write(self, new: LedgerState, raws: Sequence[bytes], accepted: AcceptedView | None) -> None:
        blob = b"".join(_LEN.pack(len(r)) + r for r in raws)
        write_at(self.path / "records.bin", self.records_bytes, blob)
        nbytes = self.records_bytes + len(blob)
        snapshot = encoding.pack(
            [
                _FORMAT,
                new.anchor,
                new.origin,
                nbytes,
                new.snapshot(),
                None if accepted is None else json.dumps(accepted.to_json()),
            ]
        )
        write_atomic(self.path / "state.bin", snapshot, error=StorageError, what="the mirror state ")
        self.state, self.view, self.records_bytes, self.new = new, accepted, nbytes, False

    def _evidence(self, exc: WritError, note: str | None, data: bytes | None = None) -> None:
        """Keep what a refused sync saw (best effort: never hides the error)."""
        with contextlib.suppress(OSError, StorageError):
            ev = Evidence.from_error(
                exc,
                observed_at=int(time.time()),
                notes=(self.view.note if self.view else None, note),
                data=data,
            )
            d = self.path / "evidence"
            d.mkdir(exist_ok=True, mode=0o700)
            name = f"{ev.observed_at}-{ev.kind}-{os.getpid()}.json"
            body = (json.dumps(ev.to_json(), indent=2) + "\n").encode()
            write_atomic(d / name, body, error=StorageError, what="the evidence ")


def _lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot open the mirror lock {path}: {exc.strerror}") from None
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise UsageError(f"the mirror {path.parent} is in use by another writ command") from None
            time.sleep(0.05)


def _load(state_file: Path) -> tuple[LedgerState, AcceptedView | None, int]:
    try:
        data = state_file.read_bytes()
    except OSError as exc:
        raise CorruptLedger(f"cannot read {state_file}: {exc.strerror}") from None
    try:
        f = encoding.unpack_array(data, min_len=6, max_len=6, error=BadMessage)
        if f[0] != _FORMAT or type(f[3]) is not int or type(f[4]) is not bytes:
            raise BadMessage("unknown mirror format")
        st = LedgerState.restore(f[4])
        if st.anchor != f[1] or st.origin != f[2]:
            raise BadMessage("mirror header does not match its state")
        accepted = None if f[5] is None else AcceptedView.from_json(json.loads(f[5]))
    except (WritError, ValueError, TypeError) as exc:
        raise CorruptLedger(
            f"the mirror state {state_file} is damaged ({getattr(exc, 'message', type(exc).__name__)});"
            " remove the directory to rebuild it"
        ) from None
    return st, accepted, f[3]
