"""The fleet run's picture: the share of devices refusing the tablet over time."""

from __future__ import annotations

import math
from pathlib import Path

from ..measure import percentile
from .model import FleetResult

__all__ = ["plot_refusals"]


def plot_refusals(result: FleetResult, path: str | Path) -> None:
    """A PNG of the share of devices refusing the tablet over time since the ack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = sorted(result.latencies)
    n = max(1, result.devices)
    xs = [0.0, *lat]
    ys = [0.0, *((i + 1) / n * 100 for i in range(len(lat)))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.step(xs, ys, where="post", color="#b22222", linewidth=1.8, label="devices refusing the tablet")
    lb = result.extra.get("lower_bound_s")
    if isinstance(lb, int | float):
        ax.axvline(lb, color="#555555", linestyle="--", linewidth=1, label=f"lower bound {lb:.2f} s")
    p99 = percentile(lat, 99)
    if not math.isnan(p99):
        ax.axvline(p99, color="#1f77b4", linestyle=":", linewidth=1, label=f"p99 {p99:.2f} s")
    ax.set_xlabel("seconds since the server acknowledged the revoke")
    ax.set_ylabel("devices refusing (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    push = result.extra.get("push", "?")
    model = result.extra.get("push_model", "?")
    ax.set_title(f"Lost tablet: {result.devices} devices, {push} ({model}), receipts {result.receipts}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
