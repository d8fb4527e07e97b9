"""Types shared by the three kinds of kubeforge.io/v1alpha1.

Every model serialises to camelCase (the Kubernetes convention) and accepts either spelling on input.
Descriptions are the documentation: they become `kubectl explain` text and docs/api.md.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubeforge.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class KubeModel(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class AcceleratorVendor(StrEnum):
    nvidia = "nvidia"
    amd = "amd"
    ascend = "ascend"
    cambricon = "cambricon"
    cpu = "cpu"


class Accelerator(KubeModel):
    """The accelerators each pod needs. Decides the extended resource, tolerations and node selection."""

    vendor: AcceleratorVendor = Field(
        default=AcceleratorVendor.cpu,
        description="Hardware family: nvidia (nvidia.com/gpu), amd (amd.com/gpu), ascend (huawei.com/Ascend910), "
        "cambricon (cambricon.com/mlu) or cpu (no accelerator).",
    )
    product: str | None = Field(
        default=None,
        max_length=128,
        description="Product to select nodes by, matched against the node's product label "
        "(nvidia.com/gpu.product, amd.com/gpu.product-name, ...), e.g. NVIDIA-H200, AMD-Instinct-MI300X, Ascend910B. "
        "Unset: any product of the vendor.",
    )
    count: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Accelerators per pod. Must be 0 for vendor cpu and at least 1 for any other vendor.",
    )


class ResourceList(KubeModel):
    """CPU and memory for each pod, in Kubernetes quantity syntax."""

    cpu: str | None = Field(default=None, description="CPU cores, e.g. '4' or '500m'.", max_length=32)
    memory: str | None = Field(default=None, description="Memory, e.g. '16Gi'.", max_length=32)


class Resources(KubeModel):
    """Requests and limits of CPU and memory per pod (accelerators come from `accelerator`)."""

    requests: ResourceList | None = Field(default=None, description="Guaranteed resources per pod.")
    limits: ResourceList | None = Field(default=None, description="Upper bounds per pod.")


class ConditionStatus(StrEnum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class Condition(KubeModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(description="Condition type, e.g. Ready, Complete, Failed.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="Machine-readable CamelCase reason.", max_length=1024)
    message: str = Field(default="", description="Human-readable explanation.", max_length=32768)
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition was computed from."
    )
    last_transition_time: str | None = Field(
        default=None, description="RFC 3339 time the status last changed."
    )


# Names shared by the operator and the runtimes: the one place for labels, annotations and paths.
LABEL_PREFIX = "kubeforge.io/"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TRAINING_JOB = "kubeforge.io/training-job"
LABEL_INFERENCE_SERVICE = "kubeforge.io/inference-service"
LABEL_MODEL_VERSION = "kubeforge.io/model-version"
LABEL_ROLE = "kubeforge.io/role"
ANNOTATION_PROGRESS = "kubeforge.io/progress"
FINALIZER = "kubeforge.io/finalizer"
FIELD_MANAGER = "kubeforge"
SPEC_MOUNT_DIR = "/etc/kubeforge"
SPEC_FILE_NAME = "trainingjob.yaml"
