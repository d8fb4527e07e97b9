"""Prometheus metrics of one server process (own registry: several servers per process)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

log = logging.getLogger("runtime.serving.requests")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kubeforge_requests",
            "Inference requests answered, by protocol and status code.",
            ["model", "protocol", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "kubeforge_request_latency_seconds",
            "Time from request received to response ready.",
            ["model", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kubeforge_batch_size",
            "Rows per batch run by the model.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "kubeforge_queue_time_seconds",
            "Time the oldest request of a batch waited in the queue.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "kubeforge_batch_run_seconds",
            "Time to run one batch (copy in, model, copy out).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Triton's statistics extension (protocol.triton): per request run, its wait and its batch's run time
        self.requests_run = Counter(
            "kubeforge_requests_run", "Requests the model ran (in batches).", ["model"], registry=r
        )
        self.request_queue = Counter(
            "kubeforge_request_queue_seconds",
            "Seconds the requests the model ran waited in the queue, summed over requests.",
            ["model"],
            registry=r,
        )
        self.request_compute = Counter(
            "kubeforge_request_compute_seconds",
            "Seconds the batches took to run (copy in, model, copy out), summed over their requests.",
            ["model"],
            registry=r,
        )
        self.batches = Counter(
            "kubeforge_batches",
            "Batches run, by their rows (at most --max-batch-size label values per model).",
            ["model", "batch_size"],
            registry=r,
        )
        self.batch_compute = Counter(
            "kubeforge_batch_compute_seconds",
            "Seconds the batches of each size took to run.",
            ["model", "batch_size"],
            registry=r,
        )
        self.last_inference = Gauge(
            "kubeforge_last_inference_timestamp_seconds",
            "When the model last finished a batch (Unix time).",
            ["model"],
            registry=r,
        )
        self.device_busy = Counter(
            "kubeforge_device_busy_seconds",
            "Seconds the device spent on the model's batches. Pipelined (accelerators): per batch, from its"
            " launch, or the end of the batch before it when that came later, to its end, as the host sees"
            " it; otherwise the batch's run time. Its rate is the share of time the device was busy with"
            " the model (near 1: the device is the limit; well below it under load: the host is).",
            ["model"],
            registry=r,
        )
        self.device_idle = Counter(
            "kubeforge_device_idle_seconds",
            "Pipelined (accelerators): seconds the device sat idle between one batch's end and the next"
            " one's launch, as the host sees them, by why: no_requests (none was queued or being launched"
            " when it went idle: the clients' pace), queued (requests were, in no batch yet: the batcher"
            " waited or read too long), launching (a batch was being launched: its launch took long).",
            ["model", "reason"],
            registry=r,
        )
        self.input_placement = Counter(
            "kubeforge_worker_inputs_total",
            "Requests a protocol worker handed to the model process, by where their input tensors were:"
            " in_place (received straight into a shared-memory slot: no copy), copied (into a slot),"
            " inline (through the socket: no free slot, or larger than one).",
            ["placement"],
            registry=r,
        )
        self.hop_time = Histogram(
            "kubeforge_worker_hop_seconds",
            "Time between a protocol worker and the model process: a request from its encoding in the worker"
            " to the model process's reader (direction to_model), a batch's answers from their encoding to"
            " the worker's event loop (to_worker, one per batch and worker).",
            ["direction"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.busy_poll = Counter(
            "kubeforge_busy_poll_seconds",
            "Seconds spent polling before sleeping (--busy-poll-us), by process (a protocol worker's index;"
            " model: the batcher thread): a worker's stretches of polling in wall time, the work its event"
            " loop did meanwhile included; the batcher thread's polling alone. 0 with polling off.",
            ["process"],
            registry=r,
        )
        self.connections = Gauge(
            "kubeforge_client_connections",
            "Client connections open, by protocol and by the process that holds them (a protocol worker's"
            " index; model: the model process serving the protocols itself).",
            ["protocol", "process"],
            registry=r,
        )
        self.inflight = Gauge("kubeforge_inflight", "Inference requests in progress.", ["model"], registry=r)
        self.queue_depth = Gauge(
            "kubeforge_queue_depth", "Requests waiting for a batch.", ["model"], registry=r
        )
        self.compile_seconds = Gauge(
            "kubeforge_compile_seconds",
            "Seconds spent compiling or loading the compiled model, warm-up included.",
            ["model", "backend"],
            registry=r,
        )
        self.backend_info = Gauge(
            "kubeforge_backend_info",
            "The backend in use (value 1), how it was chosen and what it fell back from.",
            ["model", "requested", "backend", "mode", "path", "device", "hardware", "cache_hit", "fallback"],
            registry=r,
        )
        self.fallbacks = Counter(
            "kubeforge_compile_fallbacks",
            "Fallbacks taken while compiling (aot -> jit -> eager).",
            ["model", "backend", "step"],
            registry=r,
        )
        self.dropped = Counter(
            "kubeforge_dropped_unrun",
            "Requests dropped before their batch ran: device time not spent on answers nobody reads. reason"
            " cancelled: the client left (connection closed, gRPC cancel); expired: its deadline (the timeout"
            " parameter, grpc-timeout) would pass before its answer, or it waited past --queue-timeout-ms;"
            " displaced: a more urgent request (Triton's priority) took its place in a full queue.",
            ["model", "reason"],
            registry=r,
        )
        self.inflight_refused = Counter(
            "kubeforge_inflight_refused",
            "Requests refused before their body was read because the process already held --max-inflight-mb"
            " of requests (429 / RESOURCE_EXHAUSTED), by protocol.",
            ["protocol"],
            registry=r,
        )
        self.ready = Gauge("kubeforge_ready", "1 when the server reports ready.", registry=r)
        # labelled children of the per-request metrics: labels() takes a lock and builds a key each call,
        # two thirds of what a request's four metric updates cost (4.9 vs 1.7 us); model labels are bounded
        # (served models and "(unknown)"), and so are protocols and codes
        self._children: dict[tuple[Any, ...], Any] = {}

    def started(self, model: str) -> None:
        """A request for `model` is in progress (until `ended`)."""
        self._child(self.inflight, model).inc()

    def ended(self, model: str) -> None:
        self._child(self.inflight, model).dec()

    def answered(self, model: str, protocol: str, code: str, seconds: float | None) -> None:
        """A request was answered with `code`; `seconds` (of a success) go to the latency histogram; with
        debug logs on (Triton's log_verbose_level 1, --log-level debug) a line says so."""
        self._child(self.requests, model, protocol, code).inc()
        if log.isEnabledFor(logging.DEBUG):
            ms = None if seconds is None else round(seconds * 1e3, 3)
            log.debug("answered", extra={"model": model, "protocol": protocol, "code": code, "ms": ms})
        if seconds is not None:
            self._child(self.latency, model, protocol).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def idle(self, model: str) -> Callable[[float, str], None]:
        """For the batcher: the device's idle seconds between batches, and why."""

        def idle(seconds: float, why: str) -> None:
            self._child(self.device_idle, model, why).inc(seconds)

        return idle

    def observer(self, model: str) -> Callable[[int, int, float, float, float, float], None]:
        batch, queue, run, busy = (
            self.batch_size.labels(model),
            self.queue_time.labels(model),
            self.run_time.labels(model),
            self.device_busy.labels(model),
        )
        run_n, queue_s, compute_s, last = (
            self.requests_run.labels(model),
            self.request_queue.labels(model),
            self.request_compute.labels(model),
            self.last_inference.labels(model),
        )
        by_size: dict[int, tuple[Any, Any]] = {}

        def observe(
            rows: int, requests: int, oldest: float, queued: float, ran: float, device_s: float
        ) -> None:
            batch.observe(rows)
            queue.observe(oldest)
            run.observe(ran)
            busy.inc(device_s)
            run_n.inc(requests)
            queue_s.inc(queued)
            compute_s.inc(ran * requests)
            size = by_size.get(rows)
            if size is None:
                size = by_size[rows] = (
                    self.batches.labels(model, str(rows)),
                    self.batch_compute.labels(model, str(rows)),
                )
            size[0].inc()
            size[1].inc(ran)
            last.set(time.time())

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge(texts: list[bytes]) -> bytes:
    """One exposition from several processes' expositions: samples with the same name and labels are added
    (counters, histogram buckets/sums/counts, and the gauges we keep per process all add up); `_created`
    samples are dropped (they would not add)."""
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            acc = values[fam.name]
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                acc[key] = acc.get(key, 0.0) + s.value

    class _Merged:
        def collect(self) -> list[Metric]:
            out = []
            for name, fam in families.items():
                if not values[name]:
                    continue
                for (sample, labels), v in values[name].items():
                    fam.add_sample(sample, dict(labels), v)
                out.append(fam)
            return out

    r = CollectorRegistry(auto_describe=False)
    r.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(r)
