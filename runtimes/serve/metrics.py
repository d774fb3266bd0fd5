"""The service's Prometheus metrics (``prometheus-client``), in a registry of their own per service."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..executor import Prediction

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class Metrics:
    """Requests, latency, exits per stage, deadline misses, shed requests, queue depth, operating point."""

    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stagewise_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("stagewise_request_latency_seconds", "time from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("stagewise_images", "images classified", registry=r)
        self.exits = Counter("stagewise_exits", "images answered by each stage", ["stage", "operating_point"],
                             registry=r)
        self.deadline_misses = Counter("stagewise_deadline_misses", "answers later than their budget_ms", registry=r)
        self.budget_limited = Counter("stagewise_budget_limited", "answers whose budget skipped later stages",
                                      registry=r)
        self.shed = Counter("stagewise_shed", "requests refused with 503 because the queue was full", registry=r)
        self.batch_size = Histogram("stagewise_batch_size", "images per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.reloads = Counter("stagewise_reloads", "bundle reloads by result", ["result"], registry=r)
        self.queue_depth = Gauge("stagewise_queue_depth", "images waiting for a worker", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.operating_point = Gauge("stagewise_operating_point", "1 for the default operating point in use",
                                     ["name"], registry=r)

    def use_operating_points(self, names: list[str], default: str) -> None:
        """Record which of the bundle's operating points is the default."""
        self.operating_point.clear()
        for name in names:
            self.operating_point.labels(name).set(1 if name == default else 0)

    def answered(self, prediction: Prediction, stage: str, point: str, elapsed_ms: float,
                 budget_ms: float | None) -> None:
        """Count one answered image: its exit stage, and whether it missed or was limited by its budget."""
        self.images.inc()
        self.exits.labels(stage, point).inc()
        if budget_ms is not None and elapsed_ms > budget_ms:
            self.deadline_misses.inc()
        if prediction.budget_limited:
            self.budget_limited.inc()
