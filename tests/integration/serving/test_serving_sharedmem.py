"""Triton's system shared memory extension against a live server, with tritonclient's own shared memory
utilities (tritonclient.utils.shared_memory): regions registered over REST and gRPC, inputs read from them
and outputs written to them, the registry shared by protocol workers, and the bad-input table."""

from __future__ import annotations

import concurrent.futures as cf
import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.integration.serving.conftest import WIDE, Registry, Serve, start_mlp, start_wide

pytestmark = pytest.mark.integration

ROW = 16 * 4  # bytes of one row of models:/mlp's input (16 FP32)
OUT_ROW = 4 * 4  # and of its output (4 FP32)


def _eager(reg: Registry, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return reg.mlp(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=["0", "2"], ids=["one-process", "2-workers"])
def shm_server(registry: Registry, request: pytest.FixtureRequest) -> Iterator[Serve]:
    s = start_mlp(registry, request.param, "--allow-client-shm")
    s.wait_ready()
    yield s
    s.stop()


class Regions:
    """Shared memory objects made with tritonclient's utilities, destroyed at the end."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def make(self, size: int) -> tuple[str, Any]:
        import tritonclient.utils.shared_memory as shm

        key = f"/kf-test-{uuid.uuid4().hex[:12]}"
        h = shm.create_shared_memory_region(key[1:], key, size)
        self.handles.append(h)
        return key, h

    def destroy(self) -> None:
        import tritonclient.utils.shared_memory as shm

        for h in self.handles:
            shm.destroy_shared_memory_region(h)


@pytest.fixture
def regions() -> Iterator[Regions]:
    r = Regions()
    yield r
    r.destroy()


def test_tritonclient_http_reads_inputs_from_and_writes_outputs_to_shared_memory(
    registry: Registry, shm_server: Serve, regions: Regions
) -> None:
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    client = th.InferenceServerClient(shm_server.url.removeprefix("http://"))
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]
    client.unregister_system_shared_memory()
    x = np.random.default_rng(11).standard_normal((3, 16), dtype=np.float32)
    in_key, in_h = regions.make(64 + x.nbytes)  # the tensor at offset 64 of the region, the region at 0
    out_key, out_h = regions.make(3 * OUT_ROW)
    shm.set_shared_memory_region(in_h, [x], offset=64)
    client.register_system_shared_memory("in", in_key, 64 + x.nbytes)
    client.register_system_shared_memory("out", out_key, 3 * OUT_ROW)
    status = {r["name"]: r for r in client.get_system_shared_memory_status()}
    assert status["in"] == {"name": "in", "key": in_key, "offset": 0, "byte_size": 64 + x.nbytes}
    assert set(status) == {"in", "out"}
    assert client.get_system_shared_memory_status("out") == [
        {"name": "out", "key": out_key, "offset": 0, "byte_size": 3 * OUT_ROW}
    ]

    inp = th.InferInput("input__0", [3, 16], "FP32")
    inp.set_shared_memory("in", x.nbytes, offset=64)
    out = th.InferRequestedOutput("output__0")
    out.set_shared_memory("out", 3 * OUT_ROW)
    res = client.infer("mlp", [inp], outputs=[out])
    (o,) = res.get_response()["outputs"]
    assert o["parameters"] == {"shared_memory_region": "out", "shared_memory_byte_size": 3 * OUT_ROW}
    assert o["shape"] == [3, 4] and "data" not in o
    got = shm.get_contents_as_numpy(out_h, np.float32, [3, 4])
    np.testing.assert_allclose(got, _eager(registry, x), rtol=1e-5, atol=1e-6)

    # the output sent back in the answer, the input still from shared memory
    res = client.infer("mlp", [inp], outputs=[th.InferRequestedOutput("output__0")])
    np.testing.assert_allclose(res.as_numpy("output__0"), _eager(registry, x), rtol=1e-5, atol=1e-6)

    client.unregister_system_shared_memory("in")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
    with pytest.raises(th.InferenceServerException, match="'in' is not registered"):
        client.infer("mlp", [inp])
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_tritonclient_grpc_with_shared_memory_and_a_region_registered_again(
    registry: Registry, shm_server: Serve, regions: Regions
) -> None:
    """Over gRPC; then the name registered again for another object: the next request reads the new one
    (every process looks the region up anew, none serves an old descriptor)."""
    import tritonclient.grpc as tg
    import tritonclient.utils.shared_memory as shm

    client = tg.InferenceServerClient(shm_server.grpc_url)
    client.unregister_system_shared_memory()
    x = np.random.default_rng(12).standard_normal((2, 16), dtype=np.float32)
    key, h = regions.make(x.nbytes)
    out_key, out_h = regions.make(2 * OUT_ROW + 8)
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory("x", key, x.nbytes)
    client.register_system_shared_memory("y", out_key, 2 * OUT_ROW + 8)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["x"] == {"name": "x", "key": key, "byte_size": str(x.nbytes)}  # int64s as JSON strings
    inp = tg.InferInput("input__0", [2, 16], "FP32")
    inp.set_shared_memory("x", x.nbytes)
    res = client.infer("mlp", [inp])
    np.testing.assert_allclose(res.as_numpy("output__0"), _eager(registry, x), rtol=1e-5, atol=1e-6)
    out = tg.InferRequestedOutput("output__0")
    out.set_shared_memory("y", 2 * OUT_ROW, offset=8)
    res = client.infer("mlp", [inp], outputs=[out])
    params = res.get_output("output__0").parameters
    assert params["shared_memory_region"].string_param == "y"
    assert params["shared_memory_byte_size"].int64_param == 2 * OUT_ROW
    got = shm.get_contents_as_numpy(out_h, np.float32, [2, 4], offset=8)
    np.testing.assert_allclose(got, _eager(registry, x), rtol=1e-5, atol=1e-6)

    # Triton's streaming inference reads shared memory too
    import queue

    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("mlp", [inp], request_id="s1")
    result, error = answers.get(timeout=30)
    client.stop_stream()
    assert error is None and result.get_response().id == "s1"
    np.testing.assert_allclose(result.as_numpy("output__0"), _eager(registry, x), rtol=1e-5, atol=1e-6)

    x2 = x * -3
    key2, h2 = regions.make(x2.nbytes)
    shm.set_shared_memory_region(h2, [x2])
    client.unregister_system_shared_memory("x")
    client.register_system_shared_memory("x", key2, x2.nbytes)
    for _ in range(4):  # through every protocol worker's connection the client may be given
        res = tg.InferenceServerClient(shm_server.grpc_url).infer("mlp", [inp])
        np.testing.assert_allclose(res.as_numpy("output__0"), _eager(registry, x2), rtol=1e-5, atol=1e-6)
    client.unregister_system_shared_memory()


def test_a_region_registered_on_one_connection_serves_requests_on_every_other(
    registry: Registry, shm_server: Serve, regions: Regions
) -> None:
    """Registered over one connection, used by 16 clients at once over new connections (with 2 protocol
    workers, dealt to both), each on its own rows of one region; then unregistered, and refused on each."""
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    admin = th.InferenceServerClient(shm_server.url.removeprefix("http://"))
    admin.unregister_system_shared_memory()
    n = 16
    xs = np.random.default_rng(13).standard_normal((n, 16), dtype=np.float32)
    key, h = regions.make(xs.nbytes)
    shm.set_shared_memory_region(h, [xs])
    admin.register_system_shared_memory("rows", key, xs.nbytes)

    def one(i: int) -> np.ndarray:
        c = th.InferenceServerClient(shm_server.url.removeprefix("http://"))
        inp = th.InferInput("input__0", [1, 16], "FP32")
        inp.set_shared_memory("rows", ROW, offset=i * ROW)
        return c.infer("mlp", [inp]).as_numpy("output__0")  # type: ignore[no-any-return]

    with cf.ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(one, range(n)))
    np.testing.assert_allclose(np.concatenate(outs), _eager(registry, xs), rtol=1e-5, atol=1e-6)
    admin.unregister_system_shared_memory("rows")
    with cf.ThreadPoolExecutor(4) as pool:
        failures = list(pool.map(lambda i: _fails(one, i), range(8)))
    assert all("'rows' is not registered" in f for f in failures), failures


def _fails(f: Any, *args: Any) -> str:
    try:
        f(*args)
    except Exception as e:
        return str(e)
    return "no error"


def _register(url: str, name: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v2/systemsharedmemory/region/{name}/register", json=body)


def test_shared_memory_bad_input_is_a_4xx_naming_the_problem(shm_server: Serve, regions: Regions) -> None:
    url = shm_server.url
    httpx.post(f"{url}/v2/systemsharedmemory/unregister")
    key, _ = regions.make(ROW)
    cases = [
        (_register(url, "a", key="/kf-test-none-such", byte_size=8), 400, "no shared memory object"),
        (_register(url, "a", key=key, byte_size=ROW + 1), 400, f"holds {ROW} bytes"),
        (_register(url, "a", key=key, offset=8, byte_size=ROW), 400, f"needs {ROW + 8}"),
        (_register(url, "a", key="/dir/x", byte_size=8), 400, "no other '/'"),
        (_register(url, "a", key="/..", byte_size=8), 400, "is not the name"),
        (_register(url, "a", key="/kubeforge-x", byte_size=8), 400, "server's own objects"),
        (_register(url, "a", key=key, byte_size=-1), 400, "byte_size must be a whole number"),
        (_register(url, "a", byte_size=8), 400, "key missing"),
        (httpx.post(f"{url}/v2/systemsharedmemory/region/a/register", content=b"{"), 400, "malformed JSON"),
        (httpx.get(f"{url}/v2/systemsharedmemory/region/zz/status"), 404, "'zz' is not registered"),
        (httpx.post(f"{url}/v2/cudasharedmemory/region/c/register", json={}), 501, "CUDA shared memory"),
        (httpx.get(f"{url}/v2/systemsharedmemory/region/a/register"), 405, "not allowed"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["error"], (r.status_code, r.text)
    assert _register(url, "a", key=key, byte_size=ROW).status_code == 200
    dup = _register(url, "a", key=key, byte_size=ROW)
    assert dup.status_code == 409 and "'a' is already registered" in dup.json()["error"]

    def infer(**params: Any) -> httpx.Response:
        inp = {"name": "input__0", "shape": [1, 16], "datatype": "FP32", "parameters": params}
        return httpx.post(f"{url}/v2/models/mlp/infer", json={"inputs": [inp]})

    bad = [
        (infer(shared_memory_region="a"), "without shared_memory_byte_size"),
        (infer(shared_memory_byte_size=ROW), "without shared_memory_region"),
        (infer(shared_memory_region="a", shared_memory_byte_size=8), "needs 64 bytes"),
        (infer(shared_memory_region="a", shared_memory_byte_size=ROW, shared_memory_offset=4), "run past"),
        (infer(shared_memory_region="nope", shared_memory_byte_size=ROW), "'nope' is not registered"),
        (infer(shared_memory_region="a", shared_memory_byte_size=ROW, binary_data_size=ROW), "give one"),
    ]
    for r, words in bad:
        assert r.status_code == 400 and words in r.json()["error"], r.text
    out = {"name": "output__0", "parameters": {"shared_memory_region": "a", "shared_memory_byte_size": 4}}
    inp = {"name": "input__0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}
    r = httpx.post(f"{url}/v2/models/mlp/infer", json={"inputs": [inp], "outputs": [out]})
    assert r.status_code == 400 and "the output is 16 bytes, more than its" in r.json()["error"], r.text

    # the client truncates its object under the server: a short read, answered 400; the server lives on
    fd = os.open(f"/dev/shm/{key.lstrip('/')}", os.O_RDWR)
    os.ftruncate(fd, 8)
    os.close(fd)
    r = infer(shared_memory_region="a", shared_memory_byte_size=ROW)
    assert r.status_code == 400 and "was it truncated?" in r.json()["error"], r.text
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    httpx.post(f"{url}/v2/systemsharedmemory/unregister")


def test_shared_memory_is_refused_unless_the_server_allows_it(mlp_server: Serve) -> None:
    """Off by default (Triton's --allow-client-shm): register and use are refused naming the flag."""
    import tritonclient.grpc as tg

    r = _register(mlp_server.url, "a", key="/kf-test-x", byte_size=8)
    assert r.status_code == 400 and "--allow-client-shm" in r.json()["error"]
    inp = {
        "name": "input__0",
        "shape": [1, 16],
        "datatype": "FP32",
        "parameters": {"shared_memory_region": "a", "shared_memory_byte_size": ROW},
    }
    r = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json={"inputs": [inp]})
    assert r.status_code == 400 and "--allow-client-shm" in r.json()["error"]
    assert httpx.get(f"{mlp_server.url}/v2/systemsharedmemory/status").json() == []
    assert "system_shared_memory" not in httpx.get(f"{mlp_server.url}/v2").json()["extensions"]
    client = tg.InferenceServerClient(mlp_server.grpc_url)
    with pytest.raises(tg.InferenceServerException) as e:
        client.register_system_shared_memory("a", "/kf-test-x", 8)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "--allow-client-shm" in e.value.message()
    with pytest.raises(tg.InferenceServerException) as e:
        client.register_cuda_shared_memory("c", b"\0" * 64, 0, 8)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert client.get_cuda_shared_memory_status(as_json=True) == {}


@pytest.fixture(scope="module")
def wide_shm_server(registry: Registry) -> Iterator[Serve]:
    """Registry.wide (64 KiB rows) with two protocol workers and client shared memory allowed."""
    s = start_wide(registry, "--allow-client-shm")
    yield s
    s.stop()


def _placements(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kubeforge_worker_inputs_total{"):
            kind = line.split('placement="')[1].split('"')[0]
            out[kind] = out.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_large_inputs_are_read_from_shared_memory_into_the_workers_slots_and_failed_reads_leak_none(
    registry: Registry, wide_shm_server: Serve, regions: Regions
) -> None:
    """64 KiB rows from 16 clients at once, over REST and gRPC, each in its own place of one region: every
    answer is its own row's, and every input went to the model process from the slot it was read into
    (in place: one copy, region to slot). Then 150 reads that fail (the object truncated under the server),
    more than the two workers' 128 slots: none keeps its slot, as the requests after them are still read
    into slots."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    n, row = 32, WIDE * 4
    xs = np.random.default_rng(14).standard_normal((n, WIDE), dtype=np.float32)
    key, h = regions.make(xs.nbytes)
    shm.set_shared_memory_region(h, [xs])
    th.InferenceServerClient(wide_shm_server.url.removeprefix("http://")).register_system_shared_memory(
        "rows", key, xs.nbytes
    )

    def one(i: int) -> np.ndarray:
        mod: Any = tg if i % 2 else th
        if mod is tg:
            c: Any = tg.InferenceServerClient(wide_shm_server.grpc_url)
        else:
            c = th.InferenceServerClient(wide_shm_server.url.removeprefix("http://"))
        inp = mod.InferInput("input__0", [1, WIDE], "FP32")
        inp.set_shared_memory("rows", row, offset=i * row)
        return c.infer("wide", [inp]).as_numpy("output__0")  # type: ignore[no-any-return]

    def all_rows() -> None:
        with cf.ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(one, range(n)))
        with torch.inference_mode():
            want = registry.wide(torch.from_numpy(xs)).numpy()
        np.testing.assert_allclose(np.concatenate(outs), want, rtol=1e-4, atol=1e-5)

    before = _placements(wide_shm_server.url)
    all_rows()
    after = _placements(wide_shm_server.url)
    assert after.get("in_place", 0) - before.get("in_place", 0) == n, (before, after)

    short_key, _ = regions.make(row)
    th.InferenceServerClient(wide_shm_server.url.removeprefix("http://")).register_system_shared_memory(
        "short", short_key, row
    )
    body = {
        "inputs": [
            {
                "name": "input__0",
                "shape": [1, WIDE],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": "short", "shared_memory_byte_size": row},
            }
        ]
    }
    with httpx.Client(base_url=wide_shm_server.url) as c:  # one connection: one worker, all its slots
        assert c.post("/v2/models/wide/infer", json=body).status_code == 200  # the worker opens the object
        fd = os.open(f"/dev/shm/{short_key.lstrip('/')}", os.O_RDWR)
        os.ftruncate(fd, 100)
        os.close(fd)
        for _ in range(150):
            r = c.post("/v2/models/wide/infer", json=body)
            assert r.status_code == 400 and "object ends after 100" in r.json()["error"], r.text
    before = _placements(wide_shm_server.url)
    all_rows()
    after = _placements(wide_shm_server.url)
    assert after.get("in_place", 0) - before.get("in_place", 0) == n, (before, after)
