"""Dynamic batching: batched results equal unbatched ones, bounded queue, padding, drain."""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from runtime.serving.batching import _FUTURES, Answer, Batcher
from runtime.serving.errors import Cancelled, DeadlineExceeded, QueueFull, Unavailable
from runtime.serving.examples import MLP, TokenTagger
from tests.fixtures.polling import holds_within, until


def _runner(model: torch.nn.Module, seen: list[int]):  # type: ignore[no-untyped-def]
    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        seen.append(xs[0].shape[0])
        with torch.inference_mode():
            out = model(*xs)
        return out if isinstance(out, tuple) else (out,)

    return run


def test_batched_results_equal_unbatched_and_batches_form() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    seen: list[int] = []
    gate = threading.Event()
    inner = _runner(model, seen)

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        gate.wait(5)  # hold the first batch so the others queue up behind it
        return inner(xs)

    b = Batcher(run, max_batch_size=8, max_delay_s=0.0, max_queue_size=100)
    rows = [torch.randn(1 + i % 3, 16) for i in range(20)]
    futs = [b.submit([r], r.shape[0]) for r in rows]
    gate.set()
    outs = [f.result(10)[0] for f in futs]
    b.close(5)
    for r, o in zip(rows, outs, strict=True):
        with torch.inference_mode():
            want = model(r)
        assert o.shape == want.shape
        torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)
    assert sum(seen) == sum(r.shape[0] for r in rows)
    assert max(seen) > 3 and max(seen) <= 8, seen  # requests were stacked, never past max_batch_size


def test_queue_full_raises_and_memory_stays_bounded() -> None:
    gate = threading.Event()

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        gate.wait(5)
        return (xs[0],)

    b = Batcher(run, max_batch_size=1, max_delay_s=0.0, max_queue_size=3)
    first = b.submit([torch.zeros(1, 2)], 1)
    # wait until the worker took the first request, so the queue is empty again
    for _ in range(200):
        if b.queued == 0:
            break
        threading.Event().wait(0.01)
    queued = [b.submit([torch.zeros(1, 2)], 1) for _ in range(3)]
    with pytest.raises(QueueFull, match="queue is full"):
        b.submit([torch.zeros(1, 2)], 1)
    assert b.queued == 3
    gate.set()
    for f in [first, *queued]:
        assert f.result(5)[0].shape == (1, 2)
    b.close(5)


def test_close_finishes_queued_requests_then_refuses() -> None:
    gate = threading.Event()

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        gate.wait(5)
        return (xs[0] + 1,)

    b = Batcher(run, max_batch_size=2, max_delay_s=0.0, max_queue_size=10)
    futs: list[Future[tuple[torch.Tensor, ...]]] = [
        b.submit([torch.full((1, 1), float(i))], 1) for i in range(5)
    ]
    closer = threading.Thread(target=b.close, args=(10,))
    closer.start()
    gate.set()
    closer.join(10)
    assert [f.result(0)[0].item() for f in futs] == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(Unavailable, match="shutting down"):
        b.submit([torch.zeros(1, 1)], 1)


