"""A protocol worker: one of several processes that serve the REST and gRPC connections of the server's
ports, decode requests, and hand the tensors to the one model process through shared memory
(runtime.serving.ipc). The model process accepts the connections and deals each to the worker holding the
fewest (`--balance least-connections`, through a Unix socket: runtime.serving.hub); or every worker listens
on the ports itself (`--balance kernel`, SO_REUSEPORT: the kernel spreads connections over them by a hash).
It keeps no model: health, readiness and metadata come from the state the model process pushes; /metrics is
merged by the model process from every process's own metrics.

Workers ignore SIGTERM/SIGINT: the model process owns shutdown. It tells every worker to stop (STOP), the
worker stops accepting, finishes its in-flight requests (the model process keeps batching until all workers
are gone) and exits. A worker whose model process disappears exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

import torch

from runtime.serving import errors, ipc
from runtime.serving.busypoll import LoopPoller
from runtime.serving.config import ServeConfig
from runtime.serving.errors import InferError, ModelFailure, Unavailable
from runtime.serving.logs import apply_log_settings
from runtime.serving.metrics import Metrics
from runtime.serving.model import Repository, ServedModel
from runtime.serving.server import event_loop_name, freeze_heap, run_event_loop, start_protocol
from runtime.serving.signature import Signature, TensorSpec

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[InferError]] = {
    c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, InferError)
}


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    socket_path: str  # the model process's Unix socket
    arena_path: str
    slots: int
    slot_bytes: int
    serve: ServeConfig  # the server's, with the ports the model process holds
    log_json: bool = True
    dealt: socket.socket | None = None  # where the model process deals client connections; None: listen


def listen_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    """A TCP socket with SO_REUSEPORT bound to host:port; listening or only holding the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only when proto says TCP
    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    if listen:
        s.listen(2048)
        s.setblocking(False)
    return s


class RemoteBatcher:
    """The batcher interface the protocol layer uses; announcements land in the arena's counter."""

    def __init__(self, arena: ipc.Arena) -> None:
        self._counters = arena.counters

    def announce(self) -> None:
        self._counters[ipc.ANNOUNCED] += 1

    def withdraw(self) -> None:
        if self._counters[ipc.ANNOUNCED] > 0:
            self._counters[ipc.ANNOUNCED] -= 1


class RemoteModel(ServedModel):
    """A ServedModel whose batches run in the model process."""

    worker: Worker

    async def _run(
        self, inputs: list[torch.Tensor], rows: int, deadline: float, priority: int
    ) -> tuple[torch.Tensor, ...]:
        return await self.worker.infer(inputs, rows, deadline, priority)


