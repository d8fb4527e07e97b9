"""What a compressed request costs: protocol.compression's inflating (the server's side, in a protocol worker)
and zlib's compressing at level 6 (what tritonclient and grpcio do on the client's side), µs per request, for
ResNet-50's 602 KB image (random values, and 8-bit pixels as FP32) and BERT's 1 KB of token ids.

    python bench/compression_bench.py
"""

from __future__ import annotations

import gzip
import time
import zlib

import numpy as np

from runtime.serving.protocol.compression import inflate
from runtime.serving.protocol.http1 import Budget


def _per_call(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    cases = [
        ("602 KB FP32 image, random normal values", rng.standard_normal(150528).astype(np.float32)),
        ("602 KB FP32 image, 8-bit pixels", rng.integers(0, 256, 150528).astype(np.float32)),
        ("1 KB of BERT token ids (INT64)", rng.integers(0, 30522, 128).astype(np.int64)),
    ]
    print("| request | encoding | bytes | compressed | inflate µs (server) | compress µs (client) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, array in cases:
        data = array.tobytes()
        n = 50 if len(data) > 10_000 else 5_000
        for enc, pack in (("gzip", gzip.compress), ("deflate", zlib.compress)):
            packed = pack(data, 6)
            budget = Budget(1 << 30)

            def one(packed: bytes = packed, enc: str = enc, budget: Budget = budget) -> None:
                out = inflate(packed, enc, 64 << 20, budget, "rest", "request body")
                budget.give(len(out))

            took = _per_call(one, n)
            squeeze = _per_call(lambda data=data, pack=pack: pack(data, 6), max(1, n // 10))
            print(f"| {name} | {enc} | {len(data):,} | {len(packed):,} | {took:,.0f} | {squeeze:,.0f} |")


if __name__ == "__main__":
    main()
