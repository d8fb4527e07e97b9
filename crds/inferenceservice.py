"""InferenceService: compiled Open Inference Protocol serving with safe roll-outs."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from crds.common import (
    CONDITIONS_LIST,
    Accelerator,
    Condition,
    KubeModel,
    Resources,
    Rule,
    image_field,
    name_rule,
    object_errors,
)


class ModelRef(KubeModel):
    """The model to serve. Exactly one of modelVersion or uri."""

    model_version: str | None = Field(
        default=None, max_length=253, description="A ModelVersion in the same namespace."
    )
    uri: str | None = Field(
        default=None,
        max_length=4096,
        pattern=r"^(models:/[^/@]+(/\d+|@[\w-]+)|runs:/.+|file:///.+|/.+)$",
        description="models:/name@alias, models:/name/N, runs:/<run>/<path>, or a path/file:// URI.",
    )

    x_rules = (
        Rule(
            cel="has(self.modelVersion) != has(self.uri)",
            message="model: set exactly one of modelVersion (a ModelVersion in this namespace) or uri "
            "(models:/name@alias, models:/name/N, runs:/..., file:///...)",
            check=lambda m: (m.model_version is None) != (m.uri is None),
        ),
    )


class CompileMode(StrEnum):
    aot = "aot"
    jit = "jit"
    eager = "eager"


class CompileBackend(StrEnum):
    auto = "auto"
    cuda = "cuda"
    tensorrt = "tensorrt"
    rocm = "rocm"
    npu = "npu"
    mlu = "mlu"
    cpu = "cpu"
    eager = "eager"


class CompileSpec(KubeModel):
    """Ahead-of-time compilation for the target hardware (kubeforge-serve compile, in an init container)."""

    mode: CompileMode = Field(
        default=CompileMode.aot,
        description="aot (torch.export + AOTInductor, cached), jit (torch.compile at start-up) or eager.",
    )
    backend: CompileBackend = Field(
        default=CompileBackend.auto,
        description=(
            "auto picks the best backend for the hardware found; naming one that is not available fails."
        ),
    )
    warmup_batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 8],
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Batch sizes compiled and checked against eager.",
    )
    cache_claim_name: str | None = Field(
        default=None,
        max_length=253,
        description="PersistentVolumeClaim for the compile cache shared by pods.",
    )


class BatchingSpec(KubeModel):
    """Dynamic batching per model."""

    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Largest batch formed.")
    max_delay_ms: float = Field(
        default=2.0, ge=0, le=10000, description="Longest a request waits for a batch."
    )
    max_queue_size: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Queued requests before 429/RESOURCE_EXHAUSTED (back-pressure).",
    )
    queue_timeout_ms: float = Field(
        default=0,
        ge=0,
        le=3_600_000,
        description="Longest a request waits in the queue before it is dropped unrun with"
        " 504/DEADLINE_EXCEEDED (0: no limit).",
    )
    lifo_after_ms: float = Field(
        default=0,
        ge=0,
        le=3_600_000,
        description="Overload: once the oldest queued request has waited this long, the newest go first"
        " (0: always oldest first).",
    )
    priority_levels: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Priority levels of Triton's `priority` request parameter, 1 the most urgent: batches"
        " take the most urgent first and a full queue refuses the least urgent first (0: none, the"
        " parameter is ignored).",
    )
    default_priority_level: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Level of a request that names none (or one past the last); 0: the last, least urgent.",
    )

    x_rules = (
        Rule(
            cel="self.defaultPriorityLevel <= self.priorityLevels",
            message="batching.defaultPriorityLevel must be at most batching.priorityLevels: raise"
            " priorityLevels or lower defaultPriorityLevel (0: the last level)",
            check=lambda m: m.default_priority_level <= m.priority_levels,
        ),
    )


class AutoscalingSpec(KubeModel):
    """A HorizontalPodAutoscaler for the stable deployment."""

    min_replicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(default=1, ge=1, le=1000, description="Most replicas.")
    target_cpu_utilization: int | None = Field(default=None, ge=1, le=100, description="Target CPU percent.")
    target_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Target in-flight requests per pod (custom metric kubeforge_inflight).",
    )

    x_rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must be at most autoscaling.maxReplicas: lower minReplicas "
            "or raise maxReplicas",
            check=lambda m: m.min_replicas <= m.max_replicas,
            field_path=".minReplicas",
        ),
    )


class CanarySpec(KubeModel):
    """A second model receiving a share of the traffic."""

    model: ModelRef = Field(description="The canary model.")
    traffic_percent: int = Field(
        default=10, ge=0, le=100, description="Percent of requests sent to the canary."
    )


class PortsSpec(KubeModel):
    """Ports the server listens on."""

    http: int = Field(default=8080, ge=1, le=65535, description="REST (OIP v2) and /metrics.")
    grpc: int = Field(default=8081, ge=1, le=65535, description="gRPC GRPCInferenceService.")

    x_rules = (
        Rule(
            cel="self.http != self.grpc",
            message="ports.http and ports.grpc must differ: pick another port for one of them",
            check=lambda m: m.http != m.grpc,
            field_path=".grpc",
        ),
    )


# Gateway API's own pattern for a route's host name: lower-case DNS labels, optionally under a leading "*."
Hostname = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]


class ParentRef(KubeModel):
    """A Gateway (or one of its listeners) the route attaches to, as Gateway API's parentRefs name it."""

    name: str = Field(min_length=1, max_length=253, description="The Gateway.")
    namespace: str | None = Field(
        default=None, max_length=63, description="Its namespace (default: the InferenceService's)."
    )
    section_name: str | None = Field(
        default=None, max_length=253, description="One of its listeners (default: every listener)."
    )


