"""Prometheus metrics of one app, in a registry of its own (tests create many apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.appends = Counter("writ_appends", "Records appended to the ledger", registry=r)
        self.append_requests = Counter("writ_append_requests", "Successful POST /v1/records", registry=r)
        self.rejections = Counter(
            "writ_rejections", "Refused requests, by problem type", ["type"], registry=r
        )
        self.receipts = Counter("writ_receipts", "Device receipts accepted", registry=r)
        self.checkpoints = Counter("writ_checkpoints_signed", "Checkpoints signed and published", registry=r)
        self.sse_clients = Gauge("writ_sse_clients", "Connected Server-Sent Events clients", registry=r)
        self.tree_size = Gauge("writ_tree_size", "Records in the ledger", registry=r)
        self.checkpoint_age = Gauge(
            "writ_checkpoint_age_seconds", "Seconds since the served checkpoint's timestamp", registry=r
        )
        self.append_latency = Histogram(
            "writ_append_latency_seconds",
            "Time from receiving a POST /v1/records body to its durable commit and publication",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.group_size = Histogram(
            "writ_commit_group_requests",
            "Append requests committed together in one storage transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )

    def bind_checkpoint_age(self, age: Callable[[], float]) -> None:
        self.checkpoint_age.set_function(age)
