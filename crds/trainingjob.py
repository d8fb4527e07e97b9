"""TrainingJob: elastic, 3D-parallel PyTorch training on pods."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from crds.common import (
    ALIASES_CEL,
    ALIASES_MESSAGE,
    CONDITIONS_LIST,
    Accelerator,
    AliasName,
    Condition,
    KubeModel,
    Resources,
    Rule,
    aliases_ok,
    image_field,
    name_rule,
    object_errors,
    transition_errors,
)


class BuiltinModel(StrEnum):
    llama = "llama"
    cnn = "cnn"
    mlp = "mlp"


LLAMA_PRESETS = ("tiny", "small", "125m", "1b", "3b", "8b")
SMALL_PRESETS = ("tiny", "small")


class ModelSpec(KubeModel):
    """What to train: a built-in model, or the user's own entry point. Exactly one of builtin or
    entrypoint."""

    builtin: BuiltinModel | None = Field(
        default=None,
        description="A built-in model: llama (Llama-style decoder with tensor-parallel plan and "
        "pipeline split), "
        "cnn (convolutional image classifier) or mlp (MLP classifier).",
    )
    preset: str = Field(
        default="tiny",
        max_length=32,
        description="Size preset of the built-in model: for llama tiny, small, 125m, 1b, 3b, 8b; "
        "for cnn and mlp tiny or small.",
    )
    options: dict[str, int | float | str | bool] | None = Field(
        default=None,
        max_length=64,
        description="Overrides of the preset's hyper-parameters, e.g. {dim: 512, layers: 8}. "
        "Values are numbers, strings or booleans.",
    )
    entrypoint: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="The user's own code as 'package.module:function'. The function returns a "
        "runtime.training.protocol.TrainTask (model, datasets, loss); see docs/training.md.",
    )

    x_rules = (
        Rule(
            cel="has(self.builtin) != has(self.entrypoint)",
            message="model: set exactly one of model.builtin (a built-in model: llama, cnn, mlp) "
            "or model.entrypoint (your own code as 'package.module:function')",
            check=lambda m: (m.builtin is None) != (m.entrypoint is None),
        ),
        Rule(
            cel="!has(self.builtin) || (self.builtin == 'llama' ? self.preset in "
            + repr(list(LLAMA_PRESETS))
            + " : self.preset in "
            + repr(list(SMALL_PRESETS))
            + ")",
            message="model.preset must be tiny, small, 125m, 1b, 3b or 8b for llama and tiny or small "
            "for cnn and mlp: pick one of those presets",
            check=lambda m: (
                m.builtin is None or m.preset in (LLAMA_PRESETS if m.builtin == "llama" else SMALL_PRESETS)
            ),
            field_path=".preset",
        ),
    )


class BuiltinDataset(StrEnum):
    synthetic_tokens = "synthetic-tokens"
    text_file = "text-file"
    digits = "digits"


class DataSpec(KubeModel):
    """Training data. Ignored when model.entrypoint brings its own."""

    builtin: BuiltinDataset = Field(
        default=BuiltinDataset.synthetic_tokens,
        description="synthetic-tokens (random tokens with a learnable pattern), text-file (a local text file "
        "tokenized at the byte level; set path) or digits (scikit-learn's bundled 8x8 digit images).",
    )
    path: str | None = Field(default=None, max_length=4096, description="File to read, for text-file.")
    sequence_length: int = Field(
        default=256, ge=8, le=131072, description="Tokens per sample (token datasets)."
    )
    vocab_size: int = Field(default=256, ge=2, le=1048576, description="Vocabulary size of synthetic-tokens.")
    num_workers: int = Field(default=0, ge=0, le=64, description="DataLoader worker processes per rank.")

    x_rules = (
        Rule(
            cel="self.builtin != 'text-file' || has(self.path)",
            message="data.path is required when data.builtin is text-file: set data.path to the text file",
            check=lambda m: m.builtin != "text-file" or m.path is not None,
            field_path=".path",
            reason="FieldValueRequired",
        ),
    )


class OptimizerSpec(KubeModel):
    """The optimisation loop."""

    steps: int = Field(default=100, ge=1, le=100_000_000, description="Total optimizer steps.")
    global_batch_size: int = Field(
        default=8,
        ge=1,
        description="Samples per step over all data-parallel ranks (split into micro-batches).",
    )
    learning_rate: float = Field(default=3e-4, gt=0, le=10, description="Peak learning rate of AdamW.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps before cosine decay.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    grad_clip_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the global gradient norm to this value; null disables clipping."
    )
    seed: int = Field(
        default=0, ge=0, description="Seed for weights and data order (identical on every layout)."
    )

    x_rules = (
        Rule(
            cel="self.warmupSteps <= self.steps",
            message="optimizer.warmupSteps must not exceed optimizer.steps: lower warmupSteps or raise steps",
            check=lambda m: m.warmup_steps <= m.steps,
            field_path=".warmupSteps",
        ),
    )


class DataParallelMode(StrEnum):
    fsdp = "fsdp"
    ddp = "ddp"
    hsdp = "hsdp"


class PipelineSchedule(StrEnum):
    gpipe = "GPipe"
    one_f_one_b = "1F1B"
    interleaved_1f1b = "Interleaved1F1B"
    interleaved_zero_bubble = "InterleavedZeroBubble"
    zbv_zero_bubble = "ZBVZeroBubble"
    dual_pipe_v = "DualPipeV"


# the schedules that run several stages per rank (looped: rank r holds stages r, r + pp, ...)
INTERLEAVED_SCHEDULES = frozenset({"Interleaved1F1B", "InterleavedZeroBubble"})
# the V-shaped ones: exactly two stages per rank, rank r holding stages r and 2 pp - 1 - r (the first rank
# holds the first and the last stage, so the loss is computed where the inputs enter)
V_SCHEDULES = frozenset({"ZBVZeroBubble", "DualPipeV"})
MULTI_STAGE_SCHEDULES = INTERLEAVED_SCHEDULES | V_SCHEDULES
# the schedules that split each backward into input and weight gradients (zero bubble)
SPLIT_BACKWARD_SCHEDULES = frozenset({"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"})


def _cel_list(names: frozenset[str]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in sorted(names)) + "]"


def _prose(names: frozenset[str]) -> str:
    *most, last = sorted(names)
    return f"{', '.join(most)} or {last}"


class ParallelismSpec(KubeModel):
    """How the processes are laid out: data x tensor x pipeline (torchtitan's order: pp, dp, tp)."""

    data: int = Field(
        default=-1,
        ge=-1,
        description="Data-parallel degree; -1 takes the ranks left over by tensor and pipeline (required "
        "for elastic jobs, whose world size changes).",
    )
    data_mode: DataParallelMode = Field(
        default=DataParallelMode.fsdp,
        description="fsdp (FSDP2 fully_shard, ZeRO-3 memory saving), ddp (replicated) or hsdp (replicate "
        "across dataReplicate groups, shard within).",
    )
    data_replicate: int = Field(
        default=1, ge=1, description="For hsdp: number of replica groups; data must be a multiple of it."
    )
    tensor: int = Field(default=1, ge=1, le=64, description="Tensor-parallel degree (DTensor plans).")
    sequence_parallel: bool = Field(
        default=False,
        description="With tensor > 1: split the activations between the tensor-parallel layers along the "
        "sequence too (Megatron's sequence parallelism): norms and residuals hold 1/tensor of the tokens "
        "per rank. data.sequenceLength must be a multiple of tensor.",
    )
    pipeline: int = Field(default=1, ge=1, le=64, description="Pipeline-parallel degree (stages).")
    pipeline_schedule: PipelineSchedule = Field(
        default=PipelineSchedule.one_f_one_b,
        description="GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble or DualPipeV "
        "(zero bubble: weight gradients computed in the pipeline's idle slots; ZBVZeroBubble and DualPipeV: "
        "two stages a rank placed in a V, rank r holding stages r and 2 x pipeline - 1 - r; DualPipeV "
        "(DeepSeek's) also pairs one micro-batch's forward with another's backward, and needs microBatches "
        "of at least 2 x pipeline).",
    )
    stages_per_rank: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Pipeline stages per rank; the interleaved schedules need 2 or more, the V-shaped ones "
        "(ZBVZeroBubble, DualPipeV) exactly 2.",
    )
    micro_batches: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Micro-batches per step (pipeline: at least the pipeline degree).",
    )

    x_rules = (
        Rule(
            cel=f"!(self.pipelineSchedule in {_cel_list(INTERLEAVED_SCHEDULES)}) || self.stagesPerRank >= 2",
            message="parallelism.stagesPerRank must be at least 2 for pipelineSchedule "
            f"{_prose(INTERLEAVED_SCHEDULES)}: set stagesPerRank to 2 or more, or use 1F1B",
            check=lambda m: m.pipeline_schedule not in INTERLEAVED_SCHEDULES or m.stages_per_rank >= 2,
            field_path=".stagesPerRank",
        ),
        Rule(
            cel=f"!(self.pipelineSchedule in {_cel_list(V_SCHEDULES)}) || self.stagesPerRank == 2",
            message="parallelism.stagesPerRank must be 2 for pipelineSchedule "
            f"{_prose(V_SCHEDULES)} (their V places two stages on each rank): set stagesPerRank to 2",
            check=lambda m: m.pipeline_schedule not in V_SCHEDULES or m.stages_per_rank == 2,
            field_path=".stagesPerRank",
        ),
        Rule(
            cel=f"self.stagesPerRank == 1 || self.pipelineSchedule in {_cel_list(MULTI_STAGE_SCHEDULES)}",
            message="parallelism.stagesPerRank above 1 needs pipelineSchedule "
            f"{_prose(MULTI_STAGE_SCHEDULES)}: set pipelineSchedule to one of them or stagesPerRank to 1",
            check=lambda m: m.stages_per_rank == 1 or m.pipeline_schedule in MULTI_STAGE_SCHEDULES,
            field_path=".stagesPerRank",
        ),
        Rule(
            cel="self.pipelineSchedule != 'DualPipeV' || self.microBatches >= 2 * self.pipeline",
            message="parallelism.microBatches must be at least 2 x parallelism.pipeline (the stages) for "
            "pipelineSchedule DualPipeV: raise microBatches, or use ZBVZeroBubble",
            check=lambda m: m.pipeline_schedule != "DualPipeV" or m.micro_batches >= 2 * m.pipeline,
            field_path=".microBatches",
        ),
        Rule(
            cel="self.pipeline == 1 || self.microBatches >= self.pipeline",
            message="parallelism.microBatches must be at least parallelism.pipeline when pipeline > 1 "
            "(every stage needs work): raise microBatches",
            check=lambda m: m.pipeline == 1 or m.micro_batches >= m.pipeline,
            field_path=".microBatches",
        ),
        Rule(
            cel="!self.sequenceParallel || self.tensor > 1",
            message="parallelism.sequenceParallel splits what tensor parallelism replicates: set "
            "parallelism.tensor to 2 or more, or sequenceParallel to false",
            check=lambda m: not m.sequence_parallel or m.tensor > 1,
            field_path=".sequenceParallel",
        ),
        Rule(
            cel="self.dataReplicate == 1 || self.dataMode == 'hsdp'",
            message="parallelism.dataReplicate above 1 needs dataMode hsdp: set dataMode to hsdp or "
            "dataReplicate to 1",
            check=lambda m: m.data_replicate == 1 or m.data_mode == "hsdp",
            field_path=".dataReplicate",
        ),
        Rule(
            cel="self.data == -1 || self.data >= 1",
            message="parallelism.data must not be 0: set it to -1 (use the ranks left over) or a degree "
            "of 1 or more",
            check=lambda m: m.data == -1 or m.data >= 1,
            field_path=".data",
        ),
        Rule(
            cel="self.data < 1 || self.data % self.dataReplicate == 0",
            message="parallelism.data must be a multiple of parallelism.dataReplicate: change either, "
            "or set data to -1",
            check=lambda m: m.data < 1 or m.data % m.data_replicate == 0,
            field_path=".data",
        ),
    )


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class GradientCompression(StrEnum):
    none = "none"
    fp16 = "fp16"
    bf16 = "bf16"
    powersgd = "powerSGD"


