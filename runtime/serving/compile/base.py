"""The interface every hardware backend implements, and what a compile produces."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from runtime.serving.compile.cache import CacheEntry
from runtime.serving.detect import Device, Hardware
from runtime.serving.signature import Signature

Runner = Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run here; the message names what is missing."""


@dataclass
class CompileRequest:
    module: torch.nn.Module  # eager, in eval mode, already on `device` and in the serving precision
    signature: Signature
    mode: str  # aot | jit | eager
    device: Device
    batch_sizes: tuple[int, ...]  # warm-up sizes: compiled and checked against eager
    max_batch_size: int
    cache: CacheEntry | None
    precision: torch.dtype | None = None  # float inputs are cast to it before the model


@dataclass
class Compiled:
    run: Runner  # tensors on the device → tuple of output tensors
    backend: str  # the backend that produced it (cpu, cuda, ...)
    mode: str  # aot | jit | eager: what actually runs
    path: str  # how, in words: "aotinductor package", "torch.compile(inductor, ...)", "eager"
    cache_hit: bool = False
    fallbacks: list[str] = field(default_factory=list)  # one line per fallback taken, with the reason
    batch_buckets: tuple[int, ...] | None = None  # pad batches up to these sizes (static shapes, CUDA graphs)
    details: dict[str, Any] = field(default_factory=dict)
    after_warmup: Callable[[], None] | None = None  # e.g. save torch.compile's cache once warm-up compiled


def eval_mode(m: torch.nn.Module) -> torch.nn.Module:
    """m.eval(), tolerating torch.export'ed modules (MLflow's "pt2" format), which refuse it and need none."""
    with contextlib.suppress(NotImplementedError):
        m.eval()
    return m


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    """Normalise a model's return value (tensor, tuple/list, dict) to a tuple of tensors."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise TypeError(
        f"the model returned {type(out).__name__}; serving needs a tensor, a tuple or a dict of tensors"
    )


def call_module(fn: Callable[..., Any]) -> Runner:
    def run(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return as_tuple(fn(*inputs))

    return run


class Backend(ABC):
    """One hardware family's compiler. `family` is the detect.py family whose device it runs on."""

    name: ClassVar[str]
    family: ClassVar[str]

    def missing(self, hw: Hardware) -> str | None:
        """Why this backend cannot run on `hw`, or None when it can."""
        if hw.usable(self.family):
            return None
        return hw.missing.get(self.family, f"no {self.family} device found")

    @abstractmethod
    def compile(self, req: CompileRequest) -> Compiled:
        """Compile (or load from req.cache) the module; fall back inside the family and record why."""
