"""device_sim/measure.py: the percentiles and memory figures every report uses."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from device_sim.measure import peak_rss_kib, percentile, percentiles, rss_kib


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert [percentile(values, p) for p in (0, 1, 50, 99, 99.5, 100)] == [1.0, 1.0, 50.0, 99.0, 100.0, 100.0]
    assert percentile([7.0], 50) == 7.0
    assert math.isnan(percentile([], 50))


def test_percentiles_sort_and_name_their_figures() -> None:
    out = percentiles([3.0, 1.0, 2.0, 4.0])
    assert out == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "p100": 4.0}
    assert list(percentiles([1.0], (99.9,))) == ["p99.9"]
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_rss_of_this_process_of_another_and_of_a_gone_one() -> None:
    assert rss_kib() > 0
    assert rss_kib(os.getpid()) > 0
    assert peak_rss_kib() >= rss_kib() > 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert rss_kib(child.pid) == peak_rss_kib(child.pid) == 0  # reaped: no /proc entry
