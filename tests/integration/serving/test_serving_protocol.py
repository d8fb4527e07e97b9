"""OIP v2 conformance over REST (httpx and tritonclient.http) and gRPC (tritonclient.grpc), batching under
concurrency, metrics, and the bad-input table against a live server."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.integration.serving.conftest import WIDE, Registry, Serve, grpc_health, metric_sum, start_mlp

pytestmark = pytest.mark.integration


def _eager(reg: Registry, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return reg.mlp(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


def test_health_and_metadata_over_rest(mlp_server: Serve) -> None:
    c = httpx.Client(base_url=mlp_server.url)
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    server = c.get("/v2").json()
    assert server["name"] == "kubeforge" and "binary_tensor_data" in server["extensions"]
    md = c.get("/v2/models/mlp").json()
    assert md["name"] == "mlp" and md["versions"] == ["1"]
    assert md["inputs"] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, 16]}]
    assert md["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [-1, 4]}]
    assert c.get("/v2/models/mlp/versions/1").status_code == 200
    ready = c.get("/v2/models/mlp/versions/1/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    info = ready.json()
    assert info["backend"] == "cpu" and info["mode"] == "eager"
    assert info["selection_reason"].startswith("auto chose cpu")
    assert c.get("/v2/models/mlp/versions/7/ready").status_code == 404


def test_infer_plain_json_matches_eager(registry: Registry, mlp_server: Serve) -> None:
    x = np.random.default_rng(1).standard_normal((3, 16), dtype=np.float32)
    body = {
        "id": "abc",
        "inputs": [{"name": "input__0", "shape": [3, 16], "datatype": "FP32", "data": x.tolist()}],
    }
    r = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "abc" and out["model_name"] == "mlp" and out["model_version"] == "1"
    (o,) = out["outputs"]
    assert o["name"] == "output__0" and o["shape"] == [3, 4] and o["datatype"] == "FP32"
    np.testing.assert_allclose(
        np.asarray(o["data"], np.float32).reshape(3, 4), _eager(registry, x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http(registry: Registry, mlp_server: Serve, binary: bool) -> None:
    import tritonclient.http as th

    client = th.InferenceServerClient(mlp_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    assert client.get_model_metadata("mlp")["inputs"][0]["name"] == "input__0"
    x = np.random.default_rng(2).standard_normal((2, 16), dtype=np.float32)
    inp = th.InferInput("input__0", [2, 16], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    res = client.infer("mlp", [inp], outputs=[th.InferRequestedOutput("output__0", binary_data=binary)])
    np.testing.assert_allclose(res.as_numpy("output__0"), _eager(registry, x), rtol=1e-5, atol=1e-6)


def test_compressed_requests_from_tritonclient_and_plain_http(registry: Registry, mlp_server: Serve) -> None:
    """tritonclient's request compression (HTTP: gzip and deflate bodies, asking for compressed answers
    too, which come uncompressed and read as such; gRPC: compressed messages) gets the eager model's
    answers; a body that inflates past --max-payload-mb (0.25 MB here), an unknown encoding and a cut stream
    are refused naming the problem, and the server serves on."""
    import gzip
    import json

    import tritonclient.grpc as tg
    import tritonclient.http as th

    x = np.random.default_rng(7).standard_normal((3, 16), dtype=np.float32)
    want = _eager(registry, x)
    h = th.InferenceServerClient(mlp_server.url.removeprefix("http://"))
    g = tg.InferenceServerClient(mlp_server.grpc_url)
    for alg in ("gzip", "deflate"):
        for binary in (True, False):
            inp = th.InferInput("input__0", [3, 16], "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            res = h.infer(
                "mlp",
                [inp],
                outputs=[th.InferRequestedOutput("output__0", binary_data=binary)],
                request_compression_algorithm=alg,
                response_compression_algorithm=alg,
            )
            np.testing.assert_allclose(res.as_numpy("output__0"), want, rtol=1e-5, atol=1e-6)
        ginp = tg.InferInput("input__0", [3, 16], "FP32")
        ginp.set_data_from_numpy(x)
        res = g.infer("mlp", [ginp], compression_algorithm=alg)
        np.testing.assert_allclose(res.as_numpy("output__0"), want, rtol=1e-5, atol=1e-6)
    zeros = np.zeros((20, 5000), np.float32)  # ~0.5 MB as JSON, a few KB compressed
    body = {
        "inputs": [
            {"name": "input__0", "datatype": "FP32", "shape": [20, 5000], "data": zeros.ravel().tolist()}
        ]
    }
    packed = gzip.compress(json.dumps(body).encode())
    url = f"{mlp_server.url}/v2/models/mlp/infer"
    r = httpx.post(url, content=packed, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "inflates past the server's limit of 262144 bytes" in r.json()["error"]
    r = httpx.post(url, content=packed, headers={"content-encoding": "br"})
    assert r.status_code == 415 and "send gzip, deflate or identity" in r.json()["error"]
    small = {
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [3, 16], "data": x.ravel().tolist()}]
    }
    r = httpx.post(
        url, content=gzip.compress(json.dumps(small).encode())[:-30], headers={"content-encoding": "gzip"}
    )
    assert r.status_code == 400 and "ends before its gzip stream does" in r.json()["error"]
    big = tg.InferInput("input__0", [5000, 16], "FP32")
    big.set_data_from_numpy(np.zeros((5000, 16), np.float32))  # 320 KB inflated, past the limit
    with pytest.raises(tg.InferenceServerException) as e:
        g.infer("mlp", [big], compression_algorithm="gzip")
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "inflates past" in e.value.message()
    inp = th.InferInput("input__0", [3, 16], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(h.infer("mlp", [inp]).as_numpy("output__0"), want, rtol=1e-5, atol=1e-6)


def test_tritonclient_grpc(registry: Registry, mlp_server: Serve) -> None:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(mlp_server.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    md = client.get_model_metadata("mlp", as_json=True)
    assert md["inputs"][0] == {"name": "input__0", "datatype": "FP32", "shape": ["-1", "16"]}
    assert client.get_server_metadata(as_json=True)["name"] == "kubeforge"
    x = np.random.default_rng(3).standard_normal((4, 16), dtype=np.float32)
    inp = tg.InferInput("input__0", [4, 16], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("mlp", [inp], request_id="r7")
    assert res.get_response().id == "r7"
    np.testing.assert_allclose(res.as_numpy("output__0"), _eager(registry, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(tg.InferenceServerException) as e:
        client.infer("mlp", [tg.InferInput("nope", [1, 16], "FP32").set_data_from_numpy(x[:1])])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "unknown input 'nope'" in e.value.message()
    with pytest.raises(tg.InferenceServerException) as e:  # refused before the model runs
        client.infer("mlp", [inp], outputs=[tg.InferRequestedOutput("nope")])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "unknown output 'nope'" in e.value.message()
    for name in ("nosuch", "nosuch2"):
        with pytest.raises(tg.InferenceServerException) as e:
            client.infer(name, [inp])
        assert e.value.status() == "StatusCode.NOT_FOUND"
    # Triton's timeout parameter, not a number of microseconds: named; and the request is no longer expected
    # by the batcher (an announcement left behind would hold every later batch for the 20 ms window)
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    bad = pb.ModelInferRequest(model_name="mlp")
    bad.inputs.add(name="input__0", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([0.0] * 16)
    bad.parameters["timeout"].string_param = "soon"
    with grpc.insecure_channel(mlp_server.grpc_url) as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
        )
        with pytest.raises(grpc.RpcError) as rpc:
            call(bad)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters['timeout'] (int64_param) must be a whole number of microseconds" in rpc.value.details()
    # Triton's priority parameter: named when it is not a level; ignored by a model without priority levels
    del bad.parameters["timeout"]
    bad.parameters["priority"].string_param = "high"
    with grpc.insecure_channel(mlp_server.grpc_url) as ch, pytest.raises(grpc.RpcError) as rpc:
        ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
        )(bad)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters['priority'] (uint64_param) must be a whole number >= 0" in rpc.value.details()
    assert client.infer("mlp", [inp], priority=2).as_numpy("output__0").shape == (4, 4)
    queue_time = 'kubeforge_queue_time_seconds_sum{model="mlp"}'
    before = metric_sum(httpx.get(f"{mlp_server.url}/metrics").text, queue_time)
    for _ in range(5):
        client.infer("mlp", [inp], timeout=10_000_000)  # alone: nothing to wait for
    waited = metric_sum(httpx.get(f"{mlp_server.url}/metrics").text, queue_time) - before
    assert waited < 5 * 0.010, waited
    # counted, but not under names clients make up (each would be new series: memory without bound)
    text = httpx.get(f"{mlp_server.url}/metrics").text
    assert 'model="nosuch' not in text
    assert 'kubeforge_requests_total{code="NOT_FOUND",model="(unknown)",protocol="grpc"}' in text


def test_tritonclient_asyncio_and_callback_clients(registry: Registry, mlp_server: Serve) -> None:
    """tritonclient's other client styles, which Triton users' services and load tools use: the asyncio
    clients (tritonclient.http.aio on aiohttp, tritonclient.grpc.aio on grpc.aio), several calls at once on
    one client, and the gRPC client's callback-style async_infer."""
    import asyncio
    import threading

    import tritonclient.grpc as tg
    import tritonclient.grpc.aio as tga
    import tritonclient.http.aio as tha

    xs = [np.random.default_rng(10 + i).standard_normal((1 + i % 3, 16), dtype=np.float32) for i in range(8)]
    want = [_eager(registry, x) for x in xs]

    async def both() -> None:
        for mod, url in ((tha, mlp_server.url.removeprefix("http://")), (tga, mlp_server.grpc_url)):
            client = mod.InferenceServerClient(url)
            try:
                assert await client.is_model_ready("mlp")
                inputs = []
                for x in xs:
                    inp = mod.InferInput("input__0", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    inputs.append(inp)
                results = await asyncio.gather(*(client.infer("mlp", [inp]) for inp in inputs))
                for res, w in zip(results, want, strict=True):
                    np.testing.assert_allclose(res.as_numpy("output__0"), w, rtol=1e-5, atol=1e-6)
            finally:
                await client.close()

    asyncio.run(both())
    client = tg.InferenceServerClient(mlp_server.grpc_url)
    got: dict[int, np.ndarray] = {}
    done = threading.Semaphore(0)

    def callback(i: int, result: Any, error: Any) -> None:
        got[i] = error if error is not None else result.as_numpy("output__0")
        done.release()

    for i, x in enumerate(xs):
        inp = tg.InferInput("input__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_infer("mlp", [inp], functools.partial(callback, i))
    for _ in xs:
        assert done.acquire(timeout=30)
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[i], w, rtol=1e-5, atol=1e-6)
    client.close()


def _stream(
    url: str, model: str, xs: list[np.ndarray], bad: bool = True
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every row of `xs` through one tritonclient stream (start_stream / async_stream_infer), and a request
    naming an input the model does not have: the answers by request id, and the errors' messages."""
    import queue

    import tritonclient.grpc as tg

    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tg.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    for i, x in enumerate(xs):
        inp = tg.InferInput("input__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer(model, [inp], request_id=f"s{i}")
    if bad:
        wrong = tg.InferInput("nope", list(xs[0].shape), "FP32").set_data_from_numpy(xs[0])
        client.async_stream_infer(model, [wrong], request_id="bad")
    answers, errors = {}, []
    for _ in range(len(xs) + bad):
        result, error = got.get(timeout=60)
        if error is not None:
            errors.append(error.message())
        else:
            answers[result.get_response().id] = result.as_numpy("output__0")
    client.stop_stream()
    client.close()
    return answers, errors


def test_tritonclient_streaming_answers_each_request_and_reports_a_bad_one_in_band(
    registry: Registry, mlp_server: Serve
) -> None:
    """Triton's ModelStreamInfer, as tritonclient's start_stream / async_stream_infer use it (and
    perf_analyzer --streaming): every request on the call gets its answer, equal to eager; a bad request gets
    its error in the stream and the others are answered as usual."""
    xs = [np.random.default_rng(20 + i).standard_normal((1 + i % 3, 16), dtype=np.float32) for i in range(12)]
    answers, errors = _stream(mlp_server.grpc_url, "mlp", xs)
    assert len(errors) == 1 and "unknown input 'nope'" in errors[0], errors
    assert sorted(answers) == sorted(f"s{i}" for i in range(len(xs)))
    for i, x in enumerate(xs):
        np.testing.assert_allclose(answers[f"s{i}"], _eager(registry, x), rtol=1e-5, atol=1e-6)


def test_large_rows_through_a_stream_land_in_the_workers_shared_memory(
    registry: Registry, wide_server: Serve
) -> None:
    """A stream's 64 KiB rows are received into protocol workers' shared-memory slots, as ModelInfer's are,
    and each answer is its own row's."""
    rows = list(np.random.default_rng(8).standard_normal((40, 1, WIDE), dtype=np.float32))
    before = httpx.get(f"{wide_server.url}/metrics").text
    answers, _ = _stream(wide_server.grpc_url, "wide", rows, bad=False)
    with torch.inference_mode():
        want = registry.wide(torch.from_numpy(np.concatenate(rows))).numpy()
    for i in range(len(rows)):
        np.testing.assert_allclose(answers[f"s{i}"][0], want[i], rtol=1e-4, atol=1e-5, err_msg=f"row {i}")
    after = httpx.get(f"{wide_server.url}/metrics").text
    placed = 'kubeforge_worker_inputs_total{placement="in_place"}'
    assert metric_sum(after, placed) - metric_sum(before, placed) == len(rows)


def test_grpcio_server_streams_too(registry: Registry) -> None:
    """`--grpc-server grpcio` (grpc.aio) serves ModelInfer and ModelStreamInfer as well (a stream's requests
    answered in turn there)."""
    s = start_mlp(registry, "0", "--grpc-server", "grpcio")
    try:
        s.wait_ready()
        xs = [np.random.default_rng(30 + i).standard_normal((2, 16), dtype=np.float32) for i in range(4)]
        answers, errors = _stream(s.grpc_url, "mlp", xs)
        assert len(errors) == 1 and "unknown input 'nope'" in errors[0], errors
        assert [grpc_health(s.grpc_url, n) for n in ("", "live", "nope")] == [
            "SERVING",
            "SERVING",
            "StatusCode.NOT_FOUND",
        ]
        for i, x in enumerate(xs):
            np.testing.assert_allclose(answers[f"s{i}"], _eager(registry, x), rtol=1e-5, atol=1e-6)
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize(
    ("flags", "loop"),
    [((), "uvloop"), (("--event-loop", "asyncio", "--busy-poll-us", "5000"), "asyncio")],
    ids=["uvloop", "asyncio-busy-poll"],
)
def test_both_event_loops_serve_rest_and_grpc_from_the_protocol_workers(
    registry: Registry, flags: tuple[str, ...], loop: str
) -> None:
    """The model process and two protocol workers on uvloop's event loop (the default where it is installed,
    as the serving extra does) or on asyncio's (`--event-loop asyncio`) answer tritonclient over REST
    (binary) and gRPC, a stream too, and stop cleanly. With `--busy-poll-us` the worker that served and the
    batcher thread polled (kubeforge_busy_poll_seconds), and nothing polls without it."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    s = start_mlp(registry, "2", *flags)
    try:
        s.wait_ready()
        x = np.random.default_rng(40).standard_normal((3, 16), dtype=np.float32)
        h = th.InferenceServerClient(s.url.removeprefix("http://"))
        inp = th.InferInput("input__0", [3, 16], "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = h.infer("mlp", [inp], outputs=[th.InferRequestedOutput("output__0", binary_data=True)])
        np.testing.assert_allclose(out.as_numpy("output__0"), _eager(registry, x), rtol=1e-5, atol=1e-6)
        g = tg.InferenceServerClient(s.grpc_url)
        ginp = tg.InferInput("input__0", [3, 16], "FP32")
        ginp.set_data_from_numpy(x)
        np.testing.assert_allclose(
            g.infer("mlp", [ginp]).as_numpy("output__0"), _eager(registry, x), rtol=1e-5, atol=1e-6
        )
        xs = [np.random.default_rng(41 + i).standard_normal((2, 16), dtype=np.float32) for i in range(3)]
        answers, errors = _stream(s.grpc_url, "mlp", xs)
        assert len(errors) == 1 and "unknown input 'nope'" in errors[0], errors
        for i, xi in enumerate(xs):
            np.testing.assert_allclose(answers[f"s{i}"], _eager(registry, xi), rtol=1e-5, atol=1e-6)
        assert s.log("listening")["event_loop"] == loop  # type: ignore[index]
        deadline = time.monotonic() + 10  # the workers' own loops, each logged once it serves
        while len(workers := [e for e in s.logs if e.get("msg") == "protocol worker serving"]) < 2:
            assert time.monotonic() < deadline, workers
            time.sleep(0.05)
        assert sorted((e["worker"], e["event_loop"]) for e in workers) == [(0, loop), (1, loop)]
        text = httpx.get(f"{s.url}/metrics").text
        polled = {p: metric_sum(text, f'kubeforge_busy_poll_seconds_total{{process="{p}"}}') for p in "01"}
        polled["model"] = metric_sum(text, 'kubeforge_busy_poll_seconds_total{process="model"}')
        # auto on this CPU-only machine: no polling (the cores run the model)
        assert s.log("polling before sleeping")["busy_poll_us"] == (5000 if "--busy-poll-us" in flags else 0)  # type: ignore[index]
        if "--busy-poll-us" in flags:  # a worker's stretches each last the budget at least
            assert polled["model"] > 0 and polled["0"] + polled["1"] >= 0.005, text
        else:
            assert polled == {"0": 0.0, "1": 0.0, "model": 0.0}, text
    finally:
        assert s.stop() == 0


def test_the_standard_grpc_health_protocol_answers_kubernetes_grpc_probes(mlp_server: Serve) -> None:
    """grpc.health.v1.Health/Check: readiness under "" (the server as a whole), "ready" and the inference
    service's name, liveness under "live"; another service is NOT_FOUND, Watch is not served."""
    import grpc

    url = mlp_server.grpc_url
    for service in ("", "ready", "inference.GRPCInferenceService", "live"):
        assert grpc_health(url, service) == "SERVING", service
    assert grpc_health(url, "mlp") == "StatusCode.NOT_FOUND"
    with grpc.insecure_channel(url) as ch, pytest.raises(grpc.RpcError) as e:
        next(iter(ch.unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=10)))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_triton_repository_index_and_load_refused_over_rest_and_grpc(mlp_server: Serve) -> None:
    """Triton's model repository extension as tritonclient calls it: the index lists the served model and its
    state; load and unload are refused saying why and what to do instead (one model per server)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    h = th.InferenceServerClient(mlp_server.url.removeprefix("http://"))
    g = tg.InferenceServerClient(mlp_server.grpc_url)
    want = [{"name": "mlp", "version": "1", "state": "READY"}]
    assert h.get_model_repository_index() == want
    assert g.get_model_repository_index(as_json=True) == {"models": want}
    for client, status in ((h, "501"), (g, "StatusCode.UNIMPLEMENTED")):
        for call in (client.load_model, client.unload_model):
            with pytest.raises(Exception) as e:
                call("mlp")
            assert e.value.status() == status, e.value  # type: ignore[attr-defined]
            assert "--model-control-mode=none" in e.value.message()  # type: ignore[attr-defined]
            assert "new revision of the InferenceService" in e.value.message()  # type: ignore[attr-defined]
    with httpx.Client() as c:  # a body with the request (gRPC's ready filter) is read past, not left behind
        r = c.post(f"{mlp_server.url}/v2/repository/index", json={"ready": True})
        assert r.status_code == 200 and r.json() == want
        assert c.get(f"{mlp_server.url}/v2/health/ready").status_code == 200
        assert c.post(f"{mlp_server.url}/v2/repository/nosuch").status_code == 404
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    with grpc.insecure_channel(mlp_server.grpc_url) as ch:  # gRPC's ready filter (tritonclient sends none)
        index = ch.unary_unary(
            "/inference.GRPCInferenceService/RepositoryIndex",
            request_serializer=pb.RepositoryIndexRequest.SerializeToString,
            response_deserializer=pb.RepositoryIndexResponse.FromString,
        )(pb.RepositoryIndexRequest(ready=True), timeout=10)
    assert [(m.name, m.version, m.state) for m in index.models] == [("mlp", "1", "READY")]
    g.close()
    h.close()


def test_triton_model_config_and_statistics_over_rest_and_grpc(mlp_server: Serve) -> None:
    """Triton's model configuration and statistics extensions, read with tritonclient (gRPC answers decoded
    by tritonclient's own messages, so our field numbers are checked): three requests of 2 rows, one at a
    time, are three batches of 2 rows, three successes and three queued and computed requests, in the merged
    counts of every process; the config carries the signature without its batch dimension and the batching
    flags."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.grpc import model_config_pb2 as mc

    http = th.InferenceServerClient(mlp_server.url.removeprefix("http://"))
    grpc_ = tg.InferenceServerClient(mlp_server.grpc_url)

    config = http.get_model_config("mlp")
    assert (config["name"], config["max_batch_size"]) == ("mlp", 8)
    assert config["input"] == [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [16]}]
    assert config["output"] == [{"name": "output__0", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20_000
    assert config["parameters"]["mode"] == {"string_value": "eager"}
    pb = grpc_.get_model_config("mlp").config
    assert (pb.name, pb.max_batch_size, pb.backend) == ("mlp", 8, "kubeforge")
    assert [(i.name, i.data_type, list(i.dims)) for i in pb.input] == [("input__0", mc.TYPE_FP32, [16])]
    assert pb.dynamic_batching.default_queue_policy.max_queue_size == 1024
    assert pb.parameters["mode"].string_value == "eager"
    with pytest.raises(th.InferenceServerException, match="model 'nosuch' not found"):
        http.get_model_config("nosuch")
    with pytest.raises(tg.InferenceServerException, match="model 'nosuch' not found"):
        grpc_.get_model_config("nosuch")

    def rest_stats() -> dict[str, Any]:
        return http.get_inference_statistics("mlp")["model_stats"][0]  # type: ignore[no-any-return]

    def grpc_stats() -> Any:
        (only,) = grpc_.get_inference_statistics("mlp").model_stats
        return only

    def pairs(stats: dict[str, Any]) -> dict[int, int]:
        return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}

    before, t0 = rest_stats(), time.time()
    x = np.ones((2, 16), np.float32)
    for _ in range(3):
        inp = th.InferInput("input__0", [2, 16], "FP32")
        inp.set_data_from_numpy(x)
        http.infer("mlp", [inp])
    end = time.monotonic() + 5  # a batch is counted just after its answers are handed out
    while (after := rest_stats())["execution_count"] - before[
        "execution_count"
    ] < 3 and time.monotonic() < end:
        time.sleep(0.01)
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] == 3
    s0, s1 = before["inference_stats"], after["inference_stats"]
    for kind in ("success", "queue", "compute_infer", "compute_input", "compute_output"):
        assert s1[kind]["count"] - s0[kind]["count"] == 3, kind
    assert s1["compute_infer"]["ns"] > s0["compute_infer"]["ns"] and s1["success"]["ns"] > s0["success"]["ns"]
    assert s1["queue"]["ns"] >= s0["queue"]["ns"]
    assert pairs(after).get(2, 0) - pairs(before).get(2, 0) == 3
    assert after["last_inference"] >= int(t0 * 1000)
    g = grpc_stats()
    assert (g.name, g.inference_count, g.execution_count) == (
        "mlp",
        after["inference_count"],
        after["execution_count"],
    )
    assert g.inference_stats.success.count == after["inference_stats"]["success"]["count"]
    assert {b.batch_size: b.compute_infer.count for b in g.batch_stats} == pairs(after)
    everything = http.get_inference_statistics()["model_stats"]  # no name: every model
    assert [m["name"] for m in everything] == ["mlp"]
    assert [m.name for m in grpc_.get_inference_statistics().model_stats] == ["mlp"]
    with pytest.raises(th.InferenceServerException, match="model 'nosuch' not found"):
        http.get_inference_statistics("nosuch")
    with pytest.raises(tg.InferenceServerException, match="model 'nosuch' not found"):
        grpc_.get_inference_statistics("nosuch")


def test_concurrent_requests_are_batched_and_equal_unbatched(registry: Registry, mlp_server: Serve) -> None:
    import tritonclient.grpc as tg

    before = httpx.get(f"{mlp_server.url}/metrics").text
    rows = np.random.default_rng(4).standard_normal((48, 16), dtype=np.float32)

    def one(i: int) -> np.ndarray:
        client = tg.InferenceServerClient(mlp_server.grpc_url)
        inp = tg.InferInput("input__0", [1, 16], "FP32")
        inp.set_data_from_numpy(rows[i : i + 1])
        return client.infer("mlp", [inp]).as_numpy("output__0")  # type: ignore[no-any-return]

    with cf.ThreadPoolExecutor(24) as pool:
        outs = list(pool.map(one, range(len(rows))))
    for i, out in enumerate(outs):  # each request answered with its own row, as if run alone
        np.testing.assert_allclose(out, _eager(registry, rows[i : i + 1]), rtol=1e-5, atol=1e-6)
    after = httpx.get(f"{mlp_server.url}/metrics").text
    count, total = "kubeforge_batch_size_count{", "kubeforge_batch_size_sum{"
    batches = metric_sum(after, count) - metric_sum(before, count)
    batched_rows = metric_sum(after, total) - metric_sum(before, total)
    assert batched_rows == len(rows)
    assert batches < len(rows), "no two requests shared a batch"
    if mlp_server.log("protocol workers") is not None:
        # with protocol workers the batcher thread itself reads their requests: no reader thread in between
        assert mlp_server.log("the batcher thread reads the protocol workers' requests from now on")
        tasks = Path(f"/proc/{mlp_server.proc.pid}/task")
        threads = {p.read_text().strip() for p in tasks.glob("*/comm")}
        assert "hub-read" not in threads and any(t.startswith("batcher-") for t in threads), threads


def test_large_inputs_under_load_each_get_their_own_answer_over_rest_and_grpc(
    registry: Registry, wide_server: Serve
) -> None:
    """64 KiB rows from 16 clients at once, over REST (binary) and gRPC with tritonclient: each body lands in
    a protocol worker's shared-memory slot and goes to the model from there; every answer must be the eager
    model's for that request's own row (a slot lent to two bodies at once would answer one from the other's
    data, or fail it)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    rows = np.random.default_rng(7).standard_normal((960, 1, WIDE), dtype=np.float32)
    with torch.inference_mode():
        want = registry.wide(torch.from_numpy(rows[:, 0])).numpy()
    before = httpx.get(f"{wide_server.url}/metrics").text

    def client_loop(k: int) -> list[tuple[int, np.ndarray]]:
        h = th.InferenceServerClient(wide_server.url.removeprefix("http://"))
        g = tg.InferenceServerClient(wide_server.grpc_url)
        got = []
        for i in range(k, len(rows), 16):
            if i % 2:
                inp = th.InferInput("input__0", [1, WIDE], "FP32")
                inp.set_data_from_numpy(rows[i], binary_data=True)
                out = h.infer("wide", [inp]).as_numpy("output__0")
            else:
                ginp = tg.InferInput("input__0", [1, WIDE], "FP32")
                ginp.set_data_from_numpy(rows[i])
                out = g.infer("wide", [ginp]).as_numpy("output__0")
            got.append((i, out))
        return got

    with cf.ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client_loop, range(16)) for r in rs]
    assert len(results) == len(rows)
    for i, out in results:
        np.testing.assert_allclose(out[0], want[i], rtol=1e-4, atol=1e-5, err_msg=f"request {i}")
    after = httpx.get(f"{wide_server.url}/metrics").text
    placed = 'kubeforge_worker_inputs_total{placement="in_place"}'
    assert metric_sum(after, placed) - metric_sum(before, placed) >= len(rows) // 2  # through the slots
    assert wide_server.log("a shared-memory slot was given back twice; ignored") is None


@pytest.mark.parametrize("how", ["unary", "stream", "xnet"])
def test_a_grpc_go_client_under_load_gets_no_error(
    wide_server: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """grpc-go (bench/grpcload, built with Go) as a second real client: 16 KiB DATA frames, its own flow
    control and pings, 8 concurrent callers of 64 KiB over 4 connections for 2 s, each with a unary call per
    request, or all its requests on one ModelStreamInfer call; or (xnet) unary calls from
    golang.org/x/net/http2's client, each message in one DATA frame as grpcio's C core sends it. Every request
    succeeds and each answer is the size of a ModelInferResponse for one row (inside a
    ModelStreamInferResponse on a stream); with xnet, calls for a model the server lacks come back with
    its gRPC status, NOT_FOUND, read from the trailers."""
    stream = how == "stream"
    import json
    import shutil
    import subprocess

    from tritonclient.grpc import service_pb2 as pb  # the same messages (ours clash with it in one process)

    if shutil.which("go") is None:
        pytest.skip("no Go toolchain to build bench/grpcload")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "bench"))
    import serve_bench  # its grpc_load_tool builds bench/grpcload

    tool = serve_bench.grpc_load_tool("")
    assert tool is not None, "bench/grpcload did not build"
    req = pb.ModelInferRequest(model_name="wide")
    req.inputs.add(name="input__0", datatype="FP32", shape=[1, WIDE])
    req.raw_input_contents.append(np.ones((1, WIDE), np.float32).tobytes())
    (tmp_path / "req.bin").write_bytes(req.SerializeToString())
    cmd = [tool, "-addr", wide_server.grpc_url, "-request", str(tmp_path / "req.bin"), "-c", "8"]
    cmd += ["-stream", "/inference.GRPCInferenceService/ModelStreamInfer"] if stream else []
    cmd += ["-h2", "xnet"] if how == "xnet" else []
    out = subprocess.run([*cmd, "-connections", "4", "-d", "2s"], capture_output=True, text=True, timeout=120)
    r = json.loads(out.stdout)
    assert r["errors"] == {} and r["calls"] >= 50, r
    if how == "xnet":
        req.model_name = "absent"
        (tmp_path / "absent.bin").write_bytes(req.SerializeToString())
        cmd[cmd.index(str(tmp_path / "req.bin"))] = str(tmp_path / "absent.bin")
        out = subprocess.run([*cmd, "-d", "1s"], capture_output=True, text=True, timeout=120)
        failed = json.loads(out.stdout)
        assert failed["calls"] == 0 and failed["errors"].get("NotFound", 0) > 0, failed
        assert "absent" in failed["first_error"], failed
    resp = pb.ModelInferResponse(model_name="wide", model_version="1")
    resp.outputs.add(name="output__0", datatype="FP32", shape=[1, 4])
    resp.raw_output_contents.append(bytes(16))
    size = len((pb.ModelStreamInferResponse(infer_response=resp) if stream else resp).SerializeToString())
    assert abs(r["reply_bytes"] - size) <= 8, r  # the version string may differ


def h2spec_tool() -> Path:
    """h2spec (HTTP/2 conformance, RFC 7540/9113 and HPACK), pinned in hack/h2spec/go.mod, built with Go into
    .cache/gobin when missing or older than its pin."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[3]
    pin, out = root / "hack/h2spec/go.mod", root / ".cache/gobin/h2spec"
    if out.is_file() and out.stat().st_mtime >= pin.stat().st_mtime:
        return out
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain to build h2spec")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    cmd = ["go", "build", "-o", str(out), "github.com/summerwind/h2spec/cmd/h2spec"]
    built = subprocess.run(cmd, cwd=pin.parent, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    return out


def test_h2spec_finds_the_grpc_port_conformant(mlp_server: Serve) -> None:
    """Every h2spec case (HTTP/2 and HPACK, strict mode) against our own HTTP/2 server: frames on idle,
    half-closed and closed streams, malformed header blocks, flow-control limits, priority loops, and the
    generic exchanges (a request that is not a gRPC call gets a plain HTTP answer with a body)."""
    import re
    import subprocess

    tool = h2spec_tool()
    out = subprocess.run(
        [str(tool), "-S", "-h", "127.0.0.1", "-p", str(mlp_server.grpc_port), "-o", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    m = re.search(r"(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed", out)
    assert m, out[-3000:]
    _, passed, _, failed = map(int, m.groups())
    failures = out[out.find("Failures:") :] if "Failures:" in out else ""
    assert failed == 0 and passed >= 140, failures[-6000:]
    assert httpx.get(f"{mlp_server.url}/v2/health/ready").status_code == 200


def test_metrics_report_requests_latency_batches_and_backend(mlp_server: Serve) -> None:
    r = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=_body())  # counts, even when run alone
    assert r.status_code == 200, r.text
    text = httpx.get(f"{mlp_server.url}/metrics").text
    for name in (
        "kubeforge_requests_total",
        "kubeforge_request_latency_seconds_bucket",
        "kubeforge_batch_size_bucket",
        "kubeforge_queue_time_seconds_bucket",
        "kubeforge_device_busy_seconds_total",
        "kubeforge_compile_seconds",
        "kubeforge_inflight",
    ):
        assert name in text, name
    info = next(line for line in text.splitlines() if line.startswith("kubeforge_backend_info{"))
    assert 'backend="cpu"' in info and 'mode="eager"' in info and info.endswith(" 1.0")


def _body(**kw: object) -> dict[str, object]:
    return {"inputs": [{"name": "input__0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16} | kw]}


BAD = [
    ("wrong model name", "/v2/models/nosuch/infer", _body(), 404, "model 'nosuch' not found"),
    ("wrong version", "/v2/models/mlp/versions/9/infer", _body(), 404, "no version '9'"),
    ("wrong input name", "/v2/models/mlp/infer", _body(name="x"), 400, "unknown input 'x'"),
    ("wrong shape", "/v2/models/mlp/infer", _body(shape=[1, 15], data=[0.0] * 15), 400, "shape [1, 15]"),
    ("wrong datatype", "/v2/models/mlp/infer", _body(datatype="INT32", data=[0] * 16), 400, "datatype INT32"),
    ("too few values", "/v2/models/mlp/infer", _body(data=[0.0] * 3), 400, "data has 3 elements"),
    (
        "batch over max",
        "/v2/models/mlp/infer",
        _body(shape=[9, 16], data=[0.0] * 144),
        400,
        "max batch size 8",
    ),
    ("malformed JSON", "/v2/models/mlp/infer", b'{"inputs": [', 400, "malformed JSON"),
    (
        "timeout not in microseconds",
        "/v2/models/mlp/infer",
        {**_body(), "parameters": {"timeout": "1s"}},
        400,
        "parameters.timeout must be a whole number of microseconds",
    ),
    (
        "priority not a level",
        "/v2/models/mlp/infer",
        {**_body(), "parameters": {"priority": -1}},
        400,
        "parameters.priority must be a whole number >= 0 (1 the most urgent level",
    ),
    ("parameters not an object", "/v2/models/mlp/infer", {**_body(), "parameters": [1]}, 400, "'parameters'"),
    ("oversized payload", "/v2/models/mlp/infer", b"[" + b"0," * 200_000 + b"0]", 413, "exceeds the limit"),
    ("wrong method", "/v2/health/ready", b"", 405, "method POST not allowed"),
]


@pytest.mark.parametrize("value", ["soon", "-5"])
def test_a_malformed_proxy_timeout_header_is_a_400_naming_it(mlp_server: Serve, value: str) -> None:
    headers = {"x-envoy-expected-rq-timeout-ms": value}
    r = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=_body(), headers=headers)
    assert r.status_code == 400 and "x-envoy-expected-rq-timeout-ms" in r.json()["error"], r.text
    fine = {"x-envoy-expected-rq-timeout-ms": "5000"}
    assert httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=_body(), headers=fine).status_code == 200


@pytest.mark.parametrize(("case", "path", "body", "status", "problem"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_problem(
    mlp_server: Serve, case: str, path: str, body: object, status: int, problem: str
) -> None:
    url = mlp_server.url + path
    r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert r.status_code == status, (case, r.text)
    assert problem in r.json()["error"], (case, r.text)
    assert httpx.get(f"{mlp_server.url}/v2/health/ready").status_code == 200  # still healthy
    assert mlp_server.proc.poll() is None
