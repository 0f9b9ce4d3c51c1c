"""The benchmark suite cannot rot: its quick path runs, its report renders, its helpers measure.

``python -m bench --quick --only sizes`` runs for real (a real ``writ serve``,
a CRL, a KRL) into a temporary directory, never into docs/. The report's
rendering and the pieces the long modules are built from (targets, spreads,
py-spy summaries, the disk ceilings) are checked on small inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.append import fsync_rate, sqlite_rate
from bench.harness import figure, ref, summarize_pyspy

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_quick_sizes_suite_writes_the_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "sizes", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    doc = json.loads((tmp_path / "benchmarks.json").read_text())
    sizes = doc["modules"]["sizes"]
    assert "error" not in sizes
    figs = {f["key"]: f for f in sizes["figures"]}
    # a revoke record is a signed msgpack array: well over 64 bytes (a signature), well under 600
    assert 64 < figs["sizes.revoke_record"]["median"] < 600
    assert figs["sizes.revoke_record"]["comparable"]["value"] > 0  # a CRL entry, measured
    assert figs["sizes.download_sse"]["median"] > figs["sizes.revoke_record"]["median"]
    # the compact SSE format: one revocation to a device in sync in at most 400 wire bytes
    assert figs["sizes.revoke_record"]["median"] < figs["sizes.download_sse_compact"]["median"] <= 400
    # polling in sync fetches the checkpoint and the new record, not the partial entry bundle
    assert figs["sizes.download_poll"]["median"] < 1000 < figs["sizes.download_tiles"]["median"]
    assert figs["sizes.grant_record"]["comparable"]["value"] > 0  # an X.509 leaf, measured
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Sizes on the wire and at rest" in md
    assert "python -m bench.sizes --quick" in md


def test_report_renders_targets_spreads_and_profiles() -> None:
    met = figure(
        "x.fast",
        "fast thing",
        [10.0, 11.0, 12.0],
        "ops/s",
        command="python -m bench.x",
        limit=ref("the ceiling", 20.0, "ops/s"),
        target_of_limit=0.5,
    )
    missed = figure(
        "x.slow", "slow thing", [1.0, 3.0], "ops/s", command="python -m bench.x", target=(">=", 5.0)
    )
    assert met["target"]["met"] is True and met["limit"]["ratio"] == 0.55
    assert missed["target"]["met"] is False and missed["wide"] is True
    doc = {
        "mode": "quick",
        "generated": "now",
        "machine": {"cores": 2},
        "modules": {
            "x": {
                "name": "x",
                "title": "X things",
                "command": "python -m bench.x",
                "figures": [met, missed],
                "tables": [{"title": "T", "columns": ["a", "b"], "rows": [[1, 2.5]], "note": ""}],
                "images": [{"file": "x.png", "caption": "a plot"}],
                "profiles": [
                    {
                        "title": "server",
                        "how": "py-spy",
                        "samples": 10,
                        "self": [["f (a.py)", "50.0%"]],
                        "inclusive": [["g (b.py)", "90.0%"]],
                        "roles": [["event loop", "60.0%"]],
                    }
                ],
                "notes": ["a note"],
            }
        },
    }
    md = report.render(doc)
    assert "## Targets" in md
    assert "**missed**" in md and ">= 0.5 x the limit: met" in md
    assert "⚠ wide spread" in md
    assert "![a plot](x.png)" in md
    assert "| event loop | 60.0% |" in md


def test_pyspy_summary_counts_self_inclusive_and_roles(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text(
        "main (app.py:1);Runner.run (asyncio/runners.py:118);handle (api/x.py:5) 30\n"
        "_bootstrap (threading.py:1);_connection_worker_thread (aiosqlite/core.py:9) 70\n"
    )
    s = summarize_pyspy(raw, roles=[("_connection_worker_thread", "sqlite"), ("Runner.run", "loop")])
    assert s["samples"] == 100
    assert s["self"][0] == ["_connection_worker_thread (aiosqlite/core.py)", "70.0%"]
    assert dict(map(tuple, s["roles"])) == {"sqlite": "70.0%", "loop": "30.0%"}
    assert all("threading.py" not in name for name, _ in s["inclusive"])


def test_disk_ceilings_measure_something(tmp_path: Path) -> None:
    assert fsync_rate(tmp_path, 0.05) > 0
    assert sqlite_rate(tmp_path, 0.05, 1) > 0
    assert not list(tmp_path.iterdir())  # the probes clean up after themselves
