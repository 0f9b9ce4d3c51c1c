"""ledger/fileio.py: the one writer of durable and private files."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from ledger import fileio
from ledger.errors import BadMessage, StorageError, UsageError


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_atomic_replaces_with_the_mode_asked_whatever_the_umask(tmp_path: Path) -> None:
    p = tmp_path / "state.bin"
    old = os.umask(0)
    try:
        fileio.write_atomic(p, b"one")
        assert (p.read_bytes(), _mode(p)) == (b"one", 0o600)
        fileio.write_atomic(p, b"two", mode=0o644)
        assert (p.read_bytes(), _mode(p)) == (b"two", 0o644)
    finally:
        os.umask(old)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["state.bin"]  # no temporary left


def test_a_failed_atomic_write_keeps_the_old_content_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "state.bin"
    fileio.write_atomic(p, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError) as info:
        fileio.write_atomic(p, b"new", error=StorageError)
    assert "No space left" in info.value.message and "new" not in info.value.message
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["state.bin"]


def test_concurrent_atomic_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    p = tmp_path / "state.bin"
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for _ in range(50):
                fileio.write_atomic(p, bytes([i]) * 4096)
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = p.read_bytes()
    assert len(data) == 4096 and len(set(data)) == 1  # one writer's whole content, never a mix


def test_create_private_never_overwrites_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "device.key"
    old = os.umask(0)
    try:
        fileio.create_private(key, b"secret")
    finally:
        os.umask(old)
    assert _mode(key) == 0o600
    with pytest.raises(UsageError):
        fileio.create_private(key, b"other")
    assert key.read_bytes() == b"secret"

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError) as info:
        fileio.create_private(tmp_path / "log.key", b"seed", error=StorageError)
    assert "seed" not in info.value.message
    assert not (tmp_path / "log.key").exists()


def test_read_capped_refuses_a_file_larger_than_its_limit(tmp_path: Path) -> None:
    p = tmp_path / "big"
    p.write_bytes(b"x" * 101)
    assert fileio.read_capped(p, 101) == b"x" * 101
    with pytest.raises(BadMessage):
        fileio.read_capped(p, 100, error=BadMessage, what="the state")
    with pytest.raises(UsageError):
        fileio.read_capped(tmp_path / "absent", 10)
    with pytest.raises(FileNotFoundError):
        fileio.read_capped(tmp_path / "absent", 10, missing_is_error=False)


def test_write_at_drops_what_a_crash_left_after_the_offset(tmp_path: Path) -> None:
    p = tmp_path / "records.bin"
    fileio.write_at(p, 0, b"committed")
    with p.open("ab") as fh:
        fh.write(b"torn tail")  # written, never committed: the valid length is kept elsewhere
    fileio.write_at(p, len(b"committed"), b"+next")
    assert (p.read_bytes(), _mode(p)) == (b"committed+next", 0o600)


class _Limits:
    """A stand-in for RLIMIT_NOFILE: what getrlimit returns and what setrlimit was asked."""

    def __init__(self, soft: int, hard: int, fail: bool = False) -> None:
        self.soft, self.hard, self.fail = soft, hard, fail
        self.set: list[tuple[int, int]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import resource

        def setrlimit(_which: int, limits: tuple[int, int]) -> None:
            if self.fail:
                raise ValueError("not allowed")
            self.set.append(limits)
            self.soft = limits[0]

        monkeypatch.setattr(resource, "getrlimit", lambda _which: (self.soft, self.hard))
        monkeypatch.setattr(resource, "setrlimit", setrlimit)


@pytest.mark.parametrize(
    ("soft", "hard", "want", "now", "asked"),
    [
        (1024, 4096, 65536, 4096, [(4096, 4096)]),  # capped at the hard limit
        (1024, 4096, 2048, 2048, [(2048, 4096)]),  # as much as wanted
        (8192, 8192, 2048, 8192, []),  # never lowered
        (1024, 4096, None, 4096, [(4096, 4096)]),  # None: the hard limit
    ],
)
def test_raise_open_files_limit_raises_within_the_hard_limit_and_never_lowers(
    monkeypatch: pytest.MonkeyPatch,
    soft: int,
    hard: int,
    want: int | None,
    now: int,
    asked: list[tuple[int, int]],
) -> None:
    limits = _Limits(soft, hard)
    limits.install(monkeypatch)
    assert fileio.raise_open_files_limit(want) == now
    assert limits.set == asked


def test_raise_open_files_limit_with_an_infinite_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    limits = _Limits(1024, resource.RLIM_INFINITY)
    limits.install(monkeypatch)
    assert fileio.raise_open_files_limit() == 1 << 20
    assert fileio.raise_open_files_limit(1 << 30) == 1 << 30


def test_raise_open_files_limit_refused_is_minus_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _Limits(1024, 4096, fail=True).install(monkeypatch)
    assert fileio.raise_open_files_limit(2048) == -1
