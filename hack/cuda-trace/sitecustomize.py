"""The GPU's timeline while a server is under load, for hack/serve-profile.py's TRACE=1: a diagnostic.

serve-profile puts this folder first on the server's PYTHONPATH and sets KF_CUDA_TRACE to a folder. Each
Python process of the server then watches for a file `go` there; the one that has CUDA initialised (the model
process) records the device's activity (kernels, copies, memsets: CUPTI, through torch.profiler) for the
seconds `go` holds, and writes `timeline.json`: how busy the device was, how much of the host-to-device copy
time ran under kernels, and the idle gaps between. Processes without CUDA do nothing.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(spans: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Time of `spans` (any) lying under `cover` (a union: sorted, disjoint)."""
    starts = [a for a, _ in cover]
    total = 0.0
    for a, b in spans:
        i = max(0, bisect.bisect_right(starts, a) - 1)
        while i < len(cover) and cover[i][0] < b:
            total += max(0.0, min(b, cover[i][1]) - max(a, cover[i][0]))
            i += 1
    return total


def summarize(trace: Path) -> dict[str, object]:
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kern, h2d, d2h, other = [], [], [], []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        name = e.get("name", "")
        if e["cat"] == "kernel":
            kern.append(span)
        elif "HtoD" in name:
            h2d.append(span)
        elif "DtoH" in name:
            d2h.append(span)
        else:
            other.append(span)
    spans = kern + h2d + d2h + other
    if not spans:
        return {"error": "no device activity recorded"}
    busy, kernels = _union(spans), _union(kern)
    t0, t1 = busy[0][0], busy[-1][1]
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(busy)]
    h2d_time = sum(b - a for a, b in h2d)
    return {
        "window_ms": round((t1 - t0) / 1e3, 1),
        "busy_pct": round(100 * sum(b - a for a, b in busy) / (t1 - t0), 1),
        "kernel_busy_pct": round(100 * sum(b - a for a, b in kernels) / (t1 - t0), 1),
        "kernels": len(kern),
        "h2d_copies": len(h2d),
        "h2d_ms_per_s": round(h2d_time / (t1 - t0) * 1e3, 1),
        "h2d_under_kernels_pct": round(100 * _overlap(h2d, kernels) / max(h2d_time, 1e-9), 1),
        "h2d_us_per_copy": round(h2d_time / max(1, len(h2d)), 1),
        "d2h_ms_per_s": round(sum(b - a for a, b in d2h) / (t1 - t0) * 1e3, 1),
        "idle_gaps_over_20us": sum(g > 20 for g in gaps),
        "idle_ms_per_s_in_gaps_over_20us": round(sum(g for g in gaps if g > 20) / (t1 - t0) * 1e3, 1),
        "idle_gap_p50_us": round(sorted(gaps)[len(gaps) // 2], 1) if gaps else 0.0,
    }


def _watch(folder: Path) -> None:
    go = folder / "go"
    while not go.exists():
        time.sleep(0.05)
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return  # not the model process
    seconds = float(go.read_text() or "2")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time.sleep(seconds)
    trace = folder / f"trace-{os.getpid()}.json"
    prof.export_chrome_trace(str(trace))
    (folder / "timeline.json").write_text(json.dumps(summarize(trace)))


if os.environ.get("KF_CUDA_TRACE"):
    threading.Thread(target=_watch, args=(Path(os.environ["KF_CUDA_TRACE"]),), daemon=True).start()
