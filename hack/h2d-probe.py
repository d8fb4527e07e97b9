"""What one host-to-device copy of an input row costs the thread that queues it (a diagnostic for the GPU).

The batcher thread queues a copy per request from the protocol workers' arenas (memfds the hub registers
with cudaHostRegister). A copy from page-locked memory should return at once and run by DMA; one from
pageable memory returns only once it is staged. This prints, per source, the microseconds a call holds
the calling thread (`non_blocking=True`, queued back to back) and the time until the GPU is done:

    python hack/h2d-probe.py [row bytes, default 602112] [rows, default 32]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.serving import ipc, pagelock


def probe(name: str, rows: list[torch.Tensor], batched: bool) -> None:
    dev = torch.empty((len(rows), rows[0].numel()), dtype=torch.uint8, device="cuda")
    dst = list(torch.split(dev, 1))
    for _ in range(3):  # warm
        torch._foreach_copy_(dst, rows, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if batched:
        torch._foreach_copy_(dst, rows, non_blocking=True)
    else:
        for d, r in zip(dst, rows, strict=True):
            d.copy_(r, non_blocking=True)
    queued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    size = sum(r.nbytes for r in rows)
    how = "foreach" if batched else "per row"
    print(
        f"{name:<28} {how:<8} {1e6 * (queued - t0) / len(rows):8.1f} us/row queued"
        f" {1e6 * (done - t0):9.1f} us to done  {size / (done - t0) / 1e9:6.1f} GB/s"
    )


def main() -> None:
    row = int(sys.argv[1]) if len(sys.argv) > 1 else 3 * 224 * 224 * 4
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    slot = (row + 4095) // 4096 * 4096
    arena = ipc.Arena.anonymous("kubeforge-h2d-probe", n, slot)
    arena.forget_path()
    base = ipc.HEADER_BYTES
    locked = pagelock.register(arena.address, arena.size)
    views = [
        torch.frombuffer(arena.buf, dtype=torch.uint8, count=row, offset=base + i * slot).view(1, row)
        for i in range(n)
    ]
    pinned = [torch.empty((1, row), dtype=torch.uint8, pin_memory=True) for _ in range(n)]
    pageable = [torch.empty((1, row), dtype=torch.uint8) for _ in range(n)]
    print(f"{n} rows of {row} bytes; arena registered: {locked}; is_pinned: {views[0].is_pinned()}")
    for batched in (False, True):
        probe("memfd arena (registered)", views, batched)
        probe("torch pinned", pinned, batched)
        probe("pageable", pageable, batched)
    pagelock.unregister(arena.address)
    arena.close()


if __name__ == "__main__":
    main()
