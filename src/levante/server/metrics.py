"""Prometheus metrics of one server: request counts, tokens, queue depth, KV use, latencies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from levante.engine.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per server (no process-global state), exposed at /metrics."""

    def __init__(self, *, running: Callable[[], float], waiting: Callable[[], float],
                 kv_used: Callable[[], float], kv_total: float,
                 engine: Engine | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if engine is not None:
            r.register(EngineCounters(engine))
        self.requests = Counter("levante_requests", "HTTP requests served",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("levante_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("levante_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram("levante_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("levante_time_per_output_token_seconds",
                              "Time between output tokens", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("levante_num_requests_running", "Sequences running",
              registry=r).set_function(running)
        Gauge("levante_num_requests_waiting", "Sequences waiting",
              registry=r).set_function(waiting)
        Gauge("levante_kv_blocks_used", "KV cache blocks in use",
              registry=r).set_function(kv_used)
        Gauge("levante_kv_blocks_total", "KV cache blocks in the pool",
              registry=r).set(kv_total)


class EngineCounters(Collector):
    """What the engine did, read from its counters at scrape time (vLLM's names, levante_
    prefix): preemptions, prefix-cache queried/hit prompt tokens, drafted/accepted
    speculative tokens, requests that ended with an error."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e, s = self.engine, self.engine.scheduler
        for name, doc, value in (
                ("levante_num_preemptions", "Requests preempted (KV freed, recomputed later)",
                 e.num_preemptions),
                ("levante_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                 s.num_prefix_queried_tokens),
                ("levante_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                 s.num_prefix_hit_tokens),
                ("levante_spec_decode_num_draft_tokens", "Speculative tokens proposed",
                 e.num_draft_tokens),
                ("levante_spec_decode_num_accepted_tokens", "Speculative tokens accepted",
                 e.num_accepted_tokens),
                ("levante_request_errors", "Requests that ended with an error",
                 e.num_failed_requests)):
            yield CounterMetricFamily(name, doc, value=value)
