"""Resume across world sizes and layouts: stop at step 10 with 4 processes (data 2 x pipeline 2), resume
with 2 processes (tensor 2) from the DCP checkpoint, and the loss continues as an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_local, tiny_llama
from test_training_equivalence import TOLERANCE

pytestmark = pytest.mark.integration


def test_stop_at_world_size_4_resume_at_world_size_2(tmp_path: Path) -> None:
    ckpt = {"intervalSteps": 5, "path": str(tmp_path / "ckpt"), "keep": 2}
    whole = run_local(
        tmp_path, tiny_llama(tmp_path, checkpoint={**ckpt, "path": str(tmp_path / "w")}), 1, name="whole"
    )
    first = run_local(
        tmp_path,
        tiny_llama(tmp_path, checkpoint=ckpt, parallelism={"data": 2, "pipeline": 2, "microBatches": 2}),
        4,
        "--stop-at-step",
        "10",
        name="ws4",
    )
    assert first.code == 0 and first.progress["step"] == 10
    assert first.progress["lastCheckpointStep"] == 10 and first.progress["state"] == "running"
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-10", "step-5"], "keep: 2 retains the two newest checkpoints"

    second = run_local(
        tmp_path,
        tiny_llama(tmp_path, checkpoint=ckpt, parallelism={"tensor": 2}),
        2,
        name="ws2",
    )
    assert second.code == 0 and second.progress["state"] == "succeeded"
    start = second.events("start")[0]
    assert start["step"] == 10 and start["world_size"] == 2
    ref = whole.losses()
    resumed = {**first.losses(), **second.losses()}
    assert sorted(second.losses()) == list(range(11, 21))
    worst = max(abs(resumed[s] - ref[s]) for s in ref)
    assert worst <= TOLERANCE, f"resumed curve differs from the uninterrupted one by {worst:.3g}"
