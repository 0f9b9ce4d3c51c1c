"""Audit throughput: records/s for a full audit vs raw Ed25519 verifies/s.

    python -m bench.audit [--records 100000] [--repeat 3] [--quick] [--json]

The limit is the raw two-core PyNaCl verify rate measured in the same run
over the same signatures; the target ratio is >= 0.75. The comparable is
OpenSSL's own Ed25519 verify rate (``openssl speed ed25519``), measured in
the same run. Then the real command, ``writ audit --data DIR`` (a new
process: imports, SQLite reads, every rule, the tree), is timed end to end
on a server data directory holding the same records, built through the
storage API (``SqliteStorage.append``, as the server stores them), target
>= 0.7 without the process start; and ``writ audit --server URL`` against a
real ``writ serve`` holding as many records (target >= 0.65).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import ORIGIN, build_signed, cores, median_spread, raw_verify_rate
from bench.harness import (
    Config,
    Result,
    figure,
    finish,
    ledger_server,
    module_result,
    print_result,
    profile_block,
    profile_command,
    ref,
    summarize_pyspy,
)
from device_sim.server_process import writ_command
from ledger import audit, crypto, records
from ledger.records import SignedRecord
from ledger.storage import Head
from ledger.storage.sqlite import SqliteStorage
from ledger.tree import CompactRange

COMMAND = "python -m bench.audit"
#: what a stack of ``writ audit`` is doing, by the first frame found in it.
AUDIT_ROLES = [
    ("check_frame", "worker processes: Ed25519 (ahead of the rules)"),
    ("verify_worker", "worker processes: the rest"),
    ("_find_and_load", "imports"),
    ("KeyGuess.span", "rules thread: parsing ahead and key guesses"),
    ("LedgerState.apply ", "rules thread: rules and tree (in order)"),
    ("apply_stream", "rules thread: the pipeline (waiting, hand-offs)"),
    ("scan", "reading SQLite"),
    ("cmd_audit", "main thread: the rest of the command"),
]


def openssl_verify_rate(seconds: int = 2, multi: int = 1) -> float | None:
    """``openssl speed ed25519`` verify/s (all ``multi`` processes together); None without openssl."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    cmd = [exe, "speed", "-seconds", str(seconds)]
    if multi > 1:
        cmd += ["-multi", str(multi)]
    proc = subprocess.run([*cmd, "ed25519"], capture_output=True, timeout=120, check=False)
    for line in proc.stdout.decode(errors="replace").splitlines():
        m = re.search(r"Ed25519\)?\s+(?:\S+s\s+\S+s\s+)?([\d.]+)\s+([\d.]+)\s*$", line)
        if "Ed25519" in line and m:
            return float(m.group(2))
    return None


async def _store(data_dir: Path, recs: list[SignedRecord], anchor: bytes) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    st = await SqliteStorage.open(data_dir / "ledger.db", create=True)
    try:
        await st.init(ORIGIN, anchor, os.urandom(32))
        head = Head(0, records.EMPTY_HASH)
        frontier = CompactRange()
        for i in range(0, len(recs), 5000):
            part = recs[i : i + 5000]
            for r in part:
                frontier.append(r.leaf_hash)
            head = await st.append(head, part, frontier.root())
    finally:
        await st.close()


def writ_audit_seconds(
    source: Path | str, anchor: bytes, flag: str = "--data"
) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    proc = subprocess.run(
        [*writ_command(), "audit", flag, str(source), "--anchor", anchor.hex(), "--json"],
        capture_output=True,
        timeout=600,
        check=False,
    )
    dt = time.perf_counter() - t
    out = proc.stdout.decode().strip().splitlines()
    doc: dict[str, Any] = json.loads(out[-1]) if out else {}
    if proc.returncode != 0:
        raise RuntimeError(f"writ audit failed ({proc.returncode}): {doc} {proc.stderr.decode()[-500:]}")
    return dt, doc


