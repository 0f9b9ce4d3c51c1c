"""The real ``writ`` as another program: run a command, start and stop ``writ serve``.

``device_sim`` never imports ``api``: a device, the fleet and ``writ demo``
reach the server the way a field device does, as a separate process spoken to
over HTTP. This module is the one place that starts that process; the demo,
the end-to-end tests, the benchmarks and the reliability runs all use it.

``writ_command()`` is the ``writ`` script installed beside the running
interpreter (the venv's ``bin/writ``), or, from a clone that was not
installed, the same program through ``python -c``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import httpx

from ledger.errors import TransportError

__all__ = [
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "ServerProcess",
    "free_port",
    "pick_port",
    "run_writ",
    "start_server",
    "stop_server",
    "writ_command",
]

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

#: ``writ`` without its console script: the composition root, run as a program.
_FALLBACK = "from api.main import main; main()"


def writ_command() -> list[str]:
    """The ``writ`` executable of this environment, as an argv prefix."""
    exe = Path(sys.executable).parent / "writ"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", _FALLBACK]


def run_writ(
    *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    """Run ``writ ARGS``; returns (exit code, the JSON object it printed last, stderr)."""
    proc = subprocess.run(
        [*writ_command(), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
        env=dict(env) if env is not None else None,
    )
    out = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        doc = json.loads(out[-1]) if out else {}
    except ValueError:
        doc = {}
    return proc.returncode, doc if isinstance(doc, dict) else {}, proc.stderr.decode(errors="replace")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def pick_port(host: str, wanted: int) -> int:
    """``wanted`` when free, else the next free one of the hundred after it, else any."""
    for port in range(wanted, min(wanted + 100, 65536)) if wanted > 0 else ():
        if _port_free(host, port):
            return port
    return free_port(host)


class ServerProcess(NamedTuple):
    """A running ``writ serve``: its base URL, data directory and process."""

    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]


def _flags(flags: Mapping[str, Any]) -> list[str]:
    """``name=value`` as ``--name value``; a list or tuple value repeats the flag."""
    out: list[str] = []
    for k, v in flags.items():
        for item in v if isinstance(v, list | tuple) else [v]:
            out += ["--" + k.replace("_", "-"), str(item)]
    return out


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def start_server(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    log: Path | None = None,
    stdout_to_log: bool = False,
    new_session: bool = False,
    ready_timeout: float = READY_TIMEOUT,
    **flags: Any,
) -> ServerProcess:
    """Start ``writ serve --data DATA_DIR`` and return once ``GET /checkpoint`` answers 200.

    The server's stderr is appended to ``log`` (default ``serve-PORT.log`` beside
    the data directory); its stdout (one JSON line) is a pipe the caller may read,
    or goes to the log too with ``stdout_to_log``. ``new_session`` puts it in a
    process group of its own, so a terminal's Ctrl-C reaches only the caller, which
    then stops it. ``flags`` become options (``checkpoint_interval=1`` ->
    ``--checkpoint-interval 1``). Raises :class:`~ledger.errors.TransportError`,
    with the log's tail, when it exits or is not ready within ``ready_timeout``."""
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    log = log if log is not None else data_dir.parent / f"serve-{port}.log"
    cmd = [*writ_command(), "serve", "--data", str(data_dir), "--host", host, "--port", str(port)]
    with open(log, "ab") as err:
        out: int | IO[bytes] = err if stdout_to_log else subprocess.PIPE
        proc = subprocess.Popen(
            [*cmd, *_flags(flags)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=new_session,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_ready(proc, url, log, ready_timeout)
    except BaseException:  # not ready, or interrupted while waiting: never leave it running
        stop_server(proc)
        raise
    return ServerProcess(url, data_dir, proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, ready_timeout: float) -> None:
    wait_ready(proc, url + "/checkpoint", ready_timeout, "writ serve", log=log)


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, timeout: float, what: str, *, log: Path | None = None
) -> httpx.Response:
    """Poll ``url`` until it answers 200 (returned). Raises
    :class:`~ledger.errors.TransportError` (with the log's tail) when ``proc`` exits
    first or ``timeout`` seconds pass; the caller stops ``proc``."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                said = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                tail = _tail(log) if log is not None else ""
                raise TransportError(
                    f"{what} exited with {proc.returncode} before it was ready: {said}{tail}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = client.get(url)
                if r.status_code == 200:
                    return r
            if time.monotonic() > deadline:
                raise TransportError(f"{what} at {url} was not ready within {timeout:g} s")
            time.sleep(0.05)


def stop_server(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> int:
    """Send ``sig`` and wait; SIGKILL after ``timeout`` seconds. Returns the exit code
    (``-9`` when it had to be killed)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode
