"""Whether a batch's inputs crossing the host link slow the model when they overlap its compute (CUDA only).

The server copies a ResNet-50 batch's 19.3 MB of FP32 images on the compute stream, before its compute. With
those copies left out it served 24 % more rows/s; with them started early, on a stream of their own, the
launch-to-answer time fell close to that with no copies, yet the rows/s did not follow (docs/benchmarks.md,
eighth session). This takes the server out: ResNet-50 in bf16 at batch 32, its forward pass captured in a
CUDA graph (no launch cost), replayed back to back, with each batch's inputs brought in one of these ways:

    none          no copies: the raw model (the ceiling)
    d2d           a device-to-device copy of the batch into the graph's input, no host link
    in-stream     the batch copied from page-locked memory on the compute stream, before it (the server)
    side-stream   the same copies on a second stream, a batch ahead, overlapping the compute; the compute
                  stream waits for its own batch's, then copies it into the graph's input on the device
    in-half       as in-stream with bf16 images: half the bytes (protocol workers narrowing the inputs)
    side-half     as side-stream with bf16 images

each from two kinds of host memory (Source): torch's pinned memory, one copy a batch, and the server's kind,
rows scattered over a protocol worker's arena registered with CUDA, a copy a row. The modes run interleaved,
`--rounds` times, `--batches` batches each; the table gives the median ms per batch, rows/s, and the ratio
against none. The inputs are checked: each way's logits for a batch equal those of the same images copied
in synchronously.

    python bench/h2d_overlap_bench.py [--batch 32] [--batches 100] [--rounds 3] [--host pinned,registered]
                                      [--compile]   # the forward pass as the server compiles it
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.serving import ipc, pagelock
from runtime.serving.examples import ResNet50

MODES = ("none", "d2d", "in-stream", "side-stream", "in-half", "side-half")


def captured(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`model(x)` captured in a CUDA graph after a warm-up on a side stream (as torch's docs do it)."""
    s = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()  # type: ignore[no-untyped-call]
    with torch.cuda.graph(g), torch.inference_mode():
        out = model(x)
    return g, out


