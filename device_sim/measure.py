"""Measurement helpers shared by the fleet simulation, the benchmarks and the
reliability runs: nearest-rank percentiles and a process's resident memory.

One implementation, so that a "p99" means the same in every report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "percentiles", "rss_kib"]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return float(sorted_values[min(k, len(sorted_values)) - 1])


def percentiles(values: Sequence[float], ps: Sequence[float] = (50, 90, 99, 100)) -> dict[str, float]:
    """Nearest-rank percentiles of ``values`` (any order) keyed ``p50``, ``p99``, …
    (``p100`` is the maximum); empty input gives NaN."""
    s = sorted(values)
    return {f"p{p:g}": percentile(s, p) for p in ps}


def rss_kib(pid: int | None = None) -> int:
    """Resident set size (VmRSS, KiB) of process ``pid`` (this process when None);
    0 when the process is gone or /proc is missing."""
    path = f"/proc/{'self' if pid is None else pid}/status"
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
