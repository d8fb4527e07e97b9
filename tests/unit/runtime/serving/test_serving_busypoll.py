"""Polling before sleeping (busypoll, --busy-poll-us): an event loop kept from sleeping for the budget after
each kick, asyncio's and uvloop's, and a selector that polls before the wait that sleeps."""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from runtime.serving.busypoll import AUTO_US, MIN_GAP_S, LoopPoller, Pace, poll_select, resolve
from runtime.serving.server import run_event_loop


def _run(main: Callable[[], Coroutine[Any, Any, None]], kind: str) -> None:
    run_event_loop(main(), kind)


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_kicked_loop_polls_for_its_budget_then_sleeps_again(kind: str) -> None:
    stretches: list[float] = []
    poller = LoopPoller(0.02, stretches.append)

    async def main() -> None:
        poller.kick()
        await asyncio.sleep(0.01)
        poller.kick()  # a kick while polling moves the end, in the same stretch
        await asyncio.sleep(0.06)
        assert not poller.polling
        turns = poller.turns
        await asyncio.sleep(0.03)
        assert poller.turns == turns  # asleep again: no turns without a kick

    _run(main, kind)
    assert poller.turns > 50  # turn after turn, not a timer
    assert len(stretches) == 1 and 0.025 <= stretches[0] < 0.07, stretches  # timers round to 1 ms


def test_while_polling_asyncios_loop_waits_for_io_with_a_timeout_of_zero() -> None:
    """What polling means for the loop: its selector is asked with timeout 0 until the budget is spent, then
    with none (only wait_for's, seconds away: it sleeps until I/O comes). The byte it waits for is sent only
    once polling has ended (a loaded machine that stalls the process mid-budget cannot make it come first)."""
    timeouts: list[tuple[float, float | None]] = []
    stops: list[int] = []  # how many waits for I/O the loop had made when polling ended

    async def main() -> None:
        sel = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        select = sel.select

        def recorded(timeout: float | None = None) -> Any:
            timeouts.append((time.perf_counter(), timeout))
            return select(timeout)

        sel.select = recorded
        r, w = socket.socketpair()

        def ended(_stretch: float) -> None:
            stops.append(len(timeouts))
            threading.Timer(0.01, w.send, (b"x",)).start()

        poller = LoopPoller(0.01, ended)
        got = asyncio.Event()
        asyncio.get_running_loop().add_reader(r.fileno(), got.set)
        start = time.perf_counter()
        poller.kick()
        await asyncio.wait_for(got.wait(), 5)  # a poller that never ends its stretch sends no byte
        asyncio.get_running_loop().remove_reader(r.fileno())
        r.close()
        w.close()
        assert len(stops) == 1
        polling = timeouts[: stops[0]]
        assert len(polling) > 20 and {t for _, t in polling} == {0}, polling[:5]
        at, first = timeouts[stops[0]]
        # then asleep until the byte came: no timeout but wait_for's own, seconds away
        assert (first is None or first > 1) and at >= start + 0.01, (at - start, first)

    _run(main, "asyncio")


def test_without_a_budget_a_kick_does_nothing() -> None:
    stretches: list[float] = []
    poller = LoopPoller(0.0, stretches.append)

    async def main() -> None:
        poller.kick()
        await asyncio.sleep(0.01)

    _run(main, "asyncio")
    assert (poller.turns, poller.polling, stretches) == (0, False, [])


@pytest.fixture()
def pair() -> Any:
    r, w = socket.socketpair()
    sel = selectors.SelectSelector()
    sel.register(r, selectors.EVENT_READ)
    yield sel, w
    sel.close()
    r.close()
    w.close()


def test_poll_select_returns_at_once_what_is_there(pair: Any) -> None:
    sel, w = pair
    w.send(b"x")
    polled: list[float] = []
    assert len(poll_select(sel, None, 1.0, polled.append)) == 1
    assert polled[0] < 0.1


def test_poll_select_finds_what_comes_while_it_polls(pair: Any) -> None:
    sel, w = pair
    polled: list[float] = []
    threading.Timer(0.01, w.send, (b"x",)).start()
    assert len(poll_select(sel, None, 2.0, polled.append)) == 1
    assert 0.005 <= polled[0] < 1.0  # found by polling, well before the budget's end


