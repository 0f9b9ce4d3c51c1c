"""Run every fuzz harness for a while (local long mode) and report what each did.

    python fuzz/run.py --seconds 600            # every harness, 10 minutes each
    python fuzz/run.py --seconds 60 record note # some of them
    python fuzz/run.py --runs 20000             # a fixed number of inputs each
    python fuzz/run.py --write-seeds            # regenerate fuzz/corpus/ from the vectors

Each harness runs as its own process (libFuzzer exits the process), reading
the committed seeds in ``fuzz/corpus/<name>/`` and keeping what it finds in
``fuzz/work/<name>/`` (git-ignored), so coverage grows from one run to the
next; crashes are written to ``fuzz/artifacts/<name>-crash-<sha1>`` and
reproduce with ``python fuzz/fuzz_<name>.py fuzz/artifacts/<file>``. The exit
status is 1 when a harness crashed, 0 otherwise (also when atheris is missing:
every harness then reports itself skipped).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _common as common

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Outcome:
    name: str
    returncode: int
    seconds: float
    stats: dict[str, int]
    output: str

    @property
    def skipped(self) -> bool:
        return self.returncode == common.SKIPPED and "skipped:" in self.output

    @property
    def crashed(self) -> bool:
        return self.returncode != 0

    @property
    def runs(self) -> int:
        return self.stats.get("number_of_executed_units", 0)

    @property
    def execs_per_second(self) -> int:
        """libFuzzer's figure (whole seconds of fuzzing), or runs over wall time when under a second."""
        return self.stats.get("average_exec_per_sec") or round(self.runs / max(self.seconds, 1e-3))


def run_harness(
    name: str,
    *,
    seconds: float | None = None,
    runs: int | None = None,
    workdir: Path | None = None,
    artifacts: Path | None = None,
    extra: list[str] | None = None,
    timeout: float | None = None,
) -> Outcome:
    """Run ``fuzz/fuzz_<name>.py`` once, as a subprocess, and collect its final stats."""

    work = workdir if workdir is not None else common.WORK / name
    work.mkdir(parents=True, exist_ok=True)
    art = artifacts if artifacts is not None else common.ARTIFACTS
    art.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(common.FUZZ_DIR / f"fuzz_{name}.py"), "-print_final_stats=1"]
    if seconds is not None:
        cmd.append(f"-max_total_time={max(1, round(seconds))}")
    if runs is not None:
        cmd.append(f"-runs={runs}")
    cmd += [f"-artifact_prefix={art}/{name}-", *(extra or []), str(work), str(common.CORPUS / name)]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=timeout, cwd=common.ROOT, check=False
    )
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    stats = {k: int(v) for k, v in _STAT.findall(output)}
    return Outcome(name, proc.returncode, elapsed, stats, output)


def _row(o: Outcome) -> str:
    if o.skipped:
        return f"{o.name:<10} skipped (atheris is not installed)"
    s = o.stats
    status = "CRASH" if o.crashed else "ok"
    return (
        f"{o.name:<10} {status:<6} {o.runs:>10} runs {o.execs_per_second:>7} exec/s  {o.seconds:7.1f} s  "
        f"+{s.get('new_units_added', 0)} units  rss {s.get('peak_rss_mb', 0)} MB"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"harnesses (default: all of {', '.join(common.HARNESSES)})")
    ap.add_argument("--seconds", type=float, help="how long to fuzz each harness")
    ap.add_argument("--runs", type=int, help="how many inputs to run through each harness")
    ap.add_argument("--write-seeds", action="store_true", help="regenerate fuzz/corpus/ and exit")
    args = ap.parse_args(argv)
    names = list(args.names) or list(common.HARNESSES)
    unknown = sorted(set(names) - set(common.HARNESSES))
    if unknown:
        ap.error(f"no such harness: {', '.join(unknown)}")
    if args.write_seeds:
        for name in names:
            print(f"wrote {common.write_seeds(name).relative_to(common.ROOT)}")
        return 0
    if args.seconds is None and args.runs is None:
        ap.error("give --seconds or --runs")
    if common.load_atheris() is None:
        print("skipped: atheris is not installed (pip install 'atheris>=2.3')")
        return 0
    crashed = False
    for name in names:
        o = run_harness(name, seconds=args.seconds, runs=args.runs)
        print(_row(o), flush=True)
        if o.crashed and not o.skipped:
            crashed = True
            print(o.output[-4000:], file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
