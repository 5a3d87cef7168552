"""Speculative-decoding counters of the server under test, read from its ``/metrics``.

``tureen bench serve`` is a client; speculation is the server's setting (``tureen serve
--speculative-config``). Given ``--speculative-config``, the benchmark records that setting with
its results and reads the server's ``vllm:spec_decode_*`` counters before and after each run, so
the report shows the acceptance rate and mean accepted length the measured throughput came with.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

_NAMES = {"vllm:spec_decode_num_drafts": "num_drafts", "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
          "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens"}


@dataclass(frozen=True)
class SpecCounters:
    """Summed over the server's models and engines."""

    num_drafts: float = 0.0
    num_draft_tokens: float = 0.0
    num_accepted_tokens: float = 0.0

    def minus(self, earlier: SpecCounters) -> SpecCounters:
        return SpecCounters(self.num_drafts - earlier.num_drafts, self.num_draft_tokens - earlier.num_draft_tokens,
                            self.num_accepted_tokens - earlier.num_accepted_tokens)

    def plus(self, more: SpecCounters) -> SpecCounters:
        return SpecCounters(self.num_drafts + more.num_drafts, self.num_draft_tokens + more.num_draft_tokens,
                            self.num_accepted_tokens + more.num_accepted_tokens)

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens per verified draft, the target's own included (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def document(self) -> dict[str, float | None]:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "acceptance_rate": self.acceptance_rate,
                "mean_acceptance_length": self.mean_acceptance_length}


def parse_spec_counters(text: str) -> SpecCounters | None:
    """The counters from a Prometheus text exposition, or None when it has none of them."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        key = _NAMES.get(family.name)
        if key is None:
            continue
        totals[key] = totals.get(key, 0.0) + sum(s.value for s in family.samples if s.name.endswith("_total"))
    return SpecCounters(**totals) if totals else None


def scrape_spec_counters(client: httpx.Client) -> SpecCounters | None:
    """``GET /metrics`` on the client's server; None when it fails or exposes no spec counters."""
    try:
        response = client.get("/metrics")
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_spec_counters(response.text)