class RouteTarget(KubeModel):
    """One protocol's route: where it attaches and which host names it answers."""

    parent_refs: list[ParentRef] = Field(
        min_length=1, max_length=32, description="Gateways (or listeners) the route attaches to."
    )
    hostnames: list[Hostname] | None = Field(
        default=None,
        max_length=16,
        description="Host names the route answers (default: every host the listener accepts).",
    )


class RouteSpec(KubeModel):
    """Exact traffic weights through the Gateway API: an HTTPRoute (REST) and a GRPCRoute (gRPC) named
    after the InferenceService, splitting requests between the stable and canary pods by weight. The
    cluster needs the Gateway API's CRDs and a Gateway controller; without a route, the split is by pods."""

    http: RouteTarget | None = Field(default=None, description="HTTPRoute to the REST port.")
    grpc: RouteTarget | None = Field(default=None, description="GRPCRoute to the gRPC port.")

    x_rules = (
        Rule(
            cel="has(self.http) || has(self.grpc)",
            message="route: set http, grpc or both (each with its parentRefs), or remove route",
            check=lambda m: m.http is not None or m.grpc is not None,
        ),
    )


_BACKEND_VENDOR = {"cuda": "nvidia", "tensorrt": "nvidia", "rocm": "amd", "npu": "ascend", "mlu": "cambricon"}


