"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own so that several servers can live
in one process (the tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
  content_type = CONTENT_TYPE_LATEST

  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.requests = Counter("m3_requests", "chat completion requests answered, by HTTP status", ["status"],
                            registry=r)
    self.dropped = Counter("m3_requests_dropped", "requests whose work was dropped, by reason "
                           "(disconnect, timeout)", ["reason"], registry=r)
    self.scale = Counter("m3_requests_by_scale", "answered requests by the visual-token scale used", ["scale"],
                         registry=r)
    self.queue_depth = Gauge("m3_queue_depth", "requests waiting for a batch", registry=r)
    self.running = Gauge("m3_requests_running", "requests in the batch being decoded", registry=r)
    self.batch_size = Histogram("m3_batch_size", "requests per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                                registry=r)
    self.replica_requests = Counter("m3_replica_requests", "requests of static batches given to each engine "
                                    "replica (--data-parallel N > 1)", ["replica"], registry=r)
    self.batch_seconds = Histogram("m3_batch_seconds", "one engine batch: encode + prefill + decode",
                                   buckets=LATENCY_BUCKETS, registry=r)
    self.latency = Histogram("m3_request_latency_seconds", "request received -> answered",
                             buckets=LATENCY_BUCKETS, registry=r)
    self.queue_wait = Histogram("m3_queue_wait_seconds", "request queued -> its batch starts",
                                buckets=LATENCY_BUCKETS, registry=r)
    self.prompt_tokens = Counter("m3_prompt_tokens", "prompt positions, visual tokens included", registry=r)
    self.visual_tokens = Counter("m3_visual_tokens", "visual tokens", registry=r)
    self.completion_tokens = Counter("m3_completion_tokens", "generated tokens", registry=r)

  def render(self) -> bytes:
    return generate_latest(self.registry)
