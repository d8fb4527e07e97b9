"""Triton's model configuration and statistics extensions, over REST (`GET /v2/models/{m}/config`,
`/v2/models[/{m}[/versions/{v}]]/stats`) and gRPC (`ModelConfig`, `ModelStatistics`): what Triton's tools
(perf_analyzer reads both before it measures) and tritonclient's `get_model_config` and
`get_inference_statistics` ask a server for. And the model repository's index (`POST /v2/repository/index`,
gRPC `RepositoryIndex`: tritonclient's `get_model_repository_index`), with load and unload refused: a server
serves the one model it was started with (Triton's `--model-control-mode=none`); another model or version is
another rollout (an InferenceService revision), not a call. And Triton's logging extension (`GET/POST
v2/logging`, gRPC `LogSettings`: tritonclient's `get_log_settings` / `update_log_settings`; the settings:
runtime.serving.logs): anyone may read them; changing them takes `--allow-log-settings` (a client that may
could turn the error logs off, or flood them), else 403 / PERMISSION_DENIED.

Both are built as the JSON Triton answers over REST; the gRPC answers are the same dictionaries parsed into
the messages (their field names are Triton's). The statistics come from the server's Prometheus metrics (with
protocol workers, the model process's and every worker's, merged), so they count what `/metrics` counts:
- success / fail: requests answered, by status (success: their time from received to answered);
- queue, compute_infer: per request run, its wait in the queue and its batch's run time (copy in, model,
  copy out); compute_input and compute_output count the same requests with 0 ns: a batch's run is not split;
- inference_count / execution_count: rows run / batches run; batch_stats: batches and run time by row count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from runtime.serving.errors import BadRequest, Forbidden, NotFound
from runtime.serving.logs import log_settings
from runtime.serving.metrics import Metrics
from runtime.serving.model import Repository, ServedModel
from runtime.serving.protocol.sharedmem import NOT_ALLOWED, Region

if TYPE_CHECKING:
    from runtime.serving.protocol.sharedmem import SharedMemory

_SUCCESS = frozenset({"200", "OK"})  # kubeforge_requests_total's code of a success, over REST and gRPC
# the by-size samples, and their place in [batches, seconds]
_BY_SIZE = {"kubeforge_batches_total": 0, "kubeforge_batch_compute_seconds_total": 1}


def model_config(model: ServedModel, batching: dict[str, Any]) -> dict[str, Any]:
    """Triton's ModelConfig (JSON) of `model`; `batching`: its dynamic_batching (`dynamic_batching`)."""
    sig = model.signature

    def tensor(spec: Any) -> dict[str, Any]:
        dims = list(spec.shape[1:] if sig.batched else spec.shape)  # Triton's dims leave out the batch
        return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": dims}

    config: dict[str, Any] = {
        "name": model.name,
        "platform": model.platform,
        "backend": "kubeforge",
        "max_batch_size": model.max_batch_size if sig.batched else 0,
        "input": [tensor(s) for s in sig.inputs],
        "output": [tensor(s) for s in sig.outputs],
        # how it was compiled (backend, mode, device, fallbacks, ...), as the model metadata's parameters
        "parameters": {k: {"string_value": _text(v)} for k, v in model.info.items()},
    }
    if sig.batched:
        config["dynamic_batching"] = batching
    return config


def dynamic_batching(
    max_delay_ms: float,
    max_queue_size: int,
    queue_timeout_ms: float,
    priority_levels: int,
    default_priority_level: int,
) -> dict[str, Any]:
    """The server's batching flags as Triton's ModelDynamicBatching. The queue timeout is reported as the
    default queue policy's timeout; ours also applies to requests that bring a timeout of their own (the
    sooner wins), where Triton's applies to those without one."""
    out: dict[str, Any] = {
        "max_queue_delay_microseconds": round(max_delay_ms * 1000),
        "default_queue_policy": {
            "max_queue_size": max_queue_size,
            "default_timeout_microseconds": round(queue_timeout_ms * 1000),
            "allow_timeout_override": True,
        },
    }
    if priority_levels:
        out["priority_levels"] = priority_levels
        out["default_priority_level"] = default_priority_level or priority_levels
    return out