class ActivationCheckpointing(StrEnum):
    none = "none"
    full = "full"
    selective = "selective"


class CheckpointSpec(KubeModel):
    """Distributed checkpoints (torch.distributed.checkpoint), resumed automatically on start."""

    interval_steps: int = Field(
        default=100,
        ge=1,
        description="Save every N steps (and on SIGTERM). Bounds the work lost to a failure.",
    )
    path: str = Field(
        default="/checkpoints",
        max_length=4096,
        description="Directory (in the pod) that holds step-N folders.",
    )
    keep: int = Field(
        default=3, ge=1, le=1000, description="Keep the latest K checkpoints, delete older ones."
    )
    async_save: bool = Field(default=False, description="Save in the background while training continues.")
    claim_name: str | None = Field(
        default=None,
        max_length=253,
        description="PersistentVolumeClaim mounted at path (ReadWriteMany for multi-node jobs). "
        "Unset: an emptyDir, which survives container restarts but not pod rescheduling.",
    )


class NodesSpec(KubeModel):
    """Pods (nodes) of the job. min < max makes the job elastic (torchrun --nnodes min:max)."""

    count: int = Field(default=1, ge=1, le=4096, description="Desired nodes; `kubectl scale` changes it.")
    min: int | None = Field(
        default=None, ge=1, le=4096, description="Fewest nodes to run with; default count."
    )
    max: int | None = Field(default=None, ge=1, le=4096, description="Most nodes to scale to; default count.")

    x_rules = (
        Rule(
            cel="!has(self.min) || self.min <= self.count",
            message="nodes.min must be at most nodes.count: lower nodes.min or raise nodes.count",
            check=lambda m: m.min is None or m.min <= m.count,
            field_path=".min",
        ),
        Rule(
            cel="!has(self.max) || self.count <= self.max",
            message="nodes.count must be at most nodes.max: lower nodes.count (kubectl scale --replicas) "
            "or raise nodes.max",
            check=lambda m: m.max is None or m.count <= m.max,
            field_path=".count",
        ),
    )

    @property
    def elastic(self) -> bool:
        """min < max: the world size may change while the job runs."""
        return (self.min or self.count) < (self.max or self.count)


