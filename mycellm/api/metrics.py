"""Prometheus metrics of a node (names follow the ``mycellm_*`` prefix; units in the names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mycellm.api.tally import RequestTally

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NodeMetrics:
    """One registry per ingress replica, so several nodes in one process never collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mycellm_requests",
            "Requests answered",
            ["endpoint", "model", "route", "outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "mycellm_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "mycellm_completion_tokens", "Completion tokens generated", ["model"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "mycellm_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "mycellm_request_duration_seconds",
            "Whole request duration",
            ["endpoint", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mycellm_requests_in_flight", "Requests being answered", registry=self.registry
        )

    def observe(self, served: RequestTally, route_kind: str) -> None:
        """Count one finished request (any outcome) under its endpoint, model and route."""
        self.in_flight.dec()
        self.requests.labels(served.endpoint, served.model, route_kind, served.outcome).inc()
        self.request_duration.labels(served.endpoint, served.model).observe(served.elapsed_s)
        if served.time_to_first_token_s is not None and served.endpoint != "embedding":
            self.time_to_first_token.labels(served.model).observe(served.time_to_first_token_s)
        self.prompt_tokens.labels(served.model).inc(served.prompt_tokens)
        self.completion_tokens.labels(served.model).inc(served.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
