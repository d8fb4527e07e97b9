"""User entry points for the protocol tests (imported by the workers as `training_entrypoints:<fn>`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from runtime.training.protocol import TrainTask


def regression_task(spec: Any) -> TrainTask:
    torch.manual_seed(spec.optimizer.seed)
    x = torch.randn(256, 4)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 3.0])).unsqueeze(1)
    return TrainTask(model=nn.Linear(4, 1), dataset=TensorDataset(x, y), loss_fn=F.mse_loss, name="linreg")


def meta_regression_task(spec: Any) -> TrainTask:
    """The same regression with its model built on the meta device: each rank fills its own shards."""
    task = regression_task(spec)
    with torch.device("meta"):
        task.model = nn.Linear(4, 1)

    def init(name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        return torch.full(shape, 0.1 if name == "weight" else 0.0)  # on the CPU: moved to the device

    task.init_weights = init
    return task


def meta_without_init(spec: Any) -> TrainTask:
    task = regression_task(spec)
    with torch.device("meta"):
        task.model = nn.Linear(4, 1)
    return task


def wrong_type(spec: Any) -> dict[str, Any]:
    return {"model": nn.Linear(4, 1)}


NOT_CALLABLE = 3
