"""Serving benchmark: raw compiled model in-process (ceiling) vs Kubeforge's server vs a naive FastAPI server.

    python bench/serve_bench.py --device cpu  --models mlp,cnn            # this machine
    python bench/serve_bench.py --device cuda --models resnet50,bert     # an NVIDIA GPU

Load comes from `wrk` (REST; Debian: `apt-get install -y wrk`) and `bench/grpcload` (gRPC; built with Go on
first use, or --grpc-load PATH, which may also name a `ghz`), not from Python, so the client costs the server
little CPU. Every request carries one row; throughput is rows/s. The ceiling calls the same compiled artifact
as the server, in-process, at batch min(concurrency, max batch), with its inputs already on the device; on
a GPU a second row calls it as a program holding its batch in host memory does (the inputs' copy to the
device first, from page-locked memory, on the same stream), and a line after the table gives each server
point against that one: a server's inputs start on the host too; the column "% of raw at its mean batch" runs
it at each server point's own mean batch (rounded) too: what serving costs at the batches the server formed,
apart from how large the load let them grow. Cold start = process start to
/v2/health/ready 200, with an empty compile cache and again with the cache the first start filled.

`--workers 0,8` measures the server with its protocol on the model process's event loop and with 8 protocol
worker processes, in the same run. Client parallelism: BENCH_WRK_THREADS (default 2) wrk threads, as many Go
threads for the gRPC load generator (BENCH_GRPC_PROCS to set them apart; 0: one per CPU),
BENCH_GRPC_CONNECTIONS (default 4) gRPC connections.

The last column is the server's CPU time per request during each point (model process, and the worker
processes together), from /proc. `--models tiny` (256 -> 8 -> 10) does next to no compute: what is left is
what a request costs the server itself, the CPU a GPU host spends per request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import free_port  # noqa: E402
from runtime.serving.config import ServeConfig  # noqa: E402  (torch-free: the server's defaults)


@dataclass
class Bench:
    make: Callable[[], Any]
    datatype: str
    shape: tuple[int, ...]  # per row, without the batch dimension


def _models() -> dict[str, Bench]:
    import torch

    from runtime.serving import examples as ex

    return {
        "mlp": Bench(lambda: ex.MLP(256, 1024, 10), "FP32", (256,)),
        # next to no compute: what a request costs the server itself (the CPU a GPU host spends per request)
        "tiny": Bench(lambda: ex.MLP(256, 8, 10), "FP32", (256,)),
        # the same with a ResNet-50-sized request (602 KB): what the body costs the server
        "tinyimage": Bench(
            lambda: torch.nn.Sequential(
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10)
            ),
            "FP32",
            (3, 224, 224),
        ),
        "cnn": Bench(lambda: ex.SmallCNN(), "FP32", (3, 32, 32)),
        "resnet50": Bench(lambda: ex.ResNet50(), "FP32", (3, 224, 224)),
        "bert": Bench(lambda: ex.BertEncoder(), "INT64", (128,)),
    }


def _module_and_sig(name: str) -> tuple[Any, Any]:
    import torch

    from runtime.serving.signature import Signature, TensorSpec

    b = _models()[name]
    torch.manual_seed(0)
    return b.make().eval(), Signature((TensorSpec("input__0", b.datatype, (-1, *b.shape)),), ())


def _row(name: str) -> Any:
    import numpy as np

    b = _models()[name]
    rng = np.random.default_rng(0)
    if b.datatype == "INT64":
        return rng.integers(0, 1000, (1, *b.shape), dtype=np.int64)
    row = rng.standard_normal((1, *b.shape), dtype=np.float32)
    raw = row.view(np.uint8).reshape(-1)  # ghz runs call data through Go templates: no "{{" in the bytes
    while (hit := raw.tobytes().find(b"{{")) >= 0:
        raw[hit] = 0x7A
    return row


def _warm_sizes(a: argparse.Namespace) -> tuple[int, ...]:
    given = getattr(a, "warmup_batch_sizes", "")
    return tuple(int(b) for b in given.split(",") if b.strip()) if given else (1, a.max_batch)


# -- servers (run as subprocesses of this script) --
def serve_kubeforge(a: argparse.Namespace) -> None:
    from runtime.serving.loader import LoadedModel
    from runtime.serving.logs import setup_logging
    from runtime.serving.server import Server, run_event_loop

    setup_logging("info")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(a.cache) / "inductor"))
    module, sig = _module_and_sig(a.model)
    cfg = ServeConfig(
        model_uri=f"bench:{a.model}",
        model_name=a.model,
        cache_dir=Path(a.cache),
        mode=a.mode,
        warmup_batch_sizes=_warm_sizes(a),
        max_batch_size=a.max_batch,
        max_delay_ms=a.delay_ms,
        max_queue_size=4096,
        host="127.0.0.1",
        http_port=a.port,
        grpc_port=a.grpc_port,
        precision=a.precision,
        grace_s=5,
        workers=a.workers,
        copy_stream=a.copy_stream,
        launch_deviations=a.launch_deviations,
        grpc_server=a.grpc_server,
        balance=a.balance,
        event_loop=a.event_loop,
        busy_poll_us=None if a.busy_poll_us == "auto" else float(a.busy_poll_us),
        allow_client_shm="shm" in a.path_set,
    )
    loaded = LoadedModel(module, sig, a.model, "1", cfg.model_uri, f"bench-{a.model}-seed0", Path("."))
    run_event_loop(Server(cfg, lambda: loaded).run(), cfg.event_loop)


def serve_naive(a: argparse.Namespace) -> None:
    """What users write themselves: FastAPI, one eager forward per request, JSON in and out."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    module, _ = _module_and_sig(a.model)
    dev = "cuda" if a.device == "cuda" else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    model = module.to(dev, dtype=dtype) if dtype != torch.float32 else module.to(dev)
    app = FastAPI()
    in_dtype = torch.int64 if _models()[a.model].datatype == "INT64" else dtype

    @app.get("/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/predict")
    def predict(body: dict[str, Any]) -> dict[str, Any]:
        x = torch.tensor(body["data"], dtype=in_dtype, device=dev)
        with torch.no_grad():
            y = model(x)
        return {"data": y.float().cpu().tolist()}

    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