def statistics(exposition: bytes, models: Sequence[ServedModel]) -> dict[str, Any]:
    """Triton's ModelStatisticsResponse (JSON) of `models`, from a Prometheus exposition of this server."""
    from prometheus_client.parser import text_string_to_metric_families

    # per model: sample name -> value; by-size samples: model -> size -> [batches, seconds]
    samples: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    sizes: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            slot = _BY_SIZE.get(s.name)
            if slot is not None:
                sizes[model][int(s.labels["batch_size"])][slot] += s.value
            elif s.name == "kubeforge_requests_total":
                ok = s.labels.get("code") in _SUCCESS
                samples[model]["success" if ok else "fail"] += s.value
            else:
                samples[model][s.name] += s.value
    out = []
    for m in models:
        v = samples[m.name]
        run = int(v["kubeforge_requests_run_total"])
        out.append(
            {
                "name": m.name,
                "version": m.version,
                "last_inference": int(v["kubeforge_last_inference_timestamp_seconds"] * 1000),
                "inference_count": int(v["kubeforge_batch_size_sum"]),
                "execution_count": int(v["kubeforge_batch_size_count"]),
                "inference_stats": {
                    "success": _duration(v["success"], v["kubeforge_request_latency_seconds_sum"]),
                    "fail": _duration(v["fail"], 0.0),
                    "queue": _duration(run, v["kubeforge_request_queue_seconds_total"]),
                    "compute_input": _duration(run, 0.0),
                    "compute_infer": _duration(run, v["kubeforge_request_compute_seconds_total"]),
                    "compute_output": _duration(run, 0.0),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(n, 0.0),
                        "compute_infer": _duration(n, seconds),
                        "compute_output": _duration(n, 0.0),
                    }
                    for size, (n, seconds) in sorted(sizes[m.name].items())
                ],
            }
        )
    return {"model_stats": out}


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": round(count), "ns": round(seconds * 1e9)}


def _text(value: object) -> str:
    if isinstance(value, list | tuple):
        return " | ".join(str(v) for v in value)
    return str(value)


LOG_REFUSED = (
    "this server does not let clients change its log settings: start it with --allow-log-settings (a client "
    "that may can turn the error logs off, or flood them), or change --log-level and restart"
)
LOAD_REFUSED = (
    "this server serves the one model it was started with (--model-uri), as Triton does with "
    "--model-control-mode=none: loading and unloading models is not supported; to serve another model or "
    "version, roll out a new revision of the InferenceService (or restart kubeforge-serve with its URI)"
)


class Extensions:
    """The extensions for one server process: its models, its metrics (with protocol workers, `render`
    merges the model process's and every worker's), its batching flags and the client shared memory
    registered with the server (None: not allowed, protocol.sharedmem)."""

    def __init__(
        self,
        repo: Repository,
        metrics: Metrics,
        batching: dict[str, Any],
        render: Callable[[], Awaitable[bytes]] | None = None,
        shm: SharedMemory | None = None,
        *,
        set_log: Callable[[object], Awaitable[dict[str, Any]]] | None = None,
        allow_log: bool = False,
    ) -> None:
        """`set_log`: changes the server's log settings (the model process's, which every worker follows);
        `allow_log`: whether clients may (--allow-log-settings)."""
        self.repo = repo
        self.metrics = metrics
        self.batching = batching
        self.render = render
        self.shm = shm
        self.set_log = set_log
        self.allow_log = allow_log

    def config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's ModelConfig (JSON) of a served model (NotFound, Unavailable)."""
        return model_config(self.repo.get(name, version), self.batching)

    async def statistics(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's ModelStatisticsResponse (JSON) of a served model, or of every one when `name` is empty."""
        models = [self.repo.get(name, version)] if name else list(self.repo.models.values())
        text = await self.render() if self.render is not None else self.metrics.render()
        return statistics(text, models)

    # Triton's logging extension (runtime.serving.logs), over REST and gRPC alike
    def log_settings(self) -> dict[str, Any]:
        return log_settings()

    async def update_log_settings(self, changes: object) -> dict[str, Any]:
        """Change the server's log settings (Forbidden unless allowed, BadRequest naming a bad setting); an
        empty change reads them."""
        if changes == {}:
            return log_settings()
        if not self.allow_log or self.set_log is None:
            raise Forbidden(LOG_REFUSED)
        return await self.set_log(changes)

    # Triton's system shared memory extension (protocol.sharedmem), over REST and gRPC alike
    def shm_status(self, name: str = "") -> list[Region]:
        """The registered regions, or the one named (NotFound when it is not registered)."""
        if self.shm is not None:
            return self.shm.status(name)
        if name:
            raise NotFound(f"shared memory region {name!r} is not registered")
        return []

    def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if self.shm is None:
            raise BadRequest(f"cannot register shared memory region {name!r}: {NOT_ALLOWED}")
        self.shm.register(name, key, offset, byte_size)

    def shm_unregister(self, name: str = "") -> None:
        """One region, or every one (nothing to do where none can be registered)."""
        if self.shm is not None:
            self.shm.unregister(name)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index (JSON): each model with its state, READY or UNAVAILABLE (and why)."""
        out = []
        for m in self.repo.models.values():
            entry = {"name": m.name, "version": m.version, "state": "READY" if m.ready else "UNAVAILABLE"}
            if not m.ready:
                entry["reason"] = "compiling or warming up; not ready yet"
            if m.ready or not ready_only:
                out.append(entry)
        return out  # a model that failed to load is not in it: readiness and every model call say why
