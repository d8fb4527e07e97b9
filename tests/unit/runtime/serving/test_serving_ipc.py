"""The protocol-worker <-> model-process wire format, the shared-memory arena, and merged metrics."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.serving import ipc, pagelock
from runtime.serving.batching import Batcher
from runtime.serving.metrics import Metrics, merge


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _arena(tmp_path: Path, slots: int = 4, slot_bytes: int = 4096) -> ipc.Arena:
    return ipc.Arena(str(tmp_path / "arena"), slots, slot_bytes, create=True)


@pytest.mark.parametrize("dtype", ipc.DTYPES, ids=str)
def test_request_round_trips_every_dtype_inline_and_through_the_arena(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    arena = _arena(tmp_path)
    xs = [_sample(dtype, (3, 5)), _sample(dtype, (3, 2, 2))]
    for offset in (arena.take(ipc.Arena.slot_need(xs)), None):
        placed = arena.place(xs, offset)
        assert all((p.offset >= 0) == (offset is not None) for p in placed)
        reader = ipc.FrameReader()
        wire = ipc.encode_request(41, 3, placed, deadline=12.5, priority=2)
        (kind, payload), *rest = reader.feed(wire)
        assert kind == ipc.REQ and not rest
        rid, rows, got, deadline, priority = ipc.decode_request(memoryview(payload), arena.buf)
        assert (rid, rows, deadline, priority) == (41, 3, 12.5, 2)
        assert ipc.sent_at(kind, payload) == pytest.approx(time.monotonic(), abs=5)
        for a, b in zip(xs, got, strict=True):
            assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)


@pytest.mark.parametrize("order", ["consecutive", "interleaved"])
def test_a_batchs_rows_answer_each_request_in_one_message(order: str) -> None:
    """A sink's requests of one batch go back in one ROWS message: each request gets exactly its rows of
    every output, whatever the dtype (BF16 included), the per-row shape (none, or with a 0 dimension) and
    whether the sink's requests sit together in the batch or between other workers' requests."""
    outs = [
        _sample(torch.bfloat16, (9, 4)),
        _sample(torch.int64, (9,)),
        _sample(torch.bool, (9, 2, 3)),
        _sample(torch.float32, (9, 0)),
    ]
    offsets, rows = ([0, 1, 3], [1, 2, 4]) if order == "consecutive" else ([0, 3, 8], [2, 1, 1])
    (kind, payload), *rest = ipc.FrameReader().feed(ipc.encode_rows([11, 12, 13], offsets, rows, outs))
    assert kind == ipc.ROWS and not rest
    got = ipc.decode_rows(memoryview(payload))
    assert [rid for rid, _ in got] == [11, 12, 13]
    for (_, mine), a, r in zip(got, offsets, rows, strict=True):
        assert len(mine) == len(outs)
        for t, o in zip(mine, outs, strict=True):
            assert t.dtype == o.dtype and t.shape == o[a : a + r].shape and torch.equal(t, o[a : a + r])


def test_requests_and_answers_carry_when_they_were_sent() -> None:
    before = time.monotonic()
    req = ipc.encode_request(1, 1, [ipc.Placed(torch.zeros(1, 2))])
    rows = ipc.encode_rows([1], [0], [1], [torch.zeros(1, 3)])
    after = time.monotonic()
    ((k1, p1),) = ipc.FrameReader().feed(req)
    ((k2, p2),) = ipc.FrameReader().feed(rows)
    assert before <= ipc.sent_at(k1, p1) <= after and before <= ipc.sent_at(k2, p2) <= after
    assert ipc.decode_rows(memoryview(p2))[0][0] == 1  # the stamp leaves the message readable


def test_worker_and_model_process_see_the_same_arena(tmp_path: Path) -> None:
    a = _arena(tmp_path)
    b = ipc.Arena(a.path, a.slots, a.slot_bytes, create=False)  # what the other process maps
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    placed = a.place([x], a.take(x.numel() * 4))
    (y,) = ipc.decode_request(memoryview(ipc.encode_request(1, 3, placed)[5:]), b.buf)[2]
    assert torch.equal(x, y)
    a.counters[0] += 2
    assert int(b.counters[0]) == 2  # announcements travel through the header


def test_arena_hands_out_each_slot_once_and_sends_the_rest_inline(tmp_path: Path) -> None:
    arena = _arena(tmp_path, slots=2, slot_bytes=1024)
    assert arena.take(2048) is None  # larger than a slot: inline
    first, second = arena.take(100), arena.take(100)
    assert first is not None and second is not None and first != second
    assert arena.take(100) is None  # all taken: inline
    arena.give(first)
    assert arena.take(100) == first


def test_full_tmpfs_fails_at_creation_not_at_the_first_write(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ipc.Arena(str(tmp_path / "huge"), 1, 1 << 62, create=True)
    assert not (tmp_path / "huge").exists()


def _mapped(path: str) -> bool:
    return any(path in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_closed_arena_unmaps_once_the_last_tensor_viewing_it_is_gone(tmp_path: Path) -> None:
    """What the model process does with a dead worker's arena: inputs still in a batch keep it mapped."""
    path = str(tmp_path / "arena")
    arena = ipc.Arena(path, 2, 4096, create=True)
    x = torch.arange(8, dtype=torch.int64).reshape(2, 4)
    placed = arena.place([x], arena.take(x.nbytes))
    (view,) = ipc.decode_request(memoryview(ipc.encode_request(1, 2, placed)[5:]), arena.buf)[2]
    assert _mapped(path)
    arena.close()
    assert arena.closed and _mapped(path)  # a request's input still views it
    assert torch.equal(view, x)
    del view
    assert not _mapped(path)
    ipc.Arena(path + "2", 2, 4096, create=True).close()  # no view: unmapped at once
    assert not _mapped(path + "2")


