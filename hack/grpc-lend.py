"""Where our gRPC server's reads of large requests land (a diagnostic, not a test): how many of the bytes go
straight into the call's message (`_Connection.get_buffer` lends it for the rest of a DATA frame under way)
rather than through the connection's read buffer, and the server's CPU per call, with that lending and with
it turned off, interleaved, for bench/grpcload's two HTTP/2 clients:

    grpc-go        the tables' gRPC load: 16 KiB DATA frames
    xnet           bench/grpcload -h2 xnet: frames as large as we allow, as grpcio's C core sends them

An echo handler that answers 2 bytes, no model, no protocol worker; the server runs in this process, the load
in its own.

    python hack/grpc-lend.py [--bytes 602153] [--callers 16] [--connections 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_bench import grpc_load_tool
from runtime.serving.frontend import listen_socket
from runtime.serving.protocol import http2

METHOD = "/inference.GRPCInferenceService/ModelInfer"
CLIENTS = {"grpc-go": [], "xnet": ["-h2", "xnet"]}


def _count_lent(seen: dict[str, int]) -> None:
    """Count each read's bytes, and those that landed in a call's message."""
    updated = http2._Connection.buffer_updated

    def counting(self: http2._Connection, nbytes: int) -> None:
        seen["all"] += nbytes
        seen["lent"] += nbytes if self.lent is not None else 0
        updated(self, nbytes)

    http2._Connection.buffer_updated = counting  # type: ignore[method-assign]


async def _run(tool: str, request: str, flags: list[str], a: argparse.Namespace) -> dict[str, float]:
    async def echo(message: memoryview) -> bytes:
        return b"ok"

    server = http2.GrpcServer({METHOD: echo}, max_message=a.bytes + 1024)
    port = await server.start(listen_socket("127.0.0.1", 0, listen=True))
    load = await asyncio.create_subprocess_exec(
        *[tool, "-addr", f"127.0.0.1:{port}", "-method", METHOD, "-request", request, "-c", str(a.callers)],
        *["-connections", str(a.connections), "-d", f"{a.seconds}s", "-warmup", "0s", *flags],
        stdout=asyncio.subprocess.PIPE,
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    out, _ = await load.communicate()
    after = resource.getrusage(resource.RUSAGE_SELF)
    await server.stop(1.0)
    result = json.loads(out.decode().strip().splitlines()[-1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"rps": result["rps"], "p50": result["p50_ms"], "cpu_us": cpu / max(1, result["calls"]) * 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes", type=int, default=602153, help="request message size (ResNet-50's image)")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--seconds", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--grpcload", default="", help="bench/grpcload's binary (default: built with Go)")
    a = p.parse_args()
    tool = grpc_load_tool(a.grpcload)
    if tool is None:
        print("no bench/grpcload (needs Go, or --grpcload PATH)", file=sys.stderr)
        return 2
    seen = {"all": 0, "lent": 0}
    _count_lent(seen)
    lend_min = http2.LEND_MIN
    rows = []
    with tempfile.NamedTemporaryFile(prefix="kf-grpc-lend-") as f:
        f.write(os.urandom(a.bytes))
        f.flush()
        for client, flags in CLIENTS.items():
            for r in range(a.rounds):
                for lending in (True, False):
                    http2.LEND_MIN = lend_min if lending else 1 << 62
                    seen.update(all=0, lent=0)
                    got = asyncio.run(_run(tool, f.name, flags, a))
                    share = 100 * seen["lent"] / max(1, seen["all"])
                    rows.append((client, r + 1, lending, got, share))
                    print(f"{client} {r + 1} lending={lending}: {got}, {share:.1f} %", file=sys.stderr)
    print(f"{a.bytes}-byte requests, {a.callers} callers, {a.connections} connections, {a.seconds} s a run\n")
    print("| client | round | lending | calls/s | p50 ms | server CPU µs/call | bytes read into messages |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for client, r, lending, got, share in rows:
        on = "on" if lending else "off"
        cells = f"{got['rps']:,.0f} | {got['p50']:.2f} | {got['cpu_us']:.0f} | {share:.0f} %"
        print(f"| {client} | {r} | {on} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
