"""How many CPUs this process may use, for the runtimes' thread and process counts."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cpus_allowed(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """CPUs this process may use: its affinity, and the cgroup's CPU quota when lower (v2 `cpu.max`, v1
    `cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us`): a pod's CPU limit. `os.cpu_count()` counts the node's
    cores: 64 threads under a limit of 4 CPUs get the pod throttled for most of every period."""
    n = float(len(os.sched_getaffinity(0)))
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, int(quota) / int(period))
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        if quota_us > 0:
            n = min(n, quota_us / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text()))
    return n
