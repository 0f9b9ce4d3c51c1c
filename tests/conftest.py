"""Shared pytest configuration and the fixtures several test modules use.

- the ``slow`` marker runs only with ``WRIT_SLOW=1``;
- ``softhsm``: a fresh SoftHSM2 token, yields its PKCS#11 URI;
- ``short_tmp``: a short directory path (unix socket paths are limited);
- ``ssh_agent``: a private ssh-agent, ``SSH_AUTH_SOCK`` points at it.

Helpers that are not fixtures live in ``tests/helpers/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.keys import TOKEN, init_softhsm_token


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("WRIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set WRIT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --- key backends (tests/helpers/keys.py) ---------------------------------------


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SoftHSM token (label ``writ-cli``, user PIN 1234) in its own token
    directory; yields the token's PKCS#11 URI."""
    init_softhsm_token(tmp_path, monkeypatch)
    yield f"pkcs11:token={TOKEN}"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory path: unix socket paths are limited to ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="writ-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ssh_agent(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An ssh-agent of this test only; ``SSH_AUTH_SOCK`` points at it. Yields the socket path."""
    sock = short_tmp / "agent.sock"
    proc = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ssh-agent did not start")
            time.sleep(0.01)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
