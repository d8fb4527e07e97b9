"""Back-pressure (429 / RESOURCE_EXHAUSTED), graceful drain on SIGTERM, and backend selection at start-up."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.serving.conftest import (
    ROOT,
    Registry,
    Serve,
    grpc_health,
    metric_sum,
    start_mlp,
    start_serve,
)

pytestmark = pytest.mark.integration


def _post(url: str, value: float) -> httpx.Response:
    body = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}]}
    return httpx.post(f"{url}/v2/models/slow/infer", json=body, timeout=30)


def _grpc_one(server: Serve, request_id: str = "") -> str:
    """One ModelInfer call with grpcio: "OK", or the status and message it ended with, and the retry
    pushback its trailers asked for ("[pushback N ms]")."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name="slow", id=request_id)
    req.inputs.add(name="input__0", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1.0] * 4)
    with grpc.insecure_channel(server.grpc_url) as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
        )
        try:
            call(req, timeout=30)
        except grpc.RpcError as e:
            pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")  # type: ignore[attr-defined]
            more = f" [pushback {pushback} ms]" if pushback else ""
            return f"{e.code()} {e.details()}{more}"  # type: ignore[attr-defined]
    return "OK"


def _triton_infer(client_module: Any, client: Any, value: float, **infer_kw: Any) -> str:
    """One infer of a [1, 4] row of `value` with tritonclient's HTTP or gRPC client (the same API): the
    outputs, or the status and message it failed with."""
    inp = client_module.InferInput("input__0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.full((1, 4), value, np.float32))
    try:
        out = client.infer("slow", [inp], **infer_kw).as_numpy("output__0")
    except client_module.InferenceServerException as e:
        return f"{e.status()} {e.message()}"
    return str(out.tolist())


@pytest.fixture(scope="module", params=["0", "2"], ids=["one-process", "2-workers"])
def slow_server(registry: Registry, request: pytest.FixtureRequest) -> Iterator[Serve]:
    """A model that sleeps 0.4 s per batch, one row per batch, at most 2 queued requests, two priority levels
    (requests that name none are of the second, least urgent); each process holds at most 1 KiB of requests
    at once (more than 8 of the small ones, one padded one)."""
    s = start_serve(
        registry.env,
        "--workers",
        request.param,
        "--model-uri",
        str(registry.slow_path),
        "--model-name",
        "slow",
        "--mode",
        "eager",
        "--max-batch-size",
        "1",
        "--max-queue-size",
        "2",
        "--priority-levels",
        "2",
        "--drain-delay-s",
        "1",
        "--max-inflight-mb",
        str(1024 / (1 << 20)),
    )
    s.wait_ready()
    yield s
    s.stop()


def test_full_queue_answers_429_and_resource_exhausted(slow_server: Serve) -> None:

    with cf.ThreadPoolExecutor(8) as pool:
        rest = list(pool.map(lambda i: _post(slow_server.url, float(i)), range(8)))
    codes = sorted(r.status_code for r in rest)
    assert 200 in codes and 429 in codes, codes
    assert set(codes) == {200, 429}
    refused = next(r for r in rest if r.status_code == 429)
    assert "queue is full" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"  # urllib3's Retry and Envoy's back-off honour it
    for i, r in enumerate(rest):  # the accepted ones still got their own answer
        if r.status_code == 200:
            assert r.json()["outputs"][0]["data"] == [2.0 * i] * 4

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _grpc_one(slow_server), range(8)))
    assert {a.split(" ")[0] for a in answers} == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, answers
    # a client with a retry policy waits a second before it tries again (gRPC's retry pushback)
    assert all(a.endswith("[pushback 1000 ms]") for a in answers if a != "OK"), answers
    assert httpx.get(f"{slow_server.url}/v2/health/ready").status_code == 200


