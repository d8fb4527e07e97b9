"""TrainingJob: elastic, 3D-parallel PyTorch training on pods."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from crds.common import Accelerator, Condition, KubeModel, Resources

DEFAULT_IMAGE = "ghcr.io/kubeforge/runtime:0.1.0"


class BuiltinModel(StrEnum):
    llama = "llama"
    cnn = "cnn"
    mlp = "mlp"


class ModelSpec(KubeModel):
    """What to train: a built-in model, or the user's own entry point. Exactly one of builtin or entrypoint."""

    builtin: BuiltinModel | None = Field(
        default=None,
        description="A built-in model: llama (Llama-style decoder with tensor-parallel plan and pipeline split), "
        "cnn (convolutional image classifier) or mlp (MLP classifier).",
    )
    preset: str = Field(
        default="tiny",
        max_length=32,
        description="Size preset of the built-in model: for llama tiny, small, 125m, 1b, 3b, 8b; "
        "for cnn and mlp tiny or small.",
    )
    options: dict[str, int | float | str | bool] | None = Field(
        default=None, description="Overrides of the preset's hyper-parameters, e.g. {dim: 512, layers: 8}."
    )
    entrypoint: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="The user's own code as 'package.module:function'. The function returns a "
        "runtime.training.protocol.TrainTask (model, datasets, loss); see docs/training.md.",
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
    sequence_length: int = Field(default=256, ge=8, le=131072, description="Tokens per sample (token datasets).")
    vocab_size: int = Field(default=256, ge=2, le=1048576, description="Vocabulary size of synthetic-tokens.")
    num_workers: int = Field(default=0, ge=0, le=64, description="DataLoader worker processes per rank.")


class OptimizerSpec(KubeModel):
    """The optimisation loop."""

    steps: int = Field(default=100, ge=1, le=100_000_000, description="Total optimizer steps.")
    global_batch_size: int = Field(
        default=8, ge=1, description="Samples per step over all data-parallel ranks (split into micro-batches)."
    )
    learning_rate: float = Field(default=3e-4, gt=0, le=10, description="Peak learning rate of AdamW.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps before cosine decay.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    grad_clip_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the global gradient norm to this value; unset disables clipping."
    )
    seed: int = Field(default=0, ge=0, description="Seed for weights and data order (identical on every layout).")


class DataParallelMode(StrEnum):
    fsdp = "fsdp"
    ddp = "ddp"
    hsdp = "hsdp"


class PipelineSchedule(StrEnum):
    gpipe = "GPipe"
    one_f_one_b = "1F1B"
    interleaved_1f1b = "Interleaved1F1B"


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
    pipeline: int = Field(default=1, ge=1, le=64, description="Pipeline-parallel degree (stages).")
    pipeline_schedule: PipelineSchedule = Field(
        default=PipelineSchedule.one_f_one_b, description="GPipe, 1F1B or Interleaved1F1B."
    )
    stages_per_rank: int = Field(
        default=1, ge=1, le=8, description="Pipeline stages per rank; Interleaved1F1B needs 2 or more."
    )
    micro_batches: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches per step (pipeline: at least the pipeline degree)."
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
        default=100, ge=1, description="Save every N steps (and on SIGTERM). Bounds the work lost to a failure."
    )
    path: str = Field(
        default="/checkpoints", max_length=4096, description="Directory (in the pod) that holds step-N folders."
    )
    keep: int = Field(default=3, ge=1, le=1000, description="Keep the latest K checkpoints, delete older ones.")
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
    min: int | None = Field(default=None, ge=1, le=4096, description="Fewest nodes to run with; default count.")
    max: int | None = Field(default=None, ge=1, le=4096, description="Most nodes to scale to; default count.")


