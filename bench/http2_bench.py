"""CPU per unary call of our HTTP/2 server's own code (runtime/serving/protocol/http2.py), in-process: the
frames of N calls (HEADERS, then the request message in DATA frames of a given size) are fed to one
connection as a socket would hand them over (256 KiB reads), its calls answered by a handler that returns at
once; no socket, no protobuf, no model. Messages of 64 KiB or more land in one buffer reused call after call,
as ModelInfer's land in a protocol worker's shared-memory slot (until 2026-12-05 they got a fresh bytearray
each, whose zero-filling and page faults were most of what the 602 KB cases measured: 283-385 µs against
75-110). A diagnostic that a loaded machine's noise does not swamp (best of five rounds of process time),
for A/B runs of a change to the frame handling. Then, in this process, a header block with a deadline decoded
by the `hpack` package's Decoder and by ours (protocol/hpackdec.py):

    python bench/http2_bench.py                  # this tree
    python bench/http2_bench.py --base HEAD~1    # and a git revision, in the same run (baseline)

The `--base` revision is checked out into a temporary worktree and measured in a subprocess of its own, the
rounds of both interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (label, message bytes, DATA frame size: grpc-go sends 16 KiB frames, a deadline per call)
    ("1 KB message", 1024, 16384, False),
    ("1 KB message, a deadline (a new grpc-timeout literal each call, as grpc-go sends)", 1024, 16384, True),
    ("602 KB message, 16 KiB frames", 602112, 16384, False),
    ("602 KB message, 1 MiB frames", 602112, 1 << 20, False),
]


def _measure(size: int, frame_size: int, deadline: bool, calls: int) -> float:
    """µs of process time per call, for one round."""
    from hpack import Encoder

    from runtime.serving.protocol import http2
    from runtime.serving.protocol.http1 import PlainBody

    answered = [0]

    async def handler(message: memoryview) -> bytes:
        answered[0] += 1
        return b"ok"

    class Sink(asyncio.Transport):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            pass

        def get_write_buffer_size(self) -> int:
            return 0

        def close(self) -> None:
            pass

    def call(enc: Encoder, sid: int) -> bytes:
        fields = [(":method", "POST"), (":scheme", "http"), (":path", "/b.B/Call"), (":authority", "x")]
        fields += [("content-type", "application/grpc"), ("te", "trailers")]
        if deadline:  # hpack's Encoder indexes each new value, as grpc-go's does
            fields.append(("grpc-timeout", f"{19_999_000 - 7 * sid}u"))
        out = [http2.frame(http2.HEADERS, http2.END_HEADERS, sid, enc.encode(fields))]
        body = b"\x00" + size.to_bytes(4, "big") + bytes(size)
        for i in range(0, len(body), frame_size):
            flags = http2.END_STREAM if i + frame_size >= len(body) else 0
            out.append(http2.frame(http2.DATA, flags, sid, body[i : i + frame_size]))
        return b"".join(out)

    slot = memoryview(bytearray(size + 5))  # as the server's slots: one buffer, reused, pages resident
    slot[:] = b"\1" * len(slot)

    def place(length: int, seen: memoryview) -> PlainBody | None:
        return PlainBody(slot[:length]) if length <= len(slot) and length >= 65536 else None

    async def run() -> float:
        server = http2.GrpcServer({"/b.B/Call": handler}, max_message=1 << 21, buffers={"/b.B/Call": place})
        conn = http2._Connection(server)
        conn.connection_made(Sink())

        def feed(data: bytes) -> None:
            """As asyncio's reads: each into the buffer the connection gives (its read buffer, or the rest
            of a DATA frame's message), at most that buffer's size."""
            view = memoryview(data)
            while len(view):
                buf = conn.get_buffer(-1)
                n = min(len(view), len(buf))
                buf[:n] = view[:n]
                conn.buffer_updated(n)
                view = view[n:]

        enc = Encoder()
        window = http2.frame(http2.WINDOW_UPDATE, 0, 0, (1 << 30).to_bytes(4, "big"))
        feed(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0) + window)
        wire = [call(enc, 1 + 2 * i) for i in range(calls)]
        t0 = time.process_time()
        for i, data in enumerate(wire):
            feed(data)
            if i % 8 == 7:  # the calls' tasks run between reads, as on a busy connection
                for _ in range(3):
                    await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        spent = time.process_time() - t0
        assert answered[0] == calls and conn.transport is not None, (answered[0], calls)
        return spent / calls * 1e6

    return asyncio.run(run())


def _child(rounds: int) -> None:
    """One round of every case, printed as µs per call (run with the measured tree first on sys.path)."""
    for _, size, frame_size, deadline in CASES:
        calls = 2000 if size < 65536 else 300
        print(min(_measure(size, frame_size, deadline, calls) for _ in range(rounds)))


def _round(tree: Path) -> list[float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--tree", str(tree)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return [float(x) for x in out.split()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a git revision to measure in the same run (the baseline)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, a.tree)
        _child(1)
        return 0
    with tempfile.TemporaryDirectory(prefix="kf-http2-bench-") as d:
        base = Path(d) / "base"
        if a.base:
            subprocess.run(
                ["git", "worktree", "add", "-q", "--detach", str(base), a.base], cwd=ROOT, check=True
            )
        try:
            here: list[list[float]] = []
            there: list[list[float]] = []
            for _ in range(a.rounds):  # interleaved: a machine's slow spell hits both
                here.append(_round(ROOT))
                if a.base:
                    there.append(_round(base))
        finally:
            if a.base:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    print(f"HTTP/2 layer, µs of CPU per unary call (best of {a.rounds} rounds)\n")
    print("| case | this tree |" + (f" {a.base} (baseline) | ratio |" if a.base else ""))
    print("|---|---:|" + ("---:|---:|" if a.base else ""))
    for i, (label, *_) in enumerate(CASES):
        mine = min(r[i] for r in here)
        row = f"| {label} | {mine:.1f} |"
        if a.base:
            ref = min(r[i] for r in there)
            row += f" {ref:.1f} | {mine / ref:.2f} |"
        print(row)
    print(_decoders(a.rounds))
    return 0


def _decoders(rounds: int, blocks: int = 3000) -> str:
    """µs per header block of a client with a deadline (grpc-go's fields, a new grpc-timeout literal each
    call, each indexed), decoded by the `hpack` package's Decoder and by ours (best of `rounds`)."""
    from hpack import Decoder as Reference
    from hpack import Encoder

    sys.path.insert(0, str(ROOT))
    from runtime.serving.protocol.hpackdec import Decoder

    enc = Encoder()
    fields = [(":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1:8001")]
    fields += [(":path", "/inference.GRPCInferenceService/ModelInfer"), ("content-type", "application/grpc")]
    fields += [("user-agent", "grpc-go/1.70.0"), ("te", "trailers")]
    wire = [enc.encode([*fields, ("grpc-timeout", f"{19_999_000 - 7 * i}u")]) for i in range(blocks)]
    out = ["", "HPACK, µs per header block with a deadline (grpc-go's 8 fields)", "", "| decoder | µs |"]
    out.append("|---|---:|")
    for name, make in (("hpack.Decoder", Reference), ("protocol/hpackdec.py", Decoder)):
        best = float("inf")
        for _ in range(rounds):
            dec = make()
            t0 = time.process_time()
            for block in wire:
                dec.decode(block)
            best = min(best, (time.process_time() - t0) / blocks * 1e6)
        out.append(f"| {name} | {best:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
