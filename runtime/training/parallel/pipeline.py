"""Pipeline parallelism with torch.distributed.pipelining: the model is cut into stages by the task's split
function; each stage is then parallelized (TP -> AC -> compile -> FSDP) like a whole model (PP outermost)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining import schedules as _schedules

from crds.trainingjob import MULTI_STAGE_SCHEDULES, V_SCHEDULES
from runtime.training.parallel.materialize import to_device
from runtime.training.protocol import ParallelContext, ParallelizeFn, SplitFn

SCHEDULES: dict[str, Any] = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    # zero bubble: each backward split into its input and its weight gradients, the weights' run in the
    # bubbles the other schedules leave idle (Qi et al., 2023)
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
    # the same with two stages a rank placed in a V (Qi et al., 2023, section 6): the first rank holds the
    # first and the last stage, so each rank's two stages do equal work at either end of a micro-batch
    "ZBVZeroBubble": getattr(_schedules, "ScheduleZBVZeroBubble", None),
    # DeepSeek's DualPipe in a V: the same placement, one micro-batch's forward paired with another's
    # backward (an OVERLAP_F_B action, which torch runs one after the other unless a function that overlaps
    # them is registered with the schedule's register_custom_function: we register none)
    "DualPipeV": getattr(_schedules, "ScheduleDualPipeV", None),  # torch 2.9 and later
}


def missing_schedule(name: str) -> str | None:
    """Why this torch cannot run pipeline schedule `name`, or None if it can."""
    if name in SCHEDULES and SCHEDULES[name] is None:
        return (
            f"pipelineSchedule {name} is not in this torch ({torch.__version__}): upgrade torch, or use "
            "another pipelineSchedule"
        )
    return None


@dataclass
class Pipeline:
    schedule: Any
    parts: list[nn.Module]
    has_first: bool
    has_last: bool

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Run one step over all micro-batches; the per-micro-batch losses on the last stage, else []."""
        losses: list[torch.Tensor] = []
        if self.has_first and self.has_last:
            self.schedule.step(inputs, target=targets, losses=losses)
        elif self.has_first:
            self.schedule.step(inputs)
        elif self.has_last:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        return losses


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Looped assignment: rank r holds stages r, r + pp, r + 2 pp, ...; under a V schedule r and
    2 pp - 1 - r."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def build_pipeline(
    model: nn.Module,
    split: SplitFn,
    parallelize: ParallelizeFn,
    ctx: ParallelContext,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Pipeline:
    dims = ctx.dims
    pp_mesh = ctx.mesh["pp"]
    ids = stage_ids(pp_mesh.get_local_rank(), dims.pp, dims.stages_per_rank, dims.schedule)
    parts, stages = [], []
    for sid, part in zip(ids, split(model, ids, dims.num_stages), strict=True):
        part = parallelize(to_device(part, ctx.device), ctx)
        ctx.materialize(part)
        parts.append(part)
        stages.append(PipelineStage(part, sid, dims.num_stages, ctx.device, group=pp_mesh.get_group()))
    cls = SCHEDULES[dims.schedule]
    target = stages if dims.schedule in MULTI_STAGE_SCHEDULES else stages[0]
    schedule = cls(target, n_microbatches=dims.micro_batches, loss_fn=loss_fn, scale_grads=True)
    return Pipeline(schedule, parts, has_first=0 in ids, has_last=dims.num_stages - 1 in ids)
