"""The model process's start-up, in-process: freezing the heap once ready, and a failure after loading."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.serving import server as srv
from runtime.serving.examples import MLP
from runtime.serving.loader import LoadedModel
from runtime.serving.signature import Signature, TensorSpec


def _server() -> srv.Server:
    sig = Signature((TensorSpec("x", "FP32", (-1, 16)),), ())
    loaded = LoadedModel(MLP().eval(), sig, "mlp", "1", "test:mlp", "test-mlp", Path("."))
    cfg = srv.ServeConfig(model_uri="test:mlp", model_name="mlp", mode="eager", workers=0, host="127.0.0.1")
    return srv.Server(cfg, lambda: loaded)


async def _start(s: srv.Server) -> None:
    s._start_model()
    await s._await_model()


def test_ready_model_process_has_frozen_its_heap() -> None:
    """What keeps full collections (30-330 ms here) from stalling requests: the start-up heap is frozen."""
    gc.unfreeze()
    s = _server()
    try:
        asyncio.run(_start(s))
        assert s.is_ready()
        assert gc.get_freeze_count() > 10_000  # torch, the model: most of what is alive
        out = s.repo.get("mlp").batcher.submit([torch.ones(2, 16)], 2).result(10)
        assert out[0].shape == (2, 4)
    finally:
        gc.unfreeze()
        if s._pending is not None:
            s._pending[0].close(5)


def test_the_queue_flags_reach_the_batcher_and_drops_are_counted_by_reason() -> None:
    """--queue-timeout-ms, --lifo-after-ms, --priority-levels and --launch-deviations configure the model's
    batcher; a request whose deadline passed is answered DeadlineExceeded and counted under
    kubeforge_dropped_unrun_total{reason="expired"}."""
    import time

    from runtime.serving.errors import DeadlineExceeded

    s = _server()
    s.cfg = srv.ServeConfig(
        **{
            **vars(s.cfg),
            "queue_timeout_ms": 250.0,
            "lifo_after_ms": 40.0,
            "priority_levels": 3,
            "launch_deviations": 0.5,
        }
    )
    try:
        asyncio.run(_start(s))
        b = s.repo.get("mlp").batcher
        assert (b.queue_timeout_s, b.lifo_after_s) == (0.25, 0.04)
        assert (b.priority_levels, b.default_priority) == (3, 3)  # no default level named: the last
        assert b._deviations == 0.5  # --launch-deviations
        late = b.submit([torch.ones(1, 16)], 1, deadline=time.monotonic() - 1)
        assert isinstance(late.exception(10), DeadlineExceeded)
        assert b.submit([torch.ones(1, 16)], 1).result(10)[0].shape == (1, 4)
        text = s.metrics.render().decode()
        assert 'kubeforge_dropped_unrun_total{model="mlp",reason="expired"} 1.0' in text
    finally:
        if s._pending is not None:
            s._pending[0].close(5)


def test_a_failure_after_loading_is_reported_and_never_ready(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(process: str) -> None:
        raise RuntimeError("freeze failed")

    monkeypatch.setattr(srv, "freeze_heap", broken)
    s = _server()
    try:
        with caplog.at_level(logging.ERROR, logger="runtime.serving.server"):
            asyncio.run(_start(s))
        assert not s.is_ready() and not s.repo.models
        assert s.failed == "RuntimeError: freeze failed"
        assert "model failed to start after loading" in caplog.text
        assert s.server_info()["kubeforge"]["error"] == "RuntimeError: freeze failed"
    finally:
        if s._pending is not None:
            s._pending[0].close(5)


def test_a_failed_batcher_thread_drains_the_server_and_ends_it_with_the_error() -> None:
    """The batcher thread failing (a bug of ours; here its source raises) makes the server not ready and
    stop, its error kept for the CLI to raise (a non-zero exit: the pod restarts instead of staying up
    answering nothing)."""
    from runtime.serving.errors import Unavailable

    class Broken:
        def pump(self, timeout: float | None) -> None:
            raise RuntimeError("a bug in the hub")

        def wake(self) -> None:
            pass

    async def main(s: srv.Server) -> None:
        from tests.fixtures.polling import until

        await _start(s)
        assert s.is_ready()
        b = s.repo.get("mlp").batcher
        b.set_source(Broken())
        with contextlib.suppress(Unavailable):  # refused if the batcher thread's own wait pumped it already
            b.submit([torch.ones(1, 16)], 1)  # wakes the batcher thread, which then pumps its source
        assert await until(lambda: s._stop.is_set(), 10)
        assert isinstance(s.error, RuntimeError) and str(s.error) == "a bug in the hub"
        assert s.draining and not s.is_ready()
        with pytest.raises(Unavailable, match="batcher thread failed"):
            b.submit([torch.ones(1, 16)], 1)

    s = _server()
    try:
        asyncio.run(main(s))
    finally:
        if s._pending is not None:
            s._pending[0].close(5)


def test_a_batch_of_results_wakes_the_event_loop_once() -> None:
    from runtime.serving import model
    from runtime.serving.batching import Answer

    async def main() -> tuple[list[object], int]:
        loop = asyncio.get_running_loop()
        calls = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            return schedule(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        waker = model._waker()
        futs: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(50)]
        values: list[Any] = [*range(49), ValueError("bad row")]
        first = Answer(futs[:20], split=values[:20])
        rest = Answer(futs[20:], split=values[20:])
        # a batch answered from the batcher's thread, in two deliveries, while the loop is busy
        t = threading.Thread(target=lambda: (waker.deliver(first), waker.deliver(rest)))
        t.start()
        t.join()
        return await asyncio.gather(*futs, return_exceptions=True), calls

    results, calls = asyncio.run(main())
    assert results[:-1] == list(range(49))
    assert isinstance(results[-1], ValueError)
    assert calls == 1


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_server_threads_carry_their_names_to_the_os() -> None:
    from runtime.serving.logs import name_os_thread

    seen: dict[str, str] = {}

    def body() -> None:
        name_os_thread()
        seen["comm"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    t = threading.Thread(target=body, name="batcher-a-long-model-name")
    t.start()
    t.join()
    assert seen["comm"] == "batcher-a-long-"  # the kernel keeps 15 bytes


def test_one_loop_turns_requests_form_one_batch_though_the_batcher_thread_runs_between_them() -> None:
    """Requests that reach a model in one turn of the event loop are one batch, even when the batcher's thread
    gets the GIL between them (as under uvloop, which runs its loop without the GIL): the turn's first
    request holds an announcement until the turn ends, and giving it up lets the batch form at once (not
    after max_delay); each request gets its own rows back."""
    import time

    from runtime.serving.batching import Batcher
    from runtime.serving.model import ServedModel

    sig = Signature((TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 2)),))
    sizes: list[int] = []

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        sizes.append(xs[0].shape[0])
        return (xs[0] * 2,)

    batcher = Batcher(run, max_batch_size=8, max_delay_s=5.0)
    model = ServedModel("m", "1", sig, batcher, 8, ready=True)

    def let_go_of_the_gil() -> None:  # inside this turn: the batcher's thread, woken, runs meanwhile
        time.sleep(0.02)

    async def one(i: int) -> tuple[torch.Tensor, ...]:
        if i:  # between one request queued and the next one read (not announced yet: still unread)
            let_go_of_the_gil()
        batcher.announce()  # as the protocol layers do once a request's body is known
        return await model.infer([torch.full((1, 2), float(i))], 1)

    async def main() -> list[tuple[torch.Tensor, ...]]:
        return await asyncio.gather(*(one(i) for i in range(4)))

    t0 = time.perf_counter()
    try:
        outs = asyncio.run(main())
    finally:
        batcher.close(5)
    assert sizes == [4]
    assert time.perf_counter() - t0 < 2.5  # the held announcement given up with a notify, not timed out
    assert [float(o[0][0, 0]) for o in outs] == [0.0, 2.0, 4.0, 6.0]
    assert batcher._announced == 0


def test_a_request_for_a_model_not_ready_is_refused_by_name_and_withdrawn_wherever_it_runs() -> None:
    """ServedModel (batches in this process) and RemoteModel (batches in the model process): while the model
    compiles or warms up, a request is refused (503 / UNAVAILABLE) naming the model, and the batcher stops
    waiting for it (its announcement withdrawn); once ready, each runs it where its batches run."""
    from runtime.serving.batching import Batcher
    from runtime.serving.errors import Unavailable
    from runtime.serving.frontend import RemoteModel
    from runtime.serving.model import ServedModel

    sig = Signature((TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 2)),))
    x = torch.ones(1, 2)

    class Worker:  # stands in for the worker's link to the model process: records what reaches it
        def __init__(self) -> None:
            self.calls = 0

        async def infer(self, *args: Any) -> tuple[torch.Tensor, ...]:
            self.calls += 1
            return (args[0][0] * 3,)

    batcher = Batcher(lambda xs: (xs[0] * 2,), max_batch_size=4)
    worker = Worker()
    local = ServedModel("local", "1", sig, batcher, 4)
    remote = RemoteModel("remote", "1", sig, batcher, 4)
    remote.worker = worker  # type: ignore[assignment]

    async def main() -> None:
        for model in (local, remote):
            batcher.announce()
            with pytest.raises(Unavailable, match=f"model '{model.name}' is not ready"):
                await model.infer([x], 1)
            assert batcher._announced == 0
        assert worker.calls == 0
        local.ready = remote.ready = True
        assert torch.equal((await local.infer([x], 1))[0], x * 2)
        assert torch.equal((await remote.infer([x], 1))[0], x * 3) and worker.calls == 1

    try:
        asyncio.run(main())
    finally:
        batcher.close(5)
