"""Multi-process training runs over gloo on this machine, through the real launcher (`kubeforge-train
--local`).

The launcher runs inside the pytest process (its `main`), so the elastic agent forks workers that already have
torch imported: a run costs its training time, not eight interpreter start-ups.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_llama(tmp: Path, **spec: Any) -> dict[str, Any]:
    """A 2-layer, dim-32 decoder on synthetic tokens (pass layers=4 for 4 pipeline stages)."""
    layers = spec.pop("layers", 2)
    base: dict[str, Any] = {
        "model": {"builtin": "llama", "preset": "tiny", "options": {"dim": 32, "layers": layers, "heads": 4}},
        "data": {"builtin": "synthetic-tokens", "sequenceLength": 16, "vocabSize": 64},
        "optimizer": {"steps": 20, "globalBatchSize": 8, "learningRate": 0.003},
        "parallelism": {"microBatches": 1},
        "checkpoint": {"intervalSteps": 100, "path": str(tmp / "ckpt")},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@dataclass
class Run:
    code: int
    metrics: list[dict[str, Any]]
    progress: dict[str, Any]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.metrics if "loss" in r}

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.metrics if r.get("event") == name]


def write_job(path: Path, spec: dict[str, Any]) -> Path:
    obj = {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "t"},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(obj))
    return path


def run_local(tmp: Path, spec: dict[str, Any], nproc: int, *extra: str, name: str = "run") -> Run:
    """`kubeforge-train <spec> --local --nproc-per-node N` in-process; metrics and progress files under
    tmp."""
    from runtime.training import cli

    job = write_job(tmp / f"{name}.yaml", spec)
    metrics, progress = tmp / f"{name}.metrics.jsonl", tmp / f"{name}.progress.json"
    scratch = tmp / f"{name}.tmp"  # the launcher's and torch elastic's temporary files must not outlive it
    scratch.mkdir()
    tempfile.tempdir, before = str(scratch), tempfile.tempdir
    try:
        code = _main(cli, job, nproc, metrics, progress, extra)
    finally:
        tempfile.tempdir = before
    # ours, and torch elastic's log directory (which the launcher puts in ours); not Inductor's cache, nor
    # the pickle torch.multiprocessing leaves when a worker dies (its own temporary file)
    left = [p.name for p in scratch.iterdir() if p.name.startswith(("kubeforge-", "torchelastic_"))]
    assert not left, f"left behind by the launcher: {left}"
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    prog = json.loads(progress.read_text()) if progress.exists() else {}
    return Run(code, recs, prog)


def _main(cli: Any, job: Path, nproc: int, metrics: Path, progress: Path, extra: tuple[str, ...]) -> int:
    return cli.main(  # type: ignore[no-any-return]
        [
            str(job),
            "--local",
            "--nproc-per-node",
            str(nproc),
            "--metrics-file",
            str(metrics),
            "--progress-file",
            str(progress),
            "--progress-interval",
            "0",
            "--start-method",
            "fork",
            *extra,
        ]
    )


@pytest.fixture
def train_local(tmp_path: Path) -> Callable[..., Run]:
    def _run(spec: dict[str, Any], nproc: int, *extra: str, name: str = "run") -> Run:
        return run_local(tmp_path, spec, nproc, *extra, name=name)

    return _run
