"""``writ demo`` end to end: a demo ledger, the real server, a small fleet, a lost tablet."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tests.helpers.server import free_port, writ_command

pytestmark = pytest.mark.e2e


def _demo(*args: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([*writ_command(), "demo", *args], capture_output=True, timeout=timeout, check=False)
    lines = proc.stdout.decode().strip().splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON object on stdout, the story on stderr
    return proc.returncode, json.loads(lines[0]), proc.stderr.decode()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_runs_the_lost_tablet_story_and_stops_the_server(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    port = str(free_port())
    code, doc, err = _demo("--devices", "30", "--exit-after", "0", "--dir", str(d), "--port", port)
    assert code == 0, err[-3000:]
    assert "DEMO KEY" in err and "never for production" in err and "Traceback" not in err
    assert doc["stopped"] is True and doc["server_exit"] == 0 and _gone(doc["server_pid"])
    assert doc["reused"] is False and doc["demo_key"]["demo_only"] is True
    fleet = doc["fleet"]
    assert fleet["devices"] == 30 and fleet["all_refused"] is True and fleet["receipts"] == 30
    assert fleet["refusal_reasons"] == {"revoked": 30}
    assert doc["revoker"]["seq"] == 2  # genesis, log grant, then the online revoker
    writ = str(Path(sys.executable).parent / "writ")
    assert doc["audit"] == f"{writ} audit --server {doc['server']} --anchor {doc['anchor']}"
    # the interpreter of the venv that runs writ (python or python3: the same venv)
    venv_bin = str(Path(sys.executable).parent)
    assert any(c.startswith(venv_bin) and " -m device_sim device init " in c for c in doc["device_commands"])
    # the server is gone: its dashboard is not advertised after it stopped, its restart is
    after = err[err.index("the server stopped") :]
    assert doc["server"] + "/" not in after and doc["serve_command"] in after
    assert "Serving" not in err
    for name in ("root.key", "PASSPHRASE", "revoker.key", "refusals.png", "events.jsonl", "result.json"):
        assert (d / name).exists(), name
    for secret in ("PASSPHRASE", "revoker.key", "root.key"):
        assert (d / secret).stat().st_mode & 0o077 == 0
    assert (d / "refusals.png").read_bytes()[:4] == b"\x89PNG"
    passphrase = (d / "PASSPHRASE").read_text().strip()
    assert passphrase in err  # printed loudly: it is a demo

    # again: the same ledger, a new fleet and tablet on top of it
    code, again, err = _demo("--devices", "5", "--exit-after", "0", "--dir", str(d), "--port", port)
    assert code == 0, err[-3000:]
    assert again["reused"] is True and again["anchor"] == doc["anchor"] and again["revoker"]["seq"] == 2
    assert again["fleet"]["all_refused"] is True and again["fleet"]["revoke_seq"] > fleet["revoke_seq"]
    assert _gone(again["server_pid"])


def test_demo_never_touches_a_directory_that_is_not_a_demo(tmp_path: Path) -> None:
    d = tmp_path / "precious"
    d.mkdir()
    (d / "thesis.tex").write_text("do not delete")
    for extra in ((), ("--fresh",)):
        code, doc, _ = _demo("--dir", str(d), "--exit-after", "0", *extra, timeout=30)
        assert code == 2 and doc["error"] == "usage"
        assert (d / "thesis.tex").read_text() == "do not delete"
        assert sorted(p.name for p in d.iterdir()) == ["thesis.tex"]


def _read_until(stream: IO[bytes], marker: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline().decode()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            return lines
    raise AssertionError(f"no {marker!r} line: {lines[-40:]}")


def _guide(lines: list[str]) -> list[str]:
    start = next(i for i, x in enumerate(lines) if x.startswith("Try it yourself")) + 1
    end = lines.index("", start)
    assert all(x.startswith("    ") for x in lines[start:end])
    return [x[4:] for x in lines[start:end]]


def _lock_is_free(data_dir: Path) -> bool:
    fd = os.open(data_dir / "server.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_demo_commands_run_as_printed_and_sigterm_stops_its_server(tmp_path: Path) -> None:
    """Issue #11: every printed command runs as printed, from another directory, with no
    activated venv and no `writ` on PATH; the revoker key works by hand; SIGTERM to the
    demo leaves no server behind holding the lock."""
    d = tmp_path / "demo"
    demo = subprocess.Popen(
        [*writ_command(), "demo", "--devices", "5", "--dir", str(d), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert demo.stderr is not None and demo.stdout is not None
        lines = _read_until(demo.stderr, "Serving dashboard", 120)
        guide = _guide(lines)
        assert guide[0].startswith("export WRIT_DEMO_PASSPHRASE=")
        assert any(" revoke " in c and "--revoker-key" in c for c in guide)
        server_pid = int(next(x for x in lines if "(pid " in x).rsplit("(pid ", 1)[1].rstrip(")"))

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = {
            "PATH": "/usr/bin:/bin",  # no venv on it: the commands name their programs themselves
            "HOME": str(tmp_path / "home"),
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
        }
        # every line but the last succeeds; the last is the device refusing the revoked tablet
        script = "set -euo pipefail\n" + "\n".join(guide[:-1]) + "\n"
        proc = subprocess.run(
            ["bash", "-c", script], cwd=elsewhere, env=env, capture_output=True, timeout=180, check=False
        )
        out = proc.stdout.decode().strip().splitlines()
        assert proc.returncode == 0, (proc.stderr.decode()[-3000:], out)
        docs = [json.loads(x) for x in out]
        assert len(docs) == len(guide) - 2  # one JSON object per command (not the export, not the last)
        assert all("error" not in x for x in docs), docs
        assert any(x.get("accepted") is True for x in docs)  # the tablet, before it was lost
        revoked = next(x for x in docs if x.get("reason") == "lost")
        assert revoked["signer"] == 2  # the online revoker's grant, not the root
        status = next(x for x in docs if "credentials" in x)
        assert status["credentials"][0]["status"] == "revoked"
        last = subprocess.run(
            ["bash", "-c", guide[-1]], cwd=elsewhere, env=env, capture_output=True, timeout=60, check=False
        )
        assert last.returncode == 1, last.stderr.decode()[-2000:]
        refused = json.loads(last.stdout)
        assert (refused["accepted"], refused["reason"]) == (False, "revoked")
        assert not (tmp_path / "home").exists()  # the mirror lives in the demo directory
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        rest, err = demo.communicate(timeout=60)
    assert demo.returncode == 0, err.decode()[-3000:]
    doc = json.loads(rest.decode().strip().splitlines()[-1])
    assert doc["stopped_by"] == "SIGTERM" and doc["server_exit"] == 0
    assert doc["server_pid"] == server_pid and _gone(server_pid)
    assert _lock_is_free(d / "server")
    assert "Traceback" not in err.decode()


def test_sigterm_during_the_scenario_stops_the_server_too(tmp_path: Path) -> None:
    """SIGTERM while the fleet runs: the demo stops its server (no orphan holding the
    lock) and says it was interrupted, in JSON, without a traceback."""
    d = tmp_path / "demo"
    demo = subprocess.Popen(
        [*writ_command(), "demo", "--devices", "200", "--dir", str(d), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert demo.stderr is not None
        lines = _read_until(demo.stderr, "starting 200 simulated devices", 120)
        server_pid = int(next(x for x in lines if "(pid " in x).rsplit("(pid ", 1)[1].rstrip(")"))
        assert not _gone(server_pid)
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    doc = json.loads(out.decode().strip().splitlines()[-1])
    if demo.returncode == 0:  # the fleet was faster than the signal: it was serving
        assert doc["stopped_by"] == "SIGTERM"
    else:
        assert (demo.returncode, doc["error"]) == (130, "interrupted"), err.decode()[-3000:]
    assert _gone(server_pid) and _lock_is_free(d / "server")
    assert "Traceback" not in err.decode()
