"""Durable and private files: the one implementation every writer uses.

Key files, share sheets, the CLI mirror, a device's state and evidence, the
server's identity and log key all go through these four functions, so every
one of them gets the same guarantees:

- :func:`write_atomic` replaces a file so that a crash leaves the old or the
  new content, never a torn one: a temporary file with a unique name created
  exclusively (``O_EXCL``, so two writers never share it) with ``mode``
  (``fchmod`` too, whatever the umask), written in full, fsynced, renamed over
  the target, and the directory fsynced (``O_DIRECTORY``).
- :func:`create_private` creates a new file exclusively (never overwriting
  one: key material is never replaced by accident), with ``mode``, written
  and fsynced, the directory fsynced; on failure nothing is left behind.
- :func:`fsync_dir` makes a rename or a creation in ``directory`` durable.
- :func:`read_capped` reads at most ``limit`` bytes: a file is never trusted
  to be small.

:func:`raise_open_files_limit` lives here too: the one place that raises the
process's open-files limit (a server holding an event stream per socket, a
fleet, a benchmark or a load run holding thousands of connections).

Failures raise the :class:`~ledger.errors.WritError` subclass the caller
names (``error``), with the path and the OS's reason, never the content.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from .errors import UsageError, WritError

__all__ = ["create_private", "fsync_dir", "raise_open_files_limit", "read_capped", "write_atomic"]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or a new entry in it survives a crash.
    (Best effort: a file system that cannot fsync a directory is not an error.)"""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    error: type[WritError] = UsageError,
    what: str = "",
) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, _CREATE, mode)
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise error(f"cannot write {what}{target}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def create_private(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    error: type[WritError] = UsageError,
    exists: type[WritError] = UsageError,
    what: str = "",
) -> None:
    """Create ``path`` exclusively with ``mode`` (never more permissive, whatever
    the umask), write and fsync ``data``, fsync the directory; on failure
    nothing is left behind. An existing file raises ``exists``; other failures
    raise ``error``."""
    target = os.fspath(path)
    try:
        fd = os.open(target, _CREATE, mode)
    except FileExistsError:
        raise exists(f"refusing to overwrite the existing file {target}") from None
    except OSError as exc:
        raise error(f"cannot create {what}{target}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(target)
        if isinstance(exc, OSError):
            raise error(f"cannot write {what}{target}: {exc.strerror or exc}") from None
        raise
    os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(target)))


def read_capped(
    path: str | os.PathLike[str],
    limit: int,
    *,
    error: type[WritError] = UsageError,
    what: str = "",
    missing_is_error: bool = True,
) -> bytes:
    """The bytes of ``path``, refusing a file larger than ``limit`` bytes (``error``).
    A missing or unreadable file raises ``error`` too, naming the path; with
    ``missing_is_error=False`` a missing file raises :class:`FileNotFoundError`
    (for callers to whom absence is a normal state)."""
    name = what or "file"
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        if not missing_is_error:
            raise
        raise error(f"no {name} at {os.fspath(path)}") from None
    except OSError as exc:
        raise error(f"cannot read the {name} {os.fspath(path)}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"the {name} {os.fspath(path)} is larger than {limit} bytes")
    return data


def raise_open_files_limit(want: int | None = None) -> int:
    """Raise this process's soft open-files limit (``RLIMIT_NOFILE``) towards
    ``want``, or to the hard limit when ``want`` is None (2**20 where the hard
    limit is infinite); never above the hard limit and never lowering it.
    Returns the soft limit now in force, -1 where it cannot be read."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if want is None:
            want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        elif hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft == resource.RLIM_INFINITY or soft >= want:
            return int(soft)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return int(want)
    except (ImportError, ValueError, OSError):
        return -1
