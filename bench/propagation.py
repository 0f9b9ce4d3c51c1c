"""Propagation: a lost tablet is revoked; how long until N simulated devices refuse it.

    python -m bench.propagation [--quick]

Runs the fleet simulation, ``python -m device_sim fleet``, as its own process
against a real ``writ serve`` (SQLite, fsync) started fresh for each run:
N = 1,000 and 10,000 devices, pushed over SSE (``/v1/events?records=1``) and
by polling ``/checkpoint`` and tiles every 10 s. Each run prints the refusal
times' p50/p99/max (seconds after the server acknowledged the revoke) and the
lower bound of the verifications every device must do (5 Ed25519 verifies per
device at the single-thread verify rate measured in that run: nothing in one
simulation process can beat it), and draws ``docs/propagation-N-PUSH.png``.
The fleet shares its devices among ``PROCESSES`` processes (``--processes``,
one per core of this 2-core machine, which the server shares): real devices
verify all at once, so the floor of a run is the lower bound over the
processes (``lower_bound_parallel_s``).

The comparable is what an X.509 relying party accepts: a cached CRL is good
until its nextUpdate, which the CA/Browser Forum Baseline Requirements (section
4.9.7) allow to be up to 10 days after thisUpdate, with a new CRL at least
every 7 days.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    Config,
    Result,
    figure,
    ledger_server,
    module_main,
    module_result,
    python_exe,
    ref,
    run_json,
    table,
)
from device_sim.measure import rss_kib
from ledger.verifier import usable_cores

COMMAND = "python -m bench.propagation"
PASSPHRASE_ENV = "WRIT_BENCH_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret
POLL_INTERVAL = 10.0
#: processes the fleet's devices are shared among (``fleet --processes``): the machine's cores, at most 2.
PROCESSES = max(1, min(2, usable_cores()))
#: CA/B Forum BR 4.9.7: nextUpdate at most 10 days after thisUpdate.
CRL_WINDOW_S = 10 * 86400
CRL_SOURCE = "CA/Browser Forum Baseline Requirements 4.9.7 (CRL nextUpdate <= thisUpdate + 10 days)"


def fleet_command(url: str, key: Path, n: int, push: str, plot: Path | None) -> list[str]:
    cmd = [
        python_exe(),
        "-m",
        "device_sim",
        "fleet",
        "--server",
        url,
        "--devices",
        str(n),
        "--key",
        str(key),
        "--passphrase-env",
        PASSPHRASE_ENV,
        "--push",
        push,
        "--seed",
        "1",
        "--deadline",
        "300",
        "--processes",
        str(PROCESSES),
    ]
    if push == "poll":
        cmd += ["--poll-interval", f"{POLL_INTERVAL:g}"]
    if plot is not None:
        cmd += ["--plot", str(plot)]
    return cmd


def fleet_run(cfg: Config, n: int, push: str, *, plot: bool = False) -> dict[str, Any]:
    """One lost-tablet run; the fleet's JSON plus the server's RSS. Cached per (n, push)
    in ``cfg.shared`` (the memory module reads the same runs)."""
    from ledger.signers.file import write_key_file

    with ledger_server(cfg.work, checkpoint_interval=10) as srv:
        key = Path(srv.data_dir).parent / "root.key"
        passphrase = os.urandom(12).hex()
        write_key_file(key, srv.chain.root, passphrase.encode(), cost="interactive", label="bench root")
        png = cfg.out_dir / f"propagation-{n}-{push}.png" if plot else None
        server_rss0 = rss_kib(srv.pid)
        t = time.monotonic()
        doc = run_json(
            fleet_command(srv.url, key, n, push, png),
            timeout=1200,
            env={**os.environ, PASSPHRASE_ENV: passphrase, "PYTHONUNBUFFERED": "1"},
            log=cfg.work / f"fleet-{n}-{push}.log",
        )
        doc["_wall_s"] = round(time.monotonic() - t, 1)
        doc["_server_rss_kib"] = [server_rss0, rss_kib(srv.pid)]
        if png is not None and png.exists():
            doc["_plot"] = png.name
    cfg.shared.setdefault("fleet", {}).setdefault(f"{n}-{push}", []).append(doc)
    return doc


def _plan(cfg: Config) -> list[tuple[int, str, int]]:
    """(devices, push, repeats)."""
    if cfg.quick:
        return [(1000, "sse", 1), (1000, "poll", 1)]
    return [(1000, "sse", 3), (1000, "poll", 2), (10_000, "sse", 2), (10_000, "poll", 1)]


def run(cfg: Config) -> Result:
    cmd = COMMAND + (" --quick" if cfg.quick else "")
    res = module_result("propagation", "Propagation of one revocation to a simulated fleet", cmd)
    rows: list[list[Any]] = []
    receipt_rates: list[float] = []
    for n, push, rep in _plan(cfg):
        docs = []
        for i in range(rep):
            doc = fleet_run(cfg, n, push, plot=i == 0)
            docs.append(doc)
            if doc.get("_exit") not in (0, None) and not doc.get("devices"):
                res["notes"].append(f"fleet N={n} {push} failed: {doc.get('_stderr', '')[-400:]}")
                break
        ok = [d for d in docs if d.get("refused_p99_s") is not None]
        if not ok:
            continue
        for d in ok:
            if d.get("receipts") and d.get("receipts_s"):
                receipt_rates.append(d["receipts"] / d["receipts_s"])
            if d.get("_plot"):
                res["images"].append({"file": d["_plot"], "caption": f"{n:,} devices, {push}"})
            rows.append(
                [
                    f"{n:,}",
                    push + (f" {POLL_INTERVAL:g} s" if push == "poll" else ""),
                    d.get("push_model", "?"),
                    f"{d['refused_p50_s']:.3f}",
                    f"{d['refused_p99_s']:.3f}",
                    f"{d['refused_max_s']:.3f}",
                    f"{d.get('lower_bound_s', float('nan')):.3f}",
                    f"{d.get('bytes_per_device', 0):,}",
                    f"{d.get('refused', 0):,}/{d.get('devices', 0):,}",
                    f"{d.get('setup_s', 0):.0f} / {d['_wall_s']:.0f}",
                ]
            )
        lb = statistics.median(d["lower_bound_s"] for d in ok if d.get("lower_bound_s") is not None)
        p50 = statistics.median(d["refused_p50_s"] for d in ok)
        mx = statistics.median(d["refused_max_s"] for d in ok)
        every = all(d.get("all_refused") for d in ok)
        res["figures"].append(
            figure(
                f"propagation.{n}.{push}.p99",
                f"lost tablet to {n:,} devices, {push}"
                + (f" every {POLL_INTERVAL:g} s" if push == "poll" else "")
                + ": p99 time to refuse",
                [d["refused_p99_s"] for d in ok],
                "s",
                command=f"{cmd}   # each run: python "
                + " ".join(
                    fleet_command("URL", Path("ROOT.key"), n, push, Path(f"docs/propagation-{n}-{push}.png"))[
                        1:
                    ]
                ).replace(PASSPHRASE_ENV, "VAR"),
                limit=ref(
                    "lower bound: 5 Ed25519 verifies per device at the 1-thread verify rate of that run",
                    lb,
                    "s",
                ),
                comparable=ref(
                    "a relying party's cached X.509 CRL, until nextUpdate", CRL_WINDOW_S, "s", CRL_SOURCE
                ),
                note=(
                    f"p50 {p50:.3f} s, max {mx:.3f} s (medians over runs); "
                    f"{PROCESSES} fleet processes (floor {lb / PROCESSES:.3f} s); "
                    f"{'every device refused' if every else 'NOT every device refused'}; "
                    f"push model: {ok[0].get('push_model', '?')}"
                ),
            )
        )
    if receipt_rates:
        res["figures"].append(
            figure(
                "propagation.receipts_per_s",
                "device receipts accepted by the server (POST /v1/receipts, the fleet's 32 "
                "concurrent posters)",
                receipt_rates,
                "receipts/s",
                command=cmd,
                note=(
                    "after each propagation run the fleet posts every device's signed receipt; "
                    "one value per run"
                ),
            )
        )
    res["tables"].append(
        table(
            "Every run",
            [
                "devices",
                "push",
                "model",
                "p50 s",
                "p99 s",
                "max s",
                "lower bound s",
                "bytes/device",
                "refused",
                "setup / wall s",
            ],
            rows,
            note=(
                "Seconds after the server acknowledged the revoke. bytes/device: what the propagation cost "
                "each device on the wire (a relay's bytes count once per device it feeds). The "
                f"fleet's devices are shared among {PROCESSES} processes (fleet --processes) on the "
                "same cores as the server, so its floor is the lower bound over the processes; "
                "see device_sim/fleet/ for the bootstrap ('template') and push ('relays') models."
            ),
        )
    )
    if not cfg.quick:
        res["notes"].append(
            "Polling every 10 s: a device hears of the revoke at its next poll, so p50 is about "
            "half the interval "
            "and max about one interval, plus the verification work."
        )
    return res


def main(argv: list[str] | None = None) -> Result:
    return module_main("propagation", run, argv, __doc__)


if __name__ == "__main__":
    main()