def test_poll_select_sleeps_after_its_budget_until_what_comes(pair: Any) -> None:
    sel, w = pair
    polled: list[float] = []
    threading.Timer(0.08, w.send, (b"x",)).start()
    start = time.perf_counter()
    assert len(poll_select(sel, None, 0.01, polled.append)) == 1
    assert time.perf_counter() - start >= 0.07
    assert 0.01 <= polled[0] < 0.07  # the budget, then the wait that sleeps


def test_poll_select_keeps_to_a_timeout_shorter_than_its_budget(pair: Any) -> None:
    sel, _ = pair
    polled: list[float] = []
    start = time.perf_counter()
    assert poll_select(sel, 0.02, 1.0, polled.append) == []
    assert 0.02 <= time.perf_counter() - start < 0.5
    assert 0.02 <= polled[0] < 0.5
    start = time.perf_counter()
    assert poll_select(sel, 0.04, 0.01) == []  # then asleep for the rest of the timeout
    assert 0.04 <= time.perf_counter() - start < 0.5


def test_auto_polls_next_to_an_accelerator_only_where_the_cpus_allowed_cover_every_poller() -> None:
    assert resolve(None, 8, True, cpus=16) == (AUTO_US, "auto: next to an accelerator, 16 CPUs allowed")
    assert resolve(None, 8, True, cpus=10)[0] == AUTO_US  # 8 workers, the batcher and the device's waiter
    budget, why = resolve(None, 8, True, cpus=4)  # a pod's CPU limit of 4: polling would be throttled
    assert budget == 0 and "4 CPUs allowed, fewer than the 10" in why
    budget, why = resolve(None, 2, False, cpus=64)
    assert budget == 0 and "no accelerator" in why
    assert resolve(750.0, 8, False, cpus=1) == (750.0, "asked for")  # as asked, whatever the machine
    assert resolve(0.0, 8, True, cpus=64)[0] == 0


def test_torch_threads_and_protocol_workers_follow_the_cpus_allowed_not_the_nodes_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pod limited to 4 CPUs on a 64-core node: 3 intra-op threads (one CPU left to the event loop) and 2
    protocol workers next to an accelerator, not 63 threads and 8 workers throttled by the limit."""
    import torch

    from runtime.serving import server as srv
    from runtime.serving.detect import Device, Hardware

    monkeypatch.setattr(srv, "cpus_allowed", lambda: 4.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the node's
    before = torch.get_num_threads()
    try:
        srv._set_threads(0)
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(srv, "cpus_allowed", lambda: 2.5)  # 2500m: the threads round up, one left
        srv._set_threads(0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    gpu = Device("cuda:0", "H100", "h100")
    hw = Hardware("cuda", {"cuda": gpu, "cpu": Device("cpu", "cpu", "cpu")})
    monkeypatch.setattr(srv, "detect_hardware", lambda: hw)
    server = srv.Server(srv.ServeConfig(model_uri="m"), lambda: None)  # type: ignore[arg-type,return-value]
    monkeypatch.setattr(srv, "cpus_allowed", lambda: 4.0)
    assert server.worker_count() == 2
    monkeypatch.setattr(srv, "cpus_allowed", lambda: 64.0)
    assert server.worker_count() == 8


def test_the_pace_is_light_while_requests_come_further_apart_than_min_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    pace = Pace()
    assert pace.light()  # nothing yet
    for _ in range(3):  # one client's round trips: 1 ms apart
        clock[0] += 0.001
        pace.arrived()
    assert pace.light() and pace.gap == pytest.approx(0.001)
    for _ in range(20):  # then 10,000 requests a second: not light once the mean has followed
        clock[0] += 0.0001
        pace.arrived()
    assert not pace.light() and pace.gap < MIN_GAP_S
    clock[0] += 0.004  # four requests sent at once after 4 ms: 1 ms apart each
    pace.arrived(4)
    assert pace.gap == pytest.approx(0.0001 + (0.001 - 0.0001) * 0.2, rel=0.05)


def test_a_poller_told_of_requests_coming_fast_does_not_poll() -> None:
    fast = LoopPoller(0.02)
    off = LoopPoller(0.0)

    async def main() -> None:
        for _ in range(50):  # a burst: far less than MIN_GAP_S apart
            fast.arrived()
            off.arrived()
        fast.kick()
        await asyncio.sleep(0.01)

    _run(main, "asyncio")
    assert not fast.pace.light() and (fast.turns, fast.polling) == (0, False)
    assert off.pace.last == 0.0  # without a budget nothing is kept per request
