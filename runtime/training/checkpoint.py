"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

``<path>/step-<N>/`` holds one checkpoint; it is complete once DCP has written its ``.metadata`` (the
coordinator
writes it last), so a save interrupted by a failure is never resumed from. Parameter names are layout-free
(FSDP / DDP / compile / activation-checkpoint wrappers are stripped by DCP's state-dict helpers and pipeline
stages keep global layer names), so DCP reshards on load: a checkpoint from one world size or layout loads
into another.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

log = logging.getLogger("kubeforge.checkpoint")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelState(Stateful):
    """The parameters of all model parts of this rank (several with interleaved pipeline stages)."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.parts:
            out.update(get_model_state_dict(p))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for p in self.parts:
            set_model_state_dict(p, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    """AdamW states keyed by parameter name (flattened), one optimizer per model part."""

    def __init__(self, parts: Sequence[nn.Module], optimizers: Sequence[Optimizer]) -> None:
        self.pairs = list(zip(parts, optimizers, strict=True))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m, o in self.pairs:
            out.update(get_optimizer_state_dict(m, o, options=_FLAT))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for m, o in self.pairs:
            set_optimizer_state_dict(m, o, state_dict, options=_FLAT)


@dataclass
class TrainState(Stateful):
    """Loop counters saved with the weights."""

    step: int = 0
    loss_scale: float = 1.0
    samples: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": torch.tensor(self.step),
            "loss_scale": torch.tensor(self.loss_scale, dtype=torch.float64),
            "samples": torch.tensor(self.samples),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.loss_scale = float(state_dict["loss_scale"])
        self.samples = int(state_dict["samples"])


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / ".metadata").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


@dataclass
class CheckpointManager:
    root: Path
    interval: int
    keep: int
    async_save: bool
    state: dict[str, Stateful]
    process_group: Any = None  # gloo group for async saves next to NCCL
    last_step: int | None = None
    last_path: str | None = None
    last_seconds: float = 0.0
    _pending: Future[Any] | None = field(default=None, repr=False)

    @property
    def is_writer(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint, the same on every rank (rank 0 decides)."""
        found = complete_checkpoints(self.root)
        choice: list[Any] = [found[-1] if found else None]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return choice[0]  # type: ignore[no-any-return]

    def resume(self) -> int:
        """Load the latest checkpoint if there is one; the step to continue from (0: fresh start)."""
        found = self.latest()
        if found is None:
            return 0
        step, path = found
        t0 = time.perf_counter()
        state_dict_loader.load(self.state, checkpoint_id=str(path), process_group=self.process_group)
        self.last_step, self.last_path = step, str(path)
        log.info("resumed from %s in %.2f s", path, time.perf_counter() - t0)
        return step

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def save(self, step: int, *, sync: bool = False) -> str:
        """Save ``step``; asynchronous when configured and ``sync`` is False."""
        self.wait()
        path = self.root / f"step-{step}"
        if self.is_writer:
            self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if self.async_save and not sync:
            self._pending = state_dict_saver.async_save(  # type: ignore[assignment]
                self.state, checkpoint_id=str(path), process_group=self.process_group
            )
        else:
            state_dict_saver.save(self.state, checkpoint_id=str(path), process_group=self.process_group)
            self._prune()
        self.last_seconds = time.perf_counter() - t0
        self.last_step, self.last_path = step, str(path)
        return str(path)

    def wait(self) -> None:
        """Wait for an asynchronous save in flight."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            self._prune()

    def _prune(self) -> None:
        if not self.is_writer:
            return
        found = complete_checkpoints(self.root)
        for _, d in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(d, ignore_errors=True)
        newest = found[-1][0] if found else -1
        for d in self.root.iterdir() if self.root.is_dir() else []:
            m = _STEP_DIR.match(d.name)
            if m and int(m.group(1)) < newest and not (d / ".metadata").is_file():
                shutil.rmtree(d, ignore_errors=True)  # left over by an interrupted save


def load_model_weights(model: nn.Module, path: str) -> None:
    """Load the weights of checkpoint ``path`` into a plain (unparallelized) model, in this process alone."""
    sd = model.state_dict()
    state_dict_loader.load({"model": sd}, checkpoint_id=path, no_dist=True)
    model.load_state_dict(sd)