def test_frames_split_across_reads_and_several_per_read() -> None:
    outs = [torch.full((2, 3), float(i)) for i in range(3)]
    wire = b"".join(ipc.encode_response(i, [o]) for i, o in enumerate(outs))
    wire += ipc.encode_error(9, "QueueFull", "queue is full")
    reader = ipc.FrameReader()
    got = []
    for i in range(0, len(wire), 7):  # 7-byte reads: every frame arrives in pieces
        got += reader.feed(wire[i : i + 7])
    assert [k for k, _ in got] == [ipc.RESP] * 4
    for i, (_, payload) in enumerate(got[:3]):
        rid, result = ipc.decode_response(memoryview(payload))
        assert rid == i and isinstance(result, list) and torch.equal(result[0], outs[i])
    assert ipc.decode_response(memoryview(got[3][1])) == (9, ("QueueFull", "queue is full"))


def test_merged_metrics_add_up_per_label_set() -> None:
    hub, w1, w2 = Metrics(), Metrics(), Metrics()
    w1.requests.labels("m", "rest", "200").inc(3)
    w2.requests.labels("m", "rest", "200").inc(2)
    w2.requests.labels("m", "grpc", "429").inc()
    w1.latency.labels("m", "rest").observe(0.003)
    w2.latency.labels("m", "rest").observe(0.3)
    hub.batch_size.labels("m").observe(5)
    hub.ready.set(1)
    text = merge([hub.render(), w1.render(), w2.render()]).decode()
    lines = set(text.splitlines())
    assert 'kubeforge_requests_total{code="200",model="m",protocol="rest"} 5.0' in lines
    assert 'kubeforge_requests_total{code="429",model="m",protocol="grpc"} 1.0' in lines
    assert 'kubeforge_request_latency_seconds_count{model="m",protocol="rest"} 2.0' in lines
    assert 'kubeforge_request_latency_seconds_bucket{le="0.005",model="m",protocol="rest"} 1.0' in lines
    assert 'kubeforge_batch_size_sum{model="m"} 5.0' in lines
    assert "kubeforge_ready 1.0" in lines
    assert "_created" not in text


def test_batcher_waits_for_requests_other_processes_announced() -> None:
    """A batch forming while a worker decodes a request waits for it (up to the max delay)."""
    seen: list[int] = []

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        seen.append(xs[0].shape[0])
        return (xs[0] * 2,)

    b = Batcher(run, max_batch_size=8, max_delay_s=2.0)
    pending = [1]
    b.set_external_announced(lambda: pending[0])
    f1 = b.submit([torch.ones(1, 2)], 1)

    def late() -> None:
        time.sleep(0.2)
        pending[0] = 0
        b.submit([torch.zeros(1, 2)], 1)

    threading.Thread(target=late).start()
    assert torch.equal(f1.result(5)[0], torch.full((1, 2), 2.0))
    b.close(5)
    assert seen == [2]  # both rows in one batch


def test_shared_memory_is_shared_out_among_workers() -> None:
    from runtime.serving.hub import MAX_SLOTS, SLOT_BYTES, memory_room, plan_slots

    assert plan_slots(1, 64 * SLOT_BYTES) == 16  # a quarter of the room
    assert plan_slots(8, 64 * SLOT_BYTES) == 2
    assert plan_slots(2, 1 << 40) == MAX_SLOTS
    assert plan_slots(10**9) == 0  # too many workers for the memory: all inline
    assert memory_room() > 0 and 0 <= plan_slots(1) <= MAX_SLOTS


def test_anonymous_arena_is_mapped_through_proc_and_leaves_no_name_behind() -> None:
    a = ipc.Arena.anonymous("kubeforge-test", 2, 4096)
    b = ipc.Arena(a.path, a.slots, a.slot_bytes, create=False)  # what a worker does with the path
    b.buf[ipc.HEADER_BYTES : ipc.HEADER_BYTES + 5] = b"hello"
    assert bytes(a.buf[ipc.HEADER_BYTES : ipc.HEADER_BYTES + 5]) == b"hello"
    assert a.path.startswith("/proc/") and "memfd:kubeforge-test" in os.readlink(a.path)
    a.forget_path()  # both mapped: the descriptor goes, the memory stays while mapped
    with pytest.raises(FileNotFoundError):
        os.open(a.path, os.O_RDWR)
    b.buf[ipc.HEADER_BYTES] = ord("j")
    assert bytes(a.buf[ipc.HEADER_BYTES : ipc.HEADER_BYTES + 5]) == b"jello"
    a.close()
    b.close()