class _Link(asyncio.Protocol):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.reader = ipc.FrameReader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances

    def data_received(self, data: bytes) -> None:
        self.worker.poll()  # answers: the clients' next requests come soon
        for kind, payload in self.reader.feed(data):
            self.worker.on_message(kind, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.on_hub_lost()


@dataclass(eq=False)
class SlotBody:
    """A request body read into a slot of the worker's arena (runtime.serving.protocol.http1.Body)."""

    worker: Worker
    offset: int
    view: memoryview

    def release(self) -> None:
        self.worker.release_slot(self)


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.arena = ipc.Arena(cfg.arena_path, cfg.slots, cfg.slot_bytes, create=False)
        self.batcher = RemoteBatcher(self.arena)
        self.metrics = Metrics()
        self._hop = self.metrics.hop_time.labels("to_worker")
        placements = ("in_place", "copied", "inline")
        self._placement = {k: self.metrics.input_placement.labels(k) for k in placements}
        self.repo = Repository([])
        self.state: dict[str, Any] = {"ready": False, "info": {}}
        self.stopping = False
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], int | None]] = {}
        # answers awaited from the model process (METRICS_RESP, LOG_RESP), by request id
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._stop = asyncio.Event()
        self._hub_lost = False
        self.link: _Link | None = None
        self._outbox: list[bytes] = []  # requests for the model process, sent once per loop turn
        self.poller = LoopPoller(
            (cfg.serve.busy_poll_us or 0.0) / 1e6, self.metrics.busy_poll.labels(str(cfg.index)).inc
        )
        # slots holding request bodies being read or decoded, by offset: the body that holds each. A slot
        # handed to the model process with its request leaves this map; back in the arena once answered, it
        # may be lent to a new body before the first body's HTTP layer lets go of it, which then frees nothing
        self._lent: dict[int, SlotBody] = {}

    # -- what the protocol layer calls --
    def is_ready(self) -> bool:
        return bool(self.state.get("ready")) and not self.stopping

    def server_info(self) -> dict[str, Any]:
        info = dict(self.state.get("info") or {})
        if self.stopping and "kubeforge" in info:
            info["kubeforge"] = {**info["kubeforge"], "state": "draining"}
        return info

    async def infer(
        self, inputs: list[torch.Tensor], rows: int, deadline: float = math.inf, priority: int = 0
    ) -> tuple[torch.Tensor, ...]:
        if not self._hub_there():
            self.batcher.withdraw()
            raise Unavailable("the model process is gone")
        offset = self._slot_holding(inputs)
        if offset is not None:  # the body was read into a slot: the tensors travel where they lie
            del self._lent[offset]
            placed = [ipc.Placed(t, t.data_ptr() - self.arena.address) for t in inputs]
            self._placement["in_place"].inc()
        else:
            offset = self.arena.take(ipc.Arena.slot_need(inputs))
            placed = self.arena.place(inputs, offset)
            self._placement["inline" if offset is None else "copied"].inc()
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = (fut, offset)
        self.batcher.withdraw()  # from here on the request is the model process's to count
        self._post(ipc.encode_request(rid, rows, placed, deadline, priority))
        try:
            return tuple(await fut)
        except asyncio.CancelledError:
            entry = self._pending.get(rid)
            if entry is not None:  # not answered yet
                # the client left: the model process drops the request unless it runs already, and answers
                # either way; the task ends then, so the protocol layer keeps the request's bytes counted
                # while the model process may hold them
                self._post(ipc.frame(ipc.CANCEL, ipc.pack_id(rid)))
                released = loop.create_future()
                self._pending[rid] = (released, entry[1])
                with contextlib.suppress(Exception):  # its answer is nobody's
                    await released
            raise

    def _post(self, message: bytes) -> None:
        """Queue a request for the model process. The requests that arrive in one turn of the event loop
        leave together at its next turn: one write, one wake-up of the model process's reader, instead of
        one per request (a send on the Unix socket was a fifth of a worker's time per request)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        self.poller.arrived(len(out))
        self.poll()  # their answers come next
        if self._hub_there():
            assert self.link is not None and self.link.transport is not None
            self.link.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def poll(self) -> None:
        """Keep the event loop polling for the budget (busypoll), at light load: at most one request of this
        worker's in the model process, and requests not coming faster than busypoll.MIN_GAP_S apart (the
        poller's pace)."""
        if len(self._pending) <= 1:
            self.poller.kick()

    def slot_body(self, length: int, header_len: int) -> SlotBody | None:
        """A free slot to read a request body of `length` bytes into (the kernel writes it to shared memory
        and nothing copies it again), placed so that the binary data after the JSON header of `header_len`
        bytes starts 64-byte aligned. None when no slot is free or the body does not fit."""
        pad = (-header_len) % 64
        offset = self.arena.take(length + pad)
        if offset is None:
            return None
        start = offset + pad
        body = self._lent[offset] = SlotBody(self, offset, self.arena.buf[start : start + length])
        return body

    def release_slot(self, body: SlotBody) -> None:
        if self._lent.get(body.offset) is body:  # not handed to the model process with its request
            del self._lent[body.offset]
            self.arena.give(body.offset)

    def _slot_holding(self, inputs: list[torch.Tensor]) -> int | None:
        """The lent slot that holds every one of `inputs` (each at its dtype's alignment), or None."""
        arena = self.arena
        slots = set()
        for t in inputs:
            at = t.data_ptr() - arena.address
            if not (ipc.HEADER_BYTES <= at < arena.size) or at % t.element_size():
                return None
            slots.add(ipc.HEADER_BYTES + (at - ipc.HEADER_BYTES) // arena.slot_bytes * arena.slot_bytes)
        if len(slots) != 1:
            return None
        (offset,) = slots
        return offset if offset in self._lent else None

    def _hub_there(self) -> bool:
        return not self._hub_lost and self.link is not None and self.link.transport is not None

    async def _ask(self, kind: int, body: bytes = b"") -> bytes:
        """Send the model process a request of `kind` and wait (10 s at most) for its answer's bytes."""
        assert self.link is not None and self.link.transport is not None
        rid = next(self._ids)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self.link.transport.write(ipc.frame(kind, ipc.pack_id(rid, body)))
        try:
            return await asyncio.wait_for(fut, 10)
        finally:
            self._waiters.pop(rid, None)

    async def set_log(self, changes: object) -> dict[str, Any]:
        """Triton's log settings changed by the model process, which hands them to every worker with its
        state (this one's before the answer): InferError when it refuses them."""
        if not self._hub_there():
            raise Unavailable("the model process is gone")
        reply = json.loads(await self._ask(ipc.LOG_REQ, json.dumps(changes).encode()))
        if "error" in reply:
            raise _ERRORS.get(reply.get("kind", ""), ModelFailure)(reply["error"])
        return dict(reply["settings"])

    async def render_metrics(self) -> bytes:
        if not self._hub_there():
            return self.metrics.render()
        return await self._ask(ipc.METRICS_REQ)

    # -- what the model process says --
    def on_message(self, kind: int, payload: bytearray) -> None:
        if kind == ipc.ROWS:
            self._hop.observe(time.monotonic() - ipc.sent_at(kind, payload))
            for rid, outputs in ipc.decode_rows(memoryview(payload)):
                self._answered(rid, outputs)
        elif kind == ipc.RESP:
            self._answered(*ipc.decode_response(memoryview(payload)))
        elif kind == ipc.STATE:
            self._apply_state(json.loads(payload))
        elif kind == ipc.METRICS_PULL:
            rid, _ = ipc.unpack_id(memoryview(payload))
            assert self.link is not None and self.link.transport is not None
            self.link.transport.write(ipc.frame(ipc.METRICS_TEXT, ipc.pack_id(rid, self.metrics.render())))
        elif kind in (ipc.METRICS_RESP, ipc.LOG_RESP):  # the answer to an _ask
            rid, text = ipc.unpack_id(memoryview(payload))
            waiter = self._waiters.get(rid)
            if waiter is not None and not waiter.done():
                waiter.set_result(text)
        elif kind == ipc.STOP:
            self.stopping = True
            self._stop.set()

    def _answered(self, rid: int, result: list[torch.Tensor] | tuple[str, str]) -> None:
        fut, offset = self._pending.pop(rid, (None, None))
        if offset is not None:
            self.arena.give(offset)
        if fut is None or fut.done():
            return
        if isinstance(result, tuple):
            kind_name, message = result
            fut.set_exception(_ERRORS.get(kind_name, ModelFailure)(message))
        else:
            fut.set_result(result)

    def on_hub_lost(self) -> None:
        self._hub_lost = True
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(Unavailable("the model process is gone"))
        self._pending.clear()
        if not self.stopping:
            log.error("model process gone; protocol worker exits", extra={"worker": self.cfg.index})
            self.stopping = True
            self._stop.set()

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.state = state
        if "log" in state:
            apply_log_settings(state["log"])
        self.repo.failed = state.get("info", {}).get("kubeforge", {}).get("error")
        m = state.get("model")
        if not m:
            return
        sig = Signature(
            tuple(TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in m["inputs"]),
            tuple(TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in m["outputs"]),
        )
        model = RemoteModel(
            m["name"],
            m["version"],
            sig,
            self.batcher,  # type: ignore[arg-type]
            m["max_batch_size"],
            info=m["info"],
            ready=m["ready"],
        )
        model.worker = self
        self.repo.models = {model.name: model}

    def _connection_closed(self) -> None:
        """One of the client connections ended: the model process deals the next to the worker holding the
        fewest (it counts those it dealt; this counter, in shared memory, those that ended)."""
        self.arena.counters[ipc.CLOSED] += 1

    # -- life --
    async def run(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        _, self.link = await loop.create_unix_connection(lambda: _Link(self), cfg.socket_path)
        sock = None if cfg.dealt else listen_socket(cfg.serve.host, cfg.serve.http_port, listen=True)
        _, _, stop = await start_protocol(
            cfg.serve,
            self.repo,
            self.metrics,
            self.server_info,
            self.is_ready,
            sock=sock,
            render_metrics=self.render_metrics,
            set_log=self.set_log,
            slot_body=self.slot_body if self.arena.slots else None,
            dealt=cfg.dealt,
            on_close=self._connection_closed,
            process=str(cfg.index),
        )
        assert self.link.transport is not None
        self.link.transport.write(ipc.frame(ipc.HELLO, cfg.index.to_bytes(4, "little")))
        freeze_heap(f"protocol worker {cfg.index}")
        log.info("protocol worker serving", extra={"worker": cfg.index, "event_loop": event_loop_name()})
        await self._stop.wait()
        await stop()
        if self.link.transport is not None:
            self.link.transport.close()


def main(cfg: WorkerConfig) -> None:
    """Process entry point (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from runtime.serving.logs import setup_logging

    setup_logging(cfg.serve.log_level, json=cfg.log_json)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_event_loop(Worker(cfg).run(), cfg.serve.event_loop)
