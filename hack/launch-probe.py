"""What the steps of a batch-1 request cost on this host (a diagnostic; the GPU parts need CUDA).

A batch-1 request in the model process crosses threads (reader -> batcher -> finisher) and makes a few CUDA
calls. This prints the median and p90, in microseconds, of:
  - thread wake-ups after 0.2 and 1.5 ms idle: Condition.notify -> the waiter runs; Lock.release -> acquire
    returns (a binary semaphore); SimpleQueue.put -> get returns; a socket write ->
    select() returns in another thread (the worker/hub hop);
  - gathering 1-32 BERT-like requests (3 int64 inputs of 128) and one 602 KB image row onto the GPU: staged
    through torch's page-locked allocator (cat, copy) against copies straight from registered memory;
  - waiting for the GPU: from the end of a ~300 us kernel to the return of Event.synchronize(), spinning
    (the default) against blocking-sync events, the waiter on another thread.

    python hack/launch-probe.py [iterations, default 2000]
"""

from __future__ import annotations

import queue
import selectors
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.serving import ipc, pagelock

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000


def show(name: str, samples: list[float]) -> None:
    s = sorted(samples)
    print(f"{name:<58} p50 {1e6 * statistics.median(s):8.1f} us   p90 {1e6 * s[int(len(s) * 0.9)]:8.1f} us")


def _wake(name: str, gap: float, signal: Callable[[float], None], wait: Callable[[], float]) -> None:
    """Another thread waits (`wait` returns the time sent); this one idles `gap` s, then signals."""
    lat: list[float] = []
    got = threading.Event()

    def waiter() -> None:
        for _ in range(N):
            t = wait()
            lat.append(time.perf_counter() - t)
            got.set()

    th = threading.Thread(target=waiter)
    th.start()
    for _ in range(N):
        got.clear()
        time.sleep(gap)  # let the waiter sleep, as between requests at concurrency 1
        signal(time.perf_counter())
        got.wait()
    th.join()
    show(f"{name}, {1e3 * gap:.1f} ms idle before", lat)


def wakeups() -> None:
    for gap in (0.0002, 0.0015):
        cond = threading.Condition()
        box: list[float] = []

        def cond_signal(t: float, cond: threading.Condition = cond, box: list[float] = box) -> None:
            with cond:
                box.append(t)
                cond.notify()

        def cond_wait(cond: threading.Condition = cond, box: list[float] = box) -> float:
            with cond:
                while not box:
                    cond.wait()
                return box.pop()

        _wake("Condition.notify -> waiter runs", gap, cond_signal, cond_wait)

        lock = threading.Lock()  # a binary semaphore: released by the signaller, taken by the waiter
        lock.acquire()
        slot: list[float] = []

        def lock_signal(t: float, lock: threading.Lock = lock, slot: list[float] = slot) -> None:
            slot.append(t)
            lock.release()

        def lock_wait(lock: threading.Lock = lock, slot: list[float] = slot) -> float:
            lock.acquire()
            return slot.pop()

        _wake("Lock.release -> acquire returns", gap, lock_signal, lock_wait)

        q: queue.SimpleQueue[float] = queue.SimpleQueue()
        _wake("SimpleQueue.put -> get returns", gap, q.put, q.get)

        a, b = socket.socketpair()
        sel = selectors.DefaultSelector()
        sel.register(b, selectors.EVENT_READ)

        def sock_wait(sel: selectors.BaseSelector = sel, b: socket.socket = b) -> float:
            sel.select()
            return float(b.recv(64).decode())

        _wake("socket send -> select() returns", gap, lambda t, a=a: a.send(repr(t).encode()), sock_wait)
        a.close()
        b.close()


def timed(fn: Callable[[], object], sync: bool = False) -> list[float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(N):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if sync:
            torch.cuda.synchronize()
    return out


def gathers() -> None:
    slot = 1 << 20
    arena = ipc.Arena.anonymous("kubeforge-launch-probe", 2, slot)
    arena.forget_path()
    locked = pagelock.register(arena.address, arena.size)
    base = ipc.HEADER_BYTES
    # BERT-like requests: per request 3 int64 inputs of 128, each input's rows in requests' own places
    bert = [
        [
            torch.frombuffer(arena.buf, dtype=torch.int64, count=128, offset=base + (3 * r + i) * 1024).view(
                1, 128
            )
            for r in range(32)
        ]
        for i in range(3)
    ]
    image = torch.frombuffer(arena.buf, dtype=torch.float32, count=3 * 224 * 224, offset=base + slot)
    image = image.view(1, 3, 224, 224)
    print(f"arena registered: {locked}")

    def staged(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for ts in parts:
            rows = len(ts)
            s = torch.empty((rows, *ts[0].shape[1:]), dtype=ts[0].dtype, pin_memory=True)
            torch.cat(ts, out=s)
            out.append(s.to("cuda", non_blocking=True))
        return out

    def direct(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        out = [torch.empty((len(ts), *ts[0].shape[1:]), dtype=ts[0].dtype, device="cuda") for ts in parts]
        dst = [d for o, ts in zip(out, parts, strict=True) for d in o.split_with_sizes([1] * len(ts))]
        torch._foreach_copy_(dst, [t for ts in parts for t in ts], non_blocking=True)
        return out

    for k in (1, 2, 4, 8, 16, 32):
        part = [ts[:k] for ts in bert]
        show(f"BERT {k} requests (3 inputs): staged through pinned", timed(lambda p=part: staged(p), True))
        show(f"BERT {k} requests (3 inputs): direct from registered", timed(lambda p=part: direct(p), True))
    show("image row: staged through pinned", timed(lambda: staged([[image]]), True))
    show("image row: direct from registered", timed(lambda: direct([[image]]), True))
    pagelock.unregister(arena.address)
    arena.close()


def wait_overheads(blocking: bool, cycles: int) -> list[float]:
    """Per ~300 us kernel: wall from its launch to the return of synchronize() on another thread, less the GPU
    time between events around it."""
    done: list[float] = []
    box: queue.SimpleQueue[torch.cuda.Event] = queue.SimpleQueue()
    got = threading.Event()
    n = N // 4

    def finisher() -> None:
        for _ in range(n):
            ev = box.get()
            ev.synchronize()
            done.append(time.perf_counter())
            got.set()

    th = threading.Thread(target=finisher)
    th.start()
    over = []
    for _ in range(n):
        got.clear()
        start = torch.cuda.Event(enable_timing=True)
        ev = torch.cuda.Event(blocking=blocking, enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        ev.record()
        t0 = time.perf_counter()
        box.put(ev)
        got.wait()
        over.append(done[-1] - t0 - start.elapsed_time(ev) / 1e3)
    th.join()
    return over


def event_waits() -> None:
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    cycles = 1_000_000
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    cycles = int(cycles * 300e-6 / (time.perf_counter() - t0))  # a kernel of ~300 us
    for blocking in (False, True):
        name = "blocking" if blocking else "spin"
        show(f"kernel end -> synchronize() returns ({name})", wait_overheads(blocking, cycles))


def main() -> None:
    wakeups()
    if torch.cuda.is_available():
        gathers()
        event_waits()


if __name__ == "__main__":
    main()
