"""Overload benchmark: what clients that give up get from the server when more arrives than it can run.

    python bench/overload_bench.py                       # ~3 minutes on this machine

The model sleeps `--batch-ms` per batch of up to `--max-batch` rows whatever their number (a device's time,
not the CPU's: the host stays free, as with a GPU), so the server's capacity is max-batch / batch-ms rows/s.
Clients arrive open-loop (Poisson) at a multiple of that capacity, one row per request, and each gives up
after `--client-timeout-ms` (closes its connection, or cancels its gRPC call). Each row of the table is one
server configuration and one client behaviour, in the same run:

- fifo: the defaults; the client says nothing of its patience. The baseline.
- fifo + timeout: the client sends Triton's `timeout` parameter (its patience, in µs); the server drops a
  request whose timeout would pass before a batch started now is answered (504).
- fifo + gRPC deadline: the same with gRPC calls and their deadline (grpc-timeout).
- lifo: `--lifo-after-ms`: once the oldest queued request has waited that long, the newest go first.
- lifo + queue timeout: and `--queue-timeout-ms` (the client's patience) clears the ones left behind.
- priority: `--priority-levels 2`; the urgent share of the requests (`--urgent-share`, a fifth) sends Triton's
  `priority` 1, the rest nothing (the default, least urgent level).
- priority + timeout: and every client sends its timeout.
- priority + lifo: priorities and `--lifo-after-ms`, for clients that send no timeout.

In every row the same share of the requests is urgent (the same random draw); only the priority rows mark
them. The urgent columns give their own goodput and p99: what the traffic that matters most gets.

Columns: goodput (answers that came back within the client's timeout, per second), its ratio to the fifo row
at the same load, p50/p99 latency of those answers, what the other requests got (504, gave up, 429), and the
share of the rows the model ran whose answer nobody read (from the server's own batch-size histogram).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402
from bench.serve_bench import _stop, _wait_http  # noqa: E402


@dataclass
class Case:
    name: str
    flags: list[str] = field(default_factory=list)  # server flags
    send_timeout: bool = False  # the client sends parameters.timeout (its patience)
    grpc: bool = False  # gRPC calls with a deadline instead of REST
    mark_urgent: bool = False  # urgent requests send Triton's priority 1


def _cases(client_timeout_ms: float, lifo_after_ms: float) -> list[Case]:
    lifo = ["--lifo-after-ms", str(lifo_after_ms)]
    return [
        Case("fifo"),
        Case("fifo + timeout", send_timeout=True),
        Case("fifo + gRPC deadline", grpc=True),
        Case("lifo", lifo),
        Case("lifo + queue timeout", [*lifo, "--queue-timeout-ms", str(client_timeout_ms)]),
        Case("priority", ["--priority-levels", "2"], mark_urgent=True),
        Case("priority + timeout", ["--priority-levels", "2"], send_timeout=True, mark_urgent=True),
        Case("priority + lifo", ["--priority-levels", "2", *lifo], mark_urgent=True),
    ]


def _save_model(path: Path, batch_s: float) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from runtime.serving.examples import Sleepy

    x = torch.ones(1, 4)
    mlflow.pytorch.save_model(
        Sleepy(batch_s),
        str(path),
        serialization_format="pickle",
        signature=infer_signature(x.numpy(), (x * 2).numpy()),
    )


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _server_rows(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return _metric(r.read().decode(), "kubeforge_batch_size_sum")


@dataclass
class Tally:
    good: list[float] = field(default_factory=list)  # latencies of answers within the timeout
    codes: dict[str, int] = field(default_factory=dict)
    urgent_sent: int = 0
    urgent_good: list[float] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.codes[what] = self.codes.get(what, 0) + 1


class _Rest:
    """A small HTTP/1.1 client on asyncio streams (httpx spent more CPU than this machine's two cores at 400
    requests/s, and its client's own lateness would count as the server's): keep-alive connections reused,
    and the connection of a request given up on closed, as a client that gives up does."""

    def __init__(self, port: int, path: str, body: bytes) -> None:
        self.port = port
        self.request = (
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, timeout_s: float) -> str:
        conn = self.idle.pop() if self.idle else None
        try:
            return await asyncio.wait_for(self._exchange(conn), timeout_s)
        except TimeoutError:
            return "gave up"

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> str:
        if conn is None:
            conn = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
        except BaseException:
            writer.close()  # given up on (cancelled) or broken: the connection goes
            raise
        self.idle.append(conn)
        return head.split(b" ", 2)[1].decode()


async def _load(
    case: Case,
    port: int,
    grpc_target: str,
    rate: float,
    seconds: float,
    timeout_s: float,
    seed: int,
    urgent_share: float,
) -> Tally:
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    row = {"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}
    rests: list[_Rest] = []
    messages: list[bytes] = []
    for urgent in (False, True):  # the request a client sends: [plain, urgent]
        params: dict[str, int] = {}
        if case.send_timeout:
            params["timeout"] = int(timeout_s * 1e6)
        if urgent and case.mark_urgent:
            params["priority"] = 1
        body: dict[str, object] = {"inputs": [row], **({"parameters": params} if params else {})}
        rests.append(_Rest(port, "/v2/models/sleepy/infer", json.dumps(body).encode()))
        req = pb.ModelInferRequest(model_name="sleepy")
        inp = req.inputs.add(name="input__0", datatype="FP32", shape=[1, 4])
        inp.contents.fp32_contents.extend([1.0] * 4)
        if "priority" in params:
            req.parameters["priority"].uint64_param = 1
        messages.append(req.SerializeToString())
    tally = Tally()
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        async def one(urgent: bool) -> None:
            t0 = time.perf_counter()
            tally.urgent_sent += urgent
            if case.grpc:
                try:
                    await infer(messages[urgent], timeout=timeout_s)
                    code = "200"
                except grpc.aio.AioRpcError as e:
                    code = {
                        grpc.StatusCode.DEADLINE_EXCEEDED: "gave up",
                        grpc.StatusCode.RESOURCE_EXHAUSTED: "429",
                    }.get(e.code(), e.code().name)
                    if "dropped unrun" in (e.details() or ""):
                        code = "504"  # the server's DEADLINE_EXCEEDED, before the client's own
            else:
                code = await rests[urgent].post(timeout_s)
            took = time.perf_counter() - t0
            if code == "200" and took <= timeout_s:
                tally.good.append(took)
                if urgent:
                    tally.urgent_good.append(took)
            else:  # an answer past the timeout came too late: as good as none
                tally.add("gave up" if code == "200" else code)

        rng = random.Random(seed)
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        due = start
        while due - start < seconds:
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            t = asyncio.create_task(one(rng.random() < urgent_share))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for rest in rests:
            for _, writer in rest.idle:
                writer.close()
    return tally


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-ms", type=float, default=20.0, help="the model's seconds per batch, in ms")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--client-timeout-ms", type=float, default=200.0)
    p.add_argument("--lifo-after-ms", type=float, default=50.0)
    p.add_argument("--loads", default="0.8,2", help="offered load, as multiples of the capacity")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--workers", default="0", help="the server's --workers (0: the model process's loop)")
    p.add_argument("--urgent-share", type=float, default=0.2, help="share of the requests that are urgent")
    a = p.parse_args()
    capacity = a.max_batch / (a.batch_ms / 1000)
    timeout_s = a.client_timeout_ms / 1000
    cases = _cases(a.client_timeout_ms, a.lifo_after_ms)
    if a.cases:
        wanted = set(a.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    loads = [float(x) for x in a.loads.split(",")]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="kf-overload-") as tmp:
        model = Path(tmp) / "sleepy"
        _save_model(model, a.batch_ms / 1000)
        for load in loads:
            base: float | None = None
            for case in cases:
                port, gport = free_port(), free_port()
                cmd = [
                    sys.executable, "-m", "runtime.serving.cli", "serve", "--model-uri", str(model),
                    "--model-name", "sleepy", "--mode", "eager", "--max-batch-size", str(a.max_batch),
                    "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(gport),
                    "--log-level", "warning", "--workers", a.workers, *case.flags,
                ]  # fmt: skip
                log = Path(tmp) / "server.log"
                with log.open("ab") as f:
                    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=f, env={**os.environ})
                url = f"http://127.0.0.1:{port}"
                try:
                    _wait_http(f"{url}/v2/health/ready", proc, 120)
                    ran0 = _server_rows(url)
                    cpu0 = time.process_time()
                    tally = asyncio.run(
                        _load(
                            case,
                            port,
                            f"127.0.0.1:{gport}",
                            load * capacity,
                            a.seconds,
                            timeout_s,
                            1,
                            a.urgent_share,
                        )
                    )
                    time.sleep(a.client_timeout_ms / 1000 + 0.5)  # what was launched finishes
                    ran = _server_rows(url) - ran0
                finally:
                    _stop(proc)
                good = len(tally.good)
                sent = good + sum(tally.codes.values())
                base = good if base is None else base
                wasted = max(0.0, ran - good) / ran if ran else 0.0
                rows.append(
                    [
                        f"{load:g}x",
                        case.name,
                        f"{sent / a.seconds:,.0f}",
                        f"{good / a.seconds:,.1f}",
                        f"{good / base:.2f}x" if base else "n/a",
                        f"{_pct(tally.good, 0.5) * 1000:.0f}",
                        f"{_pct(tally.good, 0.99) * 1000:.0f}",
                        f"{tally.codes.get('504', 0) / a.seconds:,.1f}",
                        f"{tally.codes.get('gave up', 0) / a.seconds:,.1f}",
                        f"{tally.codes.get('429', 0) / a.seconds:,.1f}",
                        f"{100 * wasted:.0f} %",
                        f"{len(tally.urgent_good) / a.seconds:,.1f} of {tally.urgent_sent / a.seconds:,.0f}",
                        f"{_pct(tally.urgent_good, 0.99) * 1000:.0f}",
                    ]
                )
                others = {k: v for k, v in tally.codes.items() if k not in ("504", "gave up", "429")}
                if others:
                    print(f"# {load:g}x {case.name}: other outcomes {others}", file=sys.stderr)
                client_cpu = (time.process_time() - cpu0) / a.seconds
                print(" | ".join(rows[-1]) + f" (client CPU {100 * client_cpu:.0f} %)", file=sys.stderr)
    print(
        f"Model: {a.batch_ms:g} ms per batch of up to {a.max_batch} rows (capacity {capacity:,.0f} rows/s); "
        f"clients give up after {a.client_timeout_ms:g} ms; {a.seconds:g} s per row; "
        f"lifo after {a.lifo_after_ms:g} ms; --workers {a.workers}; {100 * a.urgent_share:g} % of the"
        " requests urgent.\n"
    )
    head = [
        "load", "server / client", "sent/s", "goodput/s", "vs fifo", "p50 ms", "p99 ms", "504/s",
        "gave up/s", "429/s", "rows run unread", "urgent goodput/s of sent/s", "urgent p99 ms",
    ]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