def test_a_request_its_client_abandons_counts_as_499_not_as_a_success(slow_server: Serve) -> None:
    """A client that leaves while its request runs: the request is counted under code 499 (nginx's "client
    closed request"), not 200, adds nothing to the latency histogram, and is no longer in flight."""

    def metrics() -> str:
        return httpx.get(f"{slow_server.url}/metrics").text

    ok, gone = (
        'kubeforge_requests_total{code="200",model="slow"',
        'kubeforge_requests_total{code="499",model="slow"',
    )
    before = metrics()
    body = b'{"inputs":[{"name":"input__0","shape":[1,4],"datatype":"FP32","data":[1,1,1,1]}]}'
    with socket.create_connection(("127.0.0.1", int(slow_server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /v2/models/slow/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(0.15)  # running: the model sleeps 0.4 s
    deadline = time.monotonic() + 10
    while metric_sum(after := metrics(), gone) <= metric_sum(before, gone) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_sum(after, gone) == metric_sum(before, gone) + 1
    assert metric_sum(after, ok) == metric_sum(before, ok)
    latency = 'kubeforge_request_latency_seconds_count{model="slow",protocol="rest"}'
    assert metric_sum(after, latency) == metric_sum(before, latency)
    assert metric_sum(after, 'kubeforge_inflight{model="slow"}') == 0
    # the abandoned request's batch still runs; the next test needs the model idle: wait behind it
    assert _post(slow_server.url, 1.0).status_code == 200


def test_a_queued_request_its_client_abandons_is_dropped_not_run(slow_server: Serve) -> None:
    """A client that leaves while its request waits behind a running batch: the model never runs it (no
    device time for an answer nobody reads; with protocol workers the worker tells the model process), and
    the requests around it get their answers."""

    def batches() -> tuple[float, float]:
        text = httpx.get(f"{slow_server.url}/metrics").text
        ran, dropped = "kubeforge_batch_size_count", "kubeforge_dropped_unrun_total"
        return metric_sum(text, ran), metric_sum(text, dropped)

    before = batches()
    body = b'{"inputs":[{"name":"input__0","shape":[1,4],"datatype":"FP32","data":[5,5,5,5]}]}'
    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, slow_server.url, 1.0)  # runs for 0.4 s
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", int(slow_server.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(
                b"POST /v2/models/slow/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            time.sleep(0.1)  # queued behind the first
        last = pool.submit(_post, slow_server.url, 3.0)
        assert first.result().json()["outputs"][0]["data"] == [2.0] * 4
        assert last.result().json()["outputs"][0]["data"] == [6.0] * 4
    after = batches()
    assert after[0] - before[0] == 2  # the first and the last; the abandoned one never ran
    assert after[1] - before[1] == 1  # and is counted as dropped


def test_a_request_whose_timeout_would_pass_gets_504_and_deadline_exceeded_unrun(
    slow_server: Serve,
) -> None:
    """tritonclient's `timeout` (µs the client waits), over HTTP and gRPC: a request queued behind a 0.4 s
    batch with 0.1 s to wait is dropped unrun, answered 504 / DEADLINE_EXCEEDED naming the timeout, and
    counted as expired; one with time enough runs."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    def counts() -> tuple[float, float]:
        text = httpx.get(f"{slow_server.url}/metrics").text
        expired = 'kubeforge_dropped_unrun_total{model="slow",reason="expired"}'
        return metric_sum(text, "kubeforge_batch_size_count"), metric_sum(text, expired)

    x = np.ones((1, 4), np.float32)

    def call(client_module: Any, url: str, timeout_us: int) -> str:
        return _triton_infer(client_module, client_module.InferenceServerClient(url), 1.0, timeout=timeout_us)

    def behind_envoy(timeout_us: int) -> str:
        """Plain HTTP with what an Envoy proxy (Istio, Knative) adds: its route timeout, in ms."""
        body = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
        headers = {"x-envoy-expected-rq-timeout-ms": str(timeout_us // 1000)}
        r = httpx.post(f"{slow_server.url}/v2/models/slow/infer", json=body, headers=headers, timeout=30)
        return str([r.json()["outputs"][0]["data"]]) if r.status_code == 200 else f"{r.status_code} {r.text}"

    http, grpc_ = slow_server.url.removeprefix("http://"), slow_server.grpc_url
    clients: list[Callable[[int], str]] = [
        lambda t: call(th, http, t),
        lambda t: call(tg, grpc_, t),
        behind_envoy,
    ]
    before = counts()
    for client in clients:
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, slow_server.url, 1.0)  # runs for 0.4 s
            time.sleep(0.1)
            late = pool.submit(client, 100_000)
            assert first.result().status_code == 200
            answer = late.result()
        assert answer.split(" ")[0] in ("504", "StatusCode.DEADLINE_EXCEEDED"), answer
        assert "its deadline (the `timeout` parameter, grpc-timeout or x-envoy-" in answer, answer
        assert client(10_000_000) == str((x * 2).tolist())  # time enough: answered
    after = counts()
    assert after[0] - before[0] == 6  # the firsts and the patient ones; the late ones never ran
    assert after[1] - before[1] == 3


def test_an_urgent_request_takes_the_place_of_the_newest_in_a_full_queue_and_runs_first(
    slow_server: Serve, request: pytest.FixtureRequest
) -> None:
    """Triton's `priority` from tritonclient, over HTTP and gRPC: one request runs (0.4 s), two of the default
    level fill the queue; a priority-1 request is taken in place of the newer, which gets 429 /
    RESOURCE_EXHAUSTED naming why and is counted as displaced, and the urgent one runs before the older.

    The model process learns the order of requests from the order they reach it; with protocol workers,
    requests on different connections may reach it in another order than they were sent (a CI run answered
    the newer instead of refusing it while the first went over REST, maybe to the other worker), so there all
    four go over one gRPC connection (one worker, in order)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    def infer(client_module: Any, client: Any, value: float, priority: int = 0) -> tuple[float, str]:
        answer = _triton_infer(client_module, client, value, priority=priority)
        return time.monotonic(), answer

    def displaced() -> float:
        text = httpx.get(f"{slow_server.url}/metrics").text
        return metric_sum(text, 'kubeforge_dropped_unrun_total{model="slow",reason="displaced"}')

    batching = th.InferenceServerClient(slow_server.url.removeprefix("http://")).get_model_config("slow")
    levels = batching["dynamic_batching"]
    assert (levels["priority_levels"], levels["default_priority_level"]) == (2, 2)  # Triton's config says so
    before = displaced()
    rounds = [(tg, lambda: tg.InferenceServerClient(slow_server.grpc_url))]
    if request.node.callspec.params["slow_server"] == "0":  # one process: requests queue as they come
        rounds.append(
            (th, lambda: th.InferenceServerClient(slow_server.url.removeprefix("http://"), concurrency=4))
        )
    for module, connect in rounds:
        client = connect()  # one client: its gRPC calls share one connection
        with cf.ThreadPoolExecutor(4) as pool:
            first = pool.submit(infer, module, client, 1.0)  # runs for 0.4 s
            time.sleep(0.1)
            older = pool.submit(infer, module, client, 2.0)
            time.sleep(0.05)
            newer = pool.submit(infer, module, client, 3.0)  # the queue is full (2)
            time.sleep(0.05)
            urgent = pool.submit(infer, module, client, 4.0, 1)
            assert first.result()[1] == str([[2.0] * 4])
            (_, refused), (urgent_at, fast), (older_at, slow) = (
                newer.result(),
                urgent.result(),
                older.result(),
            )
        assert refused.split(" ")[0] in ("429", "StatusCode.RESOURCE_EXHAUSTED"), refused
        assert "a more urgent request took the place of this one (priority level 2)" in refused, refused
        assert fast == str([[8.0] * 4]) and slow == str([[4.0] * 4])
        assert urgent_at < older_at  # taken into a batch first
    assert displaced() - before == len(rounds)


def test_request_bytes_past_what_a_process_may_hold_answer_429_naming_the_flag(slow_server: Serve) -> None:
    """8 requests of ~650 bytes at once against 1 KiB per process (--max-inflight-mb): a process holds one
    while the model sleeps on it, and refuses the others before reading them, over REST (429) and gRPC
    (RESOURCE_EXHAUSTED), naming the flag; the ones it took get their own answers."""

    def padded(i: int) -> httpx.Response:
        row = {"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [float(i)] * 4}
        body = '{"inputs":' + " " * 600 + json.dumps([row]) + "}"
        return httpx.post(
            f"{slow_server.url}/v2/models/slow/infer",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )

    def refusals(protocol: str) -> float:
        text = httpx.get(f"{slow_server.url}/metrics").text
        return metric_sum(text, f'kubeforge_inflight_refused_total{{protocol="{protocol}"}}')

    before = refusals("rest"), refusals("grpc")
    with cf.ThreadPoolExecutor(8) as pool:
        rest = list(pool.map(padded, range(8)))
    assert {r.status_code for r in rest} <= {200, 429}
    refused = [r.json()["error"] for r in rest if r.status_code == 429]
    assert any("--max-inflight-mb" in e for e in refused), refused
    assert refusals("rest") - before[0] == sum("--max-inflight-mb" in e for e in refused)
    for i, r in enumerate(rest):
        if r.status_code == 200:
            assert r.json()["outputs"][0]["data"] == [2.0 * i] * 4

    with cf.ThreadPoolExecutor(8) as pool:  # an id that makes each message ~650 bytes
        statuses = list(pool.map(lambda _: _grpc_one(slow_server, request_id="r" * 600), range(8)))
    refused = [s for s in statuses if s.startswith("StatusCode.RESOURCE_EXHAUSTED") and "--max-inflight" in s]
    assert refused and all(s.endswith("[pushback 1000 ms]") for s in refused), statuses
    assert "OK" in statuses, statuses
    assert refusals("grpc") - before[1] == sum("--max-inflight-mb" in s for s in statuses)


def test_sigterm_drains_in_flight_requests(slow_server: Serve) -> None:
    with cf.ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(_post, slow_server.url, 0.0)]
        time.sleep(0.1)  # running (the queue holds 2: three at once could find the first still queued)
        futs += [pool.submit(_post, slow_server.url, float(i)) for i in (1, 2)]
        time.sleep(0.2)  # all three are in the server: one running, two queued
        slow_server.proc.terminate()
        time.sleep(0.2)
        assert httpx.get(f"{slow_server.url}/v2/health/ready").status_code == 503  # draining: out of rotation
        assert grpc_health(slow_server.grpc_url) == "NOT_SERVING"  # Kubernetes' gRPC probes too
        results = [f.result(30) for f in futs]
    assert [r.status_code for r in results] == [200, 200, 200]
    assert [r.json()["outputs"][0]["data"][0] for r in results] == [0.0, 2.0, 4.0]
    assert slow_server.proc.wait(30) == 0
    assert slow_server.log("draining") is not None and slow_server.log("stopped") is not None


def _workers_of(pid: int) -> list[int]:
    """The protocol worker processes (multiprocessing spawn children) of a server process."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")]


def _arenas_of(pid: int) -> set[str]:
    """The protocol workers' shared-memory arenas mapped into a process (memfds, by name)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(None, 5)[5] for line in maps if "/memfd:kubeforge-" in line}


def test_a_dead_protocol_worker_is_replaced_while_the_other_serves(registry: Registry) -> None:
    s = start_mlp(registry, "2")
    try:
        s.wait_ready()
        assert s.log("listening")["workers"] == 2  # type: ignore[index]
        # every process froze its start-up heap (full garbage collections then stay short)
        want, deadline = {"model", "protocol worker 0", "protocol worker 1"}, time.monotonic() + 10
        while (frozen := {r["who"] for r in s.logs if r.get("msg") == "heap frozen"}) != want:
            assert time.monotonic() < deadline, frozen
            time.sleep(0.1)
        before = _workers_of(s.proc.pid)
        assert len(before) == 2
        assert len(_arenas_of(s.proc.pid)) == 2  # memfds: no /dev/shm needed, nothing named there
        assert not list(Path("/dev/shm").glob(f"kubeforge-{s.proc.pid}-*"))
        body = {"inputs": [{"name": "input__0", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
        # new connections each: the kernel spreads them over both workers, so both arenas carry inputs
        codes = [httpx.post(f"{s.url}/v2/models/mlp/infer", json=body).status_code for _ in range(20)]
        assert codes == [200] * 20
        # the hops between workers and the model process, both ways, summed over every process
        text = httpx.get(f"{s.url}/metrics").text
        for way, least in (("to_model", 20), ("to_worker", 1)):
            line = f'kubeforge_worker_hop_seconds_count{{direction="{way}"}} '
            count = next(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))
            assert least <= count <= 20, (way, count)
        os.kill(before[0], signal.SIGKILL)
        s.wait_log("protocol worker exited; starting it again", 30)
        codes = [httpx.post(f"{s.url}/v2/models/mlp/infer", json=body).status_code for _ in range(20)]
        assert codes == [200] * 20
        deadline = time.monotonic() + 60
        while len(after := _workers_of(s.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(after) == 2 and before[0] not in after and before[1] in after
        # the dead worker's arena is given back once its requests are answered: two arenas mapped, not three
        s.wait_log("released a dead worker's arena", 30)
        assert len(_arenas_of(s.proc.pid)) == 2, _arenas_of(s.proc.pid)
    finally:
        assert s.stop() == 0


def _tcp(port: int | None = None) -> list[tuple[str, int, int, str]]:
    """The host's TCP sockets from /proc/net/tcp*: (state, local port, remote port, inode); only those of
    local `port` when given. States: 01 established, 0A listening."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, remote = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
            if port is None or local == port:
                out.append((f[3], local, remote, f[9]))
    return out


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets a process holds (one it closes while they are read is left out)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


def _holders(pids: list[int], port: int, clients: list[socket.socket]) -> list[int | None]:
    """Which of `pids` holds the server's end of each client connection to `port` (None: none yet)."""
    inodes = {remote: inode for state, _, remote, inode in _tcp(port) if state == "01"}  # by client port
    held = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    return [held.get(inodes.get(c.getsockname()[1], "")) for c in clients]


def _held_on(pid: int, port: int) -> bool:
    """Whether `pid` holds a connection to `port` (in any state: one its client ended with a FIN stays until
    closed; one reset leaves /proc/net/tcp at once, whoever still holds it)."""
    mine = _socket_inodes(pid)
    return any(state != "0A" and inode in mine for state, _, _, inode in _tcp(port))


def _await_closed(pids: list[int], port: int) -> None:
    deadline = time.monotonic() + 20
    while any(_held_on(p, port) for p in pids):
        assert time.monotonic() < deadline, "a worker never closed its ended connections"
        time.sleep(0.05)


def _await_holders(
    pids: list[int], port: int, clients: list[socket.socket], timeout: float = 20
) -> list[int]:
    deadline = time.monotonic() + timeout
    while None in (got := _holders(pids, port, clients)):
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    return got  # type: ignore[return-value]


def test_connections_are_dealt_to_the_worker_holding_the_fewest(registry: Registry) -> None:
    """With 2+ protocol workers the model process accepts the connections and deals each to the worker that
    holds the fewest (SO_REUSEPORT's hash would put each on either worker, whatever they hold)."""
    s = start_mlp(registry, "2")
    try:
        s.wait_ready()
        pids = _workers_of(s.proc.pid)
        assert len(pids) == 2
        for port in (s.http_port, s.grpc_port):
            # earlier connections (readiness checks, the last round's) ended, on both ports: the counts the
            # model process deals by are of both protocols' connections, and a worker counts one ended before
            # it closes the socket (asyncio's connection_lost), so both hold none
            for earlier in (s.http_port, s.grpc_port):
                _await_closed(pids, earlier)
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
            holders = _await_holders(pids, port, clients)
            assert sorted(holders.count(p) for p in pids) == [3, 3], holders
            # one worker's connections end: the next ones all go to it, as it holds the fewest now
            emptied = holders[0]
            for c, h in zip(clients, holders, strict=True):
                if h == emptied:
                    # a FIN, not close(): with the server's gRPC preface unread, close() sends a RST, and a
                    # reset socket leaves /proc/net/tcp at once, before its worker has counted it ended, so
                    # _await_closed would not wait for the worker (two CI runs dealt to the fuller one)
                    c.shutdown(socket.SHUT_WR)
            _await_closed([emptied], port)
            more = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            got = _await_holders(pids, port, more)
            assert got == [emptied] * 3, (got, [r for r in s.logs if r.get("level") == "warning"])
            if port == s.grpc_port:  # the gauge per process (the /metrics request is a connection too)
                text = httpx.get(f"{s.url}/metrics").text
                held = [
                    metric_sum(text, f'kubeforge_client_connections{{process="{i}",protocol="grpc"}}')
                    for i in range(2)
                ]
                assert held == [3, 3], held
            for c in clients + more:
                c.close()
        # requests over dealt connections, both protocols, several on one connection
        body = {"inputs": [{"name": "input__0", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
        with httpx.Client() as client:
            codes = [client.post(f"{s.url}/v2/models/mlp/infer", json=body).status_code for _ in range(5)]
            assert codes == [200] * 5
        import tritonclient.grpc as tg

        with tg.InferenceServerClient(s.grpc_url) as g:
            inp = tg.InferInput("input__0", [1, 16], "FP32")
            inp.set_data_from_numpy(np.full((1, 16), 0.5, np.float32))
            assert [g.infer("mlp", [inp]).as_numpy("output__0").shape for _ in range(3)] == [(1, 4)] * 3
    finally:
        assert s.stop() == 0


def test_balance_kernel_leaves_the_ports_to_the_workers(registry: Registry) -> None:
    """`--balance kernel`: every worker listens on both ports itself (SO_REUSEPORT), the model process on
    neither, and requests are served."""
    s = start_mlp(registry, "2", "--balance", "kernel")
    try:
        s.wait_ready()
        listening = [(local, inode) for state, local, _, inode in _tcp() if state == "0A"]

        def ports_of(pid: int) -> set[int]:  # the ports it listens on
            mine = _socket_inodes(pid)
            return {local for local, inode in listening if inode in mine}

        both = {s.http_port, s.grpc_port}
        assert [ports_of(p) & both for p in _workers_of(s.proc.pid)] == [both, both]
        assert not ports_of(s.proc.pid) & both
        body = {"inputs": [{"name": "input__0", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
        assert httpx.post(f"{s.url}/v2/models/mlp/infer", json=body).status_code == 200
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("workers", ["0", "2"], ids=["one-process", "2-workers"])
def test_a_model_that_cannot_load_leaves_the_server_live_never_ready_and_saying_why(
    registry: Registry, workers: str
) -> None:
    uri = "models:/mlp@nosuch"
    s = start_serve(registry.env, "--model-uri", uri, "--mode", "eager", "--workers", workers)
    try:
        s.wait_log("model failed to load; the server stays live but never ready", 120)
        assert httpx.get(f"{s.url}/v2/health/live").status_code == 200
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 503
        assert [grpc_health(s.grpc_url, n) for n in ("", "live")] == ["NOT_SERVING", "SERVING"]
        state = httpx.get(f"{s.url}/v2").json()["kubeforge"]
        assert state["state"] == "failed" and "nosuch" in state["error"], state
        body = {"inputs": [{"name": "input__0", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
        r = httpx.post(f"{s.url}/v2/models/mlp/infer", json=body)
        assert r.status_code == 503, r.text
        assert "failed to load" in r.json()["error"] and "nosuch" in r.json()["error"], r.text
        import tritonclient.grpc as tg

        inp = tg.InferInput("input__0", [1, 16], "FP32").set_data_from_numpy(np.zeros((1, 16), np.float32))
        with pytest.raises(tg.InferenceServerException) as e:
            tg.InferenceServerClient(s.grpc_url).infer("mlp", [inp])
        assert e.value.status() == "StatusCode.UNAVAILABLE" and "failed to load" in e.value.message()
        # with workers, their reader thread still serves them (the batcher thread never took over)
        assert "kubeforge_ready 0.0" in httpx.get(f"{s.url}/metrics").text
    finally:
        assert s.stop() == 4  # the load error, once stopped


@pytest.mark.parametrize(
    ("backend", "missing"),
    [
        ("npu", "torch_npu is not installed"),
        ("mlu", "torch_mlu is not installed"),
        ("cuda", "torch.cuda.is_available() is False"),
    ],
)
def test_unavailable_backend_refuses_to_start_naming_what_is_missing(
    registry: Registry, backend: str, missing: str, tmp_path: Path
) -> None:
    from runtime.serving.detect import detect_hardware

    if detect_hardware().usable(backend):
        pytest.skip(f"{backend} is available here")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.serving.cli",
            "compile",
            "--model-uri",
            "models:/mlp@champion",
            "--backend",
            backend,
            "--termination-log",
            str(tmp_path / "termination-log"),
        ],
        cwd=ROOT,
        env=registry.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"backend '{backend}' was asked for but is not available here" in proc.stderr
    assert missing in proc.stderr
    # the init container's termination message: what the InferenceService's status shows
    said = (tmp_path / "termination-log").read_text()
    assert said.startswith("kubeforge-serve: ") and said in proc.stderr and missing in said


def test_large_inputs_reach_the_model_process_from_where_rest_and_grpc_received_them(
    registry: Registry,
) -> None:
    """With protocol workers, a binary REST body or a gRPC ModelInfer message of 64 KiB or more is received
    straight into a shared-memory slot and its tensor goes to the model process from there (no copy); the
    answers equal eager inference; smaller requests are copied into a slot."""
    import torch
    import tritonclient.grpc as tg
    import tritonclient.http as th

    s = start_mlp(registry, "1", "--max-batch-size", "4096", "--max-delay-ms", "1")

    def placements() -> dict[str, float]:
        text = httpx.get(f"{s.url}/metrics").text
        prefix = 'kubeforge_worker_inputs_total{placement="'
        return {
            x[len(prefix) :].split('"')[0]: float(x.split()[-1])
            for x in text.splitlines()
            if x.startswith(prefix)
        }

    try:
        s.wait_ready()
        rng = np.random.default_rng(9)
        big, small = (rng.standard_normal((n, 16), dtype=np.float32) for n in (3000, 2))  # 192 KB, 128 B
        with torch.inference_mode():
            want = {id(x): registry.mlp(torch.from_numpy(x)).numpy() for x in (big, small)}
        before = placements()
        grpc_client = tg.InferenceServerClient(s.grpc_url)
        http_client = th.InferenceServerClient(s.url.removeprefix("http://"))
        for x in (big, small):
            g = tg.InferInput("input__0", list(x.shape), "FP32")
            g.set_data_from_numpy(x)
            got = grpc_client.infer("mlp", [g]).as_numpy("output__0")
            np.testing.assert_allclose(got, want[id(x)], rtol=1e-5, atol=1e-6)
            h = th.InferInput("input__0", list(x.shape), "FP32")
            h.set_data_from_numpy(x, binary_data=True)
            got = http_client.infer("mlp", [h]).as_numpy("output__0")
            np.testing.assert_allclose(got, want[id(x)], rtol=1e-5, atol=1e-6)
        after = placements()
        moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("in_place", "copied", "inline")}
        assert moved == {"in_place": 2.0, "copied": 2.0, "inline": 0.0}, moved
        # compressed (~180 KB on the wire): inflated out of the bytes received, then copied into a slot
        g = tg.InferInput("input__0", list(big.shape), "FP32")
        g.set_data_from_numpy(big)
        got = grpc_client.infer("mlp", [g], compression_algorithm="gzip").as_numpy("output__0")
        np.testing.assert_allclose(got, want[id(big)], rtol=1e-5, atol=1e-6)
        h = th.InferInput("input__0", list(big.shape), "FP32")
        h.set_data_from_numpy(big, binary_data=True)
        got = http_client.infer("mlp", [h], request_compression_algorithm="gzip").as_numpy("output__0")
        np.testing.assert_allclose(got, want[id(big)], rtol=1e-5, atol=1e-6)
        last = placements()
        moved = {k: last.get(k, 0.0) - after.get(k, 0.0) for k in ("in_place", "copied", "inline")}
        assert moved == {"in_place": 0.0, "copied": 2.0, "inline": 0.0}, moved
    finally:
        assert s.stop() == 0
