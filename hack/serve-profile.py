"""Where a serving request's time goes under load: a diagnostic, not a benchmark (bench/serve_bench.py is).

Starts the bench's Kubeforge server, loads it with wrk, and prints one SUMMARY line: throughput, wrk's
p50/p99, CPU per request (model process, workers; /proc), and from /metrics sums over the run: mean
batch, the share of the run the device was busy (kubeforge_device_busy_seconds) and idle, with a request
waiting or for one (kubeforge_device_idle_seconds, pipelined: GPUs), launch to answer per
batch, the oldest request's queue time per batch, the time a request spends inside the server's REST
handler, and the mean hop of a request to the model process and of a batch's answers back to a worker.
With GIL=1 it also records a py-spy `--gil` profile of the model process (needs py-spy).

    MODEL=bert W=8 C=64 D=5 DEV=cuda python hack/serve-profile.py     # on the lent GPU (see device-kit.sh)
    MODEL=tiny W=1 C=16 D=5 DEV=cpu  python hack/serve-profile.py     # here

Environment: MODEL (bench model), W (protocol workers), C (wrk connections), D (seconds), DEV (cpu|cuda),
DELAY (max delay ms, default 2), MAXB (max batch, 64),
BUCKETS (warm-up sizes, each a CUDA bucket: 1,16,24,32,48,64),
COPY_STREAM (0: --no-copy-stream; default 1), LAUNCH_DEVIATIONS (the server's --launch-deviations, its
default), BALANCE (the server's --balance), EVENT_LOOP (its --event-loop), BUSY_POLL (its --busy-poll-us),
GIL (1: py-spy profile to $OUT/gil.raw), SPY (py-spy path), TAG (label),
GRPC (1: load ModelInfer over gRPC, not REST with wrk; GRPC_LOAD: bench/grpcload's binary (the default,
built with Go when missing) or a ghz; GRPC_SERVER: native|grpcio),
SPYW (1: py-spy profile of the protocol worker holding the most client connections 0.5 s into the load, to
$OUT/worker.raw; NATIVE=1: with C frames),
WALL (1: py-spy profile of the model process's threads, waiting included, to $OUT/wall.raw).

A second line, THREADS, gives each model-process thread's CPU over the run (percent of one core, by the
names the server gives its OS threads), the load generator's CPU per request (wrk, grpcload or ghz), and
where the workers put the inputs (kubeforge_worker_inputs_total: in place in shared memory, copied there,
inline). A third, WORKERS, gives each protocol worker's CPU over the run (percent of one core) and the client
connections it holds halfway through, busiest first: how evenly the load spread. A fourth, HOST, says how fast
the host was before the server started and after it stopped (bench/hostspeed.py): lent machines differ, and
change while they are held.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
import hostspeed  # noqa: E402
import serve_bench as sb  # noqa: E402

_INPUTS = "kubeforge_worker_inputs_total"


def _sums(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name == _INPUTS:  # where inputs went: in_place, copied, inline
            name += ":" + line.split('placement="')[1].split('"')[0]
        elif not (name.startswith("kubeforge_") and name.endswith(("_sum", "_count", "_total"))):
            continue
        elif 'direction="' in line:  # the worker hops: one entry per direction
            name += ":" + line.split('direction="')[1].split('"')[0]
        elif 'reason="' in line:  # the device's idle time, by why
            name += ":" + line.split('reason="')[1].split('"')[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of `pid`, summed by thread name."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        out[name] = out.get(name, 0.0) + sb.cpu_seconds_of(task / "stat")
    return out


def _worker_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each protocol worker process of the server `pid`, by pid."""
    return {k: sb.cpu_seconds_of(Path(f"/proc/{k}/stat")) for k in sb.protocol_workers(pid)}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    env = os.environ.get
    model, workers, conns, secs = (
        env("MODEL", "tiny"),
        int(env("W", "1")),
        int(env("C", "16")),
        float(env("D", "5")),
    )
    dev = env("DEV", "cpu")
    a = argparse.Namespace(
        device=dev,
        mode="aot",
        max_batch=int(env("MAXB", "64")),
        delay_ms=float(env("DELAY", "2.0")),
        precision="bf16" if dev == "cuda" else "fp32",
        start_timeout=600,
        warmup_batch_sizes=env("BUCKETS", ""),
        copy_stream=env("COPY_STREAM", "1") == "1",
        launch_deviations=float(env("LAUNCH_DEVIATIONS", str(sb.ServeConfig.launch_deviations))),
        grpc_server=env("GRPC_SERVER", sb.ServeConfig.grpc_server),
        balance=env("BALANCE", sb.ServeConfig.balance),
        event_loop=env("EVENT_LOOP", sb.ServeConfig.event_loop),
        busy_poll_us=env("BUSY_POLL", "auto"),
    )
    tmp = Path(env("WORK", "/tmp/kf-serve-profile"))
    tmp.mkdir(exist_ok=True)
    before = hostspeed.measure()
    proc, port, gport, _ = sb._start("kubeforge", a, model, str(tmp / f"cache-{model}"), tmp / "log", workers)
    try:
        _, body, head_len, wire = sb.bodies(model)
        url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
        headers = {"Inference-Header-Content-Length": str(head_len)}
        if env("GRPC") == "1":
            tool = sb.grpc_load_tool(env("GRPC_LOAD", ""))
            assert tool, "no gRPC load generator: install Go, or GRPC_LOAD=PATH"
            target = f"127.0.0.1:{gport}"
            load = lambda s: sb._grpc_load(tool, target, wire, conns, s, tmp)  # noqa: E731
        else:
            load = lambda s: sb._wrk(url, body, conns, s, headers, tmp)  # noqa: E731
        load(2)  # warm
        m0, c0, t0 = _sums(port), sb._cpu_seconds(proc.pid), _thread_cpu(proc.pid)
        w0 = _worker_cpu(proc.pid)
        spies = []
        for flag, file in (("GIL", "gil.raw"), ("WALL", "wall.raw")):
            if env(flag) == "1":
                out = Path(env("OUT", str(tmp))) / file
                cmd = [env("SPY", "py-spy"), "record", "-p", str(proc.pid), "-d", str(max(1, int(secs) - 2))]
                cmd += ["-r", "400", "-f", "raw", "-o", str(out), "--nonblocking"]
                spies.append(subprocess.Popen([*cmd, "--gil" if flag == "GIL" else "--idle"]))
        spyw: list[subprocess.Popen[bytes]] = []
        pids = list(w0)

        def spy_worker() -> None:
            """py-spy on the worker holding the most client connections once the load is on (with few
            clients most workers hold none: the first one's profile came back empty at one client)."""
            held_now = sb.connections_held(pids, {port, gport}) if pids else []
            busiest = pids[held_now.index(max(held_now))] if pids else str(proc.pid)
            out = Path(env("OUT", str(tmp))) / "worker.raw"
            cmd = [env("SPY", "py-spy"), "record", "-p", busiest, "-d", str(max(1, int(secs) - 2))]
            # NATIVE=1: C frames too (py-spy then stops the worker for each sample)
            how = ["--native"] if env("NATIVE") == "1" else ["--nonblocking"]
            spyw.append(subprocess.Popen([*cmd, "-r", "400", "-f", "raw", "-o", str(out), *how]))

        if env("SPYW") == "1":
            threading.Timer(0.5, spy_worker).start()
        client0 = _children_cpu()
        held: dict[str, int] = {}  # connections per worker, halfway through the run
        w = threading.Timer(
            secs / 2, lambda: held.update(zip(pids, sb.connections_held(pids, {port, gport}), strict=True))
        )
        w.start()
        r = load(secs)
        w.join()
        client = _children_cpu() - client0  # py-spy is not waited for yet: the load generator's alone
        m1, c1, t1 = _sums(port), sb._cpu_seconds(proc.pid), _thread_cpu(proc.pid)
        w1 = _worker_cpu(proc.pid)
        for p in [*spies, *spyw]:
            p.wait()
        d = {k: v - m0.get(k, 0.0) for k, v in m1.items()}
        # requests served and the seconds they took, warm-ups included (see serve_bench.load_span)
        n, span = sb.load_span(d.get("kubeforge_batch_size_sum", 0.0), r["rps"], secs)
        nb = max(1.0, d.get("kubeforge_batch_size_count", 1.0))
        handled = max(1.0, d.get("kubeforge_request_latency_seconds_count", 1.0))

        def idle(why: str) -> float:
            return d.get(f"kubeforge_device_idle_seconds_total:{why}", 0.0)

        print(
            f"SUMMARY {env('TAG', '')}: {r['rps']:.0f} rows/s p50 {r['p50']:.2f} p99 {r['p99']:.2f} ms | "
            f"CPU us/request model {1e6 * (c1[0] - c0[0]) / n:.0f} "
            f"workers {1e6 * (c1[1] - c0[1]) / n:.0f} | mean batch "
            f"{d.get('kubeforge_batch_size_sum', 0) / nb:.1f}, device busy "
            f"{100 * d.get('kubeforge_device_busy_seconds_total', 0) / span:.0f}% (idle with a request "
            f"waiting {100 * (idle('queued') + idle('launching')) / span:.0f}%: queued "
            f"{100 * idle('queued') / span:.0f}%, launching {100 * idle('launching') / span:.0f}%; "
            f"for one {100 * idle('no_requests') / span:.0f}%), "
            f"launch to answer "
            f"{1e3 * d.get('kubeforge_batch_run_seconds_sum', 0) / nb:.2f} ms, oldest queued "
            f"{1e3 * d.get('kubeforge_queue_time_seconds_sum', 0) / nb:.2f} ms, in the REST handler "
            f"{1e3 * d.get('kubeforge_request_latency_seconds_sum', 0) / handled:.2f} ms | worker hops: "
            + ", ".join(
                f"{way} {1e3 * d.get(f'kubeforge_worker_hop_seconds_sum:{way}', 0) / n_hop:.2f} ms"
                for way in ("to_model", "to_worker")
                if (n_hop := d.get(f"kubeforge_worker_hop_seconds_count:{way}", 0))
            )
        )
        busy = sorted(((t1[k] - t0.get(k, 0.0)) / span, k) for k in t1)
        print(
            f"THREADS {env('TAG', '')}: "
            + ", ".join(f"{k} {100 * v:.0f}%" for v, k in reversed(busy) if v >= 0.01)
            + f" | client CPU {1e6 * client / n:.0f} us/request | inputs "
            + ", ".join(f"{k.split(':')[1]} {v:.0f}" for k, v in d.items() if k.startswith(_INPUTS))
        )
        shares = sorted(((100 * (v - w0.get(k, 0.0)) / span, held.get(k, -1)) for k, v in w1.items()))[::-1]
        print(
            f"WORKERS {env('TAG', '')}: each one's CPU (% of a core) / connections, busiest first: "
            + " ".join(f"{x:.0f}/{n}" for x, n in shares)
        )
    finally:
        sb._stop(proc)
    print(f"HOST {env('TAG', '')}: before {before.short()} | after {hostspeed.measure().short()}")


if __name__ == "__main__":
    main()
