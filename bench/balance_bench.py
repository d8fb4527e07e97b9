"""How client connections reach protocol workers: `--balance least-connections` (the model process accepts
each connection and deals it to the worker holding the fewest) against `kernel` (every worker listens with
SO_REUSEPORT; the kernel picks one by a hash of the client's address and port). The baseline is `kernel`.

    python bench/balance_bench.py                 # ~2 minutes on this machine

Per server start, in the same run, alternating the two modes `--rounds` times:

- spread: the connections each worker holds halfway through a keep-alive load (wrk, `--clients`
  connections, or the gRPC load generator's `--grpc-connections` for `--grpc`), busiest first;
- keep-alive load: rows/s and wrk's p50/p99 over those connections (`--model`, one row per request);
- a connection per request: `--connects` sequential `GET /v2/health/live` requests, each on a new
  connection (`Connection: close`): what dealing costs clients that do not keep connections (requests/s,
  p50/p99).

Read the keep-alive throughput with care on a machine of few cores: the workers, the model process and the
load generator share them, so an idle worker's core goes to the others and an even spread buys little there;
it matters where the workers are the limit (a GPU host, docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
import serve_bench as sb  # noqa: E402

_MODES = ("kernel", "least-connections")


def connections_per_worker(server_pid: int, ports: set[int]) -> list[int]:
    """Established connections to `ports` each protocol worker of `server_pid` holds, busiest first."""
    return sorted(sb.connections_held(sb.protocol_workers(server_pid), ports), reverse=True)


def _spread_later(delay: float, pid: int, ports: set[int]) -> tuple[threading.Timer, list[int]]:
    """A started timer that fills the list it returns with connections_per_worker after `delay` seconds."""
    spread: list[int] = []
    timer = threading.Timer(delay, lambda: spread.extend(connections_per_worker(pid, ports)))
    timer.start()
    return timer, spread


def connect_each_time(port: int, n: int) -> dict[str, float]:
    """`n` sequential requests, each on a connection of its own."""
    req = b"GET /v2/health/live HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(req)
            head = b""
            while chunk := s.recv(65536):
                head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"rps": n / sum(times), "p50": 1e3 * times[n // 2], "p99": 1e3 * times[int(n * 0.99)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a bench model (serve_bench.py)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--grpc", action="store_true", help="the keep-alive load over gRPC (bench/grpcload)")
    p.add_argument("--grpc-connections", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--connects", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--workdir", default="/tmp/kf-balance-bench")
    a = p.parse_args()
    tmp = Path(a.workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, float | str]]] = {m: [] for m in _MODES}
    for _ in range(a.rounds):
        for mode in _MODES:
            ns = argparse.Namespace(
                device=a.device,
                mode="aot",
                max_batch=a.max_batch,
                delay_ms=2.0,
                precision="bf16" if a.device == "cuda" else "fp32",
                start_timeout=600,
                warmup_batch_sizes="",
                copy_stream=False,
                grpc_server="native",
                balance=mode,
            )
            cache = str(tmp / f"cache-{a.model}")
            proc, port, gport, _ = sb._start("kubeforge", ns, a.model, cache, tmp / "log", a.workers)
            try:
                _, body, head_len, wire = sb.bodies(a.model)
                timer, spread = _spread_later(a.seconds / 2, proc.pid, {port, gport})
                if a.grpc:
                    tool = sb.grpc_load_tool("")
                    assert tool, "no gRPC load generator: install Go"
                    os.environ["BENCH_GRPC_CONNECTIONS"] = str(a.grpc_connections)
                    load = sb._grpc_load(tool, f"127.0.0.1:{gport}", wire, a.clients, a.seconds, tmp)
                else:
                    url = f"http://127.0.0.1:{port}/v2/models/{a.model}/infer"
                    headers = {"Inference-Header-Content-Length": str(head_len)}
                    load = sb._wrk(url, body, a.clients, a.seconds, headers, tmp)
                timer.join()
                each = connect_each_time(port, a.connects)
            finally:
                sb._stop(proc)
            rows[mode].append(
                {
                    "spread": "/".join(map(str, spread)),
                    "rps": load["rps"],
                    "p50": load["p50"],
                    "p99": load["p99"],
                    "c_rps": each["rps"],
                    "c_p50": each["p50"],
                    "c_p99": each["p99"],
                }
            )
    base = {k: statistics.median(float(r[k]) for r in rows["kernel"]) for k in ("rps", "c_rps")}
    print(
        f"\n{a.model}, {a.workers} workers, {a.clients} clients"
        + (f" over {a.grpc_connections} gRPC connections" if a.grpc else " (wrk)")
        + f", {a.seconds:g} s; {a.connects} requests on a new connection each; {a.rounds} rounds\n"
    )
    print(
        "| balance | connections per worker | keep-alive rows/s | x kernel | p50 ms | p99 ms "
        "| new connection each: requests/s | x kernel | p50 ms | p99 ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in _MODES:
        for r in rows[mode]:
            print(
                f"| {mode} | {r['spread']} | {r['rps']:,.0f} | {float(r['rps']) / base['rps']:.2f} "
                f"| {r['p50']:.2f} | {r['p99']:.2f} | {r['c_rps']:,.0f} "
                f"| {float(r['c_rps']) / base['c_rps']:.2f} | {r['c_p50']:.3f} | {r['c_p99']:.3f} |"
            )


if __name__ == "__main__":
    main()
