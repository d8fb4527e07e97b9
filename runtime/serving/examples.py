"""Small reference models for tests, benchmarks and demos (importable, so pickled MLflow models of them load
in any process), and a helper that logs and registers one with MLflow's PyTorch flavour."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 64, d_out: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """A CIFAR-sized CNN: 3x32x32 → 10 classes."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # type: ignore[no-any-return]


class TokenTagger(nn.Module):
    """Per-token model with a variable sequence length: (B, T) int64 ids → (B, T, tags) and (B, T) argmax."""

    def __init__(self, vocab: int = 100, dim: int = 16, tags: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, tags)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(torch.relu(self.emb(ids)))
        return logits, logits.argmax(-1)


class Sleepy(nn.Module):
    """Doubles its input after sleeping: a slow model for back-pressure and drain tests."""

    def __init__(self, seconds: float = 0.3) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x * 2


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.down(x))


class ResNet50(nn.Module):
    """ResNet-50 in plain torch (random weights): 3x224x224 → 1000 logits."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers: list[nn.Module] = []
        c_in = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(c_in, width, stride if i == 0 else 1))
                c_in = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))  # type: ignore[no-any-return]


class BertEncoder(nn.Module):
    """BERT-base-like encoder in plain torch (random weights): (B, T) int64 ids → (B, hidden)."""

    def __init__(
        self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12, max_len: int = 512
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, activation="gelu", batch_first=True, norm_first=False, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = nn.Linear(hidden, hidden)
        self.scale = 1 / math.sqrt(hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.norm(self.tok(ids) + self.pos(pos)))
        return torch.tanh(self.pool(h[:, 0]))


def log_and_register(
    model: nn.Module,
    example: torch.Tensor,
    name: str,
    alias: str | None = None,
    serialization: str | None = None,
) -> Any:
    """Log `model` with MLflow's PyTorch flavour (artifact `model`, tensor signature) and register it.

    `serialization`: None (MLflow's default, "pt2": torch.export) or "pickle".
    Returns the ModelVersion. Uses whatever tracking/registry URI MLflow is configured with.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model.eval()
    with torch.no_grad():
        out = model(example)
    out_np: Any = (
        {f"output__{i}": o.numpy() for i, o in enumerate(out)} if isinstance(out, tuple) else out.numpy()
    )
    signature = infer_signature(example.numpy(), out_np)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example.numpy(),
            registered_model_name=name,
            serialization_format=serialization,
        )
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, str(info.registered_model_version))
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return mv