def test_pagelock_holds_only_tensors_wholly_inside_a_registered_range() -> None:
    """The batcher trusts `holds` to send a row by DMA straight from host memory: a row that starts or ends
    outside registered memory must go through the staging buffer instead."""
    host = torch.zeros(4096, dtype=torch.uint8)
    base = host.data_ptr()
    pagelock._add(base + 1024, 2048)
    try:
        assert pagelock.holds(host[1024:3072]) and pagelock.holds(host[2000:2001])
        assert not pagelock.holds(host[1000:1100])  # starts before
        assert not pagelock.holds(host[3000:3100])  # ends after
        assert not pagelock.holds(host[:16]) and not pagelock.holds(host[3072:])
        assert not pagelock.holds(torch.zeros(8))  # elsewhere
        pagelock._add(base, 512)  # a second range, below the first
        assert (
            pagelock.holds(host[:512])
            and pagelock.holds(host[1024:1025])
            and not pagelock.holds(host[511:513])
        )
    finally:
        assert pagelock._remove(base + 1024) and pagelock._remove(base)
    assert not pagelock._remove(base)  # gone: nothing to unregister twice
    assert not pagelock.holds(host[1024:3072])


def test_pinned_gather_direct_path_equals_concatenation() -> None:
    """The direct path's logic (one call copying every request's rows into its place, padding zeroed) on the
    CPU: large rows in a range marked page-locked take it, and so do one request's small rows; the batch
    equals the plain concatenation."""
    from runtime.serving.batching import cat_and_pad
    from runtime.serving.server import DIRECT_COPY_ROW_BYTES, pinned_gather

    row = DIRECT_COPY_ROW_BYTES // 4
    host = torch.randn(6, row)  # requests of 1, 3 and 2 rows, views of one "registered" buffer
    parts = [[host[0:1], host[1:4], host[4:6]]]
    pagelock._add(host.data_ptr(), host.nbytes)
    try:
        for padded in (6, 8):
            got = pinned_gather("cpu")(parts, padded)
            assert torch.equal(got[0], cat_and_pad(parts, padded)[0]), padded
            assert got[0].data_ptr() != host.data_ptr()  # a new batch, not a view of the rows
        # one request's small rows take it too (one copy either way); the staging path would need CUDA here
        one = [[host[1:3, :8].contiguous()]]
        pagelock._add(one[0][0].data_ptr(), one[0][0].nbytes)
        try:
            assert torch.equal(pinned_gather("cpu")(one, 4)[0], cat_and_pad(one, 4)[0])
        finally:
            pagelock._remove(one[0][0].data_ptr())
        if not torch.cuda.is_available():  # two requests' small rows are staged: page-locked host memory
            with pytest.raises(RuntimeError):
                pinned_gather("cpu")([[host[0:1, :8], host[1:2, :8]]], 2)
    finally:
        pagelock._remove(host.data_ptr())


def test_pagelock_register_without_cuda_changes_nothing() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_gpu_page_unlock_undoes_page_lock covers registration")
    host = torch.zeros(4096, dtype=torch.uint8)
    assert not pagelock.register(host.data_ptr(), 4096)
    assert not pagelock.holds(host)
    pagelock.unregister(host.data_ptr())  # never registered: a no-op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("copy_stream", [False, True], ids=["one-stream", "copy-stream"])
@pytest.mark.parametrize("driver", ["driver", "driver-fails", "torch"])
def test_gpu_gather_from_page_locked_arena_equals_cpu_concatenation(
    tmp_path: Path, copy_stream: bool, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large rows from a registered arena, and a lone request's small ones, go to the GPU by DMA, other small
    rows through the staging buffer; both give the batch the CPU concatenation gives (with a copy stream,
    once the compute stream waited for it, as cuda_runner does): through the CUDA driver, through torch's
    copies once a driver call failed, and through torch's alone (KUBEFORGE_CUDA_DRIVER_CALLS=0)."""
    from runtime.serving import cudadriver
    from runtime.serving.batching import cat_and_pad
    from runtime.serving.hub import _page_lock, _page_unlock
    from runtime.serving.server import pinned_gather

    monkeypatch.setattr(cudadriver, "_tried", False)
    monkeypatch.setattr(cudadriver, "_driver", None)
    if driver == "torch":
        monkeypatch.setenv(cudadriver.OFF_ENV, "0")
    loaded = cudadriver.load()
    assert (loaded is None) == (driver == "torch")
    calls: list[int] = []  # the driver's batch copies asked for
    if loaded is not None:
        real = loaded.copy_rows

        def counted(*args: Any) -> None:
            calls.append(1)
            if driver == "driver-fails":
                raise RuntimeError("CUDA driver error 1")
            real(*args)

        monkeypatch.setattr(loaded, "copy_rows", counted)

    # a memfd as in the server: CUDA page-locks shared memory pages, not every file system's
    arena = ipc.Arena.anonymous(f"kubeforge-test-{os.getpid()}", 4, 1 << 20)
    arena.forget_path()
    _page_lock(arena)
    try:
        big = [torch.randn(1, 3, 128, 128), torch.randn(2, 3, 128, 128)]  # 196 KB rows: direct copies
        ids = torch.randint(0, 9, (1, 8))  # 64 bytes in a slot: direct too as the batch's only request
        placed = [arena.place([t], arena.take(t.numel() * t.element_size()))[0] for t in [*big, ids]]
        *views, ids_view = [
            ipc.decode_request(memoryview(ipc.encode_request(0, 1, [p])[5:]), arena.buf)[2][0] for p in placed
        ]
        assert all(v.is_pinned() and pagelock.holds(v) for v in [*views, ids_view])
        small = [torch.randint(0, 9, (1, 8)), torch.randint(0, 9, (2, 8))]  # pageable: staging buffer
        stream = torch.cuda.Stream() if copy_stream else None  # type: ignore[no-untyped-call]
        gather = pinned_gather("cuda", stream)
        for parts in ([views, small[:2]], [[views[0]], [small[0]]], [[ids_view]]):
            rows = sum(t.shape[0] for t in parts[0])
            got = gather(parts, 4)
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
            want = cat_and_pad(parts, 4)
            for g, w in zip(got, want, strict=True):
                assert g.device.type == "cuda" and torch.equal(g.cpu(), w), rows
        torch.cuda.synchronize()
        # a batch's large rows (or its one request's) in one driver call each time; a failed call hands over
        # to torch for good
        assert len(calls) == {"driver": 3, "driver-fails": 1, "torch": 0}[driver]
    finally:
        # unregister before unmapping, as the hub does: a registration outliving its mapping makes CUDA
        # refuse the next mapping at that address ("already registered"), which failed the next GPU test
        _page_unlock(arena)
        arena.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_page_unlock_undoes_page_lock() -> None:
    from runtime.serving.hub import _page_lock, _page_unlock

    arena = ipc.Arena.anonymous(f"kubeforge-test-unlock-{os.getpid()}", 1, 1 << 20)
    arena.forget_path()
    view = lambda: ipc._tensor(5, (16,), arena.buf[ipc.HEADER_BYTES : ipc.HEADER_BYTES + 16])  # noqa: E731
    _page_lock(arena)
    assert view().is_pinned() and pagelock.holds(view())
    _page_unlock(arena)
    assert not view().is_pinned() and not pagelock.holds(view())
    arena.close()
    assert arena.closed


class _Recording:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))