class FailurePolicy(KubeModel):
    """When a failed pod is retried."""

    max_restarts: int = Field(
        default=3, ge=0, le=1000, description="Restart budget: group re-formations (and pod retries) before the job fails."
    )
    retryable_exit_codes: list[int] = Field(
        default_factory=lambda: [130, 137, 143],
        max_length=255,
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
    priority_class_name: str | None = Field(default=None, max_length=253, description="PriorityClass of the pods.")


class RegisterSpec(KubeModel):
    """Register the trained model on success (creates a ModelVersion)."""

    model_name: str = Field(max_length=256, min_length=1, description="Registered model name in MLflow.")
    aliases: list[str] = Field(default_factory=list, max_length=10, description="Aliases to set, e.g. [staging].")
    tags: dict[str, str] | None = Field(default=None, description="Tags of the registered version.")


class MlflowSpec(KubeModel):
    """Where runs are tracked."""

    tracking_uri: str | None = Field(
        default=None, max_length=2048, description="MLflow tracking URI; default the operator's."
    )
    experiment: str | None = Field(default=None, max_length=256, description="Experiment; default the namespace.")


class ProfilingSpec(KubeModel):
    """A torch.profiler window recorded as MLflow artifacts."""

    start_step: int = Field(default=5, ge=0, description="First profiled step.")
    steps: int = Field(default=3, ge=1, le=100, description="Number of profiled steps.")


class TrainingJobSpec(KubeModel):
    """Desired state of a TrainingJob."""

    image: str = Field(default=DEFAULT_IMAGE, max_length=1024, description="Container image with the runtime.")
    model: ModelSpec = Field(description="What to train.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data for built-in models.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Steps, batch, learning rate.")
    nodes: NodesSpec = Field(default_factory=NodesSpec, description="Pods and elastic range.")
    processes_per_node: int = Field(default=1, ge=1, le=64, description="Worker processes per pod.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Process layout.")
    precision: Precision = Field(default=Precision.fp32, description="fp32, bf16 or fp16 (with loss scaling).")
    gradient_compression: GradientCompression = Field(
        default=GradientCompression.none,
        description="Compress data-parallel gradients: fp16/bf16 halve the bytes; powerSGD needs dataMode ddp.",
    )
    power_sgd_rank: int = Field(default=1, ge=1, le=64, description="Rank of PowerSGD's approximation.")
    activation_checkpointing: ActivationCheckpointing = Field(
        default=ActivationCheckpointing.none, description="Recompute activations in backward: none, full, selective."
    )
    compile: bool = Field(default=False, description="torch.compile each block.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Distributed checkpoints.")
    resources: Resources | None = Field(default=None, description="CPU and memory per pod.")
    accelerator: Accelerator = Field(default_factory=Accelerator, description="Accelerators per pod.")
    shm_size: str = Field(default="1Gi", max_length=32, description="Size of /dev/shm for data loaders.")
    env: dict[str, str] | None = Field(default=None, description="Extra environment variables of the workers.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="Retries and budget.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job when it runs longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job's pods this long after it finishes (the TrainingJob stays)."
    )
    clean_pod_policy: CleanPodPolicy = Field(
        default=CleanPodPolicy.running,
        description="Which pods to delete when the job finishes: All, Running (still running ones) or None.",
    )
    suspend: bool = Field(default=False, description="Suspend: delete running pods, keep checkpoints; resume later.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Queueing and gang scheduling.")
    registration: RegisterSpec | None = Field(
        default=None, alias="register", description="Register the trained model on success."
    )
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec, description="Experiment tracking.")
    profiling: ProfilingSpec | None = Field(default=None, description="Record a profiler trace.")


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
    conditions: list[Condition] | None = Field(default=None, description="Created, Running, Restarting, "
                                               "Scaling, Suspended, Complete, Failed.")
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
    model_uri: str | None = Field(default=None, description="runs:/<run>/model once the final model is logged.")
    message: str | None = Field(default=None, description="Error or note for the user.")
    updated: str | None = Field(default=None, description="RFC 3339 time of this report.")
