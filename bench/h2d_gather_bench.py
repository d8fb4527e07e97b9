"""What gathering a batch's rows onto the GPU costs the thread that launches batches (CUDA only).

The rows lie in page-locked host memory at scattered slots (as in the protocol workers' registered arenas);
each way below copies them into one device tensor on a copy stream:

    foreach        torch._foreach_copy_ of the rows into views of the batch (the server until 2026-12-05)
    torch loop     a copy_ per row
    driver loop    cuMemcpyHtoDAsync per row through ctypes' PyDLL (the GIL stays held)
    driver batch   one cuMemcpyBatchAsync for all rows (CUDA 12.8+), GIL held

For each: µs of the launching thread per batch (median), alone and beside 2 threads that run Python (as the
reader and finisher threads do: a torch call lets go of the GIL and may wait up to the 1 ms switch interval
to get it back), the device's µs for the copies, and the ratio against foreach. The results are checked
against the rows. Also the µs of one small torch call (torch.empty on the device), for scale.

    python bench/h2d_gather_bench.py [--rows 1,8,21,32] [--row-bytes 602112] [--iters 300]
"""

from __future__ import annotations

import argparse
import mmap
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.serving import cudadriver, pagelock
from runtime.serving.server import SWITCH_INTERVAL_S  # the model process's, as the launching thread has it

SLOTS, SLOT_BYTES = 64, 1 << 20

Gather = Callable[[list[torch.Tensor], int], torch.Tensor]


def ways(device: str) -> dict[str, Gather]:
    drv = cudadriver.load()

    def empty(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.empty((len(rows), *rows[0].shape[1:]), dtype=rows[0].dtype, device=device)

    def foreach(rows: list[torch.Tensor], _: int) -> torch.Tensor:
        batch = empty(rows)
        torch._foreach_copy_(batch.split_with_sizes([1] * len(rows)), rows, non_blocking=True)
        return batch

    def torch_loop(rows: list[torch.Tensor], _: int) -> torch.Tensor:
        batch = empty(rows)
        for i, r in enumerate(rows):
            batch[i : i + 1].copy_(r, non_blocking=True)
        return batch

    def driver(each: bool) -> Gather:
        def gather(rows: list[torch.Tensor], handle: int) -> torch.Tensor:
            assert drv is not None
            batch = empty(rows)
            n = rows[0].nbytes
            base = batch.data_ptr()
            dsts = [base + i * n for i in range(len(rows))]
            srcs = [r.data_ptr() for r in rows]
            (drv.copy_each if each else drv.copy_batch)(dsts, srcs, [n] * len(rows), handle)
            return batch

        return gather

    out: dict[str, Gather] = {"foreach": foreach, "torch loop": torch_loop}
    if drv is not None:
        out["driver loop"] = driver(True)
        if drv.batches:
            out["driver batch"] = driver(False)
    return out


def busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(200))


def measure(
    name: str,
    gather: Gather,
    arena: list[torch.Tensor],
    rows: int,
    iters: int,
    stream: torch.cuda.Stream,
    device: str,
) -> tuple[float, float]:
    """(median µs of the call, mean device µs of its copies); checks the batch against its rows."""
    rng = random.Random(rows)
    walls, device_us = [], []
    handle = stream.cuda_stream
    with torch.cuda.stream(stream):
        for i in range(iters):
            picked = [arena[j] for j in rng.sample(range(len(arena)), rows)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            t0 = time.perf_counter()
            batch = gather(picked, handle)
            walls.append(time.perf_counter() - t0)
            end.record(stream)
            if i % 8 == 7 or i == iters - 1:
                end.synchronize()
                device_us.append(start.elapsed_time(end) * 1e3)
            if i == iters - 1:
                stream.synchronize()
                want = torch.cat(picked).to(device)
                if not torch.equal(batch, want):
                    raise AssertionError(f"{name}: the batch differs from its rows")
    return statistics.median(walls) * 1e6, statistics.fmean(device_us)


def torch_call_us(device: str, iters: int) -> float:
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.empty(1, device=device)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,21,32")
    ap.add_argument("--row-bytes", type=int, default=602112)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--contenders", default="0,2", help="Python threads beside the launching one, per run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("h2d_gather_bench needs CUDA")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    device = "cuda:0"
    torch.cuda.init()
    mm = mmap.mmap(-1, SLOTS * SLOT_BYTES)
    addr = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    if not pagelock.register(addr, SLOTS * SLOT_BYTES):
        sys.exit("cudaHostRegister refused the arena")
    base = torch.frombuffer(mm, dtype=torch.uint8)
    n = args.row_bytes // 4
    arena = [
        base[i * SLOT_BYTES : i * SLOT_BYTES + 4 * n].view(torch.float32).view(1, n) for i in range(SLOTS)
    ]
    for i, row in enumerate(arena):
        row.copy_(torch.randn(1, n, generator=torch.Generator().manual_seed(i)))
    stream = torch.cuda.Stream(device)
    table = ways(device)
    drv = cudadriver.load()
    print(
        f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, rows of {args.row_bytes} B; "
        f"driver batch call: {bool(drv and drv.batches)}"
    )
    print("| contenders | rows | way | µs per batch (p50) | x foreach | device µs | GB/s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for k in (int(c) for c in args.contenders.split(",")):
        stop = threading.Event()
        threads = [threading.Thread(target=busy, args=(stop,), daemon=True) for _ in range(k)]
        for t in threads:
            t.start()
        try:
            print(f"| {k} | | one torch call (torch.empty) | {torch_call_us(device, args.iters):.1f} | | | |")
            for rows in (int(r) for r in args.rows.split(",")):
                ref = None
                for name, gather in table.items():
                    gather(arena[:rows], stream.cuda_stream)  # warm the caching allocator
                    iters = args.iters if not k else max(20, args.iters // 10)  # ~10 ms each
                    wall, dev = measure(name, gather, arena, rows, iters, stream, device)
                    ref = ref or wall
                    gbs = rows * args.row_bytes / dev / 1e3
                    print(
                        f"| {k} | {rows} | {name} | {wall:.1f} | {wall / ref:.2f} | {dev:.0f} | {gbs:.1f} |"
                    )
        finally:
            stop.set()
            for t in threads:
                t.join()
    pagelock.unregister(addr)


if __name__ == "__main__":
    main()