def test_a_workers_requests_of_one_loop_turn_reach_the_model_process_in_one_write(tmp_path: Path) -> None:
    import asyncio

    from runtime.serving.config import ServeConfig
    from runtime.serving.frontend import Worker, WorkerConfig, _Link

    a = _arena(tmp_path)
    cfg = WorkerConfig(0, str(tmp_path / "sock"), a.path, a.slots, a.slot_bytes, ServeConfig(model_uri="x"))

    async def scenario() -> tuple[list[bytes], list[tuple[torch.Tensor, ...]]]:
        worker = Worker(cfg)
        worker.link = _Link(worker)
        worker.link.transport = _Recording()  # type: ignore[assignment]
        xs = [torch.full((1, 4), float(i)) for i in range(5)]
        calls = [asyncio.ensure_future(worker.infer([x], 1)) for x in xs]
        await asyncio.sleep(0)  # every call runs up to its await; the flush is due at the next turn
        assert worker.link.transport.writes == []  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        writes = list(worker.link.transport.writes)  # type: ignore[attr-defined]
        # the model process answers all five in one batch
        reader = ipc.FrameReader()
        requests = [ipc.decode_request(memoryview(p), a.buf) for _, p in reader.feed(writes[0])]
        ids = [r[0] for r in requests]
        doubled = torch.cat([r[2][0] for r in requests]) * 2
        rows = ipc.encode_rows(ids, list(range(5)), [1] * 5, [doubled])
        for kind, payload in ipc.FrameReader().feed(rows):
            worker.on_message(kind, payload)
        return writes, list(await asyncio.gather(*calls))

    writes, results = asyncio.run(scenario())
    assert len(writes) == 1
    assert [k for k, _ in ipc.FrameReader().feed(writes[0])] == [ipc.REQ] * 5
    for i, (y,) in enumerate(results):
        assert torch.equal(y, torch.full((1, 4), 2.0 * i))


def test_a_cancelled_request_is_dropped_in_the_model_process_and_ends_once_it_answers(tmp_path: Path) -> None:
    """The client of a worker's request leaves: the worker sends the model process a CANCEL for it, once,
    and the request's task ends (CancelledError) only when the model process has answered it, so its bytes
    stay counted while the model process may still hold them."""
    import asyncio

    from runtime.serving.config import ServeConfig
    from runtime.serving.frontend import Worker, WorkerConfig, _Link

    a = _arena(tmp_path)
    cfg = WorkerConfig(0, str(tmp_path / "sock"), a.path, a.slots, a.slot_bytes, ServeConfig(model_uri="x"))

    async def scenario() -> list[int]:
        worker = Worker(cfg)
        worker.link = _Link(worker)
        worker.link.transport = _Recording()  # type: ignore[assignment]
        call = asyncio.ensure_future(worker.infer([torch.ones(1, 4)], 1))
        await asyncio.sleep(0.01)
        call.cancel()
        call.cancel()
        await asyncio.sleep(0.05)
        assert not call.done()  # the model process still holds the request
        writes = b"".join(worker.link.transport.writes)  # type: ignore[attr-defined]
        frames = ipc.FrameReader().feed(writes)
        rid = ipc.decode_request(memoryview(frames[0][1]), a.buf)[0]
        for kind, payload in ipc.FrameReader().feed(ipc.encode_error(rid, "Cancelled", "the client left")):
            worker.on_message(kind, payload)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 5)
        return [k for k, _ in frames]

    assert asyncio.run(scenario()) == [ipc.REQ, ipc.CANCEL]


