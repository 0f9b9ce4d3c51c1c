"""Ledger-governed SSH: how fast a revoked key stops logging in.

    python -m bench.sshrevoke [--quick]

Two figures, each beside the limit measured in the same run:

1. ``device authorized-keys`` as sshd runs it (a cold process, on every
   login) on a device whose state holds N records (10,000; half of the grants
   are operator grants, so the answer has thousands of lines), beside the
   cold start of a bare ``python -c pass`` on the same machine.
2. Revoke-to-refused-SSH, end to end with real programs: a real ``writ
   serve``, the device agent (``device run``, SSE), a real ``sshd -D`` whose
   ``AuthorizedKeysCommand`` is ``device authorized-keys``, and a tablet
   whose key logs in with ``ssh -i``. Each run grants a fresh tablet, waits
   until it logs in, posts its revoke, and from the server's acknowledgement
   runs ``ssh`` logins back to back until one is refused. The figure is the
   time from the acknowledgement to the end of the first refused login
   (p50/p99 over the runs); the limit is what no implementation of this
   design can beat: the SSE delivery measured in that run (acknowledgement
   to the agent's ``applied`` log line) plus one ``authorized-keys`` run.

Needs root and OpenSSH's ``sshd`` (``.ci/run`` installs it); otherwise the
second part is reported as skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    Config,
    Result,
    figure,
    module_main,
    module_result,
    python_exe,
    stats,
    table,
)
from ledger import crypto, notes, records
from ledger.crypto import SeedSigner
from ledger.records import Genesis, Grant, Revoke
from ledger.state import LedgerState

ORIGIN = "bench.writ.example/ssh"


def make_device_state(directory: Path, n: int, *, now: int | None = None) -> dict[str, Any]:
    """A device directory whose verified state holds ``n`` records (genesis,
    the log grant, then grants, half of them operator grants, and every 10th
    record a revoke), accepted through the device's own :meth:`apply_update`."""
    from device_sim.device import Device

    t = int(time.time()) if now is None else now
    root = SeedSigner(crypto.sha256(b"bench-ssh-root"))
    log = SeedSigner(crypto.sha256(b"bench-ssh-log"))
    st = LedgerState(root.public_key, origin=ORIGIN)
    raws: list[bytes] = []

    def add(body: records.Body) -> None:
        raw = records.sign(body, root)
        st.apply(raw, prechecked=(root.public_key, True))
        raws.append(raw)

    t0 = t - n - 10
    add(Genesis(0, st.root, t0, ORIGIN, root.public_key, None))
    add(Grant(1, st.root, t0, log.public_key, records.ROLE_LOG, "", "log", 0, 0))
    open_grants: list[int] = []
    while st.size < n:
        i = st.size
        if i % 10 == 0 and open_grants:
            add(Revoke(i, st.root, t0 + i, 0, open_grants.pop(0), int(records.Reason.LOST)))
            continue
        subject = crypto.sha256(b"bench-ssh-subject" + i.to_bytes(8, "big"))
        role = records.ROLE_OPERATOR if i % 2 else records.ROLE_DEVICE
        add(Grant(i, st.root, t0 + i, subject, role, "", f"tablet-{i}", 0, 0))
        open_grants.append(i)
    note = notes.sign_checkpoint(notes.Checkpoint(ORIGIN, st.size, st.root), ORIGIN, log, t)
    dev = Device.create(root.public_key, ORIGIN, directory=directory, now=t)
    dev.apply_update(raws, 0, note, t)
    return {"records": n, "state_bytes": (directory / "state.bin").stat().st_size}


def _cold(cmd: list[str], repeat: int, env: dict[str, str]) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, check=False, env=env, stdin=subprocess.DEVNULL)
        out.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed: {proc.stderr.decode()[-500:]}")
    return out


def _env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}


def authorized_keys_cold(work: Path, n: int, repeat: int) -> tuple[list[float], list[float], dict[str, Any]]:
    d = Path(tempfile.mkdtemp(prefix="ak-", dir=work)) / "device"
    info = make_device_state(d, n)
    env = _env()
    cmd = [python_exe(), "-m", "device_sim", "device", "authorized-keys", "--state", str(d)]
    lines = subprocess.run(cmd, capture_output=True, check=True, env=env).stdout.count(b"\n")
    info["lines"] = lines
    base = _cold([python_exe(), "-c", "pass"], repeat, env)
    ak = _cold(cmd, repeat, env)
    return ak, base, info


def revoke_to_refused(work: Path, runs: int) -> dict[str, Any]:
    """Part 2 (see the module docstring); raises ``Skip`` without root or sshd."""
    from bench.sshbench import revoke_runs

    return revoke_runs(work, runs)


def run(cfg: Config) -> Result:
    n = 10_000
    repeat = 5 if cfg.quick else 15
    runs = 5 if cfg.quick else 20
    res = module_result(
        "sshrevoke",
        "Ledger-governed SSH: authorized-keys and revoke-to-refused login",
        "python -m bench.sshrevoke",
    )
    ak, base, info = authorized_keys_cold(cfg.work, n, repeat)
    res["figures"].append(
        figure(
            f"device authorized-keys, cold process, {n:,}-record state",
            stats(ak),
            "s",
            limit=("python -c pass (interpreter start)", stats(base)["p50"], "s"),
            note=f"{info['lines']} keys printed; state.bin {info['state_bytes']:,} bytes; sshd runs it twice per login",
        )
    )
    try:
        r = revoke_to_refused(cfg.work, runs)
    except _SKIP as exc:
        res["skipped"] = str(exc)
        return res
    res["figures"].append(
        figure(
            "revoke acknowledged -> first refused SSH login",
            stats(r["refused_s"]),
            "s",
            limit=("SSE delivery + one authorized-keys run", stats(r["limit_s"])["p50"], "s"),
            note=f"{len(r['refused_s'])} runs; target 1 s, contract 5 s",
        )
    )
    res["tables"].append(
        table(
            "per run",
            ["run", "SSE applied (s)", "first refused login ended (s)", "logins tried"],
            [[i + 1, round(a, 3), round(b, 3), k] for i, (a, b, k) in enumerate(r["rows"])],
        )
    )
    return res


class Skip(Exception):
    """This part cannot run here (no root, no sshd)."""


_SKIP = Skip


if __name__ == "__main__":
    sys.exit(module_main("sshrevoke", run))