# -- measurement --------------------------------------------------------------------------------------------
def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def _start(
    kind: str, a: argparse.Namespace, model: str, cache: str, log: Path, workers: int = 0
) -> tuple[subprocess.Popen[bytes], int, int, float]:
    port, gport = free_port(), free_port()
    cmd = [
        sys.executable,
        __file__,
        f"_{kind}",
        "--model",
        model,
        "--port",
        str(port),
        "--grpc-port",
        str(gport),
        "--cache",
        cache,
        "--device",
        a.device,
        "--mode",
        a.mode,
        "--max-batch",
        str(a.max_batch),
        "--delay-ms",
        str(a.delay_ms),
        "--precision",
        a.precision,
        "--workers",
        str(workers),
        "--warmup-batch-sizes",
        getattr(a, "warmup_batch_sizes", ""),
        "--copy-stream" if getattr(a, "copy_stream", ServeConfig.copy_stream) else "--no-copy-stream",
        "--launch-deviations",
        str(getattr(a, "launch_deviations", ServeConfig.launch_deviations)),
        "--grpc-server",
        getattr(a, "grpc_server", ServeConfig.grpc_server),
        "--balance",
        getattr(a, "balance", ServeConfig.balance),
        "--event-loop",
        getattr(a, "event_loop", ServeConfig.event_loop),
        "--busy-poll-us",
        str(getattr(a, "busy_poll_us", "auto")),
        "--paths",
        getattr(a, "paths", ""),
    ]
    t0 = time.perf_counter()
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=f)
    path = "/v2/health/ready" if kind == "kubeforge" else "/ready"
    _wait_http(f"http://127.0.0.1:{port}{path}", proc, a.start_timeout)
    return proc, port, gport, time.perf_counter() - t0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "%s"
