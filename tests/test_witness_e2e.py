"""The real ``writ witness`` process: CLI, SIGKILL crash safety, and interop
with an independent C2SP implementation (aics-tlog)."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ledger import checkpoints, notes

from .helpers.server import run_writ
from .helpers.witness import FakeLog, init_witness, running_witness, spec_body, start_witness, stop_witness

pytestmark = pytest.mark.e2e

ORIGIN = "ledger.example/plant-7"
WNAME = "witness.example/w1"
PY312 = Path("/root/.pyenv/versions/3.12.1/bin/python3.12")
AICS_VENV = Path.home() / ".cache" / "writ-test" / "aics-venv"
INTEROP = Path(__file__).parent / "aics_witness_interop.py"


def test_witness_init_prints_its_vkey_and_refuses_to_overwrite(tmp_path: Path) -> None:
    data = tmp_path / "w"
    doc = init_witness(data, WNAME)
    v = notes.parse_vkey(doc["witness_vkey"])
    assert v.name == WNAME and v.sig_type == 0x04 and v.public_key.hex() == doc["witness_public_key"]
    assert (data / "witness.key").stat().st_mode & 0o777 == 0o600
    assert doc["witness_public_key"] not in (data / "witness.db").read_bytes().hex()
    code, err, _ = run_writ("witness", "init", "--data", str(data), "--name", WNAME)
    assert code != 0 and err["error"] == "ledger-exists"


def test_witness_serve_without_a_log_is_a_usage_error(tmp_path: Path) -> None:
    init_witness(tmp_path / "w", WNAME)
    code, err, stderr = run_writ("witness", "serve", "--data", str(tmp_path / "w"))
    assert code == 2 and err["error"] == "usage"
    assert "Traceback" not in stderr


def test_real_witness_cosigns_a_growing_log_and_stops_on_sigterm(tmp_path: Path) -> None:
    log = FakeLog(ORIGIN)
    with running_witness(tmp_path, WNAME, [f"{ORIGIN}={log.vkey}"]) as w:
        log.append(7)
        note = log.note()
        r = httpx.post(w.url + "/add-checkpoint", content=spec_body(0, [], note))
        assert r.status_code == 200
        full = notes.add_signatures(note, [r.text])
        vc = checkpoints.verify_checkpoint(full, ORIGIN, [log.signer.public_key], [(WNAME, w.public_key)], 1)
        assert vc.cosigners == (WNAME,)
    assert w.process.returncode == 0


# --- SIGKILL --------------------------------------------------------------------------


def _consistent(a: tuple[int, bytes, FakeLog], b: tuple[int, bytes, FakeLog]) -> bool:
    (s1, r1, _), (_, _, l2) = sorted((a, b), key=lambda x: x[0])
    return l2.root(s1) == r1 if s1 <= l2.size else False


def _hammer(
    lg: FakeLog,
    url: str,
    old: int,
    wpub: bytes,
    stop: threading.Event,
    rnd: random.Random,
    lock: threading.Lock,
    cosigned: list[tuple[int, bytes, FakeLog]],
) -> None:
    """Grow ``lg`` and submit it until the witness dies or the other fork wins."""
    with httpx.Client(timeout=2.0) as client:
        while not stop.is_set():
            lg.append(rnd.randint(1, 3))
            note = lg.note()
            try:
                r = client.post(url + "/add-checkpoint", content=spec_body(old, lg.proof(old), note))
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                full = notes.add_signatures(note, [r.text])
                checkpoints.verify_checkpoint(full, ORIGIN, [lg.signer.public_key], [(WNAME, wpub)], 1)
                with lock:
                    cosigned.append((lg.size, lg.root(), lg))
                old = lg.size
            elif r.status_code == 409 and r.headers["content-type"] == "text/x.tlog.size":
                old = int(r.text)
                if old > lg.size:
                    return  # the other fork won
            else:
                return


def test_sigkill_never_lets_the_witness_cosign_two_trees_of_one_size(tmp_path: Path) -> None:
    """Two forks of one log race to the witness while it is SIGKILLed at random
    moments and restarted: every cosignature ever returned is for one single
    append-only history, and after each restart the witness is at least at the
    largest size it cosigned."""
    rnd = random.Random(int.from_bytes(os.urandom(4), "big"))
    base = FakeLog(ORIGIN)
    data = tmp_path / "w" / "data"
    init_witness(data, WNAME)
    cosigned: list[tuple[int, bytes, FakeLog]] = []
    lock = threading.Lock()
    candidates: list[FakeLog] = [base]
    for _round in range(8):
        w = start_witness(data, [f"{ORIGIN}={base.vkey}"])
        state = httpx.get(w.url + "/healthz").json()["logs"][0]
        head_size, root = state["size"], base64.b64decode(state["root"])
        assert head_size >= max((c[0] for c in cosigned), default=0)
        # the stored head is a tree of one of the histories submitted
        matches = [lg for lg in candidates if lg.size >= head_size and lg.root(head_size) == root]
        assert matches or head_size == 0
        head_log = matches[0] if matches else base
        forks = [head_log.fork(head_size) for _ in range(2)]
        candidates = [head_log, *forks]
        stop = threading.Event()

        threads = [
            threading.Thread(
                target=_hammer, args=(lg, w.url, head_size, w.public_key, stop, rnd, lock, cosigned)
            )
            for lg in forks
        ]
        for t in threads:
            t.start()
        time.sleep(rnd.uniform(0.05, 0.4))
        w.process.send_signal(signal.SIGKILL)
        w.process.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
        if w.process.stdout is not None:
            w.process.stdout.close()
    assert cosigned, "the witness never cosigned anything"
    by_size: dict[int, set[bytes]] = {}
    for s, r, _ in cosigned:
        by_size.setdefault(s, set()).add(r)
    assert all(len(roots) == 1 for roots in by_size.values())
    for a in cosigned:
        for b in cosigned:
            assert _consistent(a, b)
    # and the restarted witness still refuses another tree at its size
    w = start_witness(data, [f"{ORIGIN}={base.vkey}"])
    try:
        size = httpx.get(w.url + "/healthz").json()["logs"][0]["size"]
        assert size > 0
        other = FakeLog(ORIGIN, base.signer)
        other.append(size)
        resp = httpx.post(w.url + "/add-checkpoint", content=spec_body(size, [], other.note()))
        assert resp.status_code == 409 and resp.headers["content-type"] != "text/x.tlog.size"
    finally:
        stop_witness(w)


# --- aics-tlog interop ------------------------------------------------------------------


@pytest.fixture(scope="session")
def aics_python() -> Iterator[Path]:
    """A Python >= 3.12 venv with aics-tlog (cached under ~/.cache/writ-test/)."""
    py = AICS_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import aics_tlog"], check=False).returncode == 0
    if not ok:
        base = PY312 if PY312.exists() else shutil.which("python3.12") or shutil.which("python3.13")
        if base is None:
            pytest.skip("aics-tlog needs Python >= 3.12 and none is installed")
        shutil.rmtree(AICS_VENV, ignore_errors=True)
        made = subprocess.run([str(base), "-m", "venv", str(AICS_VENV)], capture_output=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"cannot make a Python 3.12 venv: {made.stderr.decode()[-200:]}")
        pip = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "aics-tlog"],
            capture_output=True,
            timeout=300,
            check=False,
        )
        if pip.returncode != 0:
            pytest.skip(f"cannot install aics-tlog (offline?): {pip.stderr.decode()[-200:]}")
    yield py


def test_cosignatures_verify_under_aics_tlog(tmp_path: Path, aics_python: Path) -> None:
    """aics-tlog plays the log (its own tree, signatures and proofs, request bodies
    from the spec's text) and verifies the witness's 0x04 cosignatures."""
    keys = subprocess.run(
        [str(aics_python), str(INTEROP), "keys", ORIGIN], capture_output=True, check=True, timeout=60
    )
    k = json.loads(keys.stdout)
    with running_witness(tmp_path, WNAME, [f"{ORIGIN}={k['log_vkey']}"]) as w:
        out = subprocess.run(
            [str(aics_python), str(INTEROP), "run", ORIGIN, k["seed"], w.url, w.vkey],
            capture_output=True,
            check=False,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr.decode()[-2000:]
    results = json.loads(out.stdout)["results"]
    *cosigned, conflict, tampered = results
    assert [r["status"] for r in cosigned] == [200, 200, 200, 200]
    for r in cosigned:
        assert r["ok"], r
        assert r["witnesses"] == [WNAME]
        assert abs(r["timestamps"][WNAME] - time.time()) < 120
    assert conflict == {"status": 409, "content_type": "text/x.tlog.size", "body": "37\n"}
    assert tampered["status"] == 200 and tampered["tampered_ok"] is False


def test_the_deploy_unit_runs_the_witness_on_its_own_data_directory() -> None:
    unit = (Path(__file__).parent.parent / "deploy" / "writ-witness.service").read_text()
    values = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    argv = values["ExecStart"].split()
    assert argv[1:5] == ["witness", "serve", "--data", "/var/lib/writ-witness"]
    assert values["ReadWritePaths"] == "/var/lib/writ-witness"
    assert values["KillSignal"] == "SIGTERM"
    env = (Path(__file__).parent.parent / "deploy" / "writ-witness.env").read_text()
    assert "WRIT_WITNESS_LOGS=" in env and "$WRIT_WITNESS_LOGS" in values["ExecStart"]
