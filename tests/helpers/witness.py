"""Test helpers for witnesses.

``FakeLog(origin)``: a transparency log of random leaves with its own log key:
``append(n)``, ``note(timestamp)`` (the checkpoint signed as a Writ log signs
it, 0x01 and 0x04), ``proof(old, new)``, ``fork()`` (a log with the same key
and the same first leaves but another history from there on).

``spec_body(old, proof, note)``: an add-checkpoint request body written from
the text of c2sp.org/tlog-witness ("old" SP size LF, one base64 hash per
line, an empty line, the checkpoint), not from the project's own client.

``running_witness(tmp_path, name, logs)``: ``writ witness init`` and a real
``writ witness serve`` on a free port, yielding ``RunningWitness(url, vkey,
public_key, data_dir, process)``; ``start_witness``/``stop_witness`` restart.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time as _time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ledger import checkpoints, notes
from ledger.crypto import SeedSigner
from ledger.tree import MerkleLevels, leaf_hash

from .server import free_port, run_writ, stop_process, wait_ready, writ_command


class FakeLog:
    def __init__(self, origin: str, signer: SeedSigner | None = None) -> None:
        self.origin = origin
        self.signer = signer or SeedSigner.generate()
        self.leaves: list[bytes] = []
        self.levels = MerkleLevels()

    @property
    def size(self) -> int:
        return self.levels.size

    @property
    def vkey(self) -> str:
        return checkpoints.checkpoint_vkeys(self.origin, self.signer.public_key)[0]

    def append(self, n: int = 1) -> None:
        for _ in range(n):
            leaf = secrets.token_bytes(16)
            self.leaves.append(leaf)
            self.levels.append(leaf_hash(leaf))

    def root(self, size: int | None = None) -> bytes:
        return self.levels.root(self.size if size is None else size)

    def note(self, timestamp: int | None = None, size: int | None = None) -> str:
        size = self.size if size is None else size
        cp = checkpoints.Checkpoint(self.origin, size, self.root(size))
        ts = int(_time.time()) if timestamp is None else timestamp
        return checkpoints.sign_checkpoint(cp, self.origin, self.signer, ts)

    def proof(self, old: int, new: int | None = None) -> list[bytes]:
        new = self.size if new is None else new
        if old == 0 or old == new:
            return []
        return self.levels.consistency_proof(old, new)

    def fork(self, keep: int) -> FakeLog:
        """Another history under the same key: the first ``keep`` leaves, then others."""
        other = FakeLog(self.origin, self.signer)
        for leaf in self.leaves[:keep]:
            other.leaves.append(leaf)
            other.levels.append(leaf_hash(leaf))
        return other


def spec_body(old: int, proof: Sequence[bytes], checkpoint: str) -> bytes:
    """c2sp.org/tlog-witness: "an old size line, zero or more consistency proof
    lines, and an empty line, followed by a checkpoint"; "Each line MUST
    terminate in a newline character"; "The old size line MUST consist of the
    string `old`, a single space (0x20), and the tree size ... encoded as an
    ASCII decimal with no leading zeroes"; "Each consistency proof line MUST
    encode a single hash in base64"."""
    lines = ["old " + str(old)] + [base64.b64encode(h).decode("ascii") for h in proof]
    return ("".join(line + "\n" for line in lines) + "\n" + checkpoint).encode("utf-8")


class RunningWitness(NamedTuple):
    url: str
    vkey: str
    public_key: bytes
    name: str
    data_dir: Path
    process: subprocess.Popen[bytes]


def run_json(cmd: list[str], env: dict[str, str], timeout: float = 180.0) -> tuple[int, dict[str, Any]]:
    """Run a command that prints one JSON line (and never a traceback); its exit code and the JSON."""
    proc = subprocess.run(
        cmd, capture_output=True, timeout=timeout, check=False, env=env, stdin=subprocess.DEVNULL
    )
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    out = proc.stdout.decode().strip().splitlines()
    assert len(out) == 1, (cmd, proc.stdout, err)
    doc: dict[str, Any] = json.loads(out[0])
    return proc.returncode, doc


def init_witness(data_dir: Path, name: str) -> dict[str, str]:
    code, doc, err = run_writ("witness", "init", "--data", str(data_dir), "--name", name)
    assert code == 0, (doc, err)
    return doc


def start_witness(
    data_dir: Path,
    logs: Sequence[str],
    *,
    port: int | None = None,
    ready_timeout: float = 20.0,
) -> RunningWitness:
    """Start ``writ witness serve`` (``logs``: ``ORIGIN=VKEY`` strings) and wait for ``/healthz``."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(data_dir.parent / f"witness-{port}.log", "ab")  # noqa: SIM115 - the process owns it
    args = [a for spec in logs for a in ("--log", spec)]
    proc = subprocess.Popen(
        [*writ_command(), "witness", "serve", "--data", str(data_dir), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    doc = wait_ready(proc, url + "/healthz", ready_timeout, "writ witness serve").json()
    vkey = doc["witness_vkey"]
    pub = notes.parse_vkey(vkey).public_key
    return RunningWitness(url, vkey, pub, doc["name"], data_dir, proc)


def stop_witness(w: RunningWitness, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    return stop_process(w.process, sig, timeout, "writ witness serve")


@contextlib.contextmanager
def running_witness(tmp_path: Path, name: str, logs: Sequence[str]) -> Iterator[RunningWitness]:
    data_dir = tmp_path / ("witness-" + name.replace("/", "_")) / "data"
    init_witness(data_dir, name)
    w = start_witness(data_dir, logs)
    try:
        yield w
    finally:
        stop_witness(w)
