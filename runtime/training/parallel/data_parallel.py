"""Data parallelism (FSDP2 fully_shard, HSDP, DDP), gradient compression and activation checkpointing.

Gradient compression: with FSDP2 / HSDP it is the reduce dtype of the MixedPrecisionPolicy (gradients are
reduce-scattered in bf16 / fp16: half the bytes of fp32); with DDP it is a communication hook (fp16 / bf16
compress hooks, or PowerSGD's low-rank approximation with error feedback).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from runtime.training.protocol import ParallelContext

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def apply_ac(layers: nn.ModuleDict, mode: str) -> None:
    """Activation checkpointing per block: ``full`` wraps every block, ``selective`` every second one."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, (name, block) in enumerate(list(layers.items())):
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def reduce_dtype(ctx: ParallelContext) -> torch.dtype | None:
    if ctx.compression in _DTYPES:
        return _DTYPES[ctx.compression]
    return torch.float32 if ctx.param_dtype is not None else None


def apply_data_parallel(model: nn.Module, ctx: ParallelContext, units: Sequence[nn.Module]) -> nn.Module:
    """Shard (FSDP2: each of ``units``, then the root) or replicate (DDP) ``model`` over the data mesh.
    Nothing is applied when the data degree is 1 (mixed precision then comes from autocast)."""
    dims = ctx.dims
    if not dims.dp_enabled:
        return model
    if dims.data_mode in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = ctx.mesh["dp_replicate", "dp_shard"] if dims.data_mode == "hsdp" else ctx.mesh["dp_shard"]
        mp = MixedPrecisionPolicy(param_dtype=ctx.param_dtype, reduce_dtype=reduce_dtype(ctx))
        reshard = not dims.pp_enabled  # pipeline schedules run several micro-batches per unshard
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ctx.materialize(model)  # DDP broadcasts rank 0's weights as it starts: they must exist
    group = ctx.mesh["dp_replicate"].get_group()
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, process_group=group, device_ids=ids, broadcast_buffers=False)
    hook, state = comm_hook(ctx, group)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    return ddp


def comm_hook(ctx: ParallelContext, group: Any) -> tuple[Any, Any]:
    """The DDP communication hook of ``ctx.compression`` and its state (None: DDP's built-in all-reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if ctx.compression == "fp16":
        return default_hooks.fp16_compress_hook, group
    if ctx.compression == "bf16":
        return default_hooks.bf16_compress_hook, group
    if ctx.compression == "powerSGD":
        state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=ctx.power_sgd_rank,
            start_powerSGD_iter=2,
            min_compression_rate=1.0,
            use_error_feedback=True,
            warm_start=True,
        )
        return powerSGD_hook.powerSGD_hook, state
    return None, None


def default_parallelize(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """For models without their own parallelize: torch.compile (when asked), then data parallelism."""
    if ctx.compile:
        model.compile()
    return apply_data_parallel(model, ctx, units=[])
