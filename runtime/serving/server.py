"""The serving process: load → compile (in the model's worker thread) → REST + gRPC → graceful drain.

Listeners start first, so liveness answers while the model compiles; readiness turns 200 only once the
compiled model passed its check against eager, and back to 503 as soon as SIGTERM arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from functools import cached_property, partial
from typing import Any

import torch

from runtime.cpus import cpus_allowed
from runtime.serving import busypoll, cudadriver, ipc, pagelock
from runtime.serving import compile as compiler
from runtime.serving.batching import Batcher, BatchRunner, Gather
from runtime.serving.compile.base import Runner
from runtime.serving.config import ServeConfig
from runtime.serving.detect import detect_hardware
from runtime.serving.errors import BadRequest
from runtime.serving.loader import LoadedModel, load_model
from runtime.serving.logs import apply_log_settings, checked_log_settings, log_settings
from runtime.serving.metrics import Metrics
from runtime.serving.model import Repository, ServedModel
from runtime.serving.protocol import datatypes
from runtime.serving.protocol.http1 import Body, Listener
from runtime.serving.protocol.rest import SLOT_BODY_MIN, SlotBody
from runtime.serving.signature import Signature, TensorSpec

log = logging.getLogger(__name__)

VERSION = "0.1.0"
# rows at least this large go from page-locked shared memory to the device directly (a CPU concatenation
# of 32 ResNet-50 images into the staging buffer took 10 ms of the batcher thread on the H200 host)
DIRECT_COPY_ROW_BYTES = 64 << 10
PIPELINE_DEPTH = 2  # CUDA: batches in flight
SWITCH_INTERVAL_S = 0.001
# intra-op threads of the model's thread when the model runs on an accelerator (unless --torch-threads):
# the CPU's share is gathering batches and cutting outputs; a team of every core spins in OpenMP's barriers
# (H200 host, ResNet-50 with one event loop: 9-28 ms of CPU per request, ten cores busy at 1,084 requests/s)
ACCELERATOR_THREADS = 4
EXTENSIONS = [
    "binary_tensor_data",
    "model_repository_metadata",
    "metrics",
    "kubeforge_compile",
    "schedule_policy",  # Triton's request parameters priority and timeout
    "model_configuration",  # Triton's, protocol.triton
    "statistics",  # Triton's, protocol.triton
    "logging",  # Triton's, protocol.triton and logs (changes only with --allow-log-settings)
]


@dataclass
class Prepared:
    loaded: LoadedModel
    build: compiler.Build
    signature: Signature
    runner: BatchRunner
    gather: Gather | None = None  # how the batcher assembles a batch (None: concatenate on the CPU)
    depth: int = 1  # batches in flight (2 on CUDA: the next one is gathered while the GPU runs one)
    lead: Callable[[int], float] | None = None  # input bytes -> seconds to the device on the copy stream


def complete_signature(sig: Signature, eager: torch.nn.Module, device: str) -> Signature:
    """Fill in outputs the MLflow signature lacks (names output__i), from one eager run."""
    from runtime.serving.compile.base import call_module
    from runtime.serving.compile.inductor import example_inputs

    outs = call_module(eager)(example_inputs(sig, 1, device))
    if len(sig.outputs) == len(outs):
        return sig
    specs = tuple(
        TensorSpec(
            f"output__{i}",
            datatypes.from_torch(o.dtype),
            ((-1,) if sig.batched else ()) + tuple(o.shape[1:]) if sig.batched else tuple(o.shape),
        )
        for i, o in enumerate(outs)
    )
    return replace(sig, outputs=specs)


def prepare(cfg: ServeConfig, loader: Callable[[], LoadedModel] | None = None) -> Prepared:
    """Load, pick the backend, compile or load from the cache, verify (BackendUnavailable, ModelLoadError)."""
    hw = detect_hardware()
    compiler.select_backend(cfg.backend, hw)  # fail fast, before any download, when the backend is missing
    if loader is not None:  # an in-memory model (benchmarks, embedding)
        loaded = loader()
    else:
        loaded = load_model(cfg.model_uri, model_name=cfg.model_name, inputs=cfg.inputs, outputs=cfg.outputs)
    b = compiler.build(
        loaded.module,
        loaded.signature,
        hw=hw,
        requested=cfg.backend,
        mode=cfg.mode,
        warmup_batch_sizes=cfg.warmup_batch_sizes,
        max_batch_size=cfg.max_batch_size,
        cache_dir=cfg.cache_dir,
        model_name=loaded.name,
        identity=f"{loaded.identity}|v{loaded.version}",
        precision=cfg.precision,
        strict=cfg.strict,
    )
    sig = complete_signature(loaded.signature, b.eager, b.device)
    run, device = b.compiled.run, b.device
    if device.startswith("cuda"):
        stream = torch.cuda.Stream(device) if cfg.copy_stream else None  # type: ignore[no-untyped-call]
        lead = None
        if stream is not None:
            per_byte = h2d_seconds_per_byte(device)
            log.info("host to device copies", extra={"gb_per_s": round(1e-9 / per_byte, 1)})
            lead = lambda nbytes: nbytes * per_byte  # noqa: E731
        return Prepared(
            loaded,
            b,
            sig,
            cuda_runner(run, device, stream),
            pinned_gather(device, stream),
            PIPELINE_DEPTH,
            lead,
        )

    def runner(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if device != "cpu":
            xs = [x.to(device) for x in xs]
        outs = run(xs)
        return tuple(o.to("cpu") for o in outs) if device != "cpu" else tuple(o.clone() for o in outs)

    return Prepared(loaded, b, sig, runner)


def h2d_seconds_per_byte(device: str, nbytes: int = 16 << 20) -> float:
    """Seconds per byte of a non-blocking copy from page-locked memory to `device` (measured: an H200's
    host link took 41 GB/s from the protocol workers' registered arenas, as from torch's pinned memory)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # the first one pays for the mappings
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3 / (4 * nbytes)


