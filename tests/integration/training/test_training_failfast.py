"""Bad layouts and bad entry points fail fast with a message naming what to change; a good user entry point
trains through the documented protocol."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import run_local, tiny_llama, write_job

from runtime.training import cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("nproc", "spec_changes", "expected"),
    [
        (4, {"parallelism": {"tensor": 3}}, "parallelism.tensor"),
        (4, {"parallelism": {"pipeline": 2, "microBatches": 1}}, "microBatches"),
        (2, {"parallelism": {"tensor": 2, "dataMode": "ddp"}}, "dataMode ddp"),
        (
            2,
            {"model": {"builtin": "llama", "options": {"heads": 3, "dim": 48}}, "parallelism": {"tensor": 2}},
            "parallelism.tensor",
        ),
        (
            2,
            {"model": {"builtin": "cnn"}, "data": {"builtin": "digits"}, "parallelism": {"tensor": 2}},
            "tensor: 1",
        ),
        (2, {"model": {"entrypoint": "no_such_package.mod:make"}}, "no_such_package.mod"),
        (2, {"model": {"entrypoint": "training_entrypoints:missing"}}, "no attribute 'missing'"),
        (2, {"model": {"entrypoint": "training_entrypoints:NOT_CALLABLE"}}, "not a function"),
    ],
)
def test_rejected_before_any_worker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nproc: int, spec_changes: dict, expected: str
) -> None:
    spec = tiny_llama(tmp_path, **spec_changes)
    if "entrypoint" in spec["model"]:
        spec["model"] = {"entrypoint": spec["model"]["entrypoint"]}
    t0 = time.monotonic()
    code = cli.main([str(write_job(tmp_path / "bad.yaml", spec)), "--local", "--nproc-per-node", str(nproc)])
    assert code == cli.EXIT_USER_ERROR
    assert time.monotonic() - t0 < 5
    assert expected in capsys.readouterr().err


def test_user_entrypoint_trains(tmp_path: Path) -> None:
    spec = {
        "model": {"entrypoint": "training_entrypoints:regression_task"},
        "optimizer": {"steps": 30, "globalBatchSize": 32, "learningRate": 0.3},
        "checkpoint": {"intervalSteps": 100, "path": str(tmp_path / "c")},
    }
    run = run_local(tmp_path, spec, 2, name="user")
    assert run.code == 0 and run.progress["state"] == "succeeded"
    losses = run.losses()
    assert losses[30] < losses[1] / 10


def test_entrypoint_returning_the_wrong_type_fails_fast(tmp_path: Path) -> None:
    spec = {
        "model": {"entrypoint": "training_entrypoints:wrong_type"},
        "checkpoint": {"path": str(tmp_path / "c")},
    }
    t0 = time.monotonic()  # restarts still happen (the agent restarts any failure) but each fails at once
    run = run_local(tmp_path, spec, 2, "--max-restarts", "1", name="wrong")
    assert run.code == cli.EXIT_USER_ERROR
    assert time.monotonic() - t0 < 60
    assert run.progress["state"] == "failed"
    assert "must return runtime.training.protocol.TrainTask" in run.progress["message"]