def test_a_body_read_into_a_slot_travels_from_there_aligned_and_the_slot_comes_back_once(
    tmp_path: Path,
) -> None:
    import asyncio

    import orjson

    from runtime.serving.config import ServeConfig
    from runtime.serving.frontend import Worker, WorkerConfig, _Link
    from runtime.serving.protocol.codec import decode_request
    from runtime.serving.signature import Signature, TensorSpec

    a = _arena(tmp_path, slots=2, slot_bytes=1 << 16)
    cfg = WorkerConfig(0, str(tmp_path / "sock"), a.path, a.slots, a.slot_bytes, ServeConfig(model_uri="x"))
    sig = Signature((TensorSpec("x", "FP32", (-1, 3, 8)),), ())
    x = torch.randn(2, 3, 8)
    head = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 3, 8], "datatype": "FP32", "parameters": {"binary_data_size": 192}}
            ]
        }
    )
    body = head + x.numpy().tobytes()

    async def scenario() -> None:
        worker = Worker(cfg)
        worker.link = _Link(worker)
        worker.link.transport = _Recording()  # type: ignore[assignment]
        # a body that is never decoded (client gone, bad request): released, its slot free again
        lost = worker.slot_body(len(body), len(head))
        assert lost is not None
        lost.release()
        lost.release()
        assert sorted(worker.arena._free) == [0, 1]
        slot = worker.slot_body(len(body), len(head))
        assert slot is not None
        slot.view[:] = body  # what the socket reads write
        req = decode_request(slot.view, len(head), sig, 8)
        call = asyncio.ensure_future(worker.infer(req.inputs, req.rows))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        ((kind, payload),) = ipc.FrameReader().feed(worker.link.transport.writes[0])  # type: ignore[attr-defined]
        rid, rows, (seen,), _, _ = ipc.decode_request(memoryview(payload), a.buf)  # the model process's view
        assert kind == ipc.REQ and rows == 2 and torch.equal(seen, x)
        offset = seen.data_ptr() - a.address
        assert offset % 64 == 0 and slot.offset <= offset < slot.offset + a.slot_bytes  # in place, aligned
        assert len(payload) < 100  # no tensor bytes inline
        slot.release()  # the HTTP layer lets go of its body: the slot is the model process's now
        assert worker.arena._free == [1]  # slot 0 still holds the request
        for k, p in ipc.FrameReader().feed(ipc.encode_rows([rid], [0], [2], [seen * 2])):
            worker.on_message(k, p)
        (y,) = await call
        assert torch.equal(y, x * 2) and sorted(worker.arena._free) == [0, 1]

    asyncio.run(scenario())


def test_a_slot_given_back_twice_is_still_lent_to_one_request_at_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A double give-back (a bookkeeping bug elsewhere) is logged and ignored: the free list never holds a
    slot twice, which would lend it to two requests whose bytes then overwrite each other."""
    a = _arena(tmp_path, slots=2)
    x = a.take(10)
    assert x is not None
    a.give(x)
    with caplog.at_level("ERROR"):
        a.give(x)
    assert "given back twice" in caplog.text
    first, second = a.take(10), a.take(10)
    assert first == x and second is not None and second != x and a.take(10) is None


def test_a_body_let_go_after_its_answer_leaves_its_slot_to_the_body_that_took_it_since(
    tmp_path: Path,
) -> None:
    """The HTTP/2 server lets go of a call's body only once its answer is written, after the model process's
    answer gave the slot back to the arena, and a new call may have taken that slot by then. Letting go must
    free nothing: freeing the new call's slot let a third call receive into it too (under load over gRPC,
    one call in ~3,000 failed as "compressed", its first byte overwritten)."""
    import asyncio

    from runtime.serving.config import ServeConfig
    from runtime.serving.frontend import Worker, WorkerConfig, _Link

    a = _arena(tmp_path, slots=2, slot_bytes=1 << 16)
    cfg = WorkerConfig(0, str(tmp_path / "sock"), a.path, a.slots, a.slot_bytes, ServeConfig(model_uri="x"))

    async def scenario() -> None:
        worker = Worker(cfg)
        worker.link = _Link(worker)
        worker.link.transport = _Recording()  # type: ignore[assignment]
        first = worker.slot_body(64, 0)
        assert first is not None
        x = torch.frombuffer(first.view, dtype=torch.float32).view(1, 16)  # the body's tensor, in place
        x.copy_(torch.arange(16.0).view(1, 16))
        call = asyncio.ensure_future(worker.infer([x], 1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        ((_, payload),) = ipc.FrameReader().feed(worker.link.transport.writes[0])  # type: ignore[attr-defined]
        rid, _, (seen,), _, _ = ipc.decode_request(memoryview(payload), a.buf)
        for k, p in ipc.FrameReader().feed(ipc.encode_rows([rid], [0], [1], [seen * 2])):
            worker.on_message(k, p)  # answered: the slot is back in the arena
        await call
        second = worker.slot_body(64, 0)
        assert second is not None and second.offset == first.offset  # the next call takes that slot
        first.release()  # the first call's stream ends only now
        third = worker.slot_body(64, 0)
        assert third is not None and third.offset != second.offset
        assert worker.slot_body(64, 0) is None  # both slots held, none twice
        for body in (second, third):
            body.release()
        assert sorted(worker.arena._free) == [0, 1]

    asyncio.run(scenario())


def test_answers_to_a_worker_go_out_directly_and_in_order_when_its_socket_is_full(tmp_path: Path) -> None:
    import socket

    from runtime.serving.hub import _Conn, _Writer

    writer = _Writer.__new__(_Writer)  # its queue without its thread: the test sends what it queues
    writer.cond = threading.Condition()
    writer.dirty = {}
    ours, worker_end = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    conn = _Conn(0, ours, _arena(tmp_path), writer)
    conn.post(b"a" * 10)
    assert worker_end.recv(100) == b"a" * 10  # sent by the posting thread itself
    big = bytes(range(256)) * 4096  # 1 MiB: more than the socket holds; the rest waits for the writer
    conn.post(big)
    assert writer.dirty == {id(conn): conn} and len(conn.outbox) == 1
    worker_end.setblocking(False)

    def drain() -> bytes:
        out = bytearray()
        with contextlib.suppress(BlockingIOError):
            while chunk := worker_end.recv(1 << 20):
                out += chunk
        return bytes(out)

    head = drain()  # the worker reads all that was sent: the socket has room again
    assert 0 < len(head) < len(big)
    conn.post(b"tail")  # queued behind the rest of `big`, not sent into that room ahead of it
    assert len(conn.outbox) == 2
    assert drain() == b""
    rest = b"".join(conn.outbox)
    sender = threading.Thread(target=ours.sendall, args=(rest,))  # what the writer thread does
    sender.start()
    got = bytearray(head)
    worker_end.setblocking(True)
    while len(got) < len(big) + 4:
        got += worker_end.recv(1 << 20)
    sender.join()
    assert bytes(got) == big + b"tail"
    ours.close()
    worker_end.close()


def test_a_failing_hub_writer_thread_is_logged_as_critical_and_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer thread sends the workers their answers: should it fail (a bug of ours; here it is handed
    something that is not bytes), answers would stop with nothing said. The failure is logged as critical
    and `failed` told (the server then drains and exits: runtime.serving.server, `_thread_failed`)."""
    import socket

    from runtime.serving.hub import _Conn, _Writer

    told: list[BaseException] = []
    got = threading.Event()
    with caplog.at_level("CRITICAL", logger="runtime.serving"):
        writer = _Writer(lambda e: (told.append(e), got.set()))
        ours, worker_end = socket.socketpair()
        conn = _Conn(0, ours, _arena(tmp_path), writer)
        conn.sending = True  # earlier messages still being sent: this one goes to the writer thread
        conn.post("not bytes")  # type: ignore[arg-type]
        assert got.wait(5)
    assert len(told) == 1 and isinstance(told[0], TypeError)
    assert "thread hub-write failed" in caplog.text
    ours.close()
    worker_end.close()


