"""Prometheus metrics of the reward server.

Each app owns its own ``CollectorRegistry`` (not the process-global default), so tests and benchmarks can
build several apps in one process without duplicate-metric errors. Route labels are route templates,
never raw paths, so a scan of random URLs cannot blow up label cardinality.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latency buckets: sub-millisecond health checks up to multi-second batches with timeouts.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServerMetrics:
    """All metrics of one server instance, registered in ``registry``."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    items: Counter
    timeouts: Counter
    parse_failures: Counter
    pool_restarts: Counter
    inflight: Gauge
    rejected: Counter
    get_reward_splits: Counter

    @classmethod
    def create(cls) -> ServerMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "vlcal_rs_requests_total",
                "HTTP requests by route template and status code",
                ["route", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "vlcal_rs_request_latency_seconds",
                "HTTP request latency by route template",
                ["route"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            items=Counter(
                "vlcal_rs_items_scored_total",
                "Items scored, by item status (ok, timeout, parse_error, error)",
                ["status"],
                registry=registry,
            ),
            timeouts=Counter(
                "vlcal_rs_grading_timeouts_total", "Items whose grading hit the timeout", registry=registry
            ),
            parse_failures=Counter(
                "vlcal_rs_parse_failures_total",
                "Items whose confidence could not be parsed",
                registry=registry,
            ),
            pool_restarts=Counter(
                "vlcal_rs_pool_restarts_total",
                "Grading worker processes replaced (killed on timeout, or died)",
                registry=registry,
            ),
            inflight=Gauge("vlcal_rs_inflight_items", "Items being scored now", registry=registry),
            rejected=Counter(
                "vlcal_rs_overload_rejections_total",
                "Requests answered 503 because max_inflight items were already being scored",
                registry=registry,
            ),
            get_reward_splits=Counter(
                "vlcal_rs_get_reward_splits_total",
                "/get_reward queries by how the response was found (method=not_found: scored as empty)",
                ["method"],
                registry=registry,
            ),
        )
