"""Dynamic batching: one bounded queue and one worker thread per model.

Requests with the same per-row shapes and datatypes (a *bucket*) are stacked along the batch dimension, up to
`max_batch_size` rows. A request waits at most `max_delay` for others to join, and only while more requests
are
known to be on their way (announced by the protocol layer and not yet queued): at concurrency 1 nothing waits,
under load batches fill while the previous one runs. The queue is bounded: past `max_queue_size` queued
requests `submit` raises QueueFull (HTTP 429 / gRPC RESOURCE_EXHAUSTED), so memory stays bounded.

Deadlines and overload: a request may carry its client's deadline (Triton's `timeout` parameter, gRPC's
grpc-timeout), and the batcher may have a queue timeout. Each batch formation drops, unrun, every queued
request that waited past the queue timeout, or whose deadline would pass before a batch started now is
answered (twice a running estimate of the seconds from launch to answers); they get DeadlineExceeded (504 /
DEADLINE_EXCEEDED). With `lifo_after_s`, once the oldest queued request has waited that long (overload: the
queue grows faster than batches drain it), batches form from the newest requests first, whose clients are
most likely still waiting; the oldest wait until the queue drains, their clients leave or they expire.

Priorities (Triton's `priority` parameter; `priority_levels` > 0): level 1 is the most urgent. A batch is the
most urgent oldest request and those with its shapes, taken most urgent first, then oldest first (newest first
in a level whose oldest request waited past `lifo_after_s`), so a less urgent request still fills room that
the urgent ones leave. A full queue takes an urgent request by displacing the newest of its least urgent ones,
which gets QueueFull (429): under overload the least urgent traffic is refused first, never the most urgent.

Optional padding: `batch_buckets` pads the row count up to the next bucket (static shapes for CUDA graphs) and
`pad_multiple` pads variable non-batch dimensions (sequence lengths) up to a multiple, so fewer distinct
shapes reach the compiled model; padded rows and positions are cut off the outputs again.

Pipelining (`depth` > 1): a runner may return a zero-argument function instead of outputs: the batch's
device work is queued and that function waits for it. A second thread then waits and hands out the results
while the batcher thread gathers the next batch. While a batch runs on the device the next one keeps
filling (past max delay: its requests would wait for the device anyway) and is launched when the device is
about to be done (running estimates of device seconds per batch size and of launch seconds, a launch
given its mean and twice its mean deviation), or earlier once it is full; up to `depth` batches are in
flight. So the device idles neither while the CPU answers
requests nor while it launches the next batch, and a busy device still gets full batches. A runner whose
inputs travel to the device on a stream of their own (CUDA's copy stream) gives a `lead`: the seconds a
batch's bytes take to get there, which the launch comes that much earlier by, so that the copies run while
the device computes the batch before instead of in front of this one. The device's idle time between batches
goes to `idle` with why: `no_requests` (none was queued or being launched when it went idle: the clients'
pace), `queued` (requests were queued and no batch of them formed yet: the batcher thread waited too long,
by its estimates, or was still reading requests) or `launching` (a batch had formed and was still being
gathered and launched: the launch took longer than estimated).

Answers go to *sinks*, a batch at a time: a request names its sink and a tag (what the sink needs to find the
request again), and each sink gets one `deliver` call per batch with all of its requests' results. The
protocol worker hub sends each worker one message per batch that way, and an event loop wakes once per
batch; `submit` (a Future per request) is the simple form for callers that want one.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from runtime.serving.config import LAUNCH_DEVIATIONS
from runtime.serving.errors import (
    Cancelled,
    DeadlineExceeded,
    InferError,
    ModelFailure,
    QueueFull,
    Unavailable,
)
from runtime.serving.logs import name_os_thread

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, ...]
# a batch's inputs -> its outputs, or a function that waits for outputs being computed (pipelining)
BatchRunner = Callable[[list[torch.Tensor]], Outputs | Callable[[], Outputs]]
# per input, the requests' tensors and the row count to pad to -> the batch's inputs
Gather = Callable[[list[list[torch.Tensor]], int], list[torch.Tensor]]
# (rows, requests, queue seconds of the oldest, queue seconds of all its requests together, run seconds,
# device seconds: the batch's share of the device's time)
Observer = Callable[[int, int, float, float, float, float], None]


@dataclass(eq=False)
class Answer:
    """One batch's results for one sink's requests, in batch order."""

    tags: list[Any]
    offsets: list[int] = field(default_factory=list)  # each request's first row in `outputs`
    rows: list[int] = field(default_factory=list)
    outputs: Outputs | None = None  # the whole batch's outputs (CPU)
    error: BaseException | None = None  # the whole batch failed
    split: list[Outputs | BaseException] | None = None  # per request, when rows are not plain slices

    @property
    def sliced(self) -> bool:
        """Each request's outputs are rows offsets[i] : offsets[i] + rows[i] of every output."""
        return self.error is None and self.split is None

    def results(self) -> list[tuple[Any, Outputs | BaseException]]:
        """Per request: (tag, its outputs or the exception that failed it)."""
        if self.error is not None:
            return [(t, self.error) for t in self.tags]
        if self.split is not None:
            return list(zip(self.tags, self.split, strict=True))
        outs = self.outputs or ()
        return [
            (t, tuple(o[a : a + r] for o in outs))
            for t, a, r in zip(self.tags, self.offsets, self.rows, strict=True)
        ]