class FailurePolicy(KubeModel):
    """When a failed pod is retried."""

    max_restarts: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Restart budget: group re-formations (and pod retries) before the job fails.",
    )
    retryable_exit_codes: list[Annotated[int, Field(ge=1, le=255)]] = Field(
        default_factory=lambda: [130, 137, 143],
        max_length=255,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Exit codes that are retried within the budget (default: SIGINT, SIGKILL/OOM, SIGTERM). "
        "Any other non-zero exit code fails the job at once.",
    )


class CleanPodPolicy(StrEnum):
    all = "All"
    running = "Running"
    none = "None"


class SchedulingSpec(KubeModel):
    """Queueing and gang scheduling."""

    queue_name: str | None = Field(
        default=None, max_length=63, description="Kueue LocalQueue; the job stays suspended until admitted."
    )
    gang: bool = Field(
        default=False,
        description="Create a PodGroup (scheduler-plugins coscheduling) so all minimum nodes start together.",
    )
    schedule_timeout_seconds: int = Field(
        default=300, ge=1, description="How long a scale-up waits for its new pods before carrying on."
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the pods."
    )


class RegisterSpec(KubeModel):
    """Register the trained model on success (creates a ModelVersion)."""

    model_name: str = Field(max_length=256, min_length=1, description="Registered model name in MLflow.")
    aliases: list[AliasName] = Field(
        default_factory=list,
        max_length=10,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Aliases to set, e.g. [staging].",
    )
    tags: dict[str, str] | None = Field(
        default=None, max_length=64, description="Tags of the registered version."
    )

    x_rules = (
        Rule(
            cel=ALIASES_CEL,
            message=ALIASES_MESSAGE,
            check=lambda m: aliases_ok(m.aliases),
            field_path=".aliases",
        ),
    )