%s
local f = io.open("%s", "rb"); wrk.body = f:read("*all"); f:close()
"""


def client_threads(c: int) -> int:
    """The OS threads a load generator may run at `c` concurrent requests: $BENCH_WRK_THREADS (default 2),
    at most one a request. wrk takes it as -t; grpcload (and ghz) as GOMAXPROCS, unless $BENCH_GRPC_PROCS
    says otherwise (0: Go's default, one per CPU). Both generators share the host with the server, so they
    get the same budget: on a lent H100, 16 CPUs, ResNet-50 at 128 clients, grpcload with one Go thread per
    CPU spent 282-296 µs of CPU a call against 224-260 with 4, and the server answered 11,764-11,840 rows/s
    against 12,336-14,858 (docs/benchmarks.md, the seventeenth session)."""
    return max(1, min(c, int(os.environ.get("BENCH_WRK_THREADS", "2"))))


def _wrk(
    url: str, body: bytes, c: int, seconds: float, headers: dict[str, str], tmp: Path
) -> dict[str, float]:
    bf, lua = tmp / f"body-{len(body)}-{abs(hash(body))}.bin", tmp / "post.lua"
    bf.write_bytes(body)
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items() if k != "Content-Type")
    lua.write_text(_LUA % (headers.get("Content-Type", "application/json"), extra, bf))
    threads = client_threads(c)
    out = subprocess.run(
        [
            shutil.which("wrk") or "wrk",
            f"-t{threads}",
            f"-c{c}",
            f"-d{seconds:.0f}s",
            f"--timeout={seconds + 10:.0f}s",  # wrk's 2 s would count a slow server's answers as none at all
            "--latency",
            "-s",
            str(lua),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict[str, float]:
    """rows/s, p50 and p99 (ms) and errors (non-2xx answers, socket errors and timeouts) from wrk --latency's
    report."""

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    lost = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps[1]) if rps else float("nan"),
        "p50": ms("50"),
        "p99": ms("99"),
        "errors": (float(bad[1]) if bad else 0.0) + (sum(map(float, lost.groups())) if lost else 0.0),
    }


def load_span(rows: float, rps: float, seconds: float) -> tuple[float, float]:
    """(requests served, seconds of load) of one measured point, from the rows the server counted (one per
    request here) and the load generator's rate: what the server's counters and CPU cover is the generator's
    whole run, grpcload's half-second warm-up included, not only its `seconds` of window. Until 2026-12-05
    the window alone divided them, which put (seconds + 0.5) / seconds into every gRPC row's CPU per
    request and device shares (1.17x at 3 s: BERT's gRPC device "busy 101 %"); REST rows (wrk, no warm-up)
    were right. Without counted rows (the naive server), the window."""
    if rows > 0 and rps > 0:
        return rows, rows / rps
    return (max(1.0, rps * seconds) if rps == rps else 1.0), seconds


PATHS = {"json", "binary", "grpc", "grpc-xnet", "shm"}  # --paths


def _grpc_load(
    tool: str, target: str, req: bytes, c: int, seconds: float, tmp: Path, flags: list[str] | None = None
) -> dict[str, float]:
    """Closed-loop ModelInfer calls with `tool`: bench/grpcload (what the tables use; `flags`, else
    $BENCH_GRPCLOAD_FLAGS, are its own), or ghz (named so)."""
    bf = tmp / "grpc.bin"
    bf.write_bytes(req)
    conns = str(min(c, int(os.environ.get("BENCH_GRPC_CONNECTIONS", "4"))))
    if Path(tool).name.startswith("ghz"):
        method = "inference.GRPCInferenceService/ModelInfer"
        proto = str(ROOT / "runtime/serving/protocol/grpc_predict_v2.proto")
        cmd = [tool, "--insecure", "--proto", proto, "--call", method, "--binary-file", str(bf), "-c", str(c)]
        cmd += ["-z", f"{seconds:.0f}s", "--connections", conns, "--format", "json", target]
    else:
        cmd = [tool, "-addr", target, "-request", str(bf), "-c", str(c), "-connections", conns]
        cmd += ["-d", f"{seconds:.0f}s", *(flags or os.environ.get("BENCH_GRPCLOAD_FLAGS", "").split())]
    procs = os.environ.get("BENCH_GRPC_PROCS", "")
    env = dict(os.environ)
    if procs != "0":
        env["GOMAXPROCS"] = procs or str(client_threads(c))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env)
    try:
        r = json.loads(proc.stdout)
    except ValueError:
        print(f"{Path(tool).name} failed: {proc.stderr[-500:]}", file=sys.stderr)
        return {"rps": float("nan"), "p50": float("nan"), "p99": float("nan"), "errors": float("nan")}
    if "calls" in r:  # grpcload
        if r["errors"]:
            print(f"grpcload errors {r['errors']}: {r.get('first_error')}", file=sys.stderr)
        p50, p99 = (float("nan") if r[k] < 0 else r[k] for k in ("p50_ms", "p99_ms"))
        return {"rps": r["rps"], "p50": p50, "p99": p99, "errors": float(sum(r["errors"].values()))}
    lat = {d["percentage"]: d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
    errors = sum(v for k, v in (r.get("statusCodeDistribution") or {}).items() if k != "OK")
    return {
        "rps": r["rps"],
        "p50": lat.get(50, float("nan")),
        "p99": lat.get(99, float("nan")),
        "errors": float(errors),
    }


def grpc_load_tool(given: str) -> str | None:
    """The gRPC load generator: `given` (or else $GRPC_LOAD) if it is a file, else bench/grpcload built into
    .cache/gobin (with Go, when missing or older than its source); None without either. On the lent GPU
    machine there is no Go: $GRPC_LOAD names the kit's binary (hack/device-kit.sh)."""
    given = given or os.environ.get("GRPC_LOAD", "")
    if given:
        return given if Path(given).is_file() else None
    src, out = ROOT / "bench/grpcload", ROOT / ".cache/gobin/grpcload"
    newest = max(f.stat().st_mtime for f in src.iterdir())
    if out.is_file() and out.stat().st_mtime >= newest:
        return str(out)
    go = shutil.which("go")
    if go is None:
        return str(out) if out.is_file() else None
    env = {**os.environ, "CGO_ENABLED": "0"}
    built = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=src, env=env, capture_output=True, text=True
    )
    if built.returncode:
        print(f"building bench/grpcload failed: {built.stderr[-800:]}", file=sys.stderr)
        return None
    return str(out)


def _ceiling(
    a: argparse.Namespace, model: str, cache: str, batches: list[int]
) -> dict[int, dict[str, float]]:
    import torch

    from runtime.serving import compile as compiler
    from runtime.serving.compile.inductor import example_inputs
    from runtime.serving.detect import detect_hardware

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache) / "inductor"))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # as many as the server's model thread
    module, sig = _module_and_sig(model)
    b = compiler.build(
        module,
        sig,
        hw=detect_hardware(),
        mode=a.mode,
        warmup_batch_sizes=_warm_sizes(a),
        max_batch_size=a.max_batch,
        cache_dir=Path(cache),
        model_name=model,
        identity=f"bench-{model}-seed0|v1",
        precision=a.precision,
    )
    out: dict[int, dict[str, float]] = {}
    sync = torch.cuda.synchronize if b.device.startswith("cuda") else (lambda: None)
    buckets = b.compiled.batch_buckets

    def timed(call: Callable[[], object], n: int) -> dict[str, float]:
        for _ in range(5):
            call()
        sync()
        times: list[float] = []
        t_end = time.perf_counter() + a.seconds / 2
        while time.perf_counter() < t_end or len(times) < 20:
            t0 = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        med = statistics.median(times)
        return {"rps": n / med, "p50": med * 1e3, "p99": times[int(len(times) * 0.99) - 1] * 1e3}

    for n in batches:
        run_n = min(x for x in buckets if x >= n) if buckets else n  # the server pads to the same bucket
        xs = example_inputs(sig, run_n, b.device)
        out[n] = timed(lambda xs=xs: b.compiled.run(xs), n)
        if b.device.startswith("cuda"):
            # as a program that holds its batch in host memory calls it: the inputs' copy first, from
            # page-locked memory, on the same stream
            host = [x.cpu().pin_memory() for x in xs]
            h = timed(lambda host=host: b.compiled.run([t.to(b.device, non_blocking=True) for t in host]), n)
            out[n].update(host_rps=h["rps"], host_p50=h["p50"], host_p99=h["p99"])
        progress(f"ceiling at batch {n}: " + ", ".join(f"{k} {v:,.2f}" for k, v in out[n].items()))
    out[0] = {"mode": b.compiled.mode, "path": b.compiled.path}  # type: ignore[dict-item]
    return out


