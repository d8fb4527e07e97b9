"""Host memory registered with CUDA (page-locked), and a cheap test of whether a tensor lies in it.

The hub registers each protocol worker's input arena, so that a large input goes from there to the GPU by
DMA with no CPU copy (server.pinned_gather). Asking torch (`Tensor.is_pinned()`) costs a CUDA driver call
per row: on the H200 host that was 21 % of the batcher thread's time at 13,000 rows/s of 602 KB images, on
the one thread every batch waits for. The hub knows what it registered, so this module keeps the ranges and
answers from them."""

from __future__ import annotations

import bisect
import logging
import math
import threading

import torch

log = logging.getLogger("kubeforge.serve")

_lock = threading.Lock()
# sorted, disjoint (start, end) ranges; replaced whole under _lock, read without it
_ranges: tuple[tuple[int, int], ...] = ()


def register(address: int, size: int) -> bool:
    """Page-lock `size` bytes at `address` (True when CUDA did). Without CUDA, or when CUDA refuses, nothing
    changes and inputs still reach the GPU, through a page-locked staging buffer."""
    if size <= 0:
        return False
    try:
        if not torch.cuda.is_available() or torch.version.cuda is None:
            return False
        torch.cuda.init()  # type: ignore[no-untyped-call]  # page-locked only once its context exists
        rc = torch.cuda.cudart().cudaHostRegister(address, size, 0)  # type: ignore[no-untyped-call]
    except Exception as e:  # an optimisation only: inputs still work from pageable memory
        log.warning("could not page-lock a worker's shared memory", extra={"error": repr(e)})
        return False
    if int(rc) != 0:
        log.warning("could not page-lock a worker's shared memory", extra={"cuda_error": int(rc)})
        return False
    _add(address, size)
    return True


def unregister(address: int) -> None:
    """Undo register (before the memory is unmapped: a registration outliving its mapping makes CUDA refuse
    the next mapping at that address)."""
    if not _remove(address):
        return
    try:
        torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]
    except Exception as e:
        log.debug("cudaHostUnregister failed", extra={"error": repr(e)})


def holds(t: torch.Tensor) -> bool:
    """Whether all of `t`'s bytes lie in registered memory (for a contiguous CPU tensor). A wrong answer costs
    speed, not correctness: CUDA copies from pageable memory too, synchronously, through its own staging."""
    ranges, start = _ranges, t.data_ptr()
    i = bisect.bisect_right(ranges, (start, math.inf)) - 1
    return i >= 0 and ranges[i][0] <= start and start + t.nbytes <= ranges[i][1]


def _add(address: int, size: int) -> None:
    global _ranges
    with _lock:
        _ranges = tuple(sorted([*_ranges, (address, address + size)]))


def _remove(address: int) -> bool:
    global _ranges
    with _lock:
        kept = tuple(r for r in _ranges if r[0] != address)
        found, _ranges = len(kept) < len(_ranges), kept
        return found