class InferenceServiceSpec(KubeModel):
    """Desired state of an InferenceService."""

    image: str = image_field()
    model: ModelRef = Field(description="The model to serve.")
    accelerator: Accelerator = Field(default_factory=Accelerator, description="Accelerators per pod.")
    compile: CompileSpec = Field(default_factory=CompileSpec, description="Compilation for the hardware.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Dynamic batching.")
    replicas: int = Field(
        default=1, ge=0, le=1000, description="Replicas of the stable model (no autoscaling)."
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Autoscale instead of fixed replicas."
    )
    canary: CanarySpec | None = Field(default=None, description="Canary roll-out of a second model.")
    route: RouteSpec | None = Field(
        default=None, description="Route through a Gateway (Gateway API), for exact canary weights."
    )
    ports: PortsSpec = Field(default_factory=PortsSpec, description="Listening ports.")
    resources: Resources | None = Field(default=None, description="CPU and memory per pod.")
    env: dict[str, str] | None = Field(
        default=None, max_length=128, description="Extra environment variables."
    )

    x_rules = (
        Rule(
            cel="!has(self.canary) || "
            + " || ".join(
                f"(has(self.canary.model.{f}) ? self.canary.model.{f} : '') != "
                f"(has(self.model.{f}) ? self.model.{f} : '')"
                for f in ("modelVersion", "uri")
            ),
            message="canary.model must differ from model: point canary.model at the version you want to try",
            check=lambda m: m.canary is None or m.canary.model != m.model,
            field_path=".canary.model",
        ),
        Rule(
            cel="self.compile.backend in ['auto', 'eager', 'cpu'] || "
            + " || ".join(
                f"(self.compile.backend == '{b}' && self.accelerator.vendor == '{v}')"
                for b, v in _BACKEND_VENDOR.items()
            ),
            message="compile.backend must match accelerator.vendor (cuda and tensorrt: nvidia, rocm: amd, "
            "npu: ascend, mlu: cambricon): set compile.backend to auto, or fix accelerator.vendor",
            check=lambda m: (
                m.compile.backend in ("auto", "eager", "cpu")
                or _BACKEND_VENDOR.get(m.compile.backend) == m.accelerator.vendor
            ),
            field_path=".compile.backend",
        ),
        Rule(
            cel="self.compile.warmupBatchSizes.all(b, b <= self.batching.maxBatchSize)",
            message="compile.warmupBatchSizes must not exceed batching.maxBatchSize: remove the larger sizes "
            "or raise maxBatchSize",
            check=lambda m: all(b <= m.batching.max_batch_size for b in m.compile.warmup_batch_sizes),
            field_path=".compile.warmupBatchSizes",
        ),
    )


class InferenceServicePhase(StrEnum):
    pending = "Pending"
    compiling = "Compiling"
    ready = "Ready"
    rolling_out = "RollingOut"
    routing = "Routing"
    failed = "Failed"


class TrafficTarget(KubeModel):
    """Share of the traffic one model receives."""

    model_uri: str = Field(description="The model.")
    percent: int = Field(ge=0, le=100, description="Percent of requests.")
    ready_replicas: int = Field(default=0, description="Ready pods serving it.")


class InferenceServiceStatus(KubeModel):
    """Observed state of an InferenceService."""

    phase: InferenceServicePhase | None = Field(default=None, description="Lifecycle phase.")
    message: str | None = Field(default=None, description="Why the phase is what it is.")
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra=CONDITIONS_LIST,
        description="Ready, PredictorReady, CanaryReady, Routed.",
    )
    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    url: str | None = Field(default=None, description="In-cluster URL of the REST endpoint.")
    grpc_address: str | None = Field(default=None, description="host:port of the gRPC endpoint.")
    replicas: int | None = Field(default=None, description="Pods of the stable model (scale subresource).")
    ready_replicas: int | None = Field(default=None, description="Ready pods of the stable model.")
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    traffic: list[TrafficTarget] | None = Field(default=None, description="Traffic split.")
    traffic_summary: str | None = Field(
        default=None, description="Traffic split as text, for printer columns."
    )
    model_uri: str | None = Field(default=None, description="Resolved URI of the stable model.")
    backend: str | None = Field(default=None, description="Compile backend the pods report.")


# Rules on the whole object.
OBJECT_RULES: tuple[Rule, ...] = (name_rule(48, "the Service and the Deployments"),)


def object_rule_errors(obj: dict[str, Any]) -> list[str]:
    """Messages of the OBJECT_RULES a whole InferenceService object breaks (empty: valid)."""
    return object_errors(OBJECT_RULES, obj)


def parse_spec(obj: dict[str, Any]) -> InferenceServiceSpec:
    """The spec of an InferenceService object (or a bare spec)."""
    spec = obj.get("spec", obj) if "kind" in obj or "spec" in obj else obj
    return InferenceServiceSpec.model_validate(spec)
