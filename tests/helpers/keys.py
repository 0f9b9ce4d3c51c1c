"""Key-backend test helpers: SoftHSM2 and ssh-agent constants, skip marks, loading a seed into an agent.

The fixtures that run the real programs (``softhsm``, ``ssh_agent``,
``short_tmp``) live in ``tests/conftest.py``; tests that use them skip (with
:data:`requires_softhsm` / :data:`requires_openssh`) when the programs are
missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

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


def init_softhsm_token(directory: Path, monkeypatch: pytest.MonkeyPatch, label: str = TOKEN) -> Path:
    """A fresh SoftHSM2 token ``label`` (user PIN :data:`PIN`) in its own token directory
    under ``directory``, with ``SOFTHSM2_CONF`` pointing at it; returns the token directory."""
    tokendir = directory / "tokens"
    tokendir.mkdir()
    conf = directory / "softhsm2.conf"
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


def openssh_key_file(directory: Path, seed: bytes, name: str = "id_ed25519") -> Path:
    """An unencrypted OpenSSH private key file (0600) of an Ed25519 seed."""
    path = directory / name
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return path


def ssh_add(sock: str, *args: str) -> None:
    """``ssh-add ARGS`` against the agent at ``sock``."""
    subprocess.run(
        ["ssh-add", *args],
        env={**os.environ, "SSH_AUTH_SOCK": sock},
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


def ssh_add_seed(sock: str, directory: Path, seed: bytes, name: str = "id_ed25519") -> None:
    """Load an Ed25519 seed into the agent (through a 0600 OpenSSH key file, removed after)."""
    path = openssh_key_file(directory, seed, name)
    try:
        ssh_add(sock, str(path))
    finally:
        path.unlink()