class Sink(Protocol):
    def deliver(self, answer: Answer) -> None:
        """Results of one batch for this sink's requests (called from the batcher's threads)."""


class Source(Protocol):
    """Where requests come from when the batcher thread reads them itself (the protocol worker hub): while it
    waits, the batcher thread calls `pump`, which submits what arrives; no reader thread, no hand-over of
    each request from one thread to another."""

    def pump(self, timeout: float | None) -> None:
        """Wait up to `timeout` seconds (None: no limit) for requests, submit those that came, return."""

    def wake(self) -> None:
        """Make a `pump` under way return now (from another thread), or (from the batcher thread itself,
        while it handles what it read) once the request being submitted is."""


@dataclass(eq=False, slots=True)
class Pending:
    """A queued request; setting `cancelled` (from any thread) before its batch is launched drops it: its
    sink gets a Cancelled error instead of outputs, and the model never runs it."""

    inputs: list[torch.Tensor]
    rows: int
    key: tuple[object, ...]
    orig: list[torch.Size]  # per input, the shape before padding
    sink: Sink
    tag: Any
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    deadline: float = math.inf  # time.monotonic() past which its client no longer wants the answer
    expires: float = math.inf  # time.monotonic() past which it is not launched (the queue timeout)
    late: str | None = None  # why it is dropped unrun (set by the batcher thread)
    priority: int = 0  # its level, 1 the most urgent (0: the batcher has no priority levels)


_EXPIRED = (
    "it waited in the queue past the server's queue timeout (--queue-timeout-ms); retry, or add replicas"
)
_HOPELESS = (
    "its deadline (the `timeout` parameter, grpc-timeout or x-envoy-expected-rq-timeout-ms) would pass"
    " before a batch started now is answered; give it a longer timeout, or add replicas"
)


def settle(results: list[tuple[Any, Outputs | BaseException]]) -> list[Any]:
    """Complete futures (concurrent or asyncio: the tags) with their results; those already done (cancelled
    meanwhile) are left alone, and returned."""
    skipped = []
    for fut, r in results:
        if fut.done():
            skipped.append(fut)
        elif isinstance(r, BaseException):
            fut.set_exception(r)
        else:
            fut.set_result(r)
    return skipped


class _FutureSink:
    """`submit`'s sink: the tag is a Future."""

    def deliver(self, answer: Answer) -> None:
        settle(answer.results())


_FUTURES = _FutureSink()


def _ewma(old: float | None, sample: float) -> float:
    """A running estimate (of device or launch seconds): the newest sample weighs a fifth."""
    return sample if old is None else old + (sample - old) * 0.2