def progress(line: str) -> None:
    """One measured point, on stderr as it comes: what a run cut short (a lent GPU's limit) still gives."""
    print(line, file=sys.stderr, flush=True)


def cpu_seconds_of(stat: Path) -> float:
    """CPU seconds (user + system) from a /proc stat file (a process's, or a thread's under task/); 0 when
    it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a server's model process and by its worker processes."""
    children: list[str] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    return cpu_seconds_of(Path(f"/proc/{pid}/stat")), sum(
        cpu_seconds_of(Path(f"/proc/{c}/stat")) for c in children
    )


def protocol_workers(pid: int) -> list[str]:
    """The protocol worker processes of a server process `pid` (multiprocessing spawn children), by pid."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def connections_held(pids: list[str], ports: set[int]) -> list[int]:
    """Established TCP connections to `ports` that each process of `pids` holds (/proc/net/tcp*, matched by
    socket inode), in the order of `pids`."""
    open_: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) in ports:
                open_.add(f"socket:[{f[9]}]")
    counts = []
    for k in pids:
        held = 0
        for fd in Path(f"/proc/{k}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed while we look
                held += os.readlink(fd) in open_
        counts.append(held)
    return counts


def server_counters(port: int) -> dict[str, float]:
    """A Kubeforge server's batch and device counters: rows and batches, device busy seconds, and its idle
    seconds with a request waiting (kubeforge_device_idle_seconds, reasons queued and launching)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out = dict.fromkeys(_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0]
        if name == "kubeforge_device_idle_seconds_total" and 'reason="no_requests"' in line:
            continue
        if name in out:
            out[name] += float(line.split()[-1])
    return out