def test_batch_buckets_pad_rows_and_cut_them_off() -> None:
    seen: list[int] = []
    model = MLP().eval()
    b = Batcher(_runner(model, seen), max_batch_size=8, max_delay_s=0.0, batch_buckets=(1, 4, 8))
    x = torch.randn(3, 16)
    out = b.submit([x], 3).result(5)[0]
    b.close(5)
    assert seen == [4]  # 3 rows padded up to the bucket of 4
    with torch.inference_mode():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_variable_lengths_are_bucketed_padded_and_equal_unpadded() -> None:
    torch.manual_seed(0)
    model = TokenTagger().eval()
    seen: list[tuple[int, ...]] = []

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        seen.append(tuple(xs[0].shape))
        with torch.inference_mode():
            return tuple(model(*xs))

    gate = threading.Event()

    def gated(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        gate.wait(5)
        return run(xs)

    b = Batcher(gated, max_batch_size=16, max_delay_s=0.0, variable_dims=[[1]], pad_multiple=8)
    seqs = [torch.randint(1, 100, (1, n)) for n in (5, 7, 8, 3, 12, 16)]
    futs = [b.submit([s], 1) for s in seqs]
    gate.set()
    for s, f in zip(seqs, futs, strict=True):
        logits, tags = f.result(10)
        with torch.inference_mode():
            want_logits, want_tags = model(s)
        assert logits.shape == want_logits.shape and tags.shape == want_tags.shape
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(tags, want_tags)
    b.close(5)
    assert {shape[1] for shape in seen} <= {8, 16}  # only padded lengths reached the model
    assert sum(shape[0] for shape in seen) == len(seqs)


def test_model_error_fails_only_that_batch() -> None:
    calls = {"n": 0}

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return (xs[0],)

    b = Batcher(run, max_batch_size=1, max_delay_s=0.0)
    with pytest.raises(Exception, match="boom"):
        b.submit([torch.zeros(1, 1)], 1).result(5)
    assert b.submit([torch.ones(1, 1)], 1).result(5)[0].item() == 1.0
    b.close(5)


class _BrokenSource:
    """A batcher Source with a bug: once `fail` is set, its pump raises."""

    def __init__(self) -> None:
        self.fail = False

    def pump(self, timeout: float | None) -> None:
        if self.fail:
            raise RuntimeError("a bug in the source")
        time.sleep(0.001 if timeout is None else min(timeout, 0.001))

    def wake(self) -> None:
        pass


def test_a_batcher_thread_that_fails_answers_every_request_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should the batcher thread's loop raise (a bug of ours, here in its source), nothing would answer the
    queued requests: they get Unavailable naming the failure, so do later ones, on_failure is told (the
    server then drains and exits, so the pod restarts), and the failure is logged as critical."""
    started, gate = threading.Event(), threading.Event()

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        started.set()
        gate.wait(5)
        return (xs[0] * 2,)

    b = Batcher(run, max_batch_size=1, max_delay_s=0.0, max_queue_size=10)
    told: list[BaseException] = []
    b.on_failure = told.append
    source = _BrokenSource()
    b.set_source(source)
    first = b.submit([torch.ones(1, 2)], 1)
    assert started.wait(5)  # its batch runs, held at the gate
    queued = b.submit([torch.ones(1, 2)], 1)
    source.fail = True
    with caplog.at_level("CRITICAL", logger="runtime.serving.batching"):
        gate.set()
        assert torch.equal(first.result(5)[0], torch.full((1, 2), 2.0))  # the batch under way is answered
        with pytest.raises(Unavailable, match=r"batcher thread failed \(RuntimeError: a bug in the source\)"):
            queued.result(5)
    assert [str(e) for e in told] == ["a bug in the source"] and b.error is told[0]
    with pytest.raises(Unavailable, match="batcher thread failed"):
        b.submit([torch.ones(1, 2)], 1)
    assert "the batcher thread failed" in caplog.text
    b.close(5)
    assert not b._thread.is_alive()


class _WakeBrokenSource(_BrokenSource):
    """A source whose wake-up raises once told to (as writing a closed pipe would): the thread that wakes
    the batcher thread from its pump, here the finishing thread, fails."""

    def pump(self, timeout: float | None) -> None:
        time.sleep(0.001 if timeout is None else min(timeout, 0.001))

    def wake(self) -> None:
        if self.fail:
            raise OSError("a bug in the wake-up")


def test_a_finishing_thread_that_fails_answers_every_request_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pipelined, the finishing thread answers the launched batches: should it fail, they would never be
    answered and the batcher thread would wait for a free slot forever. The batch it was finishing, the
    batch launched behind it and the queued request get Unavailable naming the failure; so do later ones;
    on_failure is told, and both threads end on close."""
    launched: list[int] = []
    gates: list[threading.Event] = []
    b = Batcher(_deferred(torch.nn.Identity(), launched, gates), max_batch_size=1, max_delay_s=0.0, depth=2)
    told: list[BaseException] = []
    b.on_failure = told.append
    source = _WakeBrokenSource()
    b.set_source(source)
    futs = [b.submit([torch.ones(1, 2)], 1) for _ in range(3)]
    assert holds_within(lambda: len(launched) == 2)  # the third waits for a free slot,
    assert holds_within(lambda: b._pumping)  # the batcher thread in its source's pump meanwhile
    source.fail = True
    with caplog.at_level("CRITICAL", logger="runtime.serving.batching"):
        gates[0].set()  # the first batch is done: waking the batcher thread for the next one fails
        for f in futs:
            with pytest.raises(
                Unavailable, match=r"finishing thread failed \(OSError: a bug in the wake-up\)"
            ):
                f.result(5)
    assert [str(e) for e in told] == ["a bug in the wake-up"] and b.error is told[0]
    with pytest.raises(Unavailable, match="finishing thread failed"):
        b.submit([torch.ones(1, 2)], 1)
    assert "the batcher's finishing thread failed" in caplog.text
    source.fail = False  # close wakes the batcher thread too
    b.close(5)
    assert b._finisher is not None
    assert not b._thread.is_alive() and not b._finisher.is_alive()
    assert b._inflight == 0 and b._running == 0


def test_a_failing_metrics_observer_is_logged_once_and_requests_are_still_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def observer(*args: Any) -> None:
        calls.append(args[0])
        raise ZeroDivisionError("a bug in the metrics")

    b = Batcher(lambda xs: (xs[0] * 2,), max_batch_size=1, max_delay_s=0.0, observer=observer)
    with caplog.at_level("ERROR", logger="runtime.serving.batching"):
        for i in range(3):
            assert torch.equal(
                b.submit([torch.full((1, 2), float(i))], 1).result(5)[0], torch.full((1, 2), 2.0 * i)
            )
    b.close(5)
    assert calls == [1, 1, 1]
    assert caplog.text.count("recording a batch's metrics failed") == 1 and b.error is None


def _gated(seen: list[float], sizes: list[int] | None = None):  # type: ignore[no-untyped-def]
    """A runner that holds each batch until its gate is set, then doubles it; records the first column."""
    gate = threading.Event()

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        gate.wait(5)
        seen.extend(xs[0][:, 0].tolist())
        if sizes is not None:
            sizes.append(xs[0].shape[0])
        return (xs[0] * 2,)

    return run, gate


def _held(
    max_batch_size: int, **kw: Any
) -> tuple[Batcher, list[float], threading.Event, list[Any], Future[Any]]:
    """A batcher over `_gated` that records what it drops ((how many, why)), with a first request of 1.0
    taken into a batch and held at the gate: what is submitted next queues. Returns the batcher, the values
    the model saw, the gate, the drops and the first request's future."""
    seen: list[float] = []
    run, gate = _gated(seen)
    dropped: list[tuple[int, str]] = []
    b = Batcher(run, max_batch_size=max_batch_size, max_delay_s=0.0, **kw)
    b.configure(
        name="m", batched=True, max_batch_size=max_batch_size, batch_buckets=None, variable_dims=(),
        pad_multiple=None, observer=None, dropped=lambda n, why: dropped.append((n, why)),
    )  # fmt: skip
    first = b.submit([torch.full((1, 1), 1.0)], 1)
    assert holds_within(lambda: b.queued == 0)  # running, held at the gate
    return b, seen, gate, dropped, first


def test_a_request_cancelled_before_its_batch_runs_is_dropped_with_an_error_and_never_run() -> None:
    """Its client left (a worker's CANCEL, an event loop's cancelled future): the model never sees its rows,
    its sink gets Cancelled (so a worker frees its slot), the requests around it are answered, and its rows
    take no room in the batch that drops it."""
    seen: list[float] = []
    sizes: list[int] = []
    run, gate = _gated(seen, sizes)  # holds the first batch so the others queue up behind it
    b = Batcher(run, max_batch_size=2, max_delay_s=0.0, max_queue_size=100)
    first = b.submit([torch.full((1, 1), 1.0)], 1)
    assert holds_within(lambda: b.queued == 0)  # taken into the first batch, held at the gate
    sink = _Collect()
    queued = [b.submit_to(sink, i, [torch.full((1, 1), 10.0 + i)], 1) for i in range(4)]
    queued[1].cancelled = queued[3].cancelled = True
    gate.set()
    assert first.result(5)[0].item() == 2.0
    assert holds_within(lambda: len(sink.results) == 4)
    b.close(5)
    got = dict(sink.results)
    assert got[0][0].item() == 20.0 and got[2][0].item() == 24.0  # type: ignore[index]
    for i in (1, 3):
        assert isinstance(got[i], Cancelled) and "client left" in got[i].message  # type: ignore[union-attr]
    assert sorted(seen) == [1.0, 10.0, 12.0]  # the cancelled rows never reached the model
    assert sizes == [1, 2]  # the two live ones in one batch of 2: the cancelled ones took no room


def test_requests_past_the_queue_timeout_are_dropped_unrun_with_deadline_exceeded() -> None:
    """The queue timeout passes while requests wait: they are answered DeadlineExceeded (504) and never run,
    whatever their shape (a patient client's too), counted as expired; what comes later runs."""
    b, seen, gate, dropped, first = _held(max_batch_size=4, max_queue_size=100, queue_timeout_s=0.05)
    late = [
        b.submit([torch.full((1, 1), 2.0)], 1),
        b.submit([torch.full((1, 2), 3.0)], 1),  # another shape: another batch
        b.submit([torch.full((1, 1), 4.0)], 1, deadline=time.monotonic() + 60),
    ]
    time.sleep(0.1)  # past the 50 ms
    gate.set()
    assert first.result(5)[0].item() == 2.0
    for f in late:
        e = f.exception(5)
        assert isinstance(e, DeadlineExceeded) and e.http_status == 504, e
        assert "past the server's queue timeout (--queue-timeout-ms)" in e.message
    assert b.submit([torch.full((1, 1), 5.0)], 1).result(5)[0].item() == 10.0
    b.close(5)
    assert seen == [1.0, 5.0]
    assert dropped == [(3, "expired")]


def test_a_request_whose_client_deadline_would_pass_before_its_answer_is_not_run() -> None:
    """A client's deadline (Triton's timeout parameter, grpc-timeout) that cannot be met: batches have taken
    ~0.1 s from launch to answer, so a request whose client leaves before a batch launched at its turn could
    be answered is dropped unrun; one with time enough runs."""
    seen: list[float] = []
    run, gate = _gated(seen)
    gate.set()

    def slow(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        time.sleep(0.1)
        return run(xs)

    b = Batcher(slow, max_batch_size=1, max_delay_s=0.0, max_queue_size=100)
    assert b.submit([torch.full((1, 1), 1.0)], 1).result(5)[0].item() == 2.0  # learns ~0.1 s per batch
    busy = b.submit([torch.full((1, 1), 2.0)], 1)
    assert holds_within(lambda: b.queued == 0)
    now = time.monotonic()
    hopeless = b.submit([torch.full((1, 1), 3.0)], 1, deadline=now + 0.15)  # ~0.1 s queued, then 0.1 s
    fine = b.submit([torch.full((1, 1), 4.0)], 1, deadline=now + 5)
    assert busy.result(5)[0].item() == 4.0 and fine.result(5)[0].item() == 8.0
    e = hopeless.exception(5)
    assert isinstance(e, DeadlineExceeded) and "would pass before a batch started now" in e.message
    b.close(5)
    assert seen == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("lifo", [False, True])
def test_in_overload_the_newest_requests_go_first_when_asked(lifo: bool) -> None:
    """With lifo_after_s, once the oldest queued request has waited that long, batches take the newest first
    (whose clients are most likely still waiting); the oldest still run, last. Without it: oldest first."""
    seen: list[float] = []
    sizes: list[int] = []
    run, gate = _gated(seen, sizes)
    b = Batcher(
        run, max_batch_size=2, max_delay_s=0.0, max_queue_size=100, lifo_after_s=0.05 if lifo else 0.0
    )
    first = b.submit([torch.full((1, 1), 0.0)], 1)
    assert holds_within(lambda: b.queued == 0)
    futs = [b.submit([torch.full((1, 1), float(i))], 1) for i in range(1, 6)]
    time.sleep(0.1)  # the oldest has waited past 50 ms
    gate.set()
    assert [f.result(5)[0].item() for f in [first, *futs]] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    b.close(5)
    assert sizes == [1, 2, 2, 1]
    if lifo:  # newest first within the batch too; the queue drains, so the last one is the oldest
        assert seen == [0.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    else:
        assert seen == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("levels", [0, 3])
def test_priority_levels_take_the_most_urgent_first_and_fill_batches_with_the_rest(levels: int) -> None:
    """Triton's `priority`: with 3 levels, batches take level 1 first, then 2, then 3 (the default here:
    priority 0 and priorities past the last level go there), oldest first within a level, and a batch the
    urgent ones leave room in is filled with the next level's. Without levels the parameter is ignored."""
    seen: list[float] = []
    sizes: list[int] = []
    run, gate = _gated(seen, sizes)
    b = Batcher(run, max_batch_size=2, max_delay_s=0.0, max_queue_size=100, priority_levels=levels)
    first = b.submit([torch.full((1, 1), 0.0)], 1)
    assert holds_within(lambda: b.queued == 0)  # running, held at the gate
    priorities = {1.0: 0, 2.0: 2, 3.0: 1, 4.0: 7, 5.0: 1}  # value -> its request's priority parameter
    futs = [b.submit([torch.full((1, 1), v)], 1, priority=pr) for v, pr in priorities.items()]
    gate.set()
    assert [f.result(5)[0].item() for f in [first, *futs]] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    b.close(5)
    assert sizes == [1, 2, 2, 1]
    assert seen == ([0.0, 3.0, 5.0, 2.0, 1.0, 4.0] if levels else [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


def test_a_full_queue_takes_an_urgent_request_in_place_of_the_newest_least_urgent() -> None:
    """Queue full (3): an urgent request displaces the newest request of a less urgent level, which gets
    QueueFull (429) naming why and is counted as displaced; one of the least urgent level, or an urgent one
    when only urgent ones wait, is refused as before."""
    b, seen, gate, dropped, first = _held(max_batch_size=1, max_queue_size=3, priority_levels=2)

    def one(v: float, priority: int) -> Future[tuple[torch.Tensor, ...]]:
        return b.submit([torch.full((1, 1), v)], 1, priority=priority)

    low1, low2, high1 = one(1.0, 0), one(2.0, 2), one(3.0, 1)  # the queue is full
    high2 = one(4.0, 1)
    e = low2.exception(5)  # the newest of level 2 made room
    assert isinstance(e, QueueFull) and e.http_status == 429 and e.overload
    assert "a more urgent request took the place of this one (priority level 2)" in e.message
    with pytest.raises(QueueFull, match="queue is full"):
        one(5.0, 2)  # nothing less urgent to displace
    high3 = one(6.0, 1)  # displaces low1
    assert isinstance(low1.exception(5), QueueFull)
    with pytest.raises(QueueFull, match="queue is full"):
        one(7.0, 1)  # only urgent ones wait
    assert dropped == [(1, "displaced"), (1, "displaced")]
    gate.set()
    assert [f.result(5)[0].item() for f in (first, high1, high2, high3)] == [2.0, 6.0, 8.0, 12.0]
    b.close(5)
    assert seen == [1.0, 3.0, 4.0, 6.0]


def test_in_overload_lifo_takes_the_newest_first_within_each_level() -> None:
    """lifo_after_s with priority levels: the most urgent level still goes first, newest first within it;
    the queue left behind stays in level order (one row per batch, so each formation re-reads it)."""
    seen: list[float] = []
    run, gate = _gated(seen)
    b = Batcher(
        run, max_batch_size=1, max_delay_s=0.0, max_queue_size=100, lifo_after_s=0.05, priority_levels=2
    )
    first = b.submit([torch.full((1, 1), 0.0)], 1)
    assert holds_within(lambda: b.queued == 0)
    futs = [b.submit([torch.full((1, 1), v)], 1, priority=pr) for v, pr in ((1, 2), (2, 1), (3, 2), (4, 1))]
    time.sleep(0.1)  # the oldest has waited past 50 ms
    gate.set()
    assert [f.result(5)[0].item() for f in futs] == [2.0, 4.0, 6.0, 8.0]
    assert first.result(5)[0].item() == 0.0
    b.close(5)
    assert seen == [0.0, 4.0, 2.0, 3.0, 1.0]


def test_with_priority_levels_lifo_is_judged_per_level() -> None:
    """The least urgent level has waited past lifo_after_s and fills the batch newest first; the urgent
    level, just come, stays oldest first and still goes first. (Judged on the queue's head alone, a fresh
    urgent request, the batch took the stale ones oldest first: 3, 4, 1, 2.)"""
    seen: list[float] = []
    sizes: list[int] = []
    run, gate = _gated(seen, sizes)
    b = Batcher(
        run, max_batch_size=4, max_delay_s=0.0, max_queue_size=100, lifo_after_s=0.05, priority_levels=2
    )
    first = b.submit([torch.full((1, 1), 0.0)], 1)
    assert holds_within(lambda: b.queued == 0)
    low = [b.submit([torch.full((1, 1), v)], 1, priority=2) for v in (1.0, 2.0)]
    time.sleep(0.1)  # the least urgent have waited past 50 ms
    urgent = [b.submit([torch.full((1, 1), v)], 1, priority=1) for v in (3.0, 4.0)]
    low.append(b.submit([torch.full((1, 1), 5.0)], 1, priority=2))
    gate.set()
    assert [f.result(5)[0].item() for f in [first, *urgent, *low]] == [0.0, 6.0, 8.0, 2.0, 4.0, 10.0]
    b.close(5)
    assert seen == [0.0, 3.0, 4.0, 5.0, 2.0, 1.0]
    assert sizes == [1, 4, 1]


def test_a_default_priority_past_the_levels_is_refused() -> None:
    run, _ = _gated([])
    with pytest.raises(
        ValueError, match=r"default_priority \(3\) must be between 1 and priority_levels \(2\)"
    ):
        Batcher(run, priority_levels=2, default_priority=3)


def test_a_cancelled_requests_task_ends_once_the_batcher_let_go_of_it() -> None:
    """The task awaiting a queued request is cancelled (its client left): the request is marked for the
    batcher to drop, and the task ends, with CancelledError, only once the batcher dropped it, so the
    protocol layer keeps the request's bytes counted while the batcher still holds its tensors."""
    from runtime.serving.model import _waker

    seen: list[float] = []
    run, gate = _gated(seen)
    b = Batcher(run, max_batch_size=1, max_delay_s=0.0, max_queue_size=100)

    async def main() -> None:
        first = asyncio.ensure_future(_waker().run(b, [torch.full((1, 1), 1.0)], 1, math.inf))
        assert await until(lambda: b.queued == 0 and seen == [] and b.busy, 5)  # held at the gate
        queued = asyncio.ensure_future(_waker().run(b, [torch.full((1, 1), 2.0)], 1, math.inf))
        await asyncio.sleep(0.05)
        assert b.queued == 1
        queued.cancel()
        await asyncio.sleep(0.1)
        assert not queued.done()  # the batcher still holds it
        gate.set()
        assert (await first)[0].item() == 2.0
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(queued, 5)
        assert b.queued == 0

    asyncio.run(main())
    b.close(5)
    assert seen == [1.0]  # the cancelled request never ran


class _Collect:
    """A sink that keeps every Answer it is handed."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.done = threading.Event()

    def deliver(self, answer: Answer) -> None:
        self.answers.append(answer)
        self.done.set()

    @property
    def results(self) -> list[tuple[object, object]]:
        return [r for a in self.answers for r in a.results()]


def _deferred(model: torch.nn.Module, launched: list[int], gates: list[threading.Event]):  # type: ignore[no-untyped-def]
    """A pipelined runner: computes at launch, hands the outputs out only once the batch's gate opens."""

    def run(xs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            out = (model(*xs),)
        gate = threading.Event()
        gates.append(gate)
        launched.append(xs[0].shape[0])

        def wait() -> tuple[torch.Tensor, ...]:
            assert gate.wait(10)
            return out

        return wait

    return run


def test_pipelined_batches_launch_while_earlier_ones_run_and_never_more_than_depth() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    launched: list[int] = []
    gates: list[threading.Event] = []
    b = Batcher(_deferred(model, launched, gates), max_batch_size=2, max_delay_s=0.0, depth=2)
    rows = [torch.randn(1, 16) for _ in range(6)]
    futs = [b.submit([r], 1) for r in rows]
    # two batches in flight, none answered yet: the third waits for a free slot
    assert holds_within(lambda: len(launched) == 2)
    assert not holds_within(lambda: len(launched) > 2, seconds=0.2)
    assert not any(f.done() for f in futs)
    gates[0].set()  # the first batch completes: its requests are answered and the third batch launches
    assert holds_within(lambda: len(launched) == 3)
    assert all(f.done() for f in futs[:2]) and not any(f.done() for f in futs[2:])
    for g in gates:
        g.set()
    outs = [f.result(10)[0] for f in futs]
    b.close(5)
    for r, o in zip(rows, outs, strict=True):
        with torch.inference_mode():
            torch.testing.assert_close(o, model(r))
    assert not b.busy


def test_pipelined_failure_reaches_that_batch_only_and_close_drains_in_flight() -> None:
    calls = 0

    def run(xs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        n = calls

        def wait() -> tuple[torch.Tensor, ...]:
            if n == 1:
                raise RuntimeError("device fault")
            return (xs[0] * 2,)

        return wait

    b = Batcher(run, max_batch_size=1, max_delay_s=0.0, depth=2)
    first = b.submit([torch.ones(1, 2)], 1)
    with pytest.raises(Exception, match="device fault"):
        first.result(5)
    rest = [b.submit([torch.full((1, 2), float(i))], 1) for i in range(5)]
    b.close(10)  # every queued and in-flight request is answered before close returns
    assert all(f.done() for f in rest)
    for i, f in enumerate(rest):
        torch.testing.assert_close(f.result(0)[0], torch.full((1, 2), 2.0 * i))


class _PipeSource:
    """A Source as the protocol worker hub is one: requests come on a pipe, whoever pumps submits them."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.r, self.w = os.pipe()
        self.arrived: list[tuple[Future[tuple[torch.Tensor, ...]], torch.Tensor]] = []
        self.pumped_by: set[str] = set()
        self.lock = threading.Lock()

    def send(self, x: torch.Tensor) -> Future[tuple[torch.Tensor, ...]]:
        fut: Future[tuple[torch.Tensor, ...]] = Future()
        with self.lock:
            self.arrived.append((fut, x))
        os.write(self.w, b"r")
        return fut

    def pump(self, timeout: float | None) -> None:
        self.pumped_by.add(threading.current_thread().name)
        if select.select([self.r], [], [], timeout)[0]:
            os.read(self.r, 4096)
        with self.lock:
            got, self.arrived = self.arrived, []
        for fut, x in got:
            self.batcher.submit_to(_FUTURES, fut, [x], x.shape[0])

    def wake(self) -> None:
        os.write(self.w, b"w")


def test_the_batcher_thread_reads_its_source_while_batches_run_and_close_wakes_it() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    launched: list[int] = []
    gates: list[threading.Event] = []
    b = Batcher(_deferred(model, launched, gates), name="src", max_batch_size=2, max_delay_s=0.0, depth=2)
    src = _PipeSource(b)
    b.set_source(src)
    rows = [torch.randn(1, 16) for _ in range(8)]
    futs = [src.send(r) for r in rows[:4]]
    assert holds_within(lambda: len(launched) == 2)  # two batches in flight: as many as depth allows
    futs += [src.send(r) for r in rows[4:]]
    # no slot is free, yet the batcher thread keeps reading: the requests sent since are queued
    assert holds_within(lambda: b.queued == 4)
    assert len(launched) == 2 and not any(f.done() for f in futs)
    for i in range(4):  # each batch answered frees a slot, which wakes the pump to launch the next
        assert holds_within(lambda: len(gates) > i)  # noqa: B023
        gates[i].set()
    outs = [f.result(10)[0] for f in futs]
    for r, o in zip(rows, outs, strict=True):
        with torch.inference_mode():
            torch.testing.assert_close(o, model(r))
    assert launched == [2, 2, 2, 2]
    assert src.pumped_by == {"batcher-src"}  # no other thread read the source
    # the batcher now pumps with no time limit; close must wake it
    b.close(5)
    assert not any(t.name == "batcher-src" for t in threading.enumerate())


def test_after_a_batch_that_ran_on_its_thread_the_batcher_reads_its_source_before_forming_the_next() -> None:
    """A synchronous runner keeps the batcher thread from its source while a batch runs; requests (and, with
    protocol workers, cancellations) that arrived meanwhile are read before the next batch forms, even when
    the queue is not empty: they join it, rather than waiting for the queue to run dry."""
    sizes: list[int] = []
    gate, entered = threading.Event(), threading.Event()

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        entered.set()
        gate.wait(5)
        sizes.append(xs[0].shape[0])
        return (xs[0] * 2,)

    b = Batcher(run, name="sync", max_batch_size=8, max_delay_s=0.0)
    src = _PipeSource(b)
    b.set_source(src)
    first = src.send(torch.ones(1, 1))
    assert entered.wait(5)  # running on the batcher thread
    queued = b.submit([torch.full((1, 1), 2.0)], 1)  # queued directly: the queue is not empty
    unread = src.send(torch.full((1, 1), 3.0))  # arrived at the source, not read yet
    gate.set()
    assert [f.result(5)[0].item() for f in (first, queued, unread)] == [2.0, 4.0, 6.0]
    b.close(5)
    assert sizes == [1, 2]  # the source's request joined the queued one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("copy_stream", [False, True], ids=["one-stream", "copy-stream"])
@pytest.mark.parametrize("big", [False, True], ids=["staged-rows", "page-locked-64KB-rows"])
def test_gpu_pipelined_cuda_graph_batches_equal_eager(copy_stream: bool, big: bool) -> None:
    """Two batches in flight through CUDA graphs (the next replay overwrites the graph's outputs): every
    request still gets its own rows, as the eager model computes them — with inputs staged through a
    page-locked buffer or copied straight from page-locked memory, on the compute stream or a copy
    stream of their own (the next batch launched early by its copies' measured time, so that they overlap
    the batch before)."""
    from runtime.serving import compile as compiler
    from runtime.serving import pagelock
    from runtime.serving.detect import detect_hardware
    from runtime.serving.server import PIPELINE_DEPTH, cuda_runner, h2d_seconds_per_byte, pinned_gather
    from runtime.serving.signature import Signature, TensorSpec

    torch.manual_seed(0)
    width = 16384 if big else 16  # 64 KB rows go to the GPU by DMA from page-locked memory, one per request
    model = torch.nn.Sequential(torch.nn.Linear(width, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    served = copy.deepcopy(model)  # build moves the module it is given to the GPU
    sig = Signature((TensorSpec("x", "FP32", (-1, width)),), ())
    built: dict[str, object] = {}
    stream = torch.cuda.Stream() if copy_stream else None  # type: ignore[no-untyped-call]

    def setup():  # type: ignore[no-untyped-def]
        b = compiler.build(
            served, sig, hw=detect_hardware(), mode="jit", warmup_batch_sizes=(1, 8), max_batch_size=8
        )
        built["b"] = b
        per_byte = built["per_byte"] = h2d_seconds_per_byte(b.device)
        batcher.configure(
            name="mlp",
            batched=True,
            max_batch_size=8,
            batch_buckets=b.compiled.batch_buckets,
            variable_dims=[[]],
            pad_multiple=None,
            observer=None,
            gather=pinned_gather(b.device, stream),
            depth=PIPELINE_DEPTH,
            lead=(lambda n: n * per_byte) if copy_stream else None,
        )
        return cuda_runner(b.compiled.run, b.device, stream)

    batcher = Batcher(setup=setup, max_batch_size=8, max_delay_s=0.001)
    assert batcher.ready.wait(300) and batcher.error is None
    assert "CUDA graph" in built["b"].compiled.path  # type: ignore[attr-defined]
    assert 1e9 < 1 / built["per_byte"] < 2e12  # type: ignore[operator]  # a host link's bytes per second
    rows = [torch.randn(1 + i % 3, width) for i in range(400)]
    if big:  # page-locked and known as such (the hub registers its arenas with pagelock)
        rows = [r.pin_memory() for r in rows]
        for r in rows:
            pagelock._add(r.data_ptr(), r.nbytes)
    try:
        futs = [batcher.submit([r], r.shape[0]) for r in rows]
        outs = [f.result(60)[0] for f in futs]
    finally:
        batcher.close(10)
        for r in rows if big else []:
            pagelock._remove(r.data_ptr())
    for r, o in zip(rows, outs, strict=True):
        with torch.inference_mode():
            torch.testing.assert_close(o, model(r), rtol=1e-3, atol=1e-3)
    with torch.inference_mode():
        assert not torch.equal(model(rows[0]), model(rows[1][:1]))  # distinct rows: a mix-up would show


def test_pipelined_next_batch_fills_while_the_device_is_busy_and_goes_when_it_is_done() -> None:
    """Past max delay: a request would wait for the busy device anyway, so it waits in a fuller batch."""
    model = MLP().eval()
    launched: list[int] = []
    gates: list[threading.Event] = []
    b = Batcher(_deferred(model, launched, gates), max_batch_size=8, max_delay_s=0.0, depth=2)
    first = b.submit([torch.randn(1, 16)], 1)
    assert holds_within(lambda: launched == [1])
    later = [b.submit([torch.randn(1, 16)], 1) for _ in range(3)]
    assert not holds_within(lambda: len(launched) > 1, seconds=0.3)  # max delay 0, yet no second launch
    gates[0].set()
    assert holds_within(lambda: launched == [1, 3])
    gates[1].set()
    for f in [first, *later]:
        assert f.result(5)[0].shape == (1, 4)
    b.close(5)


def _serial_device(device_s: float, launch_s: float | Callable[[], float] = 0.0):  # type: ignore[no-untyped-def]
    """A pipelined runner on a simulated device that runs one batch at a time, `device_s` each, after a
    launch that takes `launch_s` of CPU (or what it returns, each launch); doubles its input. Returns it and
    its log: per batch, when its launch began and when the device finishes it."""
    import time

    state = {"end": 0.0}
    log: list[tuple[float, float]] = []

    def run(xs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        entered = time.perf_counter()
        time.sleep(launch_s() if callable(launch_s) else launch_s)
        end = state["end"] = max(time.perf_counter(), state["end"]) + device_s
        log.append((entered, end))

        def wait() -> tuple[torch.Tensor, ...]:
            time.sleep(max(0.0, end - time.perf_counter()))
            return (xs[0] * 2,)

        return wait

    return run, log


def test_pipelined_next_batch_launches_when_the_device_is_about_to_be_done() -> None:
    """A launch takes CPU time (here 0.15 s) before the device starts on it: the next batch begins its launch
    that long before the device is expected to finish the one running (device seconds per batch size, learnt
    from earlier batches), so the device does not sit idle while the CPU launches, and the batch still
    fills until then."""
    device_s, launch_s = 0.4, 0.15
    run, log = _serial_device(device_s, launch_s)
    b = Batcher(run, max_batch_size=8, max_delay_s=0.0, depth=2)
    b.submit([torch.ones(1, 2)], 1).result(5)  # learns a batch of 1: device and launch seconds
    running = b.submit([torch.ones(1, 2)], 1)
    assert holds_within(lambda: len(log) == 2)
    following = b.submit([torch.full((1, 2), 3.0)], 1)
    torch.testing.assert_close(following.result(5)[0], torch.full((1, 2), 6.0))
    assert running.result(5)[0].shape == (1, 2)
    (_, running_end), (next_began, _) = log[1], log[2]
    assert next_began < running_end  # launched before the device was done...
    assert next_began > running_end - launch_s - 0.1  # ...and not at once: it waited until about then
    b.close(5)


def test_pipelined_next_batch_launches_earlier_by_its_inputs_copy_time_when_given_a_lead() -> None:
    """Inputs that travel to the device on a stream of their own (a lead: seconds per batch's bytes) go that
    much earlier, so that they are there when the device is done with the batch before; the lead asked for is
    a full batch's bytes (8 rows of 2 FP32 values here)."""
    device_s, per_byte = 0.6, 0.3 / 64
    asked: list[int] = []

    def lead(nbytes: int) -> float:
        asked.append(nbytes)
        return nbytes * per_byte

    run, log = _serial_device(device_s)
    b = Batcher(run, max_batch_size=8, max_delay_s=0.0, depth=2, lead=lead)
    b.submit([torch.ones(1, 2)], 1).result(5)  # learns a batch of 1's device seconds
    running = b.submit([torch.ones(1, 2)], 1)
    assert holds_within(lambda: len(log) == 2)
    following = b.submit([torch.full((1, 2), 3.0)], 1)
    torch.testing.assert_close(following.result(5)[0], torch.full((1, 2), 6.0))
    running.result(5)
    (_, running_end), (next_began, _) = log[1], log[2]
    assert set(asked) == {8 * 2 * 4}
    assert running_end - 0.3 - 0.1 < next_began < running_end - 0.3 + 0.15  # 0.3 s early, not at once
    b.close(5)


def test_device_idle_time_is_told_with_why_a_batch_being_launched_or_none_to_run() -> None:
    """Launches that take longer (0.15 s) than the device (0.05 s) leave it idle with the next batch being
    launched: launching, ~0.1 s a batch; then a quiet 0.3 s with nothing queued is no_requests."""
    device_s, launch_s = 0.05, 0.15
    run, _ = _serial_device(device_s, launch_s)
    idle: list[tuple[float, str]] = []
    b = Batcher(run, max_batch_size=1, max_delay_s=0.0, depth=2, idle=lambda s, why: idle.append((s, why)))
    for f in [b.submit([torch.ones(1, 2)], 1) for _ in range(4)]:
        f.result(5)
    late = [s for s, why in idle if why == "launching"]
    assert len(late) == 3 and all(0.05 < s < 0.2 for s in late), idle
    assert not [why for _, why in idle if why != "launching"]
    time.sleep(0.3)
    b.submit([torch.ones(1, 2)], 1).result(5)
    assert idle[-1][1] == "no_requests" and 0.3 + launch_s - 0.05 < idle[-1][0] < 0.3 + launch_s + 0.2
    b.close(5)


@pytest.mark.parametrize("deviations", [2.0, 0.0], ids=["mean-and-deviation", "mean-only"])
def test_launches_whose_time_varies_are_budgeted_their_deviation_and_leave_the_device_no_gap(
    deviations: float,
) -> None:
    """Launches take 0.02 and 0.12 s in turn (mean 0.07) in front of a device busy 0.3 s a batch, requests
    coming every 0.03 s: begun the mean before the device is free, every long launch ends 0.05 s late and the
    device waits for it (launching); begun the mean and twice the mean deviation before, none does."""
    times = itertools.cycle([0.02, 0.12])
    run, _ = _serial_device(0.3, lambda: next(times))
    idle: list[tuple[float, str]] = []
    b = Batcher(
        run,
        max_batch_size=16,
        max_delay_s=0.0,
        depth=2,
        batch_buckets=[16],
        idle=lambda s, why: idle.append((s, why)),
        launch_deviations=deviations,
    )
    futs = []
    end = time.perf_counter() + 3.0
    while time.perf_counter() < end:
        futs.append(b.submit([torch.ones(1, 2)], 1))
        time.sleep(0.03)
    for f in futs:
        torch.testing.assert_close(f.result(5)[0], torch.full((1, 2), 2.0))
    b.close(5)
    # the first batches learn the device's and the launches' seconds
    late = sum(s for s, why in idle[3:] if why == "launching")
    if deviations:
        assert late < 0.04, idle
    else:
        assert late > 0.08, idle  # what the deviation is for: without it the device waits


class _DeafSource:
    """A Source whose every round takes `round_s` and that no wake cuts short: a batcher thread that reads
    too long at a time."""

    def __init__(self, round_s: float) -> None:
        self.round_s = round_s

    def pump(self, timeout: float | None) -> None:
        time.sleep(self.round_s)

    def wake(self) -> None:
        pass


def test_device_idle_time_with_requests_queued_and_no_batch_formed_is_told_as_queued() -> None:
    """The batcher thread's source keeps it 0.15 s per round while the device takes 0.05 s a batch: the
    device runs dry with requests queued that no batch took yet (queued), not while one is launched."""
    run, _ = _serial_device(0.05)
    idle: list[tuple[float, str]] = []
    b = Batcher(run, max_batch_size=1, max_delay_s=0.0, depth=2, idle=lambda s, why: idle.append((s, why)))
    b.set_source(_DeafSource(0.15))
    futs = [b.submit([torch.full((1, 2), float(i))], 1) for i in range(4)]
    for i, f in enumerate(futs):
        torch.testing.assert_close(f.result(5)[0], torch.full((1, 2), 2.0 * i))
    queued = [s for s, why in idle if why == "queued"]
    assert queued and all(0.01 < s < 0.2 for s in queued), idle
    assert "launching" not in {why for _, why in idle}
    b.close(5)


def test_a_batch_that_fills_while_the_batcher_thread_reads_its_source_cuts_that_read_short() -> None:
    """With the device busy the batcher reads its source until the device is about to be done; a batch
    that fills meanwhile goes at once: the batcher thread wakes its own pump (which ends its round after the
    request being submitted), and not for a request that leaves the batch short of full."""
    gates: list[threading.Event] = []
    launched: list[int] = []
    b = Batcher(
        _deferred(MLP().eval(), launched, gates), name="cut", max_batch_size=2, max_delay_s=0.0, depth=2
    )
    src = _PipeSource(b)
    woken: list[tuple[str, int]] = []  # (thread, requests queued) per wake
    src.wake = lambda: woken.append((threading.current_thread().name, b.queued))  # type: ignore[method-assign]
    b.set_source(src)
    first = src.send(torch.randn(1, 16))
    assert holds_within(lambda: launched == [1])  # on the device (held by its gate): the next batch waits
    src.send(torch.randn(1, 16))  # one row of two: no wake
    assert holds_within(lambda: b.queued == 1)
    assert not [w for w in woken if w[0] == "batcher-cut"]
    src.send(torch.randn(1, 16))  # fills the batch: the batcher thread wakes its own pump
    assert holds_within(lambda: launched == [1, 2])
    assert ("batcher-cut", 2) in woken
    for g in gates:
        g.set()
    first.result(5)
    b.close(5)


def test_pipelined_batches_report_their_own_device_seconds_not_the_wait_behind_the_one_before() -> None:
    """Two batches launched at once on a device that takes 0.2 s each: the second is answered ~0.4 s after
    its launch, but only 0.2 s of that were its own (kubeforge_device_busy_seconds adds these up)."""
    device_s = 0.2
    run, _ = _serial_device(device_s)
    seen: list[tuple[float, float]] = []  # (run seconds, device seconds) per batch
    b = Batcher(
        run,
        max_batch_size=1,
        max_delay_s=0.0,
        depth=2,
        observer=lambda rows, n, oldest, queued, ran, dev: seen.append((ran, dev)),
    )
    futs = [b.submit([torch.ones(1, 2)], 1) for _ in range(2)]
    for f in futs:
        f.result(5)
    b.close(5)
    assert len(seen) == 2
    (_, dev1), (ran2, dev2) = seen
    assert ran2 > 1.6 * device_s  # answered after both batches' device time...
    for dev in (dev1, dev2):
        assert 0.9 * device_s < dev < 1.4 * device_s  # ...but its own share was one batch's


def _padded_device(base_s: float, row_s: float):  # type: ignore[no-untyped-def]
    """A pipelined runner on a simulated device that runs one batch at a time, `base_s` plus `row_s` per row
    it is given (padding included), after a launch of 0.03 s; doubles its input. Returns it and the rows of
    each batch it ran."""
    state = {"end": 0.0}
    ran: list[int] = []

    def run(xs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        ran.append(xs[0].shape[0])
        time.sleep(0.03)  # so the next batch forms that long before the device is done: while it is busy
        end = state["end"] = max(time.perf_counter(), state["end"]) + base_s + row_s * xs[0].shape[0]

        def wait() -> tuple[torch.Tensor, ...]:
            time.sleep(max(0.0, end - time.perf_counter()))
            return (xs[0] * 2,)

        return wait

    return run, ran


@pytest.mark.parametrize(
    ("base_s", "row_s", "want"),
    [(0.02, 0.02, [4, 8, 8, 4, 4]), (0.1, 0.005, [4, 8, 8, 8])],
    ids=["padding-costs-more: 4 rows go, 1 leads the next", "padding-costs-less: all 5 go padded"],
)
def test_while_the_device_is_busy_a_batch_goes_in_the_bucket_that_serves_the_most_rows_per_second(
    base_s: float, row_s: float, want: list[int]
) -> None:
    """Buckets of 4 and 8 rows, 5 rows queued while the device runs a batch: padded to 8 they cost the
    device 0.18 s (5 rows: 28 per s) where 4 of them cost 0.1 (40 per s), so 4 go and the fifth leads the
    next batch; where padding is cheap (0.14 s against 0.12: 36 against 33 per s) all 5 go. Every request
    gets its own answer either way."""
    run, ran = _padded_device(base_s, row_s)
    b = Batcher(run, max_batch_size=8, max_delay_s=0.0, depth=2, batch_buckets=[4, 8])
    b.submit([torch.ones(4, 2)], 4).result(5)  # the device seconds of both buckets are learnt
    b.submit([torch.ones(8, 2)], 8).result(5)
    busy = b.submit([torch.ones(8, 2)], 8)
    assert holds_within(lambda: len(ran) == 3)
    rows = [torch.full((1, 2), float(i)) for i in range(5)]
    futs = [b.submit([r], 1) for r in rows]
    for r, f in zip(rows, futs, strict=True):
        torch.testing.assert_close(f.result(5)[0], r * 2)
    busy.result(5)
    b.close(5)
    assert ran == want


def test_each_sink_gets_its_requests_of_a_batch_in_one_delivery() -> None:
    """Requests from two sinks, interleaved in one batch: each sink gets one Answer per batch naming its own
    requests' rows, which equal the unbatched model's outputs; a failed batch reaches every sink as one
    error."""
    torch.manual_seed(0)
    model = MLP().eval()
    gate, entered = threading.Event(), threading.Event()
    fail = False

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        entered.set()
        gate.wait(5)
        if fail:
            raise RuntimeError("device fault")
        with torch.inference_mode():
            return (model(xs[0]),)

    a, b = _Collect(), _Collect()
    batcher = Batcher(run, max_batch_size=16, max_delay_s=0.0)
    first = batcher.submit_to(a, "a0", [torch.randn(1, 16)], 1)  # runs alone, holding the gate
    assert entered.wait(5)
    rows = [torch.randn(n, 16) for n in (2, 1, 3, 1)]
    for i, (sink, x) in enumerate(zip([a, b, a, b], rows, strict=True)):
        batcher.submit_to(sink, f"{'ab'[i % 2]}{i + 1}", [x], x.shape[0])
    gate.set()
    assert holds_within(lambda: len(a.answers) == 2 and len(b.answers) == 1)
    second_a, only_b = a.answers[1], b.answers[0]
    assert first.tag == "a0" and a.answers[0].tags == ["a0"]
    assert second_a.tags == ["a1", "a3"] and only_b.tags == ["b2", "b4"]
    assert second_a.sliced and second_a.outputs is only_b.outputs
    for answer, xs in ((second_a, [rows[0], rows[2]]), (only_b, [rows[1], rows[3]])):
        for (_, outs), x in zip(answer.results(), xs, strict=True):
            assert not isinstance(outs, BaseException)
            with torch.inference_mode():
                torch.testing.assert_close(outs[0], model(x))
    fail = True
    batcher.submit_to(a, "a5", [torch.randn(1, 16)], 1)
    assert holds_within(lambda: len(a.answers) == 3)
    assert a.answers[2].tags == ["a5"] and not a.answers[2].sliced
    ((tag, err),) = a.answers[2].results()
    assert tag == "a5" and "device fault" in str(err)
    batcher.close(5)