def event_loop_kind(kind: str) -> str:
    """The event loop `kind` (--event-loop) means: auto is uvloop's when the package is installed (the serving
    extra installs it; an explicit uvloop is checked for when the flag is parsed), else asyncio's."""
    if kind == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return kind


def run_event_loop(main: Coroutine[Any, Any, None], kind: str) -> None:
    """Run `main` on the event loop `kind` names (--event-loop, event_loop_kind): asyncio's own, or uvloop's
    (libuv's: on a lent GPU host 17 % less worker CPU per gRPC request and 10 % more rows/s at 128 clients,
    batch-1 latency the same; docs/benchmarks.md)."""
    if event_loop_kind(kind) == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def event_loop_name() -> str:
    """The running event loop's package, as the logs name it: asyncio or uvloop."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def freeze_heap(process: str) -> None:
    """Put everything alive now (torch, the model, its compiled graphs: most of the heap) out of the cyclic
    garbage collector's reach, once a process is ready to serve. Otherwise every full collection walks it all:
    on this 2-core machine each took 30-330 ms, growing as the heap did, and the one that came under load
    stalled every in-flight request (MLP server, concurrency 64: p99 305 ms against 41 ms at p90)."""
    gc.collect()
    gc.freeze()
    log.info("heap frozen", extra={"who": process, "objects": gc.get_freeze_count()})


def cuda_runner(run: Runner, device: str, copy_stream: torch.cuda.Stream | None = None) -> BatchRunner:
    """Launch a batch without waiting for it: inputs (page-locked, see pinned_gather) go to the GPU and the
    outputs come back into page-locked memory with non-blocking copies on the current stream, then an event
    marks the end. The batcher's finishing thread waits on the event (without the GIL) while its own thread
    launches the next batch. Stream order makes this safe with CUDA graphs, whose outputs the next replay
    overwrites: the copy out is queued before it. With a copy stream (pinned_gather's) the batch's work
    first waits for the copies queued there so far: its own inputs', not the next batch's, which the batcher
    thread gathers only after this launch."""

    def launch(xs: list[torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        if copy_stream is not None:
            torch.cuda.current_stream(device).wait_stream(copy_stream)
        # pinned_gather's batches are there already: each torch call lets go of the GIL, so none for nothing
        xs = [x if x.is_cuda else x.to(device, non_blocking=True) for x in xs]
        outs = run(xs)
        host = tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs)
        for h, o in zip(host, outs, strict=True):
            h.copy_(o, non_blocking=True)
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record()

        def wait() -> tuple[torch.Tensor, ...]:
            done.synchronize()
            return host

        return wait

    return launch


def pinned_gather(device: str, copy_stream: torch.cuda.Stream | None = None) -> Gather:
    """Assemble a batch on the device without synchronous copies from pageable memory.

    Large rows that already lie in page-locked memory (protocol workers' shared-memory arenas, which the hub
    registers with CUDA: pagelock), and a batch of one request's rows whatever their size, go to the device
    by DMA with no CPU copy, the batch's copies in one call of the CUDA driver's that keeps the GIL
    (cudadriver). torch's calls let go of the GIL and take it back, and this thread is the one every batch
    waits for: with a call per row (and `is_pinned()`, a driver call, per row) it spent half its time
    waiting to get the GIL back from the threads that read requests and answer batches (H200, 602 KB rows,
    13,000 rows/s); torch's `_foreach_copy_`, one call for the batch, still took ~0.3 ms of ~0.6 for
    launching a batch of 21 rows, the driver's batch call 0.05. Anything else is concatenated into a
    page-locked buffer whose copy to the device does not wait. The buffer comes from torch's caching host
    allocator, which reuses a block only after the copies queued from it have run: with batches in flight, a
    buffer still waiting for its copy is never overwritten.

    With `copy_stream` the copies go on that stream, so the next batch's inputs travel to the GPU while the
    compute stream still runs the batch before (cuda_runner makes each batch wait for its own copies). On the
    compute stream alone they queue behind it: ResNet-50 moves 602 KB per row, ~12 MB for a batch of 20, a
    fifth to a third of that batch's compute time on an H200's host link. The batch tensors are then marked
    as used by the compute stream, so the caching allocator reuses their memory only once it is done."""

    def gather(parts: list[list[torch.Tensor]], padded_rows: int) -> list[torch.Tensor]:
        if copy_stream is None:
            return assemble(parts, padded_rows)
        # no wait for the compute stream: the copies read page-locked memory that stays untouched until the
        # batch is answered and write fresh blocks of the copy stream's pool
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(copy_stream):
            out = assemble(parts, padded_rows)
        for t in out:
            t.record_stream(compute)
        return out

    driver = cudadriver.load()

    def driver_copy(batch: torch.Tensor, rows: list[torch.Tensor]) -> bool:
        """Copy `rows` into the start of `batch` through the CUDA driver, on the current stream, holding the
        GIL (True), or leave it to torch (False: no driver, or it failed once, logged; or a row is not
        contiguous, which the driver's byte copies would scramble)."""
        nonlocal driver
        if driver is None or not all(t.is_contiguous() for t in rows):
            return False
        try:
            driver.copy_rows(batch.data_ptr(), rows, torch.cuda.current_stream(device).cuda_stream)
            return True
        except RuntimeError as e:
            log.warning("CUDA driver copies failed; torch's from now on", extra={"error": str(e)})
            driver = None
            return False

    def assemble(parts: list[list[torch.Tensor]], padded_rows: int) -> list[torch.Tensor]:
        out = []
        for ts in parts:
            shape = (padded_rows, *ts[0].shape[1:])
            sizes = [t.shape[0] for t in ts]
            rows = sum(sizes)
            # one request's rows: one copy either way, so straight from its slot (BERT's 1 KB ids at batch 1)
            direct = len(ts) == 1 or ts[0].nbytes >= DIRECT_COPY_ROW_BYTES * sizes[0]
            if direct and all(map(pagelock.holds, ts)):
                batch = torch.empty(shape, dtype=ts[0].dtype, device=device)
                if not driver_copy(batch, ts):
                    # one call for the batch's copies: no Python, and no GIL hand-over, between them
                    torch._foreach_copy_(batch[:rows].split_with_sizes(sizes), ts, non_blocking=True)
                if padded_rows > rows:
                    batch[rows:].zero_()
                out.append(batch)
                continue
            staged = torch.empty(shape, dtype=ts[0].dtype, pin_memory=True)
            torch.cat(ts, out=staged[:rows])
            if padded_rows > rows:
                staged[rows:].zero_()
            out.append(staged.to(device, non_blocking=True))
        return out

    return gather


def _set_threads(n: int) -> None:
    """Leave a core to the event loop: with every core in an OpenMP team, its barriers wait on threads the
    event loop has descheduled, and a CPU batch runs many times slower (measured 10x on 2 cores). The cores
    are the CPUs allowed (affinity, a pod's CPU limit), not the node's: torch's default counts the node's."""
    n = n or max(1, math.ceil(cpus_allowed()) - 1)
    torch.set_num_threads(n)
    log.info("torch threads", extra={"intra_op_threads": n})


def build_info(b: compiler.Build) -> dict[str, Any]:
    c = b.compiled
    return {
        "backend": c.backend,
        "requested_backend": b.requested,
        "selection_reason": b.reason,
        "mode": c.mode,
        "compile_path": c.path,
        "device": b.device,
        "hardware": b.hardware,
        "cache_hit": c.cache_hit,
        "cache_key": b.cache_key,
        "fallbacks": c.fallbacks,
        "compile_seconds": round(b.compile_seconds, 3),
        "verified_max_rel_error": b.max_rel_error,
        "torch": torch.__version__,
    }


class Server:
    def __init__(self, cfg: ServeConfig, loader: Callable[[], LoadedModel] | None = None) -> None:
        self._own_registry = cfg.allow_client_shm and not cfg.shm_registry
        if self._own_registry:
            from runtime.serving.protocol.sharedmem import create_registry

            cfg = replace(cfg, shm_registry=create_registry())
        self.cfg = cfg
        self.loader = loader
        self.metrics = Metrics()
        self.repo = Repository([])
        self.draining = False
        self.error: BaseException | None = None  # why the model failed to load or a vital thread failed
        self._loop: asyncio.AbstractEventLoop | None = None  # run's
        self.http_port = cfg.http_port
        self.grpc_port = cfg.grpc_port
        self._stop = asyncio.Event()
        self._pending: tuple[Batcher, dict[str, Prepared]] | None = None
        self._hub: Any = None  # runtime.serving.hub.Hub when protocol workers serve

    @property
    def failed(self) -> str | None:
        """Why the model failed to load, when it did (the repository's, which infer answers with)."""
        return self.repo.failed

    def is_ready(self) -> bool:
        return not self.draining and bool(self.repo.models) and self.repo.ready

    def server_info(self) -> dict[str, Any]:
        models = {n: {"version": m.version, "ready": m.ready, **m.info} for n, m in self.repo.models.items()}
        state = (
            "failed"
            if self.failed
            else "draining"
            if self.draining
            else "ready"
            if self.is_ready()
            else "loading"
        )
        return {
            "name": "kubeforge",
            "version": VERSION,
            "extensions": EXTENSIONS + ["system_shared_memory"] * self.cfg.allow_client_shm,
            "kubeforge": {"state": state, "error": self.failed, "models": models},
        }

    def _start_model(self) -> None:
        """Load the model on its batcher thread (call from the event loop that serves)."""
        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        holder: dict[str, Prepared] = {}

        def setup() -> BatchRunner:
            # runs in the model's worker thread: torch's intra-op thread count is per calling thread
            _set_threads(cfg.torch_threads)
            p = prepare(cfg, self.loader)
            if p.build.device != "cpu":
                if not cfg.torch_threads:
                    _set_threads(min(ACCELERATOR_THREADS, torch.get_num_threads()))
                # Every torch call gives up the GIL and takes it back; when another thread is busy in Python
                # the batcher thread then waits up to the switch interval (5 ms by default) at each of them.
                # H200, BERT, 8 workers, concurrency 64: 1 ms 7,404 rows/s, 0.2 ms 6,731. On the CPU the
                # default did better (MLP, 2 cores, concurrency 1: 770-855 vs 651-725 requests/s).
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            holder["p"] = p
            sig = p.signature
            batcher.configure(
                name=p.loaded.name,
                batched=sig.batched,
                max_batch_size=cfg.max_batch_size,
                batch_buckets=p.build.compiled.batch_buckets,
                variable_dims=[[j for j, d in enumerate(s.shape) if d == -1 and j > 0] for s in sig.inputs],
                pad_multiple=cfg.pad_multiple,
                observer=self.metrics.observer(p.loaded.name),
                idle=self.metrics.idle(p.loaded.name),
                gather=p.gather,
                depth=p.depth,
                dropped=lambda n, why: self.metrics.dropped.labels(p.loaded.name, why).inc(n),
                lead=p.lead,
            )
            return p.runner

        batcher = Batcher(
            setup=setup,
            name=cfg.model_name or "model",
            max_batch_size=cfg.max_batch_size,
            max_delay_s=cfg.max_delay_ms / 1000,
            max_queue_size=cfg.max_queue_size,
            queue_timeout_s=cfg.queue_timeout_ms / 1000,
            lifo_after_s=cfg.lifo_after_ms / 1000,
            priority_levels=cfg.priority_levels,
            default_priority=cfg.default_priority_level,
            launch_deviations=cfg.launch_deviations,
        )
        batcher.on_failure = self._thread_failed
        self._pending = (batcher, holder)

    def _thread_failed(self, e: BaseException) -> None:
        """A thread the server cannot serve without failed (the batcher's, its finishing thread, one of the
        protocol worker hub's; a bug of ours, logged there), told from that thread: drain, then exit with the
        error (the CLI raises it), so that the pod restarts rather than stay up answering nothing."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped already
            self._loop.call_soon_threadsafe(self._stop_failed, e)

    def _stop_failed(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.request_stop("a thread failed")

    async def _await_model(self) -> None:
        assert self._pending is not None
        batcher, holder = self._pending
        await asyncio.get_running_loop().run_in_executor(None, batcher.ready.wait)
        if batcher.error is not None:  # its traceback is logged where it happened, in the batcher's setup
            self._model_failed(batcher.error, "model failed to load")
            return
        try:
            self._serve_model(batcher, holder["p"])
        except Exception as e:  # a bug of ours: say so, and never report ready on a half-set-up model
            self._model_failed(e, "model failed to start after loading", trace=True)

    def _model_failed(self, e: BaseException, what: str, *, trace: bool = False) -> None:
        self.repo.models = {}
        self.error = e
        self.repo.failed = f"{type(e).__name__}: {e}"
        log.error(
            f"{what}; the server stays live but never ready",
            extra={"error": self.failed},
            exc_info=e if trace else None,
        )
        self._changed()

    def _serve_model(self, batcher: Batcher, p: Prepared) -> None:
        name = p.loaded.name
        info = build_info(p.build)
        model = ServedModel(
            name, p.loaded.version, p.signature, batcher, batcher.max_batch_size, info=info, ready=True
        )
        self.repo.models = {name: model}
        m = self.metrics
        m.compile_seconds.labels(name, info["backend"]).set(info["compile_seconds"])
        m.backend_info.labels(
            name,
            info["requested_backend"],
            info["backend"],
            info["mode"],
            info["compile_path"],
            info["device"],
            info["hardware"],
            str(info["cache_hit"]).lower(),
            " | ".join(info["fallbacks"]) or "none",
        ).set(1)
        for fb in info["fallbacks"]:
            m.fallbacks.labels(name, info["backend"], fb.split(":")[0]).inc()
        m.queue_depth.labels(name).set_function(lambda: batcher.queued)
        freeze_heap("model")
        m.ready.set(1)
        self._changed()
        log.info(
            "ready",
            extra={
                "model": name,
                "version": p.loaded.version,
                "seconds_since_start": round(time.time() - self.cfg.started, 3),
                **info,
            },
        )

    def worker_count(self) -> int:
        """Protocol worker processes: as configured, else none on a CPU-only machine (the cores run the
        model) and half the CPUs allowed (affinity, a pod's CPU limit), at most 8, next to an accelerator."""
        if self.cfg.workers is not None:
            return self.cfg.workers
        if self._family == "cpu":
            return 0
        return min(8, max(1, int(cpus_allowed()) // 2))

    @cached_property
    def _family(self) -> str:
        """The hardware's best family (detect_hardware), probed once for the start-up's choices."""
        return detect_hardware().family

    def worker_state(self) -> dict[str, Any]:
        """What protocol workers need to answer health, metadata and readiness themselves."""
        m = next(iter(self.repo.models.values()), None)
        model = None
        if m is not None:
            model = {
                "name": m.name,
                "version": m.version,
                "inputs": [s.to_json() for s in m.signature.inputs],
                "outputs": [s.to_json() for s in m.signature.outputs],
                "max_batch_size": m.max_batch_size,
                "info": m.info,
                "ready": m.ready,
            }
        return {"ready": self.is_ready(), "info": self.server_info(), "model": model, "log": log_settings()}

    def set_log(self, changes: object) -> dict[str, Any]:
        """Triton's log settings changed (BadRequest naming the setting): here, and in every protocol worker
        with the state it gets before the answer."""
        try:
            settings = checked_log_settings(changes)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        apply_log_settings(settings)
        log.warning("log settings changed", extra={"settings": settings})  # seen whatever they let through
        self._changed()
        return settings

    async def _set_log(self, changes: object) -> dict[str, Any]:
        return self.set_log(changes)

    def _changed(self) -> None:
        if self._hub is not None:
            self._hub.push_state()

    async def run(self) -> None:
        cfg = self.cfg
        self._start_model()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        workers = self.worker_count()
        stop_listeners = await (self._listen_workers(workers) if workers else self._listen_here())
        log.info(
            "listening",
            extra={
                "http_port": self.http_port,
                "grpc_port": self.grpc_port,
                "host": cfg.host,
                "workers": workers,
                "event_loop": event_loop_name(),
            },
        )
        model_task = asyncio.create_task(self._await_model())
        await self._stop.wait()
        # drain: readiness already 503; keep serving for drain_delay_s so load balancers notice, then stop
        # accepting and let in-flight requests finish (up to grace_s)
        t0 = time.perf_counter()
        await asyncio.sleep(cfg.drain_delay_s)
        await stop_listeners()
        if self._pending is not None:
            await loop.run_in_executor(None, self._pending[0].close, cfg.grace_s)
        model_task.cancel()
        if self._own_registry:
            from runtime.serving.protocol.sharedmem import remove_registry

            remove_registry(self.cfg.shm_registry)
        log.info("stopped", extra={"drain_seconds": round(time.perf_counter() - t0, 3)})

    async def _listen_here(self) -> Callable[[], Awaitable[None]]:
        """REST and gRPC on this process's event loop."""
        self.http_port, self.grpc_port, stop = await start_protocol(
            self.cfg, self.repo, self.metrics, self.server_info, self.is_ready, set_log=self._set_log
        )
        return stop

    async def _listen_workers(self, n: int) -> Callable[[], Awaitable[None]]:
        """REST and gRPC in `n` protocol worker processes sharing the ports (runtime.serving.hub)."""
        from runtime.serving.hub import Hub

        assert self._pending is not None
        asked = self.cfg.busy_poll_us  # None: auto, which asks what the hardware is
        accelerator = asked is None and self.cfg.backend != "cpu" and self._family != "cpu"
        budget, why = busypoll.resolve(asked, n, accelerator)
        log.info("polling before sleeping", extra={"busy_poll_us": budget, "why": why})
        hub = Hub(
            workers=n,
            cfg=replace(self.cfg, busy_poll_us=budget),
            batcher=self._pending[0],
            metrics=self.metrics,
            state=self.worker_state,
            set_log=self.set_log,
            failed=self._thread_failed,
        )
        self._hub = hub
        self.http_port, self.grpc_port = hub.cfg.http_port, hub.cfg.grpc_port
        loop = asyncio.get_running_loop()
        hub.start()
        await loop.run_in_executor(None, hub.wait_started, 120.0)

        async def stop() -> None:
            await loop.run_in_executor(None, hub.stop)

        return stop

    def request_stop(self, why: str = "stop") -> None:
        if not self.draining:
            log.info("draining", extra={"signal": why})
        self.draining = True
        self.metrics.ready.set(0)
        self._changed()
        self._stop.set()


DEALT_HTTP, DEALT_GRPC = b"h", b"g"  # what hub.Hub sends with a connection it deals: which server takes it


def _take_dealt(
    channel: socket.socket,
    servers: dict[bytes, Listener],
    adopting: set[asyncio.Task[None]],
    on_close: Callable[[], object] | None,
) -> None:
    """Serve the connections the model process dealt this worker (one per message on `channel`)."""
    while True:
        try:
            kind, fds = ipc.recv_fd(channel)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            kind, fds = b"", []
        if not kind and not fds:  # the model process is gone (the worker's link says so and stops it)
            asyncio.get_running_loop().remove_reader(channel.fileno())
            return
        for fd in fds:
            conn = socket.socket(fileno=fd)
            server = servers.get(kind)
            if server is None or server.stopping:
                conn.close()
                if on_close is not None:
                    on_close()  # dealt and ended: the model process counts it out
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(server.adopt(conn))
            adopting.add(task)  # held until done (the loop keeps only weak references to tasks)
            task.add_done_callback(adopting.discard)


async def start_protocol(
    cfg: ServeConfig,
    repo: Repository,
    metrics: Metrics,
    server_info: Callable[[], dict[str, Any]],
    is_ready: Callable[[], bool],
    *,
    sock: socket.socket | None = None,
    render_metrics: Callable[[], Awaitable[bytes]] | None = None,
    set_log: Callable[[object], Awaitable[dict[str, Any]]] | None = None,
    slot_body: SlotBody | None = None,
    dealt: socket.socket | None = None,
    on_close: Callable[[], object] | None = None,
    process: str = "model",
) -> tuple[int, int, Callable[[], Awaitable[None]]]:
    """Start the REST (protocol.http1) and gRPC servers over `repo` on cfg's host and ports; with `sock` (a
    protocol worker), REST on that listening socket and gRPC with SO_REUSEPORT, sharing the ports with the
    other workers; with `dealt` (a protocol worker, `--balance least-connections`), neither listens: the
    model process deals the connections through that Unix socket (hub.Hub), and `on_close` hears of each
    that ends. Returns the HTTP and gRPC ports and the coroutine function that stops both (in-flight
    requests finish, up to cfg.grace_s)."""
    import grpc

    from runtime.serving.protocol.grpc_service import InferenceService, add_to_server
    from runtime.serving.protocol.http1 import Budget, HttpServer
    from runtime.serving.protocol.rest import RestApp
    from runtime.serving.protocol.triton import Extensions, dynamic_batching

    batching = dynamic_batching(
        cfg.max_delay_ms,
        cfg.max_queue_size,
        cfg.queue_timeout_ms,
        cfg.priority_levels,
        cfg.default_priority_level,
    )
    # one per process, HTTP/1.1 and gRPC together
    refused = metrics.inflight_refused
    budget = Budget(cfg.max_inflight_bytes or 4 * cfg.max_payload_bytes, lambda p: refused.labels(p).inc())
    shm = None
    if cfg.allow_client_shm:
        from runtime.serving.protocol.sharedmem import SharedMemory

        def lend(n: int) -> Body | None:  # a slot for inputs as large as REST bodies that get one
            return slot_body(n, 0) if slot_body is not None and n >= SLOT_BODY_MIN else None

        assert cfg.shm_registry, "Server makes the registry the server's processes share"
        shm = SharedMemory(
            cfg.shm_registry,
            max_payload=cfg.max_payload_bytes,
            budget=budget,
            lend=lend if slot_body is not None else None,
        )
    triton = Extensions(
        repo, metrics, batching, render_metrics, shm, set_log=set_log, allow_log=cfg.allow_log_settings
    )
    app = RestApp(
        repo,
        metrics,
        server_info,
        is_ready=is_ready,
        render_metrics=render_metrics,
        slot_body=slot_body,
        triton=triton,
        max_payload=cfg.max_payload_bytes,
        budget=budget,
    )
    http = HttpServer(app, max_payload=cfg.max_payload_bytes, budget=budget)
    http.on_close = on_close
    metrics.connections.labels("http", process).set_function(lambda: len(http.connections))
    service = InferenceService(repo, metrics, server_info, is_ready, triton)
    stop_grpc: Callable[[], Awaitable[Any]]
    servers: dict[bytes, Listener] = {DEALT_HTTP: http}
    if cfg.grpc_server == "native":
        from runtime.serving.frontend import listen_socket
        from runtime.serving.protocol.grpc_service import (
            MODEL_INFER,
            MODEL_STREAM_INFER,
            infer_buffer,
            native_handlers,
            native_stream_handlers,
        )
        from runtime.serving.protocol.http2 import GrpcServer

        slots = infer_buffer(slot_body) if slot_body is not None else None
        native = GrpcServer(
            native_handlers(service),
            stream_handlers=native_stream_handlers(service),
            max_message=cfg.max_payload_bytes,
            buffers={MODEL_INFER: slots, MODEL_STREAM_INFER: slots} if slots is not None else None,
            budget=budget,
        )
        native.on_close = on_close
        metrics.connections.labels("grpc", process).set_function(lambda: len(native.connections))
        if dealt is None:
            grpc_port = await native.start(listen_socket(cfg.host, cfg.grpc_port, listen=True))
        else:
            native.start_sweeping()
            grpc_port, servers[DEALT_GRPC] = cfg.grpc_port, native
        stop_grpc = partial(native.stop, cfg.grace_s)
    else:
        opts = [
            ("grpc.max_receive_message_length", cfg.max_payload_bytes),
            ("grpc.max_send_message_length", max(cfg.max_payload_bytes, 64 << 20)),
            ("grpc.so_reuseport", int(sock is not None)),
        ]
        grpc_server = grpc.aio.server(options=opts)
        add_to_server(service, grpc_server)
        grpc_port = grpc_server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
        await grpc_server.start()
        stop_grpc = partial(grpc_server.stop, cfg.grace_s)
    loop = asyncio.get_running_loop()
    if dealt is None:
        http_port = await http.start(cfg.host, cfg.http_port, sock)
    else:
        http.start_sweeping()
        http_port = cfg.http_port
        adopting: set[asyncio.Task[None]] = set()
        loop.add_reader(dealt.fileno(), _take_dealt, dealt, servers, adopting, on_close)

    async def stop() -> None:
        if dealt is not None:
            loop.remove_reader(dealt.fileno())
        await asyncio.gather(http.stop(cfg.grace_s), stop_grpc(), return_exceptions=True)
        if shm is not None:
            shm.close()  # this process's descriptors

    return http_port, grpc_port, stop