def bodies(model: str) -> tuple[bytes, bytes, int, bytes]:
    """One row's request for `model`, as each path sends it: the REST JSON body, the REST binary body (JSON
    header, then the tensor; binary outputs asked for) with its header's length, and the serialized gRPC
    ModelInferRequest (raw contents)."""
    from runtime.serving.protocol._generated import grpc_predict_v2_pb2 as pb

    row = _row(model)
    spec = {"name": "input__0", "shape": list(row.shape), "datatype": _models()[model].datatype}
    oip_json = json.dumps({"inputs": [spec | {"data": row.ravel().tolist()}]}).encode()
    head = json.dumps(
        {
            "inputs": [spec | {"parameters": {"binary_data_size": row.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    greq = pb.ModelInferRequest(model_name=model)
    greq.inputs.add(name="input__0", datatype=spec["datatype"], shape=spec["shape"])
    greq.raw_input_contents.append(row.tobytes())
    return oip_json, head + row.tobytes(), len(head), greq.SerializeToString()


def shm_bodies(model: str, port: int) -> tuple[bytes, bytes, Callable[[], None]]:
    """One row of `model` in a system shared memory object registered with the server on `port`, and the
    requests naming it: the REST JSON body and the serialized gRPC ModelInferRequest (Triton's shared memory
    parameters; outputs in the answer). The callable unregisters the region and removes the object."""
    from runtime.serving.protocol._generated import grpc_predict_v2_pb2 as pb

    row = _row(model)
    key = f"/kf-bench-{os.getpid()}-{model}"
    path = f"/dev/shm{key}"
    Path(path).write_bytes(row.tobytes())
    base = f"http://127.0.0.1:{port}/v2/systemsharedmemory"
    body = json.dumps({"key": key, "offset": 0, "byte_size": row.nbytes}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{base}/region/bench/register", data=body)).read()
    params = {"shared_memory_region": "bench", "shared_memory_byte_size": row.nbytes}
    spec = {"name": "input__0", "shape": list(row.shape), "datatype": _models()[model].datatype}
    rest = json.dumps({"inputs": [spec | {"parameters": params}]}).encode()
    greq = pb.ModelInferRequest(model_name=model)
    inp = greq.inputs.add(name="input__0", datatype=spec["datatype"], shape=spec["shape"])
    inp.parameters["shared_memory_region"].string_param = "bench"
    inp.parameters["shared_memory_byte_size"].int64_param = row.nbytes

    def done() -> None:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(urllib.request.Request(f"{base}/unregister", data=b"")).read()
        os.unlink(path)

    return rest, greq.SerializeToString(), done


def _measure_server(
    a: argparse.Namespace,
    pid: int,
    model: str,
    port: int,
    gport: int,
    grpc_load: str | None,
    tmp: Path,
    results: dict[tuple[str, int], dict[str, float]],
    label: str,
) -> None:
    """Load one running Kubeforge server at every concurrency, over each protocol path."""
    oip_json, oip_bin, head_len, grpc_wire = bodies(model)
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    shm_rest, shm_grpc, shm_done = shm_bodies(model, port) if "shm" in a.path_set else (b"", b"", None)

    def measured(key: tuple[str, int], fn: Callable[[], dict[str, float]]) -> None:
        k0 = server_counters(port)
        m0, w0 = _cpu_seconds(pid)
        r = fn()
        m1, w1 = _cpu_seconds(pid)
        k1 = server_counters(port)
        d = {k: k1[k] - k0[k] for k in _COUNTERS}
        r["batch"] = d["kubeforge_batch_size_sum"] / max(1.0, d["kubeforge_batch_size_count"])
        requests, span = load_span(d["kubeforge_batch_size_sum"], r["rps"], a.seconds)
        r["busy"] = 100 * d["kubeforge_device_busy_seconds_total"] / span
        r["late"] = 100 * d["kubeforge_device_idle_seconds_total"] / span
        r["cpu_model"], r["cpu_workers"] = (m1 - m0) / requests * 1e6, (w1 - w0) / requests * 1e6
        results[key] = r
        progress(
            f"{key[0]} at {key[1]}: {r['rps']:,.0f} rows/s, p50 {r['p50']:.2f} ms, batch {r['batch']:.1f}"
        )

    for c in a.concurrency:
        if "json" in a.path_set:
            measured((f"{label} REST json", c), lambda c=c: _wrk(url, oip_json, c, a.seconds, {}, tmp))
        measured(
            (f"{label} REST binary", c),
            lambda c=c: _wrk(
                url,
                oip_bin,
                c,
                a.seconds,
                {
                    "Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(head_len),
                },
                tmp,
            ),
        )
        # grpc-xnet: frames as large as the server allows (grpcio's way), not grpc-go's 16 KiB
        for path, row, flags in (("grpc", "gRPC", None), ("grpc-xnet", "gRPC x/net", ["-h2", "xnet"])):
            if grpc_load and path in a.path_set:
                measured(
                    (f"{label} {row}", c),
                    lambda c=c, flags=flags: _grpc_load(
                        grpc_load, f"127.0.0.1:{gport}", grpc_wire, c, a.seconds, tmp, flags
                    ),
                )
        if shm_done is not None:  # the row in a registered shared memory region, named by the request
            measured((f"{label} REST shm", c), lambda c=c: _wrk(url, shm_rest, c, a.seconds, {}, tmp))
            if grpc_load:
                measured(
                    (f"{label} gRPC shm", c),
                    lambda c=c: _grpc_load(grpc_load, f"127.0.0.1:{gport}", shm_grpc, c, a.seconds, tmp),
                )
    if shm_done is not None:
        shm_done()


def run_model(a: argparse.Namespace, model: str, tmp: Path, grpc_load: str | None) -> list[str]:
    import numpy as np

    row = _row(model)
    cache = str(tmp / f"cache-{model}")
    log = tmp / f"{model}.log"
    lines: list[str] = []
    # cold starts: empty cache, then the cache the first start filled
    proc, port, gport, cold = _start("kubeforge", a, model, cache, log, a.workers_list[0])
    progress(f"{model}: cold start {cold:.1f} s")
    _stop(proc)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for wi, workers in enumerate(a.workers_list):
        proc, port, gport, warm_w = _start("kubeforge", a, model, cache, log, workers)
        if wi == 0:
            warm = warm_w
            info = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/ready").read()
            )
            lines.append(
                f"\n### {model} ({a.device}: {info['hardware']}, {a.precision}; server: {info['backend']}/"
                f"{info['mode']}: {info['compile_path']}; fallbacks: {info['fallbacks'] or 'none'})\n"
            )
            lines.append(
                f"Cold start to ready: {cold:.1f} s with an empty compile cache, {warm:.1f} s with the cache "
                f"(compile/load step {info['compile_seconds']:.1f} s, cache hit: {info['cache_hit']}).\n"
            )
        _measure_server(a, proc.pid, model, port, gport, grpc_load, tmp, results, f"kubeforge w{workers}")
        _stop(proc)
    proc, port, _, _ = _start("naive", a, model, cache, log)
    naive_body = json.dumps({"data": row.tolist()}).encode()
    for c in a.concurrency:
        results[("naive FastAPI eager", c)] = _wrk(
            f"http://127.0.0.1:{port}/predict", naive_body, c, a.seconds, {}, tmp
        )
    _stop(proc)
    # the raw model also at each server point's own mean batch (rounded): what serving costs at the batches
    # the server formed, apart from how large a load lets them grow
    own = {n for r in results.values() if (n := _batch_of(r))}
    ceil = _ceiling(a, model, cache, sorted({min(c, a.max_batch) for c in a.concurrency} | own))
    lines.append(f"Ceiling: {ceil[0]['mode']} ({ceil[0]['path']}), in-process, same batch size.\n")  # type: ignore[index]
    lines.append(
        "| concurrency | path | rows/s | x naive | % of ceiling | % of raw at its mean batch | p50 ms "
        "| p99 ms | errors | mean batch | CPU us/request: model process, workers "
        "| device busy %, idle with a request waiting % |"
    )
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in a.concurrency:
        ce = ceil[min(c, a.max_batch)]
        naive = results[("naive FastAPI eager", c)]["rps"]
        lines.append(
            f"| {c} | ceiling: compiled model, batch {min(c, a.max_batch)} | {ce['rps']:,.0f} | "
            f"{times_naive(ce['rps'], naive, a.seconds)} | 100 | 100 | {ce['p50']:.2f} | {ce['p99']:.2f} | | "
            f"{min(c, a.max_batch)} | | |"
        )
        if "host_rps" in ce:
            n, hr = min(c, a.max_batch), ce["host_rps"]
            lines.append(
                f"| {c} | ceiling, inputs from host memory, batch {n} | {hr:,.0f} | "
                f"{times_naive(hr, naive, a.seconds)} | {100 * hr / ce['rps']:.0f} | | "
                f"{ce['host_p50']:.2f} | {ce['host_p99']:.2f} | | {n} | | |"
            )
        for (path, cc), r in results.items():
            if cc != c:
                continue
            n = _batch_of(r)
            own_pct = f"{100 * r['rps'] / ceil[n]['rps']:.0f}" if n else ""
            x = "1.0" if path.startswith("naive") else times_naive(r["rps"], naive, a.seconds)
            lines.append(
                f"| {c} | {path} | {r['rps']:,.0f} | {x if r['rps'] else ''} | "
                f"{100 * r['rps'] / ce['rps']:.0f} | {own_pct} | "
                f"{latency_cell(r, 'p50')} | {latency_cell(r, 'p99')} | {r['errors']:.0f} | "
                f"{r.get('batch', float('nan')):.1f} | {_cpu_cell(r)} | {_device_cell(r)} |"
            )
    if shares := host_shares(results, ceil, a.max_batch):
        lines.append(f"\n{shares}")
    best = f"kubeforge w{a.workers_list[-1]}"
    if 1 in a.concurrency:
        kf1 = results.get((f"{best} gRPC", 1)) or results[(f"{best} REST binary", 1)]
        lines.append(
            f"\nBatch-1 p50: server {kf1['p50']:.2f} ms vs raw {ceil[1]['p50']:.2f} ms "
            f"(+{kf1['p50'] - ceil[1]['p50']:.2f} ms)"
            + (
                f"; raw with its input from host memory {ceil[1]['host_p50']:.2f} ms."
                if "host_p50" in ceil[1]
                else "."
            )
        )
    del np
    return lines


_COUNTERS = (
    "kubeforge_batch_size_sum",
    "kubeforge_batch_size_count",
    "kubeforge_device_busy_seconds_total",
    "kubeforge_device_idle_seconds_total",  # with a request waiting (queued, launching) only
)


def host_shares(
    results: dict[tuple[str, int], dict[str, float]], ceil: dict[int, dict[str, float]], max_batch: int
) -> str:
    """Each Kubeforge point's rows/s as a share of the ceiling with its inputs from host memory at the same
    batch (min(concurrency, max batch)); empty where that ceiling was not measured (CPU)."""
    shares = [
        f"{path} at {c}: {100 * r['rps'] / ce['host_rps']:.0f} %"
        for (path, c), r in results.items()
        if path.startswith("kubeforge") and "host_rps" in (ce := ceil[min(c, max_batch)])
    ]
    if not shares:
        return ""
    return "Against the ceiling with its inputs from host memory (where a server's inputs start): " + (
        "; ".join(shares) + "."
    )


def times_naive(rps: float, naive: float, seconds: float) -> str:
    """The "x naive" cell. A naive server that answered nothing within the run's `seconds` (each request
    took longer: all of them were still running) served fewer than 1 / `seconds` rows/s, so the ratio is
    at least `rps` x `seconds`: written as such, not as nan or infinity. Empty when the naive point failed."""
    if not math.isfinite(naive) or naive < 0:
        return ""
    return f"> {rps * seconds:,.0f}" if naive == 0 else f"{rps / naive:.1f}"


def latency_cell(r: dict[str, float], key: str) -> str:
    """A point's p50 or p99 in ms; "none" where no request was answered within the run (no latency to
    give: not 0.00)."""
    return f"{r[key]:.2f}" if r["rps"] > 0 else "none"


def _batch_of(r: dict[str, float]) -> int:
    """A server point's mean batch, rounded (0: none measured)."""
    b = r.get("batch", float("nan"))
    return max(1, round(b)) if math.isfinite(b) and b > 0 else 0


def _device_cell(r: dict[str, float]) -> str:
    """A Kubeforge point's device busy share and its idle share with a request waiting (the naive server's:
    empty)."""
    return f"{r['busy']:.0f}, {r['late']:.0f}" if "busy" in r else ""


def _cpu_cell(r: dict[str, float]) -> str:
    if "cpu_model" not in r:
        return ""
    return f"{r['cpu_model']:.0f}, {r['cpu_workers']:.0f}" if r["cpu_workers"] else f"{r['cpu_model']:.0f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", nargs="?", default="bench", choices=["bench", "_kubeforge", "_naive"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--model", default="mlp")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--mode", default="aot", choices=["aot", "jit", "eager"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument(
        "--warmup-batch-sizes",
        default="",
        help="warm-up batch sizes, comma-separated; each is also a padding bucket on CUDA (default: 1,MAX)",
    )
    p.add_argument(
        "--copy-stream",
        action=argparse.BooleanOptionalAction,
        default=ServeConfig.copy_stream,
        help="the server's --copy-stream (CUDA; on by default, as the server's)",
    )
    p.add_argument(
        "--launch-deviations",
        type=float,
        default=ServeConfig.launch_deviations,
        help="the server's --launch-deviations",
    )
    p.add_argument(
        "--grpc-server", default=ServeConfig.grpc_server, choices=["native", "grpcio"], help="the server's"
    )
    p.add_argument(
        "--balance", default=ServeConfig.balance, choices=["least-connections", "kernel"], help="the server's"
    )
    p.add_argument(
        "--event-loop",
        default=ServeConfig.event_loop,
        choices=["auto", "asyncio", "uvloop"],
        help="the server's",
    )
    p.add_argument("--busy-poll-us", default="auto", help="the server's (auto or microseconds)")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--grpc-port", type=int, default=0)
    p.add_argument("--cache", default="")
    p.add_argument(
        "--grpc-load",
        default=os.environ.get("GRPC_LOAD", ""),
        help="gRPC load generator: bench/grpcload's binary (default: built into .cache/gobin) or a ghz",
    )
    p.add_argument(
        "--workers",
        default="0",
        help="protocol worker processes of the Kubeforge server; a comma-separated list measures each",
    )
    p.add_argument(
        "--paths",
        default="json,binary,grpc",
        help="which Kubeforge request paths to load (json, binary, grpc; grpc-xnet: gRPC from x/net's HTTP/2 "
        "client, frames as large as the server allows, as grpcio's C core sends them, not grpc-go's 16 KiB; "
        "shm: the row in a registered system shared memory region, over REST and gRPC, the server started "
        "with --allow-client-shm)",
    )
    p.add_argument("--out", help="also write the tables to this file")
    p.add_argument("--workdir", help="keep server logs and caches here (default: a temporary folder)")
    a = p.parse_args()
    a.path_set = set(filter(None, a.paths.split(",")))
    if unknown := a.path_set - PATHS:
        p.error(f"--paths: unknown {', '.join(sorted(unknown))}; choose from {', '.join(sorted(PATHS))}")
    a.workers_list = [int(w) for w in str(a.workers).split(",")]
    a.workers = a.workers_list[0]
    if a.role == "_kubeforge":
        serve_kubeforge(a)
        return 0
    if a.role == "_naive":
        serve_naive(a)
        return 0
    if not shutil.which("wrk"):
        print("wrk not found: install it (Debian/Ubuntu: apt-get install -y wrk)", file=sys.stderr)
        return 2
    grpc_load = grpc_load_tool(a.grpc_load)
    if grpc_load is None and a.path_set & {"grpc", "grpc-xnet"}:
        print(
            "no gRPC load generator (Go builds bench/grpcload; or --grpc-load PATH): gRPC rows skipped",
            file=sys.stderr,
        )
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    lines = [
        f"`python bench/serve_bench.py --device {a.device} --models {a.models} --mode {a.mode} "
        f"--precision {a.precision} --max-batch {a.max_batch} --delay-ms {a.delay_ms} "
        f"--seconds {a.seconds:.0f} --workers {','.join(map(str, a.workers_list))} --paths {a.paths} "
        f"--concurrency {','.join(map(str, a.concurrency))}{'' if a.copy_stream else ' --no-copy-stream'}`"
    ]
    import hostspeed  # this folder: the script's own

    with tempfile.TemporaryDirectory(prefix="kf-bench-") as d:
        work = Path(a.workdir or d)
        work.mkdir(parents=True, exist_ok=True)
        before = hostspeed.measure()
        for model in a.models.split(","):
            lines += run_model(a, model, work, grpc_load)
            after = hostspeed.measure()  # also the next model's "before": nothing runs in between
            lines += ["", before.line("before this model's points"), after.line("after them")]
            before = after
            print("\n".join(lines), flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
