"""The gateway's Prometheus metrics, all on one registry exposed at ``/metrics``.

Label sets stay bounded: model and deployment come from the config, status is an HTTP code, and
the tenant label exists only when ``tureen_settings.metrics_label_by`` asks for it (team or key
alias, both finite sets created by the admin). Keys never appear in a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, label_by: str = "none") -> None:
        self.label_by = label_by
        tenant = ["tenant"] if label_by != "none" else []
        self.requests = Counter("tureen_gateway_requests", "Requests answered, by public model, deployment "
                                "and HTTP status.", ["model", "deployment", "status", *tenant], registry=registry)
        self.upstream_latency = Histogram("tureen_gateway_upstream_latency_seconds", "Upstream time of one "
                                          "attempt, request sent to last byte.", ["deployment"],
                                          buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_ttfb = Histogram("tureen_gateway_upstream_first_byte_seconds", "Upstream time of one "
                                       "attempt, request sent to first body byte.", ["deployment"],
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.overhead = Histogram("tureen_gateway_overhead_seconds", "Time the gateway itself added before the "
                                  "response started (total to first byte minus upstream time).",
                                  buckets=OVERHEAD_BUCKETS, registry=registry)
        self.retries = Counter("tureen_gateway_retries", "Upstream attempts retried, by reason.",
                               ["model", "reason"], registry=registry)
        self.fallbacks = Counter("tureen_gateway_fallbacks", "Requests moved to a fallback model, by kind "
                                 "(fallbacks or context_window_fallbacks).", ["model", "fallback", "kind"],
                                 registry=registry)
        self.breaker_state = Gauge("tureen_gateway_circuit_breaker_state", "Circuit breaker per deployment: "
                                   "0 closed, 1 open, 2 half-open.", ["deployment"], registry=registry)
        self.healthy = Gauge("tureen_gateway_deployment_healthy", "1 when the last active health check passed.",
                             ["deployment"], registry=registry)
        self.inflight = Gauge("tureen_gateway_inflight_requests", "Requests in flight to each deployment.",
                              ["deployment"], registry=registry)
        self.midstream_errors = Counter("tureen_gateway_midstream_errors", "Streams that failed after their "
                                        "first byte and were ended with an SSE error event.", ["deployment"],
                                        registry=registry)
        self.client_disconnects = Counter("tureen_gateway_client_disconnects", "Requests whose client went "
                                          "away before the response ended.", ["model"], registry=registry)
        self.step_errors = Counter("tureen_gateway_step_errors", "Pipeline steps that raised (logged; the request "
                                   "was not failed by an after() error).", ["step", "phase"], registry=registry)

    def tenant(self, ctx) -> list[str]:
        if self.label_by == "none":
            return []
        p = ctx.principal
        value = (p.team_id if self.label_by == "team" else p.key_alias) if p else None
        return [value or ""]
