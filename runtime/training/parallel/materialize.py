"""Models built on the meta device: no rank ever holds the whole model.

A task whose model is built under ``torch.device("meta")`` (the built-in llama) has no storage until it is
parallelized: tensor parallelism and FSDP2 shard the meta parameters, then ``materialize`` gives each rank
storage for its own shards alone and fills them from the task's ``init_weights(name, shape, device)``,
which returns a parameter's or buffer's full value (made on the rank's device, or moved there), one tensor
at a time. A rank's peak is its shards plus the largest single tensor, not the model: a plain build holds
the full model on every rank before sharding (an 8b llama: ~32 GB of host memory per process). The full
value depends on the name and shape alone, so every layout starts from the same weights (the equivalence
tests compare layouts against one process).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

InitFn = Callable[[str, torch.Size, torch.device], torch.Tensor]

# what wrappers add to a parameter's name: activation checkpointing, torch.compile, DDP
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical(name: str) -> str:
    """A parameter's name as the unwrapped model has it."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name.removeprefix("module.")


def on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``, except for a module on the meta device, which stays there (materialize)."""
    return module if on_meta(module) else module.to(device)


def materialize(module: nn.Module, device: torch.device, init: InitFn | None) -> None:
    """Give a (possibly parallelized) module on the meta device storage on ``device`` and fill it: each
    parameter and buffer gets ``init(name, full shape, device)``, of which a sharded one (DTensor) keeps its
    own shards. Nothing happens to a module with no meta tensors."""
    if not on_meta(module):
        return
    if init is None:
        raise ValueError(
            "the task's model is on the meta device but the task has no init_weights to fill it: set "
            "TrainTask.init_weights, or build the model on the CPU"
        )
    module.to_empty(device=device)
    with torch.no_grad():
        for wrapped, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            name = canonical(wrapped)
            full = init(name, t.shape, device)
            if tuple(full.shape) != tuple(t.shape):
                raise ValueError(
                    f"init_weights({name!r}) gave shape {tuple(full.shape)}, expected {tuple(t.shape)}"
                )
            full = full.to(device=device, dtype=t.dtype)
            if isinstance(t, DTensor):
                # every rank holds the same full value: each keeps its part, no communication
                local = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(local.to_local())
            else:
                t.copy_(full)