def test_hub_selector_takes_descriptors_past_fd_setsize_and_forgets_closed_sockets() -> None:
    import resource
    import selectors
    import socket

    from runtime.serving.hub import prune, register

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 1500:
        pytest.skip("this process may not open descriptor 1500")

    a, b = socket.socketpair()
    c, d = socket.socketpair()
    sel: selectors.BaseSelector = selectors.SelectSelector()
    sel = register(sel, a, "a")
    assert isinstance(sel, selectors.SelectSelector)  # waits to the microsecond
    high = socket.socket(fileno=os.dup2(c.fileno(), 1500))  # past select()'s FD_SETSIZE (1024)
    try:
        sel = register(sel, high, "high")
        assert not isinstance(sel, selectors.SelectSelector)  # the default selector took both over
        b.send(b"x")
        d.send(b"y")
        assert sorted(k.data for k, _ in sel.select(1.0)) == ["a", "high"]
        sel.unregister(high)
    finally:
        high.close()
    # a registered socket closed by another thread: select() refuses it, prune forgets it
    sel2: selectors.BaseSelector = register(selectors.SelectSelector(), a, "a")
    e, f = socket.socketpair()
    sel2 = register(sel2, e, "e")
    e.close()
    with pytest.raises((OSError, ValueError)):
        sel2.select(0)
    assert prune(sel2) and not prune(sel2)
    assert [k.data for k, _ in sel2.select(1.0)] == ["a"]  # b's byte is still unread
    for s in (a, b, c, d, f):
        s.close()


def test_descriptors_travel_with_their_kind_and_neither_side_ever_waits() -> None:
    """How the model process deals client connections to protocol workers (hub.Hub): a descriptor with a
    one-byte kind per message. Sending to a worker whose socket is full, or reading an empty one, raises
    BlockingIOError at once even on a blocking socket (Python 3.11's socket.send_fds / recv_fds ignore their
    flags: the dealing thread would hang on a worker that stopped reading, every new connection with it)."""
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # both blocking
    r, w = os.pipe()
    try:
        ipc.send_fd(ours, b"g", w)
        kind, fds = ipc.recv_fd(theirs)
        assert kind == b"g" and len(fds) == 1 and fds[0] != w
        os.write(fds[0], b"through the copy")
        os.close(fds[0])
        assert os.read(r, 100) == b"through the copy"
        with pytest.raises(BlockingIOError):
            ipc.recv_fd(theirs)  # nothing sent: no wait

        outcome: list[object] = []

        def fill() -> None:
            try:
                for _ in range(100_000):
                    ipc.send_fd(ours, b"h", w)
                outcome.append("never full")
            except BlockingIOError as e:
                outcome.append(e)

        t = threading.Thread(target=fill, daemon=True)
        t.start()
        t.join(10)
        assert outcome and isinstance(outcome[0], BlockingIOError), outcome or "send_fd waited"
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()
    assert ipc.recv_fd(a) == (b"", [])  # the model process is gone: an empty message
    a.close()