def run(cfg: Config, n_records: int | None = None, repeat: int | None = None, cli: bool = True) -> Result:
    n = n_records or cfg.pick(20_000, 100_000)
    rep = repeat or cfg.pick(2, 3)
    cmd = f"{COMMAND} --records {n} --repeat {rep}"
    res = module_result("audit", f"Audit: {n:,} records from genesis", cmd)
    t0 = time.perf_counter()
    root, recs = build_signed(n)
    raws = [r.raw for r in recs]
    built = time.perf_counter() - t0
    items = [
        (root.public_key, crypto.RECORD_DOMAIN, r.body_bytes, r.signature) for r in map(records.parse, raws)
    ]
    n_cores = cores()

    raw1 = [raw_verify_rate(items, 1) for _ in range(rep)]
    rawn = [raw_verify_rate(items, n_cores) for _ in range(rep)]
    ossl1 = openssl_verify_rate(2, 1)
    ossln = openssl_verify_rate(2, n_cores) if n_cores > 1 else ossl1

    def run_audit() -> float:
        with ThreadPoolExecutor(n_cores) as pool:
            t = time.perf_counter()
            chunks = [raws[i : i + 4096] for i in range(0, len(raws), 4096)]
            _, rep_ = audit.audit(chunks, anchor=root.public_key, executor=pool)
            assert rep_.size == len(raws)
            return len(raws) / (time.perf_counter() - t)

    aud = [run_audit() for _ in range(rep)]
    rawn_med = statistics.median(rawn)
    lim_n = ref(
        f"raw Ed25519 verify, PyNaCl, {n_cores} threads, same signatures", round(rawn_med), "verifies/s"
    )
    res["figures"].append(
        figure(
            "audit.core_records_per_s",
            f"audit (ledger.audit.audit, {n_cores} threads), in process",
            aud,
            "records/s",
            command=cmd,
            limit=lim_n,
            comparable=ref(
                f"OpenSSL {_openssl_version()} Ed25519 verify, {n_cores} processes (openssl speed -multi)",
                ossln,
                "verifies/s",
            ),
            target_of_limit=0.75,
        )
    )
    res["figures"].append(
        figure(
            "audit.raw_verify_1",
            "raw Ed25519 verify, PyNaCl, 1 thread",
            raw1,
            "verifies/s",
            command=cmd,
            comparable=ref(f"OpenSSL {_openssl_version()} Ed25519 verify, 1 process", ossl1, "verifies/s"),
        )
    )
    res["figures"].append(
        figure(
            "audit.raw_verify_n",
            f"raw Ed25519 verify, PyNaCl, {n_cores} threads",
            rawn,
            "verifies/s",
            command=cmd,
            limit=ref(
                "the same, 1 thread, x cores (perfect scaling)",
                round(statistics.median(raw1) * n_cores),
                "verifies/s",
            ),
            note="how well the machine's cores scale: ratio 1 means perfect",
        )
    )
    res["raw"] = {"records": n, "build_s": round(built, 1), "cores": n_cores}

    if cli:
        data = cfg.work / "audit-data"
        t = time.perf_counter()
        asyncio.run(_store(data, recs, root.public_key))
        res["raw"]["store_s"] = round(time.perf_counter() - t, 1)
        # the process start (interpreter, imports, opening the database) is measured in the
        # same run, on a ledger of one record, and subtracted for the records/s figure
        tiny = cfg.work / "audit-data-1"
        asyncio.run(_store(tiny, recs[:1], root.public_key))
        starts = [writ_audit_seconds(tiny, root.public_key)[0] for _ in range(rep)]
        start_s = statistics.median(starts)
        runs: list[float] = []
        verify_runs: list[float] = []
        doc: dict[str, Any] = {}
        for _ in range(rep):
            dt, doc = writ_audit_seconds(data, root.public_key)
            runs.append(n / dt)
            verify_runs.append(n / max(dt - start_s, 1e-6))
        if doc.get("size") not in (None, n):
            res["notes"].append(f"writ audit reported size {doc.get('size')}, expected {n}")
        if statistics.median(aud) < 0.8 * rawn_med:
            out = cfg.work / "audit.raw"
            argv = [
                *writ_command(),
                "audit",
                "--data",
                str(data),
                "--anchor",
                root.public_key.hex(),
                "--json",
            ]
            if profile_command(argv, out):
                res["profiles"].append(
                    profile_block(
                        f"`writ audit --data DIR` over {n:,} records",
                        summarize_pyspy(out, roles=AUDIT_ROLES),
                        "py-spy record --rate 250 -- writ audit --data DIR --anchor HEX --json",
                    )
                )
        res["figures"].append(
            figure(
                "audit.writ_audit_data_records",
                f"`writ audit --data DIR` ({n:,} records), excluding the process start",
                verify_runs,
                "records/s",
                command=f"writ audit --data DIR --anchor HEX --json   (DIR built by: {cmd})",
                limit=lim_n,
                target_of_limit=0.7,
                note=(
                    f"the process start, measured in the same run on a ledger of one record "
                    f"({start_s:.2f} s: interpreter, imports, opening the database), is subtracted"
                ),
            )
        )
        res["figures"].append(
            figure(
                "audit.writ_audit_data",
                f"`writ audit --data DIR` end to end ({n:,} records, a new process)",
                runs,
                "records/s",
                command=f"writ audit --data DIR --anchor HEX --json   (DIR built by: {cmd})",
                limit=lim_n,
                comparable=ref(
                    f"OpenSSL {_openssl_version()} Ed25519 verify, {n_cores} processes", ossln, "verifies/s"
                ),
                note=(
                    "wall time of the whole command: interpreter start and imports, SQLite reads, "
                    "every rule, "
                    "the tree; "
                    f"{n / (sum(runs) / len(runs)):.1f} s per run on average"
                ),
            )
        )
        with ledger_server(cfg.work, n_records=max(0, n - 2)) as srv:
            srv_runs: list[float] = []
            for _ in range(rep):
                dt, doc = writ_audit_seconds(srv.url, srv.chain.root.public_key, flag="--server")
                srv_runs.append(int(doc.get("size", n)) / max(dt - start_s, 1e-6))
        res["figures"].append(
            figure(
                "audit.writ_audit_server",
                f"`writ audit --server URL` ({n:,} records over HTTP), excluding the process start",
                srv_runs,
                "records/s",
                command=f"writ audit --server URL --anchor HEX --json   (a real `writ serve`; {cmd})",
                limit=lim_n,
                target_of_limit=0.65,
                note=(
                    f"the server runs on the same {n_cores} cores; the process start measured above "
                    f"({start_s:.2f} s) is subtracted"
                ),
            )
        )
    return res


_OPENSSL_VERSION: list[str] = []


def _openssl_version() -> str:
    if not _OPENSSL_VERSION:
        exe = shutil.which("openssl")
        v = ""
        if exe:
            out = subprocess.run(
                [exe, "version"], capture_output=True, check=False, timeout=10
            ).stdout.decode()
            parts = out.split()
            v = parts[1] if len(parts) > 1 else ""
        _OPENSSL_VERSION.append(v)
    return _OPENSSL_VERSION[0]


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=None, help="default 100000 (20000 with --quick)")
    ap.add_argument("--repeat", type=int, default=None, help="default 3 (2 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-cli", action="store_true", help="skip timing the `writ audit --data` command")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON document")
    args = ap.parse_args(argv)
    cfg = Config(quick=args.quick)
    try:
        res = finish(run(cfg, args.records, args.repeat, cli=not args.no_cli))
    finally:
        shutil.rmtree(cfg.work, ignore_errors=True)
    if args.json:
        print(json.dumps(res))
    else:
        print_result(res)
    return res


# kept for callers of the first version of this module
__all__ = ["main", "median_spread", "openssl_verify_rate", "run"]


if __name__ == "__main__":
    main()
