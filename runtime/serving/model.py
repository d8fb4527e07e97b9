"""A model being served: its signature, batcher and the truth about how it was compiled."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.serving.batching import Batcher
from runtime.serving.errors import NotFound, Unavailable
from runtime.serving.signature import Signature


@dataclass
class ServedModel:
    name: str
    version: str
    signature: Signature
    batcher: Batcher
    max_batch_size: int
    platform: str = "pytorch"
    info: dict[str, Any] = field(default_factory=dict)  # backend, mode, path, fallbacks, compile_seconds, ...
    ready: bool = False

    def check_version(self, version: str | None) -> None:
        if version is not None and version != self.version:
            raise NotFound(
                f"model {self.name!r} has no version {version!r}; serving version {self.version!r}"
            )

    def metadata(self) -> dict[str, Any]:
        """OIP model metadata, plus `parameters` telling how the model was compiled."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [s.to_json() for s in self.signature.inputs],
            "outputs": [s.to_json() for s in self.signature.outputs],
            "parameters": {"max_batch_size": self.max_batch_size, **self.info},
        }

    async def infer(self, inputs: list[torch.Tensor], rows: int) -> tuple[torch.Tensor, ...]:
        if not self.ready:
            self.batcher.withdraw()
            raise Unavailable(f"model {self.name!r} is not ready")
        fut = self.batcher.submit(inputs, rows, announced=True)
        return await asyncio.wrap_future(fut)


class Repository:
    """The models one server serves, by name."""

    def __init__(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}

    def get(self, name: str, version: str | None = None) -> ServedModel:
        try:
            model = self.models[name]
        except KeyError:
            raise NotFound(f"model {name!r} not found; serving {sorted(self.models)}") from None
        model.check_version(version)
        return model

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.models.values())