def test_a_round_cut_short_starts_the_next_where_it_stopped_and_a_whole_round_moves_on_by_one() -> None:
    """The batcher thread's rounds over the workers' connections (hub.take_turns): it stops before the next
    connection once the round is over, and the next round starts with the first one it left, so that rounds
    cut short do not keep serving the same workers first."""
    from runtime.serving.hub import take_turns

    handled: list[str] = []
    ready = ["a", "b", "c", "d"]
    turn = take_turns(ready, 0, handled.append, lambda: len(handled) >= 2)
    assert handled == ["a", "b"] and turn == 2
    turn = take_turns(ready, turn, handled.append, lambda: len(handled) >= 5)
    assert handled[2:] == ["c", "d", "a"] and turn == 1
    turn = take_turns(ready, turn, handled.append, lambda: False)  # a whole round: the next starts one on
    assert handled[5:] == ["b", "c", "d", "a"] and turn == 2
    assert take_turns([], 7, handled.append, lambda: False) == 7
    assert take_turns(ready, 3, handled.append, lambda: True) == 3 and len(handled) == 9  # over at once


def test_cuda_driver_is_absent_without_cuda() -> None:
    from runtime.serving import cudadriver

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_gpu_driver_copies_equal_torchs covers the driver")
    assert cudadriver.load() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("way", ["each", "batch"])
def test_gpu_driver_copies_equal_torchs(way: str) -> None:
    """The driver's copies (one call per row, or one batch call) from a registered arena's scattered slots
    land the rows where torch's copies would, on the stream they were given."""
    from runtime.serving import cudadriver
    from runtime.serving.hub import _page_lock, _page_unlock

    drv = cudadriver.load()
    assert drv is not None
    if way == "batch" and not drv.batches:
        pytest.skip("this CUDA driver has no cuMemcpyBatchAsync")
    arena = ipc.Arena.anonymous(f"kubeforge-test-driver-{os.getpid()}", 8, 1 << 16)
    arena.forget_path()
    _page_lock(arena)
    try:
        rows = [torch.randn(1, 999) for _ in range(5)]
        views = [arena.place([r], arena.take(r.nbytes))[0] for r in reversed(rows)][::-1]
        srcs = [arena.address + p.offset for p in views]
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        with torch.cuda.stream(stream):
            batch = torch.empty(5, 999, device="cuda")
            n = rows[0].nbytes
            dsts = [batch.data_ptr() + i * n for i in range(5)]
            (drv.copy_each if way == "each" else drv.copy_batch)(dsts, srcs, [n] * 5, stream.cuda_stream)
        stream.synchronize()
        assert torch.equal(batch.cpu(), torch.cat(rows))
    finally:
        _page_unlock(arena)
        arena.close()


class _Libcuda:
    """The entry points Driver looks up, recording their calls (arrays read back from the addresses given);
    `v2`: CUDA 13's batch call (8 arguments) rather than 12.8's (9: and a fail index)."""

    def __init__(self, v2: bool) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        for name in ("cuMemcpyHtoDAsync_v2",):
            setattr(self, name, self._recorder(name))
        setattr(self, "cuMemcpyBatchAsync_v2" if v2 else "cuMemcpyBatchAsync", self._batch())

    def _recorder(self, name: str):  # type: ignore[no-untyped-def]
        def call(*args: object) -> int:  # a function, not a method: Driver sets its argtypes
            self.calls.append((name, args))
            return 0

        return call

    def _batch(self):  # type: ignore[no-untyped-def]
        import ctypes

        def call(dsts: int, srcs: int, sizes: int, count: int, *rest: object) -> int:
            read = lambda a: list((ctypes.c_uint64 * count).from_address(a))  # noqa: E731
            self.calls.append(("batch", (read(dsts), read(srcs), read(sizes), len(rest))))
            return 0

        return call


@pytest.mark.parametrize("v2", [True, False], ids=["cuda13-batch-call", "cuda12.8-batch-call"])
def test_cuda_driver_copies_rows_back_to_back_in_one_batch_call_or_one_call_each(v2: bool) -> None:
    """copy_rows lays the rows one after another from the destination on; one batch call on a stream of
    its own, with the argument count of the driver's version; a call per row on the legacy default stream,
    which the batch call refuses."""
    from runtime.serving import cudadriver

    rows = [torch.zeros(1, 10), torch.zeros(2, 10), torch.zeros(1, 10)]
    lib = _Libcuda(v2)
    drv = cudadriver.Driver(lib)  # type: ignore[arg-type]
    assert drv.batches
    drv.copy_rows(1000, rows, stream=7)
    want_dsts = [1000, 1040, 1120]
    (name, (dsts, srcs, sizes, rest)), *more = lib.calls
    assert name == "batch" and not more
    assert (dsts, srcs, sizes) == (want_dsts, [r.data_ptr() for r in rows], [40, 80, 40])
    assert rest == (4 if v2 else 5)  # attrs, attrsIdxs, numAttrs, [failIdx,] stream
    lib.calls.clear()
    drv.copy_rows(1000, rows, stream=0)
    assert lib.calls == [
        ("cuMemcpyHtoDAsync_v2", (d, r.data_ptr(), r.nbytes, 0)) for d, r in zip(want_dsts, rows, strict=True)
    ]


