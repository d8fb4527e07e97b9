"""The CPUs a runtime process may use: its affinity, or its cgroup's CPU quota (a pod's limit) when lower."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.cpus import cpus_allowed


def test_the_cpus_allowed_are_the_affinity_or_the_cgroups_quota_when_lower(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpus_allowed(tmp_path) == cores  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")  # cgroup v2, no limit
    assert cpus_allowed(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # a pod's limit of 500m
    assert cpus_allowed(tmp_path) == 0.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()  # cgroup v1: -1 is no limit
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus_allowed(tmp_path) == cores
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    assert cpus_allowed(tmp_path) == min(cores, 1.5)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("garbage\n")  # unreadable: no limit assumed
    assert cpus_allowed(tmp_path) == cores
    assert 0 < cpus_allowed() <= cores  # this machine's own
