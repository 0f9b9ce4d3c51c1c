"""``writ demo`` end to end: a demo ledger, the real server, a small fleet, a lost tablet."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

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
    assert doc["audit"] == f"writ audit --server {doc['server']} --anchor {doc['anchor']}"
    assert doc["dashboard"] == doc["server"] + "/"
    assert any(c.startswith("python -m device_sim device init") for c in doc["device_commands"])
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
