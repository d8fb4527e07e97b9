"""Whether a batch's inputs crossing the host link slow the model when they overlap its compute (CUDA only).

The server copies a ResNet-50 batch's 19.3 MB of FP32 images on the compute stream, before its compute. With
those copies left out it served 24 % more rows/s; with them started early, on a stream of their own, the
launch-to-answer time fell as much, yet the rows/s did not follow (docs/benchmarks.md, eighth session). This
takes the server out: ResNet-50 in bf16 at batch 32, its forward pass captured in a CUDA graph (no launch
cost), replayed back to back, with each batch's inputs brought in one of these ways:

    none          no copies: the raw model (the ceiling)
    d2d           a device-to-device copy of the batch into the graph's input, no host link
    in-stream     the batch copied from page-locked memory on the compute stream, before it (the server)
    side-stream   the same copies on a second stream, a batch ahead, overlapping the compute; the compute
                  stream waits for its own batch's, then copies it into the graph's input on the device
    in-half       as in-stream with bf16 images: half the bytes (protocol workers narrowing the inputs)
    side-half     as side-stream with bf16 images

The modes run interleaved, `--rounds` times, `--batches` batches each; the table gives the median ms per
batch, rows/s, and the ratio against none. The inputs are checked: the last batch's logits equal those of a
batch run with no copies from the same images.

    python bench/h2d_overlap_bench.py [--batch 32] [--batches 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def run_mode(mode: str, batches: int, ctx: dict[str, object]) -> float:
    """Seconds per batch of `batches` batches in `mode`, device-bound (the CPU only queues work)."""
    half = mode.endswith("half")
    g: torch.cuda.CUDAGraph = ctx["g16" if half else "g32"]  # type: ignore[assignment]
    static: torch.Tensor = ctx["in16" if half else "in32"]  # type: ignore[assignment]
    hosts: list[torch.Tensor] = ctx["host16" if half else "host32"]  # type: ignore[assignment]
    bufs: list[torch.Tensor] = ctx["buf16" if half else "buf32"]  # type: ignore[assignment]
    side: torch.cuda.Stream = ctx["side"]  # type: ignore[assignment]
    compute = torch.cuda.current_stream()
    events = [torch.cuda.Event() for _ in bufs]  # type: ignore[no-untyped-call]

    def prefetch(k: int) -> None:
        with torch.cuda.stream(side):
            bufs[k % len(bufs)].copy_(hosts[k % len(hosts)], non_blocking=True)
            events[k % len(bufs)].record(side)

    steps: dict[str, Callable[[int], object]] = {
        "none": lambda k: None,
        "d2d": lambda k: static.copy_(bufs[k % len(bufs)]),
        "in-stream": lambda k: static.copy_(hosts[k % len(hosts)], non_blocking=True),  # and in-half
    }
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
            compute.wait_event(events[k % len(bufs)])
            static.copy_(bufs[k % len(bufs)])
        else:
            steps[mode.replace("-half", "-stream")](k)
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("h2d_overlap_bench: needs a CUDA device", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    dev = "cuda"
    model = ResNet50().to(dev).eval()
    net = model.to(torch.bfloat16)

    def fwd32(x: torch.Tensor) -> torch.Tensor:  # the served model's first step: its inputs cast to bf16
        out: torch.Tensor = net(x.to(torch.bfloat16))
        return out

    shape = (a.batch, 3, 224, 224)
    host32 = [torch.randn(shape).pin_memory() for _ in range(4)]
    host16 = [h.to(torch.bfloat16).pin_memory() for h in host32]
    in32 = torch.empty(shape, device=dev)
    in16 = torch.empty(shape, device=dev, dtype=torch.bfloat16)
    g32, out32 = captured(fwd32, in32)
    g16, out16 = captured(net, in16)
    ctx: dict[str, object] = {
        "g32": g32,
        "g16": g16,
        "in32": in32,
        "in16": in16,
        "host32": host32,
        "host16": host16,
        "buf32": [torch.empty(shape, device=dev) for _ in range(2)],
        "buf16": [torch.empty(shape, device=dev, dtype=torch.bfloat16) for _ in range(2)],
        "side": torch.cuda.Stream(),  # type: ignore[no-untyped-call]
    }
    for m in MODES:  # warm every path once, and check the inputs arrive right
        run_mode(m, 2, ctx)
    checks = {}
    for m, out, hosts in (("side-stream", out32, host32), ("side-half", out16, host16)):
        run_mode(m, 3, ctx)  # its last batch: hosts[2]
        got = out.clone()
        (in32 if out is out32 else in16).copy_(hosts[2])
        (g32 if out is out32 else g16).replay()
        torch.cuda.synchronize()
        checks[m] = torch.equal(got, out)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for m in MODES:
            times[m].append(run_mode(m, a.batches, ctx))
    name = torch.cuda.get_device_name()
    print(f"ResNet-50, bf16, batch {a.batch}, CUDA graph, {name}; {a.rounds} rounds x {a.batches} batches")
    print(f"inputs checked: {checks}")
    print("| inputs | bytes a batch | ms per batch (median) | rows/s | x none |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["none"])
    for m in MODES:
        t = statistics.median(times[m])
        nbytes = 0 if m in ("none", "d2d") else (host16 if m.endswith("half") else host32)[0].nbytes
        print(f"| {m} | {nbytes / 1e6:.1f} MB | {t * 1e3:.3f} | {a.batch / t:,.0f} | {base / t:.2f} |")


if __name__ == "__main__":
    main()
