"""ParallelDims: the process layout of a job, validated on CPU before any process group exists.

Mesh dimensions follow torchtitan's order, outermost first: ``pp, dp_replicate, dp_shard, tp``.
Their product is the world size. Every error names the spec field to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crds.trainingjob import INTERLEAVED_SCHEDULES, MULTI_STAGE_SCHEDULES, V_SCHEDULES, TrainingJobSpec

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


class LayoutError(ValueError):
    """The parallel layout cannot run at this world size; the message says what to change."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    data_mode: str  # fsdp | ddp | hsdp
    schedule: str  # a crds.trainingjob.PipelineSchedule value
    stages_per_rank: int
    micro_batches: int
    global_batch: int
    sequence_parallel: bool = False  # activations split along the sequence over the tp ranks too

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def local_batch(self) -> int:
        """Samples each data-parallel rank processes per step."""
        return self.global_batch // self.dp

    @property
    def micro_batch(self) -> int:
        return self.local_batch // self.micro_batches

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_enabled and self.data_mode in ("fsdp", "hsdp")

    def describe(self) -> str:
        return (
            f"world {self.world_size} = pp {self.pp}"
            + (f" ({self.schedule}, {self.stages_per_rank} stages a rank)" if self.pp > 1 else "")
            + f" x dp {self.dp} ({self.data_mode}"
            + (f", {self.dp_replicate} replicas x {self.dp_shard} shards" if self.data_mode == "hsdp" else "")
            + f") x tp {self.tp}"
            + (" (sequence parallel)" if self.sequence_parallel else "")
            + f"; global batch {self.global_batch} = {self.dp} x {self.micro_batches} "
            f"micro-batches of {self.micro_batch}"
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def resolve(spec: TrainingJobSpec, world_size: int) -> ParallelDims:
    """The layout of ``spec`` at ``world_size`` processes, or a LayoutError saying what to change."""
    par = spec.parallelism
    if world_size < 1:
        raise LayoutError(f"world size must be at least 1, got {world_size}")
    tp, pp = par.tensor, par.pipeline
    if world_size % (tp * pp):
        raise LayoutError(
            f"world size {world_size} (nodes x processesPerNode) is not divisible by parallelism.tensor "
            f"({tp}) x parallelism.pipeline ({pp}) = {tp * pp}; change tensor/pipeline or the number of "
            f"processes"
        )
    data = world_size // (tp * pp) if par.data == -1 else par.data
    if data * tp * pp != world_size:
        raise LayoutError(
            f"parallelism.data ({data}) x tensor ({tp}) x pipeline ({pp}) = {data * tp * pp} must equal "
            f"the world "
            f"size {world_size}; set parallelism.data to {world_size // (tp * pp)} or to -1 (use the "
            f"leftover ranks)"
        )
    mode = str(par.data_mode)
    if mode != "hsdp" and par.data_replicate != 1:
        raise LayoutError(
            "parallelism.dataReplicate applies to dataMode hsdp only; set it to 1 or dataMode: hsdp"
        )
    if mode == "hsdp":
        if data % par.data_replicate:
            raise LayoutError(
                f"dataMode hsdp: the data degree {data} is not a multiple of parallelism.dataReplicate "
                f"({par.data_replicate}); choose a divisor of {data}"
            )
        dp_replicate, dp_shard = par.data_replicate, data // par.data_replicate
    elif mode == "ddp":
        dp_replicate, dp_shard = data, 1
    else:
        dp_replicate, dp_shard = 1, data
    if mode == "ddp" and tp > 1:
        raise LayoutError(
            "dataMode ddp cannot be combined with tensor parallelism (DDP does not handle DTensor "
            "parameters); "
            "use dataMode fsdp or hsdp, or set parallelism.tensor: 1"
        )
    schedule = str(par.pipeline_schedule)
    spr = par.stages_per_rank
    interleaved = schedule in INTERLEAVED_SCHEDULES
    if interleaved and spr < 2:
        raise LayoutError(f"pipelineSchedule {schedule} needs parallelism.stagesPerRank of 2 or more")
    if schedule in V_SCHEDULES and spr != 2:
        raise LayoutError(f"pipelineSchedule {schedule} needs parallelism.stagesPerRank: 2 (its V)")
    if schedule not in MULTI_STAGE_SCHEDULES and spr != 1:
        raise LayoutError(
            f"pipelineSchedule {schedule} runs one stage per rank; set stagesPerRank: 1 or "
            f"pipelineSchedule: one of {', '.join(sorted(MULTI_STAGE_SCHEDULES))}"
        )
    mb = par.micro_batches
    if pp > 1 and schedule == "DualPipeV" and mb < 2 * pp:
        raise LayoutError(
            f"pipelineSchedule DualPipeV needs parallelism.microBatches ({mb}) of at least 2 x "
            f"parallelism.pipeline ({2 * pp}, its stages); set microBatches to {2 * pp} or more"
        )
    if pp > 1:
        from runtime.training.parallel.pipeline import missing_schedule  # torch's pipelining: only here

        if why := missing_schedule(schedule):
            raise LayoutError(why)
    if pp > 1 and mb < pp:
        raise LayoutError(
            f"parallelism.microBatches ({mb}) must be at least parallelism.pipeline ({pp}) or the "
            f"pipeline idles; "
            f"set microBatches to {pp} or more"
        )
    if pp > 1 and interleaved and mb % pp:
        raise LayoutError(
            f"{schedule} needs parallelism.microBatches ({mb}) to be a multiple of "
            f"parallelism.pipeline ({pp})"
        )
    gb = spec.optimizer.global_batch_size
    if gb % (data * mb):
        raise LayoutError(
            f"optimizer.globalBatchSize ({gb}) must be divisible by the data degree ({data}) x "
            f"parallelism.microBatches ({mb}) = {data * mb}; pick a multiple of {data * mb}"
        )
    comp = str(spec.gradient_compression)
    if comp == "powerSGD" and mode != "ddp":
        raise LayoutError(
            "gradientCompression powerSGD works with dataMode ddp only; use bf16/fp16 compression "
            "with fsdp/hsdp, or set dataMode: ddp"
        )
    if comp == "powerSGD" and str(spec.precision) != "fp32":
        raise LayoutError("gradientCompression powerSGD needs precision fp32 (its error feedback is fp32)")
    return ParallelDims(
        world_size=world_size,
        pp=pp,
        dp_replicate=dp_replicate,
        dp_shard=dp_shard,
        tp=tp,
        data_mode=mode,
        schedule=schedule,
        stages_per_rank=spr,
        micro_batches=mb,
        global_batch=gb,
        sequence_parallel=par.sequence_parallel and tp > 1,
    )


def validate_range(
    spec: TrainingJobSpec, min_nodes: int, max_nodes: int, nproc_per_node: int
) -> list[ParallelDims]:
    """Resolve the layout for every world size an elastic job can take; the first failure is raised."""
    out = []
    for nodes in range(min_nodes, max_nodes + 1):
        try:
            out.append(resolve(spec, nodes * nproc_per_node))
        except LayoutError as e:
            extra = f" (with {nodes} nodes x {nproc_per_node} processes" + (
                f", inside the elastic range {min_nodes}:{max_nodes})" if min_nodes != max_nodes else ")"
            )
            raise LayoutError(str(e) + extra) from None
    return out
