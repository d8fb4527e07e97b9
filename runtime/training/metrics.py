"""Throughput, MFU, the per-step metrics file, and the profiling window (trace, operator table,
collective bytes)."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("kubeforge.metrics")

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name; MFU is reported only where the peak is known.
PEAK_BF16 = {
    "H200": 989.5e12,
    "H100": 989.5e12,
    "H800": 989.5e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "MI300X": 1307e12,
    "MI250X": 383e12,
}
_DTYPE_BYTES = {
    "float": 4,
    "c10::Half": 2,
    "c10::BFloat16": 2,
    "double": 8,
    "long int": 8,
    "int": 4,
    "signed char": 1,
    "unsigned char": 1,
    "bool": 1,
    "c10::Float8_e4m3fn": 1,
    "short int": 2,
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Throughput:
    """Samples per second over the last ``window`` steps."""

    def __init__(self, window: int = 20) -> None:
        self.times: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def mark(self, samples: int) -> None:
        self.times.append((time.perf_counter(), samples))

    def reset(self) -> None:
        self.times.clear()

    def per_second(self) -> float | None:
        if len(self.times) < 2:
            return None
        (t0, _), (t1, _) = self.times[0], self.times[-1]
        n = sum(s for _, s in list(self.times)[1:])
        return n / (t1 - t0) if t1 > t0 else None


class MetricsFile:
    """One JSON object per line: per-step metrics and events (resume, checkpoint, restart), with wall time."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


def collective_bytes(trace: dict[str, Any]) -> dict[str, int]:
    """Bytes handed to the communication backend per collective, read from a Chrome trace of torch.profiler:
    the backend's own events (``gloo:all_reduce``, ``nccl:reduce_scatter`` ...) record input dtypes and
    shapes,
    DDP's built-in reducer included."""
    out: dict[str, int] = {}
    for ev in trace.get("traceEvents", []):
        name = ev.get("name", "")
        if not (name.startswith("gloo:") or name.startswith("nccl:")):
            continue
        args = ev.get("args", {})
        total = 0
        for dims, dtype in zip(args.get("Input Dims", []), args.get("Input type", []), strict=False):
            shapes = dims if dims and isinstance(dims[0], list) else [dims]
            for shape in shapes:
                n = 1
                for d in shape:
                    n *= int(d)
                total += n * _DTYPE_BYTES.get(dtype, 4)
        key = name.split(":", 1)[1]
        out[key] = out.get(key, 0) + total
    return out


class ProfileWindow:
    """torch.profiler over steps [start, start + steps) on this rank; writes a Chrome trace, a
    per-operator table
    and the collective byte counts into ``folder``."""

    def __init__(self, start: int, steps: int, folder: Path, device: torch.device) -> None:
        self.start, self.stop, self.folder, self.device = start, start + steps, folder, device
        self.prof: Any = None
        self.files: list[Path] = []

    def before_step(self, step: int) -> None:
        if step == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts, record_shapes=True)
            self.prof.__enter__()

    def after_step(self, step: int) -> list[Path]:
        """The files written when the window closed at ``step``, else []."""
        if self.prof is None or step + 1 != self.stop:
            return []
        self.prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / "trace.json"
        self.prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.folder / "operators.txt"
        table.write_text(self.prof.key_averages().table(sort_by=sort, row_limit=50))
        comm = self.folder / "collective_bytes.json"
        comm.write_text(json.dumps(collective_bytes(json.loads(trace.read_text())), indent=1))
        self.prof = None
        self.files = [trace, table, comm]
        return self.files
