"""Prometheus metrics, one registry per server so several servers can coexist."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.http = Counter("easympt_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=self.registry)
        self.requests = Counter("easympt_generation_requests", "finished generation requests by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.tokens = Counter("easympt_generated_tokens", "tokens generated", registry=self.registry)
        self.queue_depth = Gauge("easympt_queue_depth", "requests waiting for a decode slot", registry=self.registry)
        self.ttft = Histogram("easympt_time_to_first_token_seconds", "submit to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("easympt_inter_token_latency_seconds", "decode time per token step",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)

        self.prefix_hits = Counter("easympt_prefix_cache_hits", "requests that reused cached prefix KV",
                                   registry=self.registry)
        self.prefix_misses = Counter("easympt_prefix_cache_misses", "requests with no cached prefix worth reusing",
                                     registry=self.registry)
        self.prefix_reused = Counter("easympt_prefix_cache_reused_tokens", "prompt tokens not prefilled again",
                                     registry=self.registry)
        self.prefix_evictions = Counter("easympt_prefix_cache_evictions", "blocks evicted (least recently used)",
                                        registry=self.registry)
        self.prefix_blocks = Gauge("easympt_prefix_cache_blocks", "blocks the prefix cache holds",
                                   registry=self.registry)

        self.spec_drafted = Counter("easympt_speculative_draft_tokens", "draft tokens checked (speculative decoding)",
                                    registry=self.registry)
        self.spec_accepted = Counter("easympt_speculative_accepted_tokens", "draft tokens the model agreed with",
                                     registry=self.registry)
        self.spec_rate = Gauge("easympt_speculative_acceptance_rate", "accepted / checked draft tokens so far",
                               registry=self.registry)

        self._spec_totals = [0, 0]  # drafted, accepted: the rate's terms

    def speculated(self, drafted: int, accepted: int) -> None:
        self.spec_drafted.inc(drafted)
        self.spec_accepted.inc(accepted)
        self._spec_totals = [self._spec_totals[0] + drafted, self._spec_totals[1] + accepted]
        if self._spec_totals[0]:
            self.spec_rate.set(self._spec_totals[1] / self._spec_totals[0])

    def prefix_lookup(self, reused_tokens: int) -> None:
        (self.prefix_hits if reused_tokens else self.prefix_misses).inc()
        self.prefix_reused.inc(reused_tokens)

    def prefix_stored(self, evicted: int, used_blocks: int) -> None:
        self.prefix_evictions.inc(evicted)
        self.prefix_blocks.set(used_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
