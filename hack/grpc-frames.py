"""How a gRPC client frames one large request: the DATA frames it sends (a diagnostic, not a test).

Listens on 127.0.0.1 and opens each connection as our server does (http2.SERVER_PREFACE: 16 MiB windows,
1 MiB frames; PINGs and SETTINGS answered), takes two unary calls of a `--bytes` message from each client
below on one connection, counts each call's DATA frames and their sizes, and answers nothing (each call then
times out; only the framing is measured; the first call may go before the client has read our SETTINGS):

    grpcio         grpcio's C core, what tritonclient.grpc and Triton's perf_analyzer use
    grpc-go        bench/grpcload (the tables' gRPC load), grpc-go's client
    xnet           bench/grpcload -h2 xnet, golang.org/x/net/http2's client

    python hack/grpc-frames.py [--bytes 602153] [--grpcload .cache/gobin/grpcload]

With `--concurrent N`, N calls at once on one connection from grpc-go and from x/net's client: at which of
the connection's DATA frames each call's message was complete. grpc-go sends a 16 KiB frame of each call in
turn (its writer's round robin), so every message completes near the end of all N.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.serving.protocol.http2 import _FRAME, ACK, DATA, PING, PREFACE, SERVER_PREFACE, SETTINGS, frame

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def data_frames(
    srv: socket.socket, want: int, calls: int = 2, order: list[int] | None = None
) -> list[list[int]]:
    """Accept one connection and return, for each of its first `calls` calls, the sizes of the DATA frames
    that carry its `want` bytes (the first call may go before the client has read our SETTINGS)."""
    conn, _ = srv.accept()
    conn.settimeout(5)
    conn.sendall(SERVER_PREFACE)
    buf, streams = b"", dict[int, list[int]]()  # stream id: its DATA frames' sizes

    def done() -> bool:
        return sum(sum(v) >= want for v in streams.values()) >= calls

    try:
        while len(buf) < len(PREFACE):
            buf += conn.recv(1 << 16)
        buf = buf[len(PREFACE) :]
        while not done():
            while len(buf) >= 9:
                hi, lo, kind, flags, sid = _FRAME.unpack_from(buf)
                n = hi << 8 | lo
                if len(buf) < 9 + n:
                    break
                if kind in (SETTINGS, PING) and not flags & ACK:
                    conn.sendall(frame(kind, ACK, 0, buf[9 : 9 + n] if kind == PING else b""))
                elif kind == DATA:
                    streams.setdefault(sid, []).append(n)
                    if order is not None:  # the connection's DATA frames in turn, by stream
                        order.append(sid)
                buf = buf[9 + n :]
            if done():
                break
            more = conn.recv(1 << 20)
            if not more:
                break
            buf += more
    except TimeoutError:
        pass
    conn.close()
    return [v for _, v in sorted(streams.items()) if sum(v) >= want]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=602_153, help="the message's size (a ResNet-50 request's)")
    ap.add_argument("--grpcload", default=".cache/gobin/grpcload", help="bench/grpcload's binary")
    ap.add_argument("--concurrent", type=int, default=1, help="calls at once on one connection (Go clients)")
    a = ap.parse_args()
    if a.concurrent > 1:
        return interleaving(a)
    message = bytes(a.bytes)
    want = a.bytes + 5  # gRPC's message prefix
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "req.bin"
        req.write_bytes(message)
        for client in ("grpcio", "grpc-go", "xnet"):
            srv = socket.create_server(("127.0.0.1", 0))
            port = srv.getsockname()[1]
            result: list[list[list[int]]] = []
            t = threading.Thread(target=lambda s=srv, r=result: r.append(data_frames(s, want)))
            t.start()
            if client == "grpcio":
                opts = [("grpc.max_send_message_length", 1 << 30)]
                with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                    call = ch.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)
                    for _ in range(2):
                        with contextlib.suppress(grpc.RpcError):  # no answer comes: only the framing counts
                            call(message, timeout=1)
            elif not Path(a.grpcload).is_file():
                print(f"{client}: no {a.grpcload} (python bench/serve_bench.py builds it)", file=sys.stderr)
                srv.close()
                continue
            else:
                cmd = [a.grpcload, "-addr", f"127.0.0.1:{port}", "-request", str(req), "-warmup", "0s"]
                cmd += ["-d", "2500ms", "-timeout", "1s", *(["-h2", "xnet"] if client == "xnet" else [])]
                subprocess.run(cmd, capture_output=True, timeout=60)
            t.join(timeout=10)
            srv.close()
            for i, sizes in enumerate(result[0] if result else []):
                span = f"{min(sizes):,} to {max(sizes):,} bytes each"
                print(f"{client}, call {i + 1}: {len(sizes)} DATA frames for {want:,} bytes, {span}")
    return 0


def interleaving(a: argparse.Namespace) -> int:
    """--concurrent: the frame at which each of N concurrent calls' messages was whole, per Go client."""
    want = a.bytes + 5
    if not Path(a.grpcload).is_file():
        print(f"no {a.grpcload} (python bench/serve_bench.py builds it)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "req.bin"
        req.write_bytes(bytes(a.bytes))
        for client in ("grpc-go", "xnet"):
            srv = socket.create_server(("127.0.0.1", 0))
            order: list[int] = []
            t = threading.Thread(target=data_frames, args=(srv, want, a.concurrent, order))
            t.start()
            cmd = [a.grpcload, "-addr", f"127.0.0.1:{srv.getsockname()[1]}", "-request", str(req)]
            cmd += ["-warmup", "0s", "-d", "2500ms", "-timeout", "1s", "-c", str(a.concurrent)]
            cmd += ["-connections", "1", *(["-h2", "xnet"] if client == "xnet" else [])]
            subprocess.run(cmd, capture_output=True, timeout=60)
            t.join(timeout=10)
            srv.close()
            last = {sid: i + 1 for i, sid in enumerate(order)}  # each stream's last frame, 1-based
            done = sorted(last.values())[: a.concurrent]
            print(
                f"{client}: {a.concurrent} calls on one connection, {len(order)} DATA frames; "
                f"the messages were whole at frames {', '.join(map(str, done))}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
