"""Image classifiers for scikit-learn's 8x8 digits: a small CNN and an MLP. Data parallel only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crds.trainingjob import TrainingJobSpec
from runtime.training.protocol import TrainTask

WIDTHS = {"tiny": 16, "small": 64}


class CNN(nn.Module):
    """(batch, 1, 8, 8) images -> (batch, classes) logits."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 4 * width), nn.ReLU(), nn.Linear(4 * width, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class MLP(nn.Module):
    """(batch, 1, 8, 8) or (batch, 64) -> (batch, classes) logits."""

    def __init__(self, width: int = 16, classes: int = 10, inputs: int = 64) -> None:
        super().__init__()
        h = 8 * width
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(inputs, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def build_task(spec: TrainingJobSpec, kind: str) -> TrainTask:
    from runtime.training.data import Digits

    if str(spec.data.builtin) != "digits":
        raise ValueError(f"model {kind} classifies images: set spec.data.builtin: digits")
    preset = spec.model.preset
    if preset not in WIDTHS:
        raise ValueError(
            f"spec.model.preset {preset!r} is not a {kind} preset; choose one of {sorted(WIDTHS)}"
        )
    opts = dict(spec.model.options or {})
    width = int(opts.pop("width", WIDTHS[preset]))
    if opts:
        raise ValueError(f"spec.model.options {sorted(opts)} unknown for {kind}; known: ['width']")
    torch.manual_seed(spec.optimizer.seed)
    model: nn.Module = CNN(width) if kind == "cnn" else MLP(width)
    dataset = Digits()
    n_params = sum(p.numel() for p in model.parameters())
    flops = 6.0 * n_params if kind == "mlp" else None  # dense layers only: 2 N forward + 4 N backward
    return TrainTask(
        model=model,
        dataset=dataset,
        loss_fn=F.cross_entropy,
        parallelize=None,
        split_pipeline=None,
        flops_per_sample=flops,
        example_input=dataset[0][0].unsqueeze(0),
        name=f"{kind}-{preset}",
        params={"model.width": width, "model.parameters": n_params},
    )