class MlflowSpec(KubeModel):
    """Where runs are tracked."""

    tracking_uri: str | None = Field(
        default=None, max_length=2048, description="MLflow tracking URI; default the operator's."
    )
    experiment: str | None = Field(
        default=None, max_length=256, description="Experiment; default the namespace."
    )


class ProfilingSpec(KubeModel):
    """A torch.profiler window recorded as MLflow artifacts."""

    start_step: int = Field(default=5, ge=0, description="First profiled step.")
    steps: int = Field(default=3, ge=1, le=100, description="Number of profiled steps.")


_TP_PP = "self.parallelism.tensor * self.parallelism.pipeline"
_WORLD = "self.nodes.count * self.processesPerNode"
_ELASTIC = (
    "(has(self.nodes.min) ? self.nodes.min : self.nodes.count) < "
    "(has(self.nodes.max) ? self.nodes.max : self.nodes.count)"
)
RESERVED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_RDZV_ENDPOINT",
    "PET_RDZV_BACKEND",
    "PET_RDZV_ID",
    "PET_MAX_RESTARTS",
)


class TrainingJobSpec(KubeModel):
    """Desired state of a TrainingJob."""

    image: str = image_field()
    model: ModelSpec = Field(description="What to train.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data for built-in models.")
    optimizer: OptimizerSpec = Field(
        default_factory=OptimizerSpec, description="Steps, batch, learning rate."
    )
    nodes: NodesSpec = Field(default_factory=NodesSpec, description="Pods and elastic range.")
    processes_per_node: int = Field(default=1, ge=1, le=64, description="Worker processes per pod.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Process layout.")
    precision: Precision = Field(
        default=Precision.fp32, description="fp32, bf16 or fp16 (with loss scaling)."
    )
    gradient_compression: GradientCompression = Field(
        default=GradientCompression.none,
        description=(
            "Compress data-parallel gradients: fp16/bf16 halve the bytes; powerSGD needs dataMode ddp."
        ),
    )
    power_sgd_rank: int = Field(default=1, ge=1, le=64, description="Rank of PowerSGD's approximation.")
    activation_checkpointing: ActivationCheckpointing = Field(
        default=ActivationCheckpointing.none,
        description="Recompute activations in backward: none, full, selective.",
    )
    compile: bool = Field(default=False, description="torch.compile each block.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Distributed checkpoints.")
    resources: Resources | None = Field(default=None, description="CPU and memory per pod.")
    accelerator: Accelerator = Field(default_factory=Accelerator, description="Accelerators per pod.")
    shm_size: str = Field(default="1Gi", max_length=32, description="Size of /dev/shm for data loaders.")
    env: dict[str, str] | None = Field(
        default=None, max_length=128, description="Extra environment variables of the workers."
    )
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="Retries and budget.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job when it runs longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the job's pods this long after it finishes (the TrainingJob stays).",
    )
    clean_pod_policy: CleanPodPolicy = Field(
        default=CleanPodPolicy.running,
        description="Which pods to delete when the job finishes: All, Running (still running ones) or None.",
    )
    suspend: bool = Field(
        default=False, description="Suspend: delete running pods, keep checkpoints; resume later."
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="Queueing and gang scheduling."
    )
    registration: RegisterSpec | None = Field(
        default=None, alias="register", description="Register the trained model on success."
    )
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec, description="Experiment tracking.")
    profiling: ProfilingSpec | None = Field(default=None, description="Record a profiler trace.")

    x_rules = (
        Rule(
            cel=f"self.parallelism.data == -1 || self.parallelism.data * {_TP_PP} == {_WORLD}",
            message="parallelism.data * parallelism.tensor * parallelism.pipeline must equal "
            "nodes.count * processesPerNode (the world size): fix the degrees, or set parallelism.data "
            "to -1 to use the ranks left over",
            check=lambda m: (
                m.parallelism.data == -1
                or m.parallelism.data * m.parallelism.tensor * m.parallelism.pipeline
                == m.nodes.count * m.processes_per_node
            ),
            field_path=".parallelism.data",
        ),
        Rule(
            cel=f"{_WORLD} % ({_TP_PP}) == 0",
            message="parallelism.tensor * parallelism.pipeline must divide nodes.count * processesPerNode "
            "(the world size): change processesPerNode, nodes.count or the degrees",
            check=lambda m: (
                (m.nodes.count * m.processes_per_node) % (m.parallelism.tensor * m.parallelism.pipeline) == 0
            ),
            field_path=".parallelism",
        ),
        Rule(
            cel=f"!({_ELASTIC}) || self.parallelism.data == -1",
            message="parallelism.data must be -1 for an elastic job (nodes.min < nodes.max), whose world "
            "size changes: set parallelism.data to -1, or make nodes.min equal nodes.max",
            check=lambda m: not m.nodes.elastic or m.parallelism.data == -1,
            field_path=".parallelism.data",
        ),
        Rule(
            cel=f"!({_ELASTIC}) || self.processesPerNode % ({_TP_PP}) == 0",
            message="processesPerNode must be a multiple of parallelism.tensor * parallelism.pipeline for "
            "an elastic job (nodes.min < nodes.max), so that every node count holds whole model replicas: "
            "change processesPerNode or the degrees",
            check=lambda m: (
                not m.nodes.elastic
                or m.processes_per_node % (m.parallelism.tensor * m.parallelism.pipeline) == 0
            ),
            field_path=".processesPerNode",
        ),
        Rule(
            cel="self.gradientCompression != 'powerSGD' || self.parallelism.dataMode == 'ddp'",
            message="gradientCompression powerSGD requires parallelism.dataMode ddp: set "
            "parallelism.dataMode "
            "to ddp, or choose gradientCompression fp16, bf16 or none",
            check=lambda m: m.gradient_compression != "powerSGD" or m.parallelism.data_mode == "ddp",
            field_path=".gradientCompression",
        ),
        # zero bubble splits each backward into input and weight gradients; a compiled block's backward is
        # one graph, and under torch 2.15 the ranks fell out of step (rank 0 waited for a gradient, the others
        # exited 0): refused rather than left to fail that way
        Rule(
            cel="!self.compile || "
            f"!(self.parallelism.pipelineSchedule in {_cel_list(SPLIT_BACKWARD_SCHEDULES)})",
            message=f"pipelineSchedules {_prose(SPLIT_BACKWARD_SCHEDULES)} split each backward into "
            "input and weight gradients, which torch.compile'd blocks cannot do: set compile: false, or use "
            "pipelineSchedule Interleaved1F1B",
            check=lambda m: not m.compile or m.parallelism.pipeline_schedule not in SPLIT_BACKWARD_SCHEDULES,
            field_path=".compile",
        ),
        Rule(
            cel="!has(self.env) || !self.env.exists(k, k in " + repr(list(RESERVED_ENV)) + ")",
            message="env must not set variables the operator owns (MASTER_ADDR, MASTER_PORT, "
            "WORLD_SIZE, RANK, "
            "LOCAL_RANK, NODE_RANK and PET_*): remove them from env; use nodes and processesPerNode instead",
            check=lambda m: not (m.env and any(k in RESERVED_ENV for k in m.env)),
            field_path=".env",
        ),
    )


