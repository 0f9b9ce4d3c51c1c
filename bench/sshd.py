"""A real OpenSSH ``sshd -D`` whose ``AuthorizedKeysCommand`` asks a Writ device.

Stable API (``bench/sshrevoke.py`` and ``tests/test_sshd_e2e.py`` use it; it
lives in bench/ because benchmarks never import the tests):

``sshd_unavailable() -> str | None``
    Why a real sshd cannot run here (no ``sshd`` binary, not root), or None.

``with running_sshd(work, device_state, roles=()) as srv:``
    Starts ``sshd -D`` on a free port of 127.0.0.1 with a temporary host key,
    ``AuthorizedKeysFile none`` and ``AuthorizedKeysCommand`` = a wrapper
    that runs ``python -m device_sim device authorized-keys --state DIR``
    (this checkout) as the current user; yields ``Sshd(port, user, log)``
    and stops it (SIGTERM) at the end.

``ssh_login(srv, key_file, timeout=10.0) -> bool``
    ``ssh -i KEY user@127.0.0.1 true``: True when the login ran ``true``.

``agent_applied(log, size, timeout=15.0) -> float``
    Waits until a device agent's JSON log (its stderr, in a file) shows an
    applied update reaching ``size``; returns that line's ``time``.

sshd refuses an ``AuthorizedKeysCommand`` unless the program and every
directory above it are owned by root and not writable by group or others,
so the wrapper lives in a new directory under a root-owned, 0755 parent
(``/run`` usually; ``/tmp`` is 1777 and is refused).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
_CANDIDATES = ("/run", "/var/lib", "/opt", "/usr/local/lib", str(REPO))


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    log: Path
    process: subprocess.Popen[bytes]


def sshd_unavailable() -> str | None:
    if SSHD is None or SSH is None or SSH_KEYGEN is None:
        return "OpenSSH (sshd, ssh, ssh-keygen) is not installed (.ci/run installs openssh-server)"
    if os.geteuid() != 0:
        return "sshd runs an AuthorizedKeysCommand only from a root-owned path: the test needs root"
    if _secure_base() is None:
        return "no root-owned directory without group/world write access for the AuthorizedKeysCommand"
    return None


def _secure(path: str) -> bool:
    """sshd's safe_path(): the path and each parent root-owned, not group/world-writable."""
    p = os.path.abspath(path)
    while True:
        try:
            st = os.stat(p)
        except OSError:
            return False
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        if p == "/":
            return True
        p = os.path.dirname(p)


def _secure_base() -> str | None:
    for c in _CANDIDATES:
        if os.path.isdir(c) and os.access(c, os.W_OK) and _secure(c):
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def authorized_keys_wrapper(directory: Path, state: Path, roles: Sequence[str] = ()) -> Path:
    """A root-owned 0755 script running this checkout's ``device authorized-keys``."""
    cmd = [sys.executable, "-m", "device_sim", "device", "authorized-keys", "--state", str(state)]
    for r in roles:
        cmd += ["--role", r]
    script = directory / "writ-authorized-keys"
    script.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))}\nexport PYTHONPATH\nexec {shlex.join(cmd)}\n"
    )
    script.chmod(0o755)
    return script


@contextlib.contextmanager
def running_sshd(work: Path, device_state: Path, roles: Sequence[str] = ()) -> Iterator[Sshd]:
    reason = sshd_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    assert SSHD is not None and SSH_KEYGEN is not None
    base = _secure_base()
    assert base is not None
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    bin_dir = Path(tempfile.mkdtemp(prefix="writ-sshd-", dir=base))
    try:
        bin_dir.chmod(0o755)
        script = authorized_keys_wrapper(bin_dir, device_state, roles)
        work.mkdir(parents=True, exist_ok=True)
        host_key = work / "ssh_host_ed25519_key"
        if not host_key.exists():
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        port = _free_port()
        user = getpass.getuser()
        config = work / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    "PidFile none",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "AuthorizedKeysFile none",
                    f"AuthorizedKeysCommand {script} %u",
                    f"AuthorizedKeysCommandUser {user}",
                    "MaxStartups 100:30:200",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
        log = work / "sshd.log"
        with open(log, "ab") as err:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)], stdout=err, stderr=err, stdin=subprocess.DEVNULL
            )
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {log.read_text()[-2000:]}")
                time.sleep(0.05)
            yield Sshd(port, user, log, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(bin_dir, ignore_errors=True)


def ssh_login(srv: Sshd, key_file: Path, timeout: float = 10.0) -> bool:
    """One ``ssh -i KEY user@127.0.0.1 -p PORT true``; True when it logged in and ran ``true``."""
    assert SSH is not None
    cmd = [
        SSH,
        "-i",
        str(key_file),
        "-p",
        str(srv.port),
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        f"ConnectTimeout={max(1, int(timeout))}",
        "-F",
        "/dev/null",
        f"{srv.user}@127.0.0.1",
        "true",
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def agent_applied(log: Path, size: int, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("event") == "applied" and ev.get("size", 0) >= size:
                return float(ev["time"])
        time.sleep(0.02)
    raise AssertionError(f"the agent did not apply size {size}: {log.read_text()[-3000:]}")
