"""What the benchmarks share: the local training run's command-line arguments, a free port."""

from __future__ import annotations

import socket
from pathlib import Path


def local_run_args(job: Path, procs: int, metrics: Path, log_every: int = 10) -> list[str]:
    """`python -m runtime.training.cli` arguments: run `job` here on `procs` processes, metrics to a file,
    no checkpoints and no restarts (a benchmark measures steps, not recovery)."""
    return [
        str(job),
        "--local",
        "--nproc-per-node",
        str(procs),
        "--metrics-file",
        str(metrics),
        "--log-every",
        str(log_every),
        "--no-checkpoint",
        "--max-restarts",
        "0",
    ]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
