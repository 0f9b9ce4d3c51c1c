"""Shared key-backend fixtures: a fresh SoftHSM2 token and a private ssh-agent.

Import the fixtures into a test module (``from tests.fixtures_keys import
softhsm, ssh_agent, short_tmp``); both run the real programs and the tests
that use them skip when the programs are missing.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from device_sim.server_process import stop_server as stop_process
from ledger.signers import pkcs11 as p11_mod

SOFTHSM_MODULE = p11_mod.DEFAULT_MODULE
PIN = "1234"
SO_PIN = "5678"
TOKEN = "writ-cli"

requires_softhsm = pytest.mark.skipif(
    shutil.which("softhsm2-util") is None or not os.path.exists(SOFTHSM_MODULE),
    reason="softhsm2 is not installed (apt-get install softhsm2)",
)
requires_openssh = pytest.mark.skipif(
    shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None,
    reason="openssh-client is not installed (apt-get install openssh-client)",
)


def init_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str) -> Path:
    """Initialise a SoftHSM token ``label`` (user PIN :data:`PIN`) in a token
    directory of its own under ``tmp_path``, the environment pointing at it;
    returns the token directory."""
    tokendir = tmp_path / "tokens"
    tokendir.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    monkeypatch.delenv(p11_mod.MODULE_ENV, raising=False)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return tokendir


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SoftHSM token (label ``writ-cli``, user PIN 1234) in its own token
    directory; yields the token's PKCS#11 URI."""
    init_token(tmp_path, monkeypatch, TOKEN)
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
        stop_process(proc, timeout=5)


def openssh_key_file(directory: Path, seed: bytes, name: str = "id_ed25519") -> Path:
    """An unencrypted OpenSSH private key file (0600, created exclusively) of an Ed25519 seed."""
    path = directory / name
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return path


def ssh_add_seed(sock: str, directory: Path, seed: bytes, name: str = "id_ed25519") -> None:
    """Load an Ed25519 seed into the agent (through a 0600 OpenSSH key file, removed after)."""
    path = openssh_key_file(directory, seed, name)
    try:
        subprocess.run(
            ["ssh-add", str(path)],
            env={**os.environ, "SSH_AUTH_SOCK": sock},
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
    finally:
        path.unlink()
