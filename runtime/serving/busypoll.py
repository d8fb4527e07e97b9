"""Polling before sleeping (`--busy-poll-us`): a process that expects a message within microseconds keeps
asking for it, instead of sleeping until the kernel wakes it.

A batch-1 request crosses three sleeps on the server's side: the protocol worker waits for the client's
request, the model process's batcher thread for the worker's, the worker again for the batch's answer. Each
wake-up costs what the host's scheduler and idle states make it: on this machine 30-50 µs, on lent GPU hosts
29-47 µs at p50 and 60-178 at p90 after 1.5 ms idle (`hack/launch-probe.py`). Polling for a while first
trades CPU (at most the budget per wait, and only while the process has nothing else to do) for that
latency: on a lent H100 host, ResNet-50 at 1 client, p50 1.60 -> 1.04-1.08 ms over REST and 1.80-1.82 ->
1.33-1.38 over gRPC, rows/s at 128 clients within the runs' spread (docs/benchmarks.md). Polling is for light
load: a worker polls while it has at most one request in the model process, the batcher thread while no
batch is in flight and its last one ran one request, and either only while its requests come less often
than every MIN_GAP_S (`Pace`): a model fast enough to keep batches at one request under load (a tiny MLP on
this 2-core machine, 16 clients: 10,700 requests/s) would otherwise have it poll between every two requests,
for the CPU that the workers and clients need (-16 % rows/s there).

`auto` (the default, `resolve`): AUTO_US next to an accelerator when the CPUs the server may use (its
affinity, and the cgroup's quota: a pod's CPU limit) cover every worker and the model process's two threads
polling at once; otherwise none, since polling past a CPU limit gets the pod throttled, and on a CPU-only
server the cores run the model.

- `LoopPoller`: an event loop (asyncio's or uvloop's) keeps a callback ready for the budget after each
  `kick`, so that its next waits for I/O have a timeout of 0: the loop polls its sockets between turns
  instead of sleeping in epoll. Kicked when a worker sends requests to the model process (their answers
  come next) and when answers arrive (the clients' next requests do).
- `poll_select`: a selector's `select`, polling with timeouts of 0 for up to the budget before the one that
  sleeps. The model process's batcher thread reads the workers' requests that way while no batch is in
  flight: polling holds the GIL between calls, which the thread finishing a batch would wait for.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable

from runtime.cpus import cpus_allowed

AUTO_US = 2000.0  # covers a batch-1 round trip to the model process on a GPU (ResNet-50: ~1 ms)
# light load: requests further apart than this on average (one client of a tiny model here: 0.37 ms apart;
# 16 clients: 0.09 ms; one client of ResNet-50 on a lent GPU: 1.1-1.6 ms)
MIN_GAP_S = 200e-6


class Pace:
    """How often requests come: a running mean of the gaps between them (the newest gap weighs a fifth)."""

    def __init__(self) -> None:
        self.gap = float("inf")
        self.last = 0.0

    def arrived(self, n: int = 1) -> None:
        """`n` requests came now."""
        now = time.perf_counter()
        if self.last:
            gap = (now - self.last) / max(1, n)
            self.gap = gap if self.gap == float("inf") else self.gap + (gap - self.gap) * 0.2
        self.last = now

    def light(self) -> bool:
        """Light load: requests MIN_GAP_S apart or more, on average."""
        return self.gap >= MIN_GAP_S


def resolve(
    asked: float | None, workers: int, accelerator: bool, cpus: float | None = None
) -> tuple[float, str]:
    """The budget in µs for `--busy-poll-us` `asked` (None: auto) with `workers` protocol workers, and why."""
    if asked is not None:
        return asked, "asked for"
    if not accelerator:
        return 0.0, "auto: no accelerator (the cores run the model)"
    cpus = cpus_allowed() if cpus is None else cpus
    need = workers + 2  # every worker, the batcher thread and the thread waiting for the device
    if cpus < need:
        return 0.0, f"auto: {cpus:g} CPUs allowed, fewer than the {need} polling could take at once"
    return AUTO_US, f"auto: next to an accelerator, {cpus:g} CPUs allowed"


class LoopPoller:
    """Keeps the running event loop polling (no sleep in its waits for I/O) for `budget_s` after each
    `kick` while the requests it is told of (`arrived`) come at a light pace; `budget_s` 0: never (both do
    nothing). `polled` is told the seconds of each stretch of polling as it ends (wall time: the work the
    loop did meanwhile included)."""

    def __init__(self, budget_s: float, polled: Callable[[float], object] | None = None) -> None:
        self.budget_s = budget_s
        self.polled = polled
        self.until = 0.0
        self.since = 0.0  # when this stretch of polling began
        self.polling = False
        self.turns = 0  # loop turns it kept from sleeping (tests, diagnostics)
        self.pace = Pace()
        self._loop: asyncio.AbstractEventLoop | None = None

    def arrived(self, n: int = 1) -> None:
        if self.budget_s:
            self.pace.arrived(n)

    def kick(self) -> None:
        if not self.budget_s or not self.pace.light():
            return
        now = time.perf_counter()
        self.until = now + self.budget_s
        if not self.polling:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self.polling, self.since = True, now
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        # a ready callback: the loop's next wait for I/O has a timeout of 0 (asyncio's and libuv's both)
        now = time.perf_counter()
        if now < self.until:
            self.turns += 1
            assert self._loop is not None
            self._loop.call_soon(self._turn)
            return
        self.polling = False
        if self.polled is not None:
            self.polled(now - self.since)


def poll_select(
    sel: selectors.BaseSelector,
    timeout: float | None,
    budget_s: float,
    polled: Callable[[float], object] | None = None,
) -> list[tuple[selectors.SelectorKey, int]]:
    """`sel.select(timeout)`, polling (timeouts of 0) for up to `budget_s` of it first; `polled` is told the
    seconds spent polling."""
    start = time.perf_counter()
    end = start + (budget_s if timeout is None else min(budget_s, timeout))
    while True:
        ready = sel.select(0)
        now = time.perf_counter()
        if ready or now >= end:
            break
    if polled is not None:
        polled(now - start)
    if ready:
        return ready
    if timeout is None:
        return sel.select(None)
    left = start + timeout - now
    return sel.select(left) if left > 0 else []
