"""Copies from page-locked host memory to the GPU through the CUDA driver, without letting go of the GIL.

The batcher thread launches every batch, and every torch call on it lets go of the GIL and waits to get it
back from the threads that read requests and answer batches (H100, ResNet-50 at 64 clients: the device
idled 7-13 % of the time with a batch being launched; the launch's largest part was one `_foreach_copy_`
of the batch's rows, ~0.3 ms for ~21 rows of 602 KB). The driver's own entry points, called through ctypes'
PyDLL (which keeps the GIL), enqueue the same DMA copies in a few microseconds each, and CUDA 12.8's batch
call enqueues all of a batch's in one: bench/h2d_gather_bench.py measures each way.

Nothing here is needed: `load()` answers None without a CUDA driver (or with one too old), and the caller
keeps torch's copies."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger("kubeforge.serve")

_SRC_ACCESS_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: the sources are read in stream order
_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1  # copy engines, leaving the SMs to the batch before


class _Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):  # CUmemcpyAttributes
    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_hint", _Location),
        ("dst_loc_hint", _Location),
        ("flags", ctypes.c_uint),
    ]


class Driver:
    """libcuda's host-to-device copies on a stream (a CUstream is a cudaStream_t: torch's `cuda_stream`).
    The calling thread must have the device's primary context current, as any thread that made a torch CUDA
    call on that device has."""

    def __init__(self, lib: ctypes.PyDLL) -> None:
        self._copy = lib.cuMemcpyHtoDAsync_v2
        self._copy.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._copy.restype = ctypes.c_int
        self._batch, self._fail_index = _batch_entry(lib)
        self._attrs = _Attributes(_SRC_ACCESS_ORDER_STREAM, _Location(0, 0), _Location(0, 0), 0)
        self._attrs.flags = _FLAG_PREFER_OVERLAP_WITH_COMPUTE
        self._attr_index = ctypes.c_size_t(0)
        self._failed_at = ctypes.c_size_t(0)

    @property
    def batches(self) -> bool:
        """Whether the driver has the batch call (CUDA 12.8 or later)."""
        return self._batch is not None

    def copy_each(self, dsts: Sequence[int], srcs: Sequence[int], sizes: Sequence[int], stream: int) -> None:
        """One driver call per copy."""
        for d, s, n in zip(dsts, srcs, sizes, strict=True):
            check(self._copy(d, s, n, stream), "cuMemcpyHtoDAsync")

    def copy_rows(self, dst: int, rows: Sequence[torch.Tensor], stream: int) -> None:
        """Copy contiguous page-locked `rows` one after another into device memory from `dst` on: in one batch
        call where the driver has it and the stream is not the legacy default one, else a call per row."""
        dsts, srcs, sizes = [], [], []
        for t in rows:
            n = t.nbytes
            dsts.append(dst)
            srcs.append(t.data_ptr())
            sizes.append(n)
            dst += n
        if self._batch is not None and stream:
            self.copy_batch(dsts, srcs, sizes, stream)
        else:
            self.copy_each(dsts, srcs, sizes, stream)

    def copy_batch(self, dsts: Sequence[int], srcs: Sequence[int], sizes: Sequence[int], stream: int) -> None:
        """One driver call for all the copies (not on the legacy default stream, which the call refuses)."""
        if self._batch is None:
            raise RuntimeError("this CUDA driver has no cuMemcpyBatchAsync (CUDA 12.8 or later)")
        n = len(sizes)
        d = np.asarray(dsts, dtype=np.uint64)
        s = np.asarray(srcs, dtype=np.uint64)
        z = np.asarray(sizes, dtype=np.uint64)
        args: list[object] = [d.ctypes.data, s.ctypes.data, z.ctypes.data, n]
        args += [ctypes.byref(self._attrs), ctypes.byref(self._attr_index), 1]
        if self._fail_index:
            args.append(ctypes.byref(self._failed_at))
        check(self._batch(*args, stream), "cuMemcpyBatchAsync")


def _batch_entry(lib: ctypes.PyDLL) -> tuple[Any, bool]:
    """CUDA 13's cuMemcpyBatchAsync_v2 (8 arguments), or 12.8's cuMemcpyBatchAsync (9: and a fail index)."""
    common = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    common += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    for name, fail_index in (("cuMemcpyBatchAsync_v2", False), ("cuMemcpyBatchAsync", True)):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.argtypes = [*common, *([ctypes.c_void_p] if fail_index else []), ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return fn, fail_index
    return None, False


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed: CUDA driver error {rc}")


_driver: Driver | None = None
_tried = False


OFF_ENV = "KUBEFORGE_CUDA_DRIVER_CALLS"  # "0": torch's calls only (a driver whose batch call misbehaves)


def load() -> Driver | None:
    """The process's Driver, or None where libcuda cannot be loaded (no NVIDIA driver: CPU, CI), torch is not
    built for CUDA (ROCm: its pointers and streams are HIP's), or OFF_ENV is "0"."""
    global _driver, _tried
    if not _tried:
        _tried = True
        if os.environ.get(OFF_ENV) == "0":
            log.info("CUDA driver calls turned off; torch's are used", extra={"env": OFF_ENV})
            return None
        if torch.version.cuda is None:
            return None
        try:
            _driver = Driver(ctypes.PyDLL("libcuda.so.1"))
        except (OSError, AttributeError) as e:
            log.info("CUDA driver copies unavailable; torch's are used", extra={"error": repr(e)})
    return _driver