class Batcher:
    def __init__(
        self,
        run: BatchRunner | None = None,
        *,
        setup: Callable[[], BatchRunner] | None = None,
        name: str = "model",
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue_size: int = 1024,
        batched: bool = True,
        batch_buckets: Sequence[int] | None = None,
        variable_dims: Sequence[Sequence[int]] = (),
        pad_multiple: int | None = None,
        observer: Observer | None = None,
        depth: int = 1,
        queue_timeout_s: float = 0.0,
        lifo_after_s: float = 0.0,
        priority_levels: int = 0,
        default_priority: int = 0,
        lead: Callable[[int], float] | None = None,
        idle: Callable[[float, str], object] | None = None,
        launch_deviations: float = LAUNCH_DEVIATIONS,
    ) -> None:
        """`run` runs a batch; or `setup` builds that runner in the worker thread itself (compile and warm-up
        there: CUDA graphs and other per-thread state then belong to the thread that serves).
        `queue_timeout_s`: the longest a request waits in the queue (0: no limit);
        `lifo_after_s`: the oldest request's wait past which the newest go first (0: always oldest first);
        `priority_levels`: how many (0: none), `default_priority`: the level of a request that names none, or
        one past the last (Triton's; 0: the last level); `launch_deviations`: pipelined, how many mean
        deviations of the launches' seconds a launch is given beyond their mean (see _launch_budget)."""
        if (run is None) == (setup is None):
            raise ValueError("give exactly one of run or setup")
        self._run: BatchRunner | None = run
        self._setup = setup
        self.ready = threading.Event()  # set once the runner exists
        self.error: BaseException | None = None  # why setup failed, or the batcher thread (_failed)
        self.name = name
        self.max_batch_size = max_batch_size if batched else 1
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self.queue_timeout_s = queue_timeout_s
        self.lifo_after_s = lifo_after_s
        if priority_levels < 0 or not 0 <= default_priority <= priority_levels:
            raise ValueError(
                f"default_priority ({default_priority}) must be between 1 and priority_levels"
                f" ({priority_levels}), or 0 for the last level"
            )
        self.priority_levels = priority_levels
        self.default_priority = default_priority or priority_levels
        self.batched = batched
        self._buckets = sorted(batch_buckets) if batch_buckets else None
        self._variable_dims = [list(v) for v in variable_dims]  # per input: non-batch dims that vary
        self._pad_multiple = pad_multiple
        self._observer = observer
        self._observer_failed = False  # it raised once (logged then)
        # told how many requests it dropped unrun, and why ("cancelled", "expired")
        self._dropped: Callable[[int, str], object] | None = None
        self._queue: deque[Pending] = deque()
        self._rows: dict[tuple[object, ...], int] = {}  # queued rows per key
        self._device_wait = False  # the batcher waits for the device (only a full batch needs to wake it)
        self._cond = threading.Condition()
        self._announced = 0  # requests being decoded that will be submitted soon
        self._external: Callable[[], int] = lambda: 0  # the same, counted by protocol worker processes
        self._gather: Gather = cat_and_pad
        self._closed = False
        self._refusal = ""  # what a request gets once the batcher thread failed (_failed)
        self._inflight = 0  # batches taken and not yet answered
        self._running = 0  # batches launched on the device and not yet done there
        self.last_taken = 0  # requests run by the last batch formed (busypoll: 1 at light load)
        self._depth = max(1, depth)  # batches in flight at most
        self._source: Source | None = None
        self._pumping = False  # the batcher thread is in its source's pump (under _cond)
        self._pumped = False  # it read its source since it last took a batch
        # launched batches for the finishing thread, in launch (= stream) order; None stops it
        self._launched: queue.SimpleQueue[
            tuple[list[Pending], Callable[[], Outputs], float, float, int] | None
        ] = queue.SimpleQueue()
        # pipelining: the next batch goes when the device is about to be done with the ones launched, by
        # estimates of device seconds per batch size and of the seconds a launch takes (the CPU side)
        self._device_s: dict[int, float] = {}
        self._launch_s = 0.0
        self._launch_dev = 0.0  # running mean of |launch seconds - _launch_s|: how much a launch varies
        self._deviations = launch_deviations
        self._lead = lead  # a batch's input bytes -> seconds they take to the device (see configure)
        self._on_idle = idle  # told the device's idle seconds between pipelined batches, and why
        self._idle_since = 0.0  # when the device went idle (0: busy, or not known)
        self._idle_why = ""
        self._free_at = 0.0
        self._answer_s = 0.0  # running estimate of the seconds from a batch's launch to its answers
        self._finisher: threading.Thread | None = None
        # told (from the batcher thread) what ended it if anything but close() did: a bug of ours, after which
        # nothing would answer requests (set before the first submit)
        self.on_failure: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def configure(
        self,
        *,
        name: str,
        batched: bool,
        max_batch_size: int,
        batch_buckets: Sequence[int] | None,
        variable_dims: Sequence[Sequence[int]],
        pad_multiple: int | None,
        observer: Observer | None,
        gather: Gather | None = None,
        depth: int = 1,
        dropped: Callable[[int, str], object] | None = None,
        lead: Callable[[int], float] | None = None,
        idle: Callable[[float, str], object] | None = None,
    ) -> None:
        """Apply what loading the model decided (call from `setup`, before the first batch). `lead`: the
        seconds a batch's input bytes take to reach the device while it still computes the batch before;
        `idle`: told the device's idle seconds between batches and why (pipelining; see the module's
        docstring)."""
        self._dropped = dropped
        self._lead = lead
        self._on_idle = idle
        self._gather = gather or cat_and_pad
        self._depth = max(1, depth)
        self.name = name
        self.batched = batched
        self.max_batch_size = max_batch_size if batched else 1
        self._buckets = sorted(batch_buckets) if batch_buckets else None
        self._variable_dims = [list(v) for v in variable_dims]
        self._pad_multiple = pad_multiple
        self._observer = observer

    # -- producer side (any thread) --
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Batches taken and not answered yet (read without the lock: a hint)."""
        return self._inflight

    @property
    def busy(self) -> bool:
        return self._inflight > 0 or bool(self._queue)

    def announce(self) -> None:
        """A request arrived and is being decoded: batches forming now may wait for it (up to max delay)."""
        with self._cond:
            self._announced += 1

    def set_external_announced(self, count: Callable[[], int]) -> None:
        """Requests announced elsewhere (protocol worker processes), read whenever a batch may wait."""
        self._external = count

    def set_source(self, source: Source) -> None:
        """From now on the batcher thread reads requests from `source` whenever it waits (see Source)."""
        with self._cond:
            self._source = source
            self._notify()

    def withdraw(self, notify: bool = False) -> None:
        """An announced request will not be submitted (bad input), or an announcement held for requests that
        may come is given up (`notify`: a batch waiting for it forms now)."""
        with self._cond:
            self._announced = max(0, self._announced - 1)
            if notify:
                self._notify(now=False)

    def submit(
        self,
        inputs: list[torch.Tensor],
        rows: int,
        *,
        announced: bool = False,
        deadline: float = math.inf,
        priority: int = 0,
    ) -> Future[tuple[torch.Tensor, ...]]:
        """Queue a request (CPU tensors, batch dimension first when batched); the future gets its outputs."""
        fut: Future[tuple[torch.Tensor, ...]] = Future()
        self.submit_to(_FUTURES, fut, inputs, rows, announced=announced, deadline=deadline, priority=priority)
        return fut

    def submit_to(
        self,
        sink: Sink,
        tag: Any,
        inputs: list[torch.Tensor],
        rows: int,
        *,
        announced: bool = False,
        deadline: float = math.inf,
        priority: int = 0,
    ) -> Pending:
        """Queue a request whose result goes to `sink` under `tag` (QueueFull, Unavailable); `deadline`: the
        time.monotonic() past which its client no longer wants the answer; `priority`: Triton's (1 the most
        urgent; 0, or past the last level: the default level; ignored without priority levels)."""
        expires = time.monotonic() + self.queue_timeout_s if self.queue_timeout_s else math.inf
        orig = [t.shape for t in inputs]
        if self._pad_multiple:
            inputs = [self._pad_dims(t, dims) for t, dims in zip(inputs, self._variable_dims, strict=False)]
        if self.batched:
            key = tuple((t.shape[1:], t.dtype) for t in inputs)
        else:
            key = tuple((t.shape, t.dtype) for t in inputs)
        p = Pending(inputs, rows, key, orig, sink, tag, deadline=deadline, expires=expires)
        displaced = None
        with self._cond:
            if announced:
                self._announced = max(0, self._announced - 1)
            if self._closed:
                raise Unavailable(self._refusal or f"model {self.name!r} is shutting down")
            queue = self._queue
            if self.priority_levels:
                p.priority = priority if 0 < priority <= self.priority_levels else self.default_priority
                if queue and len(queue) >= self.max_queue_size and queue[-1].priority > p.priority:
                    displaced = queue.pop()  # the newest of the least urgent (the queue is in level order)
                    self._count_out(displaced.key, displaced.rows)
            if len(queue) >= self.max_queue_size:
                raise QueueFull(
                    f"model {self.name!r} queue is full ({self.max_queue_size} requests waiting); retry later"
                )
            if not queue or queue[-1].priority <= p.priority:
                queue.append(p)
            else:  # behind the requests of its level and the more urgent ones
                queue.insert(bisect.bisect_right(queue, p.priority, key=_priority), p)
            n = self._rows[key] = self._rows.get(key, 0) + rows
            # while the device is busy the forming batch waits for it; only a full one goes earlier, and
            # then at once: the rest of what the batcher thread is reading waits for the next batch
            full = n >= self.max_batch_size
            if not self._device_wait or full:
                self._notify(now=full)
        if displaced is not None:
            self._displace(displaced)
        return p

    def _count_out(self, key: tuple[object, ...], rows: int) -> None:
        """`rows` of `key` left the queue (hold _cond)."""
        left = self._rows[key] = self._rows[key] - rows
        if not left:
            del self._rows[key]

    def _displace(self, p: Pending) -> None:
        error = QueueFull(
            f"model {self.name!r} queue is full: a more urgent request took the place of this one (priority"
            f" level {p.priority}); retry later"
        )
        _fail_all([p], error)
        if self._dropped is not None:
            self._dropped(1, "displaced")

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish every queued one, then stop the worker."""
        with self._cond:
            self._closed = True
            self._notify()
        self._thread.join(timeout)

    # -- worker --
    def _pad_dims(self, t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        m = self._pad_multiple or 1
        pad: list[int] = []
        for d in range(t.dim() - 1, -1, -1):  # F.pad takes (last dim first) pairs
            extra = (-t.shape[d]) % m if d in dims else 0
            pad += [0, extra]
        return F.pad(t, pad) if any(pad) else t

    def _notify(self, now: bool = True) -> None:
        """Wake the batcher thread (hold _cond): from its wait, or from its source's pump; when it is the
        batcher thread itself (submitting what its pump read), that pump returns early only if `now`."""
        self._cond.notify()
        if self._pumping and (now or threading.get_ident() != self._thread.ident):
            assert self._source is not None
            self._source.wake()

    def _idle(self, timeout: float | None = None) -> None:
        """The batcher thread waits (holding _cond) for a notify or `timeout` seconds: reading requests from
        its source meanwhile, when it has one."""
        source = self._source
        if source is None:
            self._cond.wait(timeout)
            return
        self._pumping = self._pumped = True
        self._cond.release()
        try:
            source.pump(timeout)
        finally:
            self._cond.acquire()
            self._pumping = False

    def _take(self) -> list[Pending] | None:
        with self._cond:
            # a batch forms while the previous ones run, until fewer than `depth` are in flight
            while not self._queue or self._inflight >= self._depth:
                if self._closed and not self._queue:
                    return None
                self._idle()
            first = self._queue[0]
            deadline = first.enqueued + self.max_delay_s
            while not self._closed and self.batched:
                if self._rows[first.key] >= self.max_batch_size:
                    break
                if self._running:
                    # the device is busy: fill the batch until it is about to be done (or done: notified)
                    go_in = (
                        self._free_at - self._launch_budget() - self._lead_s(first) - time.perf_counter()
                        if self._free_at
                        else None
                    )
                    if go_in is not None and go_in <= 0:
                        break
                    self._device_wait = True
                    self._idle(go_in)
                    self._device_wait = False
                    continue
                remaining = deadline - time.perf_counter()
                # wait only for requests known to be on their way, and never past the oldest's deadline
                if remaining <= 0 or not (self._announced or self._external()):
                    break
                self._idle(remaining)
            if self._source is not None and not self._pumped:
                # a batch that ran on this thread (no waits since the last one) left requests unread, and
                # their cancellations: read what arrived meanwhile (without waiting) before forming this one
                self._idle(0)
            self._pumped = False
            return self._form()

    def _launch_budget(self) -> float:
        """The seconds a launch is given before the device is expected to be free: the running mean of the
        launches' seconds and (by default) twice their mean deviation (as TCP budgets a round trip), since a
        launch that comes late leaves the device idle while one early only leaves the batch a few rows
        smaller (H100, ResNet-50, 64 clients, one pair: idle with a batch being launched 9 % of the time with
        the mean alone, 7 % with the deviations, rows/s within the runs' spread; docs/benchmarks.md)."""
        return self._launch_s + self._deviations * self._launch_dev

    def _lead_s(self, first: Pending) -> float:
        """How much earlier than the device is free a batch of `first`'s rows goes: the time a full batch of
        its inputs takes to reach the device on their own stream (0 without a `lead`). A full batch's, not the
        rows queued so far: the batch grows until it goes."""
        if self._lead is None:
            return 0.0
        row = sum(t.nbytes for t in first.inputs) // max(1, first.rows)
        return self._lead(row * self.max_batch_size)

    def _form(self) -> list[Pending]:
        """Take the next batch off the queue (hold _cond; the queue is not empty): the oldest live request
        and those with its key, oldest first; newest first in overload (lifo_after_s). Requests cancelled or
        past their deadline are taken along whatever their key, marked, for `_launch` to answer."""
        now = time.monotonic()
        queue = self._queue
        order, lifo = self._lifo_order(queue) if self.lifo_after_s else (queue, False)
        # a client that leaves before then gets no answer in time: a batch's seconds from launch to answers,
        # twice (the answer's way back to the client, the estimate's error; with once, bench/overload_bench.py
        # at 2x: gRPC goodput 176 rows/s against 203, and 14 % of the rows run answered too late)
        hopeless = now + 2 * self._answer_s
        batch: list[Pending] = []
        rest: list[Pending] = []
        taken: list[Pending] = []  # the batch's requests to run
        key: tuple[object, ...] | None = None
        rows = 0  # the batch's rows to run
        queued = self._rows  # rows per key
        dead = False
        for p in order:
            if p.cancelled or p.expires <= now or p.deadline <= hopeless:  # answered at launch, unrun
                if not p.cancelled:
                    p.late = _EXPIRED if p.expires <= now else _HOPELESS
                batch.append(p)
                queued[p.key] -= p.rows
                dead = True
            elif key is None or (p.key == key and rows + p.rows <= self.max_batch_size):
                key = p.key
                batch.append(p)
                taken.append(p)
                rows += p.rows
            else:
                rest.append(p)
        if taken and self._running and not lifo and (keep := self._fit([p.rows for p in taken])) < len(taken):
            back = {id(p) for p in taken[keep:]}  # they lead the next batch, in their places in the queue
            rows -= sum(p.rows for p in taken[keep:])
            batch = [p for p in batch if id(p) not in back]
            kept = {id(p) for p in batch}
            rest = [p for p in queue if id(p) not in kept]
        if key is not None:
            self._count_out(key, rows)
        if dead:
            for k in {p.key for p in batch}:
                if k in queued and not queued[k]:
                    del queued[k]
        if lifo:  # back to oldest first (within each level)
            if self.priority_levels:
                rest.sort(key=_arrival)
            else:
                rest.reverse()
        self._queue = deque(rest)
        self._inflight += 1
        self.last_taken = len(taken)
        return batch

    def _fit(self, rows_each: list[int]) -> int:
        """How many of a batch's requests (oldest first, `rows_each` rows each) go now, while the device is
        busy with a batch before: all, unless the most of them that fit the next smaller bucket run more rows
        per device second than all of them padded up to theirs (by the device seconds learnt per bucket; the
        others lead the next batch). The device is the bound then, and the rows a batch is padded with are
        device time no request gets: ResNet-50 on an H200 ran batches of ~20 rows in buckets of 20 and 24."""
        total, n = sum(rows_each), len(rows_each)
        up = self._bucket(total)
        t_up = self._device_s.get(up)
        if up == total or not t_up:
            return n
        rows, keep = total, n
        while keep > 1 and self._bucket(rows) == up:
            keep -= 1
            rows -= rows_each[keep]
        down = self._bucket(rows)
        t_down = self._device_s.get(down)
        return keep if down < up and t_down and rows / t_down > total / t_up else n

    def _lifo_order(self, queue: deque[Pending]) -> tuple[Iterable[Pending], bool]:
        """The order a batch forms in under `lifo_after_s`, and whether any of it is newest first: newest
        first once the oldest request has waited that long; with priority levels, judged per level (an urgent
        level served in time stays oldest first while a less urgent one falls behind), most urgent first."""
        old = time.perf_counter() - self.lifo_after_s
        if not self.priority_levels:
            lifo = queue[0].enqueued < old
            return (reversed(queue) if lifo else queue), lifo
        order: list[Pending] = []
        lifo = False
        for _, run in itertools.groupby(queue, key=_priority):
            level = list(run)
            if level[0].enqueued < old:
                level.reverse()
                lifo = True
            order += level
        return order, lifo

    def _loop(self) -> None:
        name_os_thread()
        if self._setup is not None:
            try:
                self._run = self._setup()
            except BaseException as e:
                self.error = e
                log.exception("model setup failed", extra={"model": self.name})
                self._abandon(Unavailable(f"model {self.name!r} failed to load: {e}"))
                self.ready.set()
                return
        self.ready.set()
        if self._depth > 1:
            self._finisher = threading.Thread(
                target=self._finish_loop, name=f"finish-{self.name}", daemon=True
            )
            self._finisher.start()
        batch: list[Pending] | None
        try:
            while True:
                batch = None  # an answered batch is not failed again below
                batch = self._take()
                if batch is None:
                    break
                self._launch(batch)
        except BaseException as e:
            self._failed(e, batch or [])
        if self._finisher is not None:
            self._launched.put(None)
            self._finisher.join()

    def _failed(self, e: BaseException, batch: list[Pending], thread: str = "batcher thread") -> None:
        """The `thread`'s loop raised (a bug of ours, in it or in its source): refuse requests from
        now on, answer the queued ones and the batch under way, if any, with Unavailable, and tell
        on_failure."""
        self.error = e
        log.critical(
            f"the {thread} failed; no request can be answered from now on",
            extra={"model": self.name},
            exc_info=e,
        )
        why = f"model {self.name!r} cannot answer: its {thread} failed ({type(e).__name__}: {e}); restarting"
        self._refusal = why  # read by submit once _abandon has closed the batcher
        self._abandon(Unavailable(why), batch)
        if self.on_failure is not None:
            self.on_failure(e)

    def _abandon(self, error: Exception, batch: list[Pending] | None = None) -> None:
        """Refuse requests from now on, and answer the queued ones and `batch` (taken off the queue, not
        answered) with `error`."""
        with self._cond:
            self._closed = True
            pending, self._queue = list(self._queue), deque()
            self._rows.clear()
            # wake the batcher thread if it waits for a batch in flight to end (it stops): unless its source's
            # wake-up is what failed
            with contextlib.suppress(Exception):
                self._notify()
        _fail_all([*(batch or []), *pending], error)

    def _launch(self, batch: list[Pending]) -> None:
        start = time.perf_counter()
        live = [p for p in batch if not p.cancelled and p.late is None]
        if len(live) < len(batch):  # no device time for answers nobody reads
            self._drop([p for p in batch if p.cancelled], "cancelled")
            self._drop([p for p in batch if p.late is not None and not p.cancelled], "expired")
        bucket = self._bucket(sum(p.rows for p in live))  # the rows the batch is padded to
        outs = self._start(live, bucket) if live else None
        if callable(outs) and self._finisher is not None:
            launched = time.perf_counter()
            gap, why = 0.0, ""
            with self._cond:
                if self._idle_since:  # the device was idle from then until this launch
                    gap, why, self._idle_since = launched - self._idle_since, self._idle_why, 0.0
                self._running += 1
                took = launched - start
                if self._launch_s:
                    self._launch_dev = _ewma(self._launch_dev, abs(took - self._launch_s))
                self._launch_s = _ewma(self._launch_s or None, took)
                device_s = self._device_s.get(bucket)
                # when the device will be done with all launched (unknown before a batch of this size ran)
                self._free_at = max(launched, self._free_at) + device_s if device_s else 0.0
            self._launched.put((live, outs, start, launched, bucket))
            if gap > 0 and self._on_idle is not None:
                self._on_idle(gap, why)
            return
        try:
            if callable(outs):
                outs = self._wait(live, outs)
            if outs is not None:
                self._answer(live, outs, start)
        finally:
            self._done_batch()

    def _drop(self, dropped: list[Pending], why: str) -> None:
        if not dropped:
            return
        if why == "cancelled":
            _fail_all(dropped, Cancelled("the client left before its request ran"))
        else:
            for reason in {p.late for p in dropped}:
                group = [p for p in dropped if p.late == reason]
                _fail_all(group, DeadlineExceeded(f"request dropped unrun: {reason}"))
        if self._dropped is not None:
            self._dropped(len(dropped), why)

    def _finish_loop(self) -> None:
        name_os_thread()
        last_done = 0.0
        unanswered: list[Pending] = []  # the batch being finished until its requests have their answers
        try:
            while (item := self._launched.get()) is not None:
                live, wait, start, launched, bucket = item
                unanswered = live
                try:
                    outs = self._wait(live, wait)
                    done = time.perf_counter()
                    with self._cond:
                        self._running -= 1
                        # the device started on this batch once it was launched and the one before was done
                        took = done - max(launched, last_done)
                        self._device_s[bucket] = _ewma(self._device_s.get(bucket), took)
                        if not self._running:
                            self._free_at = 0.0
                            # idle from now: with a batch being launched (this one counts in _inflight until
                            # it is answered), with requests queued, or for want of requests
                            self._idle_since = done
                            self._idle_why = (
                                "launching"
                                if self._inflight - 1 > self._running
                                else ("queued" if self._queue else "no_requests")
                            )
                        self._notify()  # the next batch may go now
                    last_done = done
                    if outs is not None:
                        self._answer(live, outs, start, took)
                    unanswered = []
                finally:
                    self._done_batch()
        except BaseException as e:
            self._failed(e, unanswered, "batcher's finishing thread")
            # the batches launched before the batcher thread saw it closed, until it stops (None)
            while (item := self._launched.get()) is not None:
                _fail_all(item[0], Unavailable(self._refusal))
                with self._cond:
                    self._running -= 1
                    self._inflight -= 1
                    self._cond.notify()

    def _done_batch(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._notify()

    def _start(self, live: list[Pending], bucket: int) -> Outputs | Callable[[], Outputs] | None:
        """Gather (padded to `bucket` rows) and run (or launch) a batch; None when it failed (its requests
        have their error)."""
        try:
            if self.batched:
                xs = self._gather([[p.inputs[i] for p in live] for i in range(len(live[0].inputs))], bucket)
            else:
                xs = live[0].inputs
            assert self._run is not None
            return self._run(xs)
        except Exception as e:
            self._fail(live, e)
            return None

    def _wait(self, live: list[Pending], wait: Callable[[], Outputs]) -> Outputs | None:
        try:
            return wait()
        except Exception as e:
            self._fail(live, e)
            return None

    def _fail(self, live: list[Pending], e: Exception) -> None:
        rows = sum(p.rows for p in live)
        log.exception("batch failed", extra={"model": self.name, "rows": rows})
        err = (
            e
            if isinstance(e, InferError)
            else ModelFailure(f"model {self.name!r} failed: {type(e).__name__}: {e}")
        )
        _fail_all(live, err)

    def _answer(
        self, live: list[Pending], outs: Outputs, start: float, device_s: float | None = None
    ) -> None:
        """Hand each sink its requests' results; `device_s`: the seconds the device spent on this batch alone
        (pipelined: from its launch, or the end of the batch before when that came later, to its end; else
        the batch's run time)."""
        ran = time.perf_counter() - start
        self._answer_s = _ewma(self._answer_s or None, ran)
        # requests whose outputs are not plain row slices of the batch's
        split = not self.batched or bool(self._pad_multiple) or any(o.dim() == 0 for o in outs)
        answers: dict[int, tuple[Sink, Answer]] = {}
        offset = 0
        for p in live:
            entry = answers.get(id(p.sink))
            if entry is None:
                entry = answers[id(p.sink)] = (p.sink, Answer([], outputs=outs, split=[] if split else None))
            a = entry[1]
            a.tags.append(p.tag)
            a.offsets.append(offset)
            a.rows.append(p.rows)
            if a.split is not None:
                a.split.append(self._split(outs, offset, p))
            offset += p.rows
        for sink, a in answers.values():
            _hand(sink, a)
        if self._observer is not None:
            device = ran if device_s is None else device_s
            n = len(live)
            queued = n * start - sum(p.enqueued for p in live)
            try:
                self._observer(offset, n, start - live[0].enqueued, queued, ran, device)
            except Exception:  # a bug in the metrics: the requests have their answers, and serving goes on
                if not self._observer_failed:
                    self._observer_failed = True
                    log.exception("recording a batch's metrics failed (logged once; serving goes on)")

    def _split(self, outs: Outputs, offset: int, p: Pending) -> Outputs | BaseException:
        if not self.batched:
            return outs
        try:
            return tuple(self._cut(o, offset, p) for o in outs)
        except Exception as e:
            return ModelFailure(f"model {self.name!r}: cannot split outputs per request: {e}")

    def _bucket(self, rows: int) -> int:
        if not self._buckets:
            return rows
        i = bisect.bisect_left(self._buckets, rows)
        return self._buckets[i] if i < len(self._buckets) else rows

    def _cut(self, out: torch.Tensor, offset: int, p: Pending) -> torch.Tensor:
        if out.dim() == 0:
            raise ValueError("an output has no batch dimension")
        part = out[offset : offset + p.rows]
        if self._pad_multiple:
            # cut padded positions of variable dimensions off outputs that carry them (per-token outputs)
            for t, o, dims in zip(p.inputs, p.orig, self._variable_dims, strict=False):
                for d in dims:
                    if t.shape[d] != o[d] and d < part.dim() and part.shape[d] == t.shape[d]:
                        part = part.narrow(d, 0, o[d])
        return part


def _priority(p: Pending) -> int:
    return p.priority


def _arrival(p: Pending) -> tuple[int, float]:
    """A request's place in the queue: its level, then oldest first."""
    return p.priority, p.enqueued


def _fail_all(batch: list[Pending], error: BaseException) -> None:
    answers: dict[int, tuple[Sink, Answer]] = {}
    for p in batch:
        answers.setdefault(id(p.sink), (p.sink, Answer([], error=error)))[1].tags.append(p.tag)
    for sink, a in answers.values():
        _hand(sink, a)


def _hand(sink: Sink, answer: Answer) -> None:
    try:
        sink.deliver(answer)
    except Exception:  # one sink's bug must not keep the others' requests unanswered
        log.exception("delivering results failed")


def cat_and_pad(parts: list[list[torch.Tensor]], padded_rows: int) -> list[torch.Tensor]:
    """The default gather: concatenate each input's requests on the CPU, zero rows up to `padded_rows`."""
    xs = [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in parts]
    return [
        F.pad(x, [0, 0] * (x.dim() - 1) + [0, padded_rows - x.shape[0]]) if padded_rows > x.shape[0] else x
        for x in xs
    ]
