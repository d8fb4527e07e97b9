"""Polling before sleeping (`kubeforge-serve --busy-poll-us`) against none, in one run: for each budget, a
server of the bench's (bench/serve_bench.py: an in-memory model, its protocol workers), loaded over REST
(wrk) and gRPC (bench/grpcload) at each concurrency, the budgets interleaved over `--rounds` so that the
machine's drift shows. Prints one markdown table: rows/s, p50 and p99, the server's CPU per request (model
process, workers: /proc), and the p50 against the same point without polling (the first budget).

    python bench/busypoll_bench.py                          # here: tiny, 1 worker, 1 and 16 clients
    python bench/busypoll_bench.py --device cuda --model resnet50 --workers 8 --precision bf16 \\
        --budgets 0,2000 --concurrency 1,128                # on the lent GPU (hack/device-kit.sh)

On a CPU-only machine `auto` polls not at all, so the budgets are given as numbers (µs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostspeed
import serve_bench as sb


def _point(
    pid: int,
    port: int,
    path: str,
    c: int,
    seconds: float,
    url: str,
    target: str,
    tool: str | None,
    tmp: Path,
    requests: tuple[bytes, dict[str, str], bytes],
) -> dict[str, float]:
    """One measured point: the load's rows/s, p50, p99, and the server's CPU µs per request answered."""
    body, headers, wire = requests

    def load(s: float) -> dict[str, float]:
        if path == "grpc":
            assert tool is not None
            return sb._grpc_load(tool, target, wire, c, s, tmp)
        return sb._wrk(url, body, c, s, headers, tmp)

    load(1)  # warm
    rows0, (m0, w0) = sb.server_counters(port)["kubeforge_batch_size_sum"], sb._cpu_seconds(pid)
    r = load(seconds)
    rows1, (m1, w1) = sb.server_counters(port)["kubeforge_batch_size_sum"], sb._cpu_seconds(pid)
    n, _ = sb.load_span(rows1 - rows0, r["rps"], seconds)  # one row a request; grpcload's warm-up counted
    r["model_us"], r["workers_us"] = 1e6 * (m1 - m0) / n, 1e6 * (w1 - w0) / n
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--budgets", default="0,1000", help="--busy-poll-us values, µs; the first is the baseline")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--paths", default="rest,grpc")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    budgets = a.budgets.split(",")
    concs = [int(c) for c in a.concurrency.split(",")]
    paths = a.paths.split(",")
    tool = sb.grpc_load_tool("") if "grpc" in paths else None
    if "grpc" in paths and not tool:
        p.error("--paths grpc: no gRPC load generator (bench/grpcload is built with Go; install Go)")
    server = argparse.Namespace(
        device=a.device,
        mode="aot",
        max_batch=a.max_batch,
        delay_ms=2.0,
        precision=a.precision,
        start_timeout=900,
    )
    _, body, head_len, wire = sb.bodies(a.model)
    headers = {"Inference-Header-Content-Length": str(head_len)}
    tmp = Path(tempfile.mkdtemp(prefix="busypoll-bench-"))
    cache = str(tmp / "cache")
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    before = hostspeed.measure()
    for _ in range(a.rounds):
        for budget in budgets:
            server.busy_poll_us = budget
            proc, port, gport, _ = sb._start("kubeforge", server, a.model, cache, tmp / "log", a.workers)
            try:
                url = f"http://127.0.0.1:{port}/v2/models/{a.model}/infer"
                for path in paths:
                    for c in concs:
                        r = _point(
                            proc.pid,
                            port,
                            path,
                            c,
                            a.seconds,
                            url,
                            f"127.0.0.1:{gport}",
                            tool,
                            tmp,
                            (body, headers, wire),
                        )
                        runs.setdefault((path, c, budget), []).append(r)
                        print(
                            f"{path} c={c} budget={budget}: {r['rps']:,.0f} rows/s p50 {r['p50']:.2f} ms",
                            file=sys.stderr,
                        )
            finally:
                sb._stop(proc)
    after = hostspeed.measure()
    print(f"`python bench/busypoll_bench.py {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    print(before.line("before the runs"))
    print(after.line("after them") + "\n")
    print(
        f"{a.model} on {a.device}, {a.workers} protocol worker(s), {a.seconds:g} s a point, {a.rounds} rounds"
    )
    print()
    print(
        "| path | clients | --busy-poll-us | rows/s | p50 ms | p99 ms | CPU µs/request: model, workers "
        "| p50 x no polling |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        for c in concs:
            base = statistics.mean(r["p50"] for r in runs[path, c, budgets[0]])
            for budget in budgets:
                rs = runs[path, c, budget]

                def each(key: str, fmt: str, rs: list[dict[str, float]] = rs) -> str:
                    return " / ".join(format(r[key], fmt) for r in rs)

                cpu = " / ".join(f"{r['model_us']:.0f}, {r['workers_us']:.0f}" for r in rs)
                ratio = statistics.mean(r["p50"] for r in rs) / base
                print(
                    f"| {path} | {c} | {budget} | {each('rps', ',.0f')} | {each('p50', '.2f')} | "
                    f"{each('p99', '.2f')} | {cpu} | {ratio:.2f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
