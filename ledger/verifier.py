"""Where a run of signature pre-checks is computed: in this thread, in a thread
pool, or in worker processes.

:meth:`ledger.state.LedgerState.apply_all` checks the signatures of a run of
records ahead of the rules. Threads do not give it the machine: each libsodium
call releases the GIL, but the thread must take it back to start the next one,
and the rules thread holds it most of the time (measured on 2 cores: a 2-thread
audit reached about half the 2-thread raw verify rate). :class:`ProcessVerifier`
checks batches in worker processes instead (:mod:`ledger.verify_worker`,
started with ``python -P -m``, never forked from a threaded process), each
with its own interpreter.

``apply`` uses a result only for the very key and bytes it decides on, so a
wrong key guess costs time, never correctness; the answer itself is trusted as
the thread pool's was (the workers run this package's code, exec'd from the
same interpreter, and hold public keys only). A worker that dies, or answers a
batch with the wrong number of results, makes the caller check that batch
itself (and stop using the workers). Pure computation; no I/O but the workers' pipes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import IO

from . import crypto
from .keyguess import PrecheckItem
from .verify_worker import NOTHING

__all__ = ["PrecheckItem", "ProcessVerifier", "Results", "shared", "submit", "usable_cores"]

#: call it to wait for a submitted batch's results (one bool per item, in order)
Results = Callable[[], Sequence[bool]]

#: a run given only an executor moves to the shared workers once this long (a round trip
#: to a worker costs about 0.1 ms, and the first use starts them: about 70 ms of CPU each)
PROCESS_MIN = 512
_MAX_KEYS = 254
#: the pipe to each worker (Linux lets an unprivileged process ask for up to 1 MiB)
PIPE_SIZE = 1 << 20
_ENV = "WRIT_VERIFY_PROCESSES"


def _encode(items: Sequence[PrecheckItem | None]) -> bytes | None:
    """A batch in :mod:`ledger.verify_worker`'s format, or None when it cannot
    be encoded (too many distinct keys or domains: check those in process)."""
    domains: dict[bytes, int] = {}
    keys: dict[bytes, int] = {}
    parts: list[bytes] = []
    skip = bytes((0, NOTHING)) + bytes(66)
    for it in items:
        if it is None:
            parts.append(skip)
            continue
        key, domain, msg, sig = it
        if len(key) != crypto.PUBLIC_KEY_SIZE or len(sig) != crypto.SIGNATURE_SIZE or len(msg) > 0xFFFF:
            parts.append(skip)  # crypto.check says False for these too
            continue
        di = domains.get(domain)
        if di is None:
            if len(domains) == _MAX_KEYS or len(domain) > 0xFFFF:
                return None
            di = domains[domain] = len(domains)
        ki = keys.get(key)
        if ki is None:
            if len(keys) == _MAX_KEYS:
                return None
            ki = keys[key] = len(keys)
        parts.append(bytes((di, ki)) + sig + len(msg).to_bytes(2, "big") + msg)
    head = [bytes((len(domains),))]
    head += [len(d).to_bytes(2, "big") + d for d in domains]
    head.append(bytes((len(keys),)))
    head += list(keys)
    return b"".join(head) + b"".join(parts)


def _grow_pipe(fd: int) -> None:
    """Ask for a :data:`PIPE_SIZE` pipe (Linux); elsewhere the default stays."""
    with contextlib.suppress(ImportError, AttributeError, OSError):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class _WorkerGone(Exception):
    pass


class _Worker:
    """One worker process; requests and answers are paired by order."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout
        # room for the batches in flight (a 1,024-record batch is about 300 KB): with
        # the default 64 KiB a send waits until the worker has finished the batch before,
        # and the rules thread, which sends, stops with it
        _grow_pipe(self.stdin.fileno())
        self.send_lock = threading.Lock()
        self.recv_lock = threading.Lock()
        self.sent = 0
        self.received = 0
        self.answers: dict[int, bytes] = {}
        self.dropped: set[int] = set()

    def outstanding(self) -> int:
        return self.sent - self.received

    def send(self, frame: bytes) -> int:
        with self.send_lock:
            n = self.sent
            try:
                self.stdin.write(len(frame).to_bytes(4, "big") + frame)
                self.stdin.flush()
            except (OSError, ValueError) as exc:
                raise _WorkerGone from exc
            self.sent += 1
            return n

    def _read(self, n: int) -> bytes:
        data = self.stdout.read(n)
        if data is None or len(data) != n:
            raise _WorkerGone
        return data

    def answer(self, n: int) -> bytes:
        with self.recv_lock:
            while n not in self.answers:
                try:
                    size = int.from_bytes(self._read(4), "big")
                    data = self._read(size)
                except (OSError, ValueError) as exc:
                    raise _WorkerGone from exc
                k = self.received
                self.received += 1
                if k in self.dropped:
                    self.dropped.discard(k)
                else:
                    self.answers[k] = data
            return self.answers.pop(n)

    def drop(self, n: int) -> None:
        with self.recv_lock:
            if self.answers.pop(n, None) is None and n >= self.received:
                self.dropped.add(n)

    def close(self) -> None:
        # end of input stops the worker; closing its answers first means a worker
        # still writing an answer nobody will read stops too (broken pipe)
        for f in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                f.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ProcessVerifier:
    """Ed25519 pre-checks in ``processes`` worker processes.

    Thread-safe: several threads may submit and collect at once. ``close``
    (or leaving the ``with`` block) stops the workers; a verifier whose workers
    could not start or have died answers every batch in the calling thread.
    """

    def __init__(self, processes: int = 2) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self.broken: str | None = None
        argv = [sys.executable, "-P", "-m", "ledger.verify_worker"]
        try:
            for _ in range(max(1, processes)):
                self._workers.append(_Worker(argv))
        except OSError as exc:
            self._fail(f"could not start a worker: {exc}")

    def __enter__(self) -> ProcessVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def usable(self) -> bool:
        return self.broken is None and os.getpid() == self._pid

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = why

    def submit(self, items: Sequence[PrecheckItem | None]) -> Results:
        """Start checking ``items``; the returned callable waits for the results."""
        frame = _encode(items) if self.usable else None
        if frame is None:
            return partial(crypto.check_batch, items)
        workers = self._workers
        if not workers:  # closed meanwhile
            return partial(crypto.check_batch, items)
        w = min(workers, key=_Worker.outstanding)
        try:
            n = w.send(frame)
        except _WorkerGone:
            self._fail("a worker stopped taking work")
            return partial(crypto.check_batch, items)
        return _Pending(self, w, n, items)

    def close(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child: the workers are the parent's
        self._fail("closed")
        workers, self._workers = self._workers, []
        for w in workers:
            w.close()


class _Pending:
    __slots__ = ("_items", "_n", "_owner", "_worker")

    def __init__(self, owner: ProcessVerifier, worker: _Worker, n: int, items: Sequence[PrecheckItem | None]):
        self._owner, self._worker, self._n, self._items = owner, worker, n, items

    def __call__(self) -> Sequence[bool]:
        try:
            data = self._worker.answer(self._n)
        except _WorkerGone:
            self._owner._fail("a worker died")
            data = b""
        if len(data) != len(self._items):
            return crypto.check_batch(self._items)
        return [b == 1 for b in data]

    def cancel(self) -> None:
        self._worker.drop(self._n)


def cancel(results: Results) -> None:
    """Forget a batch whose results will never be read."""
    if isinstance(results, _Pending):
        results.cancel()


_shared: ProcessVerifier | None = None
_shared_lock = threading.Lock()


def _processes() -> int:
    """How many workers :func:`shared` starts: ``WRIT_VERIFY_PROCESSES`` if set
    (0 turns them off), else one per core, none on a single core."""
    env = os.environ.get(_ENV, "").strip()
    if env:
        try:
            return max(0, min(int(env), 64))
        except ValueError:
            return 0
    n = usable_cores()
    return n if n > 1 else 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def shared() -> ProcessVerifier | None:
    """The process-wide verifier (started on first use, stopped at exit), or
    None where worker processes are turned off or cannot help."""
    global _shared
    with _shared_lock:
        v = _shared
        if v is not None and v.usable:
            return v
        if v is not None and os.getpid() != v._pid:
            _shared = v = None  # inherited through fork: the parent's
        if v is not None:
            return None  # broken: check in process from now on
        n = _processes()
        if n == 0:
            return None
        _shared = v = ProcessVerifier(n)
        atexit.register(v.close)
        return v if v.usable else None


def submit(
    items: Sequence[PrecheckItem | None], *, executor: Executor | None, verifier: ProcessVerifier | None
) -> Results:
    """Start the pre-checks of ``items``: in ``verifier``'s worker processes,
    else in ``executor``'s threads, else on demand in the caller's thread."""
    if verifier is not None and verifier.usable:
        return verifier.submit(items)
    if executor is not None:
        return executor.submit(crypto.check_batch, items).result
    return partial(crypto.check_batch, items)
