"""Prometheus metrics of the server (prometheus_client), one registry per app.

Names (all prefixed `adfilter_`):

    posts_total{stage, decision}          posts decided, by who decided (gate/deep) and how
    http_requests_total{route, status}    HTTP requests answered
    errors_total{kind}                    errors by their JSON error code (image_corrupt, ...)
    stage_latency_seconds{stage}          gate (per post), deep (per post: queue + batch),
                                          end_to_end (per /v1/moderate request, server side)
    http_request_duration_seconds{route}  every route, measured around the whole ASGI call
    deep_batch_size / deep_batch_seconds  micro-batches of the deep model (kind=request|drift)
    deep_queue_posts, store_queue_rows    queue depths
    store_rows_total{table}               rows written to the store
    model_info{model_version, source}     1 for the model being served
    model_reloads_total{result}           success | failure | unchanged
    model_ready                           1 while a model is loaded
    gpu_memory_allocated_bytes{device}, gpu_memory_reserved_bytes{device},
    gpu_utilization_ratio{device}         only when CUDA is present

The p99 alert (docker/prometheus/alerts.yml) and the autoscaling signal
(docker/k8s/) are `histogram_quantile(0.99, ...)` over `stage_latency_seconds{stage="end_to_end"}`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Fine below 100 ms (the alert threshold), coarse above.
LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GpuCollector(Collector):
    """GPU memory and utilisation read at scrape time through torch.cuda."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            "adfilter_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "adfilter_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator",
            labels=["device"],
        )
        util = GaugeMetricFamily(
            "adfilter_gpu_utilization_ratio", "GPU busy share over the last sample period (NVML)",
            labels=["device"],
        )
        for i in range(torch.cuda.device_count()):
            dev = str(i)
            allocated.add_metric([dev], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([dev], float(torch.cuda.memory_reserved(i)))
            try:
                util.add_metric([dev], float(torch.cuda.utilization(i)) / 100.0)
            except Exception:  # needs NVML (pynvml); memory figures still come
                pass
        yield allocated
        yield reserved
        if util.samples:
            yield util


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, gpu: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.posts = Counter("adfilter_posts_total", "Posts decided", ["stage", "decision"], registry=r)
        self.http_requests = Counter(
            "adfilter_http_requests_total", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.errors = Counter("adfilter_errors_total", "Errors by kind", ["kind"], registry=r)
        self.stage_latency = Histogram(
            "adfilter_stage_latency_seconds", "Latency of the gate, the deep model and whole requests",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.http_latency = Histogram(
            "adfilter_http_request_duration_seconds", "Time to answer an HTTP request",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "adfilter_deep_batch_size", "Posts per deep-model batch", ["kind"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "adfilter_deep_batch_seconds", "Featurize + forward time of one deep-model batch",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.deep_queue = Gauge("adfilter_deep_queue_posts", "Posts waiting for the deep model",
                                registry=r)
        self.store_queue = Gauge("adfilter_store_queue_rows", "Rows waiting for the store writer",
                                 registry=r)
        self.store_rows = Counter("adfilter_store_rows_total", "Rows written to the store",
                                  ["table"], registry=r)
        self.drift_samples_dropped = Counter(
            "adfilter_drift_samples_dropped_total",
            "Gate-decided posts picked for drift features but not featurized (queue full)",
            registry=r,
        )
        self.model_info = Gauge("adfilter_model_info", "The model being served (value 1)",
                                ["model_version", "source"], registry=r)
        self.model_reloads = Counter("adfilter_model_reloads_total", "Model (re)loads by result",
                                     ["result"], registry=r)
        self.model_ready = Gauge("adfilter_model_ready", "1 while a model is loaded", registry=r)
        self._info_labels: tuple[str, str] | None = None
        if gpu:
            r.register(GpuCollector())

    def set_model(self, version: str, source: str) -> None:
        if self._info_labels is not None:
            self.model_info.remove(*self._info_labels)
        self._info_labels = (version, source)
        self.model_info.labels(version, source).set(1)
        self.model_ready.set(1)

    def on_batch(self, size: int, seconds: float, background: bool) -> None:
        kind = "drift" if background else "request"
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)

    def on_store_write(self, table: str, rows: int, seconds: float) -> None:
        self.store_rows.labels(table).inc(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)

