"""The API's Prometheus metrics, and their exposition (multiprocess mode under several workers).

prometheus_client picks its storage when it is first imported: with PROMETHEUS_MULTIPROC_DIR set
(`abrec serve --workers N` sets it before any import), every worker writes its samples to files
in that directory and `/metrics` sums them, so the numbers do not depend on which worker answers.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)

REQUESTS = Counter("abrec_api_requests_total", "HTTP requests answered", ["endpoint", "status"])
REQUEST_LATENCY = Histogram(
    "abrec_api_request_seconds", "HTTP request latency", ["endpoint"], buckets=_LATENCY_BUCKETS
)
RECOMMENDATIONS = Counter(
    "abrec_recommendations_total", "Slates served, per arm", ["experiment", "arm", "logged"]
)
RECOMMENDATION_LATENCY = Histogram(
    "abrec_recommendation_seconds",
    "Latency of a recommendation (decision, model, log), per arm",
    ["experiment", "arm"],
    buckets=_LATENCY_BUCKETS,
)
FALLBACKS = Counter(
    "abrec_fallbacks_total",
    "Slates served from popular items because the model failed",
    ["experiment", "arm"],
)
CLICKS = Counter("abrec_clicks_total", "Clicks recorded, per arm", ["experiment", "arm", "duplicate"])
QUEUE_DEPTH = Gauge(
    "abrec_eventlog_queue_depth", "Requests waiting for the event log writer", multiprocess_mode="livesum"
)
BATCH_ROWS = Histogram(
    "abrec_eventlog_batch_rows",
    "Rows per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
COMMITS = Counter("abrec_eventlog_commits_total", "Event-log transactions", ["outcome"])


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: the hot path's label sets are few (experiments x arms),
    and `labels()` validates, locks and builds keys on every call."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def observe_request(rule: str, status: int, seconds: float | None) -> None:
    """One answered API request: counted by route and status, timed by route (when it was)."""
    child(REQUESTS, rule, str(status)).inc()
    if seconds is not None:
        child(REQUEST_LATENCY, rule).observe(seconds)


def exposition() -> tuple[bytes, str]:
    """The body and content type of /metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
