"""Elastic recovery: SIGKILL one worker mid-run; torchrun's agent stops the group, re-forms it, the workers
resume from the last checkpoint and the job finishes. Measures the steps lost and the recovery time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import run_local, tiny_llama

pytestmark = pytest.mark.integration


def _kill_worker_after(progress: Path, step: int, out: dict[str, Any]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            current = json.loads(progress.read_text())["step"]
        except (OSError, ValueError, KeyError):
            current = 0
        if current >= step:
            workers = psutil.Process().children()
            if len(workers) >= 2:
                victim = workers[-1]
                out.update(step=current, time=time.time(), pid=victim.pid)
                os.kill(victim.pid, signal.SIGKILL)
                return
        time.sleep(0.02)


def test_killed_worker_group_reforms_and_resumes(tmp_path: Path) -> None:
    spec = tiny_llama(
        tmp_path,
        optimizer={"steps": 40},
        checkpoint={"intervalSteps": 5, "path": str(tmp_path / "c")},
        parallelism={"data": 2},
    )
    killed: dict[str, Any] = {}
    killer = threading.Thread(target=_kill_worker_after, args=(tmp_path / "el.progress.json", 12, killed))
    killer.start()
    run = run_local(tmp_path, spec, 2, "--max-restarts", "2", name="el")
    killer.join()
    assert killed, "the worker was never killed"
    assert run.code == 0 and run.progress["state"] == "succeeded" and run.progress["step"] == 40
    starts = run.events("start")
    assert [s["restarts"] for s in starts] == [0, 1]
    resumed_from = starts[1]["step"]
    ckpts_before = [c["step"] for c in run.events("checkpoint") if c["time"] < killed["time"]]
    assert resumed_from == max(ckpts_before), "resumes from the last checkpoint written before the kill"
    steps_lost = killed["step"] - resumed_from
    assert 0 <= steps_lost < 5 + 2, "work lost is bounded by the checkpoint interval (+ steps in flight)"
    first_after = min(
        r["time"]
        for r in run.metrics
        if "loss" in r and r["time"] > killed["time"] and r["step"] == resumed_from + 1
    )
    recovery_s = first_after - killed["time"]
    assert run.progress["restarts"] == 1
    print(
        f"\nelastic recovery: killed at step {killed['step']}, resumed from step {resumed_from}, "
        f"steps lost {steps_lost}, recovery {recovery_s:.2f} s (kill -> first step after restart)"
    )
    assert recovery_s < 120
