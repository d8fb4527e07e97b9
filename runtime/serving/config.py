"""`ServeConfig`: what `kubeforge-serve` runs with, and every default of its flags. No torch here, so that the
CLI (and its --help) reads its defaults from the one place the server does."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.serving.signature import TensorSpec

LAUNCH_DEVIATIONS = 2.0  # a launch's budget beyond its mean, by default (--launch-deviations)


@dataclass
class ServeConfig:
    model_uri: str
    model_name: str | None = None
    cache_dir: Path | None = None
    backend: str = "auto"
    mode: str = "aot"
    warmup_batch_sizes: tuple[int, ...] = (1, 8)
    precision: str = "fp32"
    strict: bool = False
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    max_queue_size: int = 1024
    queue_timeout_ms: float = 0.0  # the longest a request waits in the queue; 0: no limit
    lifo_after_ms: float = 0.0  # the oldest request's wait past which the newest go first; 0: never
    priority_levels: int = 0  # of Triton's `priority` parameter (batching.Batcher); 0: none
    default_priority_level: int = 0  # of requests that name none; 0: the last level
    pad_multiple: int | None = None
    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 8081
    max_payload_bytes: int = 64 << 20
    max_inflight_bytes: int = 0  # request bytes a process holds at once (http1.Budget); 0: 4 x max payload
    drain_delay_s: float = 0.0
    grace_s: float = 30.0
    torch_threads: int = 0  # intra-op threads; 0: the CPUs allowed but one (CPU), 4 (accelerator)
    copy_stream: bool = True  # CUDA: copy inputs to the GPU on a stream of their own (see pinned_gather)
    launch_deviations: float = LAUNCH_DEVIATIONS  # pipelined: a launch's budget beyond its mean (Batcher)
    grpc_server: str = "native"  # native: protocol.http2; grpcio: grpc.aio
    # of the processes that serve the protocols: asyncio's own, uvloop's, or auto (uvloop's when installed)
    event_loop: str = "auto"
    # poll before sleeping (busypoll): how long a protocol worker, and the batcher thread with no batch in
    # flight, keep polling for the message they expect next; 0: sleep at once; None: auto (busypoll.resolve)
    busy_poll_us: float | None = None
    workers: int | None = None  # protocol worker processes; 0: one event loop in this process; None: auto
    # how client connections reach 2+ protocol workers: least-connections (the model process accepts them and
    # deals each to the worker holding the fewest, see hub.Hub) or kernel (SO_REUSEPORT: a hash of the
    # client's address and port picks the worker)
    balance: str = "least-connections"
    # Triton's system shared memory extension (protocol.sharedmem): off unless asked for; the registry
    # directory every process of the server shares (made by Server when empty)
    allow_client_shm: bool = False
    allow_log_settings: bool = False  # Triton's POST v2/logging / LogSettings may change the log settings
    shm_registry: str = ""
    log_level: str = "info"
    started: float = field(default_factory=time.time)