def test_cuda_driver_calls_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """KUBEFORGE_CUDA_DRIVER_CALLS=0 keeps torch's calls, whatever the machine has, and says so."""
    import logging

    from runtime.serving import cudadriver

    monkeypatch.setenv(cudadriver.OFF_ENV, "0")
    monkeypatch.setattr(cudadriver, "_tried", False)
    monkeypatch.setattr(cudadriver, "_driver", None)
    with caplog.at_level(logging.INFO, logger="kubeforge.serve"):
        assert cudadriver.load() is None
    assert any("turned off" in r.getMessage() for r in caplog.records)


def test_a_dead_worker_that_cannot_be_started_again_is_retried_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Starting a dead protocol worker again can fail (no processes, descriptors or memory left for a
    moment): the hub logs it and tries again, doubling the wait, rather than leave the slot dead for good;
    each failed try's arena and dealing sockets are closed, and the dead worker's arena is released."""
    import socket

    from runtime.serving import hub as hubmod
    from runtime.serving.config import ServeConfig

    class Flaky:
        starts = 0

        def __init__(self, **kw: Any) -> None:
            self.exitcode = None

        def start(self) -> None:
            Flaky.starts += 1
            if Flaky.starts <= 2:
                raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(hubmod, "RESPAWN_FIRST_S", 0.01)
    cfg = ServeConfig(model_uri="m", host="127.0.0.1", http_port=0, grpc_port=0, balance="least-connections")
    b = Batcher(lambda xs: (xs[0],), max_batch_size=1, max_delay_s=0.0)
    hub = hubmod.Hub(workers=2, cfg=cfg, batcher=b, metrics=Metrics(), state=dict)
    made: list[ipc.Arena] = []
    real_arena = hub._new_arena

    def new_arena(name: str) -> ipc.Arena:
        made.append(real_arena(name))
        return made[-1]

    monkeypatch.setattr(hub, "_new_arena", new_arena)
    monkeypatch.setattr(hub._ctx, "Process", Flaky)
    ours, theirs = socket.socketpair()
    dead = hubmod._Conn(0, ours, _arena(tmp_path), hub._writer)
    try:
        with caplog.at_level("ERROR", logger="runtime.serving.hub"):
            hub._lost(dead)
        assert Flaky.starts == 3
        assert caplog.text.count("starting a protocol worker again failed; retrying") == 2
        assert [a.closed for a in made] == [True, True, False]  # the failed tries' arenas, the new one's
        assert hub._arenas[0] is made[2] and isinstance(hub._procs[0], Flaky)
        assert list(hub._channels) == [0]  # the new worker's dealing socket alone
        assert dead.arena.closed  # the dead worker's, released once its requests were answered (none)
    finally:
        theirs.close()
        made[-1].close()
        for sock in [*hub._channels.values(), *hub._holds, hub._listener]:
            sock.close()
        b.close(5)


def test_the_batcher_thread_polls_only_at_light_load_with_no_batch_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """busypoll's rule in the hub: the batcher thread's rounds (`cut`) poll before sleeping when no batch is
    in flight (its finishing thread would wait for the GIL that polling holds), the last batch ran one
    request and requests come further apart than MIN_GAP_S (light load); not the reader thread's rounds
    before the model is ready, not with polling off."""
    import runtime.serving.hub as hubmod
    from runtime.serving.busypoll import MIN_GAP_S
    from runtime.serving.config import ServeConfig

    class Batches:  # what the hub reads of its batcher (no batcher thread racing these rounds)
        inflight = 0
        last_taken = 0

        def set_external_announced(self, announced: Any) -> None:
            pass

        def set_source(self, source: Any) -> None:
            pass

    polls: list[float | None] = []

    def poll_select(sel: Any, timeout: float | None, budget: float, polled: Any) -> list[Any]:
        polls.append(timeout)
        polled(budget)
        return []

    monkeypatch.setattr(hubmod, "poll_select", poll_select)
    b = Batches()
    for budget in (500.0, 0.0):
        cfg = ServeConfig(model_uri="m", host="127.0.0.1", http_port=0, grpc_port=0, busy_poll_us=budget)
        metrics = Metrics()
        hub = hubmod.Hub(workers=1, cfg=cfg, batcher=b, metrics=metrics, state=dict)  # type: ignore[arg-type]
        try:
            polls.clear()
            rounds = [(0, 1, True), (1, 1, True), (0, 3, True), (0, 0, False), (0, 0, True)]
            for inflight, last, cut in rounds:  # batches in flight, requests in the last one, a batcher round
                b.inflight, b.last_taken = inflight, last
                hub._select(0.001, cut=cut)
            assert polls == ([0.001, 0.001] if budget else []), budget
            text = metrics.render().decode()
            assert f'kubeforge_busy_poll_seconds_total{{process="model"}} {2 * budget / 1e6}' in text, text
            hub._pace.gap = MIN_GAP_S / 2  # requests coming fast: not light load
            b.inflight, b.last_taken = 0, 1
            hub._select(0.001, cut=True)
            assert len(polls) == (2 if budget else 0)
        finally:
            for sock in [*hub._holds, hub._listener]:
                sock.close()