class TrainingJobPhase(StrEnum):
    pending = "Pending"
    running = "Running"
    restarting = "Restarting"
    scaling = "Scaling"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


class TrainingJobStatus(KubeModel):
    """Observed state of a TrainingJob, written by the operator only."""

    phase: TrainingJobPhase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra=CONDITIONS_LIST,
        description="Created, Running, Restarting, Scaling, Suspended, Complete, Failed.",
    )
    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    nodes_desired: int | None = Field(default=None, description="Nodes the spec asks for.")
    nodes_ready: int | None = Field(default=None, description="Nodes running now.")
    world_size: int | None = Field(default=None, description="Processes in the current group.")
    current_step: int | None = Field(default=None, description="Last step the runtime reported.")
    total_steps: int | None = Field(default=None, description="Steps to train.")
    progress: str | None = Field(default=None, description="current/total as text, for printer columns.")
    loss: float | None = Field(default=None, description="Last reported training loss.")
    last_checkpoint: str | None = Field(default=None, description="Path of the last completed checkpoint.")
    last_checkpoint_step: int | None = Field(default=None, description="Step of the last checkpoint.")
    mlflow_run_id: str | None = Field(default=None, description="MLflow run of this job.")
    mlflow_run_url: str | None = Field(default=None, description="Link to the run in MLflow's UI.")
    model_version: str | None = Field(default=None, description="ModelVersion created on success.")
    restarts: int | None = Field(default=None, description="Restarts used from the budget.")
    start_time: str | None = Field(default=None, description="When the job started running.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    message: str | None = Field(default=None, description="What the operator wants the user to know now.")
    nodes_target: int | None = Field(
        default=None,
        description="Nodes the operator runs the job at now: nodes.count, or fewer while a "
        "scale-up cannot be scheduled.",
    )
    scale_up_blocked_at: str | None = Field(
        default=None, description="When a scale-up was given up because its pods could not be scheduled."
    )
    scale_up_blocked_target: int | None = Field(
        default=None,
        description="The node count that could not be scheduled; retried when nodes.count "
        "changes or after four schedule timeouts.",
    )


_STARTED = "has(oldSelf.status) && has(oldSelf.status.phase) && oldSelf.status.phase != 'Pending'"
_RUNNING = (
    "has(oldSelf.status) && has(oldSelf.status.phase) && oldSelf.status.phase in ['Running', "
    "'Restarting', 'Scaling']"
)
RUNNING_PHASES = ("Running", "Restarting", "Scaling")


def _phase(obj: dict[str, Any]) -> str | None:
    phase = (obj.get("status") or {}).get("phase")
    return phase if isinstance(phase, str) else None


def _same(old: dict[str, Any], new: dict[str, Any], *path: str) -> bool:
    a: Any = old.get("spec") or {}
    b: Any = new.get("spec") or {}
    for key in path:
        a = a.get(key) if isinstance(a, dict) else None
        b = b.get(key) if isinstance(b, dict) else None
    return bool(a == b)


def _frozen_while_running(path: str, what: str) -> Rule:
    keys = path.split(".")
    return Rule(
        cel=f"!({_RUNNING}) || self.spec.{path} == oldSelf.spec.{path}",
        message=f"spec.{path} cannot change while the job runs ({what}): set spec.suspend to true, "
        "wait for phase Suspended, then change it",
        transition=lambda old, new: _phase(old) not in RUNNING_PHASES or _same(old, new, *keys),
        field_path=f".spec.{path}",
    )


# Rules on the whole object (they read status.phase): fields a started or running job must keep.
OBJECT_RULES: tuple[Rule, ...] = (
    Rule(
        cel=f"!({_STARTED}) || self.spec.model == oldSelf.spec.model",
        message="spec.model cannot change once the job has started: create a new TrainingJob to train "
        "another model",
        transition=lambda old, new: _phase(old) in (None, "Pending") or _same(old, new, "model"),
        field_path=".spec.model",
    ),
    _frozen_while_running("processesPerNode", "it fixes the world size of every checkpoint"),
    _frozen_while_running("parallelism.tensor", "the model is sharded by it"),
    _frozen_while_running("parallelism.pipeline", "the model is split by it"),
    _frozen_while_running("accelerator", "the pods are placed by it"),
    name_rule(50, "the Job and its pods' DNS names <name>-<index>"),
)


def object_rule_errors(obj: dict[str, Any]) -> list[str]:
    """Messages of the non-transition OBJECT_RULES a whole TrainingJob object breaks (empty: valid)."""
    return object_errors(OBJECT_RULES, obj)


def update_errors(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Messages of the OBJECT_RULES an update of a TrainingJob object breaks (empty: allowed)."""
    return transition_errors(OBJECT_RULES, old, new)


def parse_spec(obj: dict[str, Any]) -> TrainingJobSpec:
    """The spec of a TrainingJob object (or a bare spec)."""
    spec = obj.get("spec", obj) if "kind" in obj or "spec" in obj else obj
    return TrainingJobSpec.model_validate(spec)


class TrainingProgress(KubeModel):
    """What the training runtime publishes (rank 0, as JSON in its pod's `kubeforge.io/progress` annotation,
    or in a file when run locally) and the operator copies into status. The contract between the two."""

    state: str = Field(default="running", description="running, succeeded or failed.")
    step: int = Field(default=0, ge=0, description="Last completed optimizer step.")
    total_steps: int = Field(default=0, ge=0, description="Steps to train.")
    world_size: int | None = Field(default=None, description="Processes in the current group.")
    restarts: int = Field(default=0, ge=0, description="Group re-formations so far (elastic restarts).")
    loss: float | None = Field(default=None, description="Last training loss.")
    last_checkpoint: str | None = Field(default=None, description="Path of the last completed checkpoint.")
    last_checkpoint_step: int | None = Field(default=None, description="Its step.")
    run_id: str | None = Field(default=None, description="MLflow run id.")
    run_url: str | None = Field(default=None, description="Link to the run.")
    model_uri: str | None = Field(
        default=None, description="runs:/<run>/model once the final model is logged."
    )
    message: str | None = Field(default=None, description="Error or note for the user.")
    updated: str | None = Field(default=None, description="RFC 3339 time of this report.")