class Source:
    """Four batches of host inputs, and how a batch reaches a device tensor (queued on the current stream):
    pinned, one copy of the whole batch from torch's page-locked memory (cudaHostAlloc); registered, a copy
    per row from the 1 MiB slots of a protocol worker's arena (ipc.Arena) registered with CUDA
    (cudaHostRegister), as the server's rows come (the server issues them in one driver call; here a torch
    call each: the CPU still stays ahead of the device)."""

    def __init__(self, kind: str, batches: list[torch.Tensor]) -> None:
        self.kind = kind
        self.nbytes = batches[0].nbytes
        if kind == "pinned":
            self.rows = [[b.pin_memory()] for b in batches]
            return
        row = batches[0][0].nbytes
        n = sum(len(b) for b in batches)
        # the server's own kind: a protocol worker's arena, registered as the hub registers it
        self._arena = ipc.Arena.anonymous(f"kubeforge-overlap-{os.getpid()}", n, -(-row // (1 << 20)) << 20)
        if not pagelock.register(self._arena.address, self._arena.size):
            raise SystemExit("h2d_overlap_bench: cudaHostRegister refused the arena")
        base = torch.frombuffer(self._arena.buf, dtype=torch.uint8)
        order = list(range(n))
        random.Random(0).shuffle(order)  # scattered, as slots are
        self.rows, i = [], 0
        for b in batches:
            rows = []
            for r in b:
                at = ipc.HEADER_BYTES + order[i] * self._arena.slot_bytes
                view = base[at : at + row].view(b.dtype).view(r.shape)
                view.copy_(r)
                rows.append(view.unsqueeze(0))
                i += 1
            self.rows.append(rows)

    def bring(self, dst: torch.Tensor, k: int) -> None:
        rows = self.rows[k % len(self.rows)]
        if len(rows) == 1:
            dst.copy_(rows[0], non_blocking=True)
            return
        for i, r in enumerate(rows):
            dst[i : i + 1].copy_(r, non_blocking=True)

    def batch(self, k: int) -> torch.Tensor:
        return torch.cat(self.rows[k % len(self.rows)])


def width(mode: str) -> str:
    """Which inputs a mode brings: "16" (bf16 images, the half modes) or "32" (FP32)."""
    return "16" if mode.endswith("half") else "32"


def run_mode(
    mode: str,
    batches: int,
    graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]],
    src: dict[str, Source],
    side: torch.cuda.Stream,
) -> float:
    """Seconds per batch of `batches` batches in `mode`, device-bound (the CPU only queues work)."""
    g, static = graphs[width(mode)]
    source = src[width(mode)]
    compute = torch.cuda.current_stream()
    bufs = [torch.empty_like(static) for _ in range(2)]
    events = [torch.cuda.Event() for _ in bufs]  # type: ignore[no-untyped-call]

    def prefetch(k: int) -> None:
        with torch.cuda.stream(side):
            source.bring(bufs[k % 2], k)
            events[k % 2].record(side)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if mode.startswith("side"):
        prefetch(0)
    for k in range(batches):
        if mode.startswith("side"):
            if k + 1 < batches:
                # the next batch's copy may start only once its buffer is free: of two buffers, it writes
                # the one batch k-1 read, in a copy into the graph's input queued on the compute stream
                side.wait_stream(compute)
                prefetch(k + 1)
            compute.wait_event(events[k % 2])
            static.copy_(bufs[k % 2])
        elif mode == "d2d":
            static.copy_(bufs[k % 2])
        elif mode != "none":  # in-stream, in-half
            source.bring(static, k)
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--host", default="pinned,registered", help="host memory kinds (see Source)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="the forward pass compiled by torch.compile (inductor), as served",
    )
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("h2d_overlap_bench: needs a CUDA device", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    dev = "cuda"
    net = ResNet50().to(dev).eval().to(torch.bfloat16)
    if a.compile:  # the server's kernels (its own CUDA graphs around them, as here)
        net = torch.compile(net)  # type: ignore[assignment]

    def fwd32(x: torch.Tensor) -> torch.Tensor:  # the served model's first step: its inputs cast to bf16
        out: torch.Tensor = net(x.to(torch.bfloat16))
        return out

    shape = (a.batch, 3, 224, 224)
    images = [torch.randn(shape) for _ in range(4)]
    in32 = torch.empty(shape, device=dev)
    in16 = torch.empty(shape, device=dev, dtype=torch.bfloat16)
    (g32, out32), (g16, out16) = captured(fwd32, in32), captured(net, in16)
    graphs = {"32": (g32, in32), "16": (g16, in16)}
    outs = {"32": out32, "16": out16}
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    name = torch.cuda.get_device_name()
    how = "torch.compile (inductor)" if a.compile else "eager"
    print(
        f"ResNet-50, bf16, {how}, batch {a.batch}, CUDA graph, {name}; {a.rounds} rounds x {a.batches} each"
    )
    print("| host memory | inputs | MB a batch | ms per batch (median) | rows/s | x none | inputs checked |")
    print("|---|---|---:|---:|---:|---:|---|")
    for kind in a.host.split(","):
        src = {"32": Source(kind, images), "16": Source(kind, [x.to(torch.bfloat16) for x in images])}
        checks = {}
        for m in MODES:  # warm every path, and check that batch 2 arrives whole (the graph's answer to it)
            run_mode(m, 3, graphs, src, side)
            if m in ("none", "d2d"):
                continue
            w = width(m)
            got = outs[w].clone()
            graphs[w][1].copy_(src[w].batch(2))
            graphs[w][0].replay()
            torch.cuda.synchronize()
            checks[m] = torch.equal(got, outs[w])
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(a.rounds):
            for m in MODES:
                times[m].append(run_mode(m, a.batches, graphs, src, side))
        base = statistics.median(times["none"])
        for m in MODES:
            t = statistics.median(times[m])
            mb = 0.0 if m in ("none", "d2d") else src[width(m)].nbytes / 1e6
            ok = "" if m not in checks else ("yes" if checks[m] else "NO")
            print(f"| {kind} | {m} | {mb:.1f} | {t * 1e3:.3f} | {a.batch / t:,.0f} | {base / t:.2f} | {ok} |")


if __name__ == "__main__":
    main()
