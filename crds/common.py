"""Types shared by the three kinds of kubeforge.io/v1alpha1.

Every model serialises to camelCase (the Kubernetes convention) and accepts either spelling on input.
Descriptions are the documentation: they become `kubectl explain` text and docs/api.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubeforge.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Rule:
    """One validation rule, enforced with the same message at two doors.

    `cel` runs in the API server (an `x-kubernetes-validations` entry of the model's schema, `self` being
    the object the model describes); `check` is its pydantic mirror (True when the object is valid), run
    by the operator, which re-checks defensively, and by the training runtime on local YAML. A transition
    rule (its CEL uses `oldSelf`) compares an update with the stored object: `transition(old, new)`
    mirrors it, and pydantic alone cannot run it.
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    transition: Callable[[Any, Any], bool] | None = None
    field_path: str | None = None
    reason: str | None = None

    def to_schema(self) -> dict[str, Any]:
        """The `x-kubernetes-validations` entry."""
        entry: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        if self.reason:
            entry["reason"] = self.reason
        return entry


def _add_rules(schema: dict[str, Any], cls: type[Any]) -> None:
    """json_schema_extra of every KubeModel: carries the class's rules into its JSON schema."""
    rules: tuple[Rule, ...] = getattr(cls, "x_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_schema() for r in rules]


class KubeModel(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields rejected.

    A subclass lists its cross-field rules in `x_rules`; they become CEL rules of the CRD and are
    checked here with identical messages.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        json_schema_extra=_add_rules,
    )

    x_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        errors = [r.message for r in type(self).x_rules if r.check is not None and not r.check(self)]
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_document(self) -> dict[str, Any]:
        """The object for a runtime to read back exactly (the spec file pods mount, the one the training
        launcher hands its workers): camelCase, every field, nulls included. Without its nulls a field set to
        null where its default is not (optimizer.gradClipNorm: null, no clipping) would read back as the
        default."""
        return self.model_dump(by_alias=True, mode="json")


def dns1035_ok(name: Any, limit: int) -> bool:
    """Mirror of name_rule's CEL: a DNS-1035 label of at most `limit` characters (anything else passes)."""
    if not isinstance(name, str):
        return True
    ok_chars = all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in name)
    return ok_chars and 0 < len(name) <= limit and name[0].isalpha() and name[-1] != "-"


def name_rule(limit: int, names: str) -> Rule:
    """A rule on a whole object: its name becomes the prefix of child objects named `names`."""
    return Rule(
        cel="!has(self.metadata.name) || (self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') "
        f"&& self.metadata.name.size() <= {limit})",
        message=f"metadata.name must be a DNS-1035 label of at most {limit} characters (it names {names}): "
        "start with a letter, use only a-z, 0-9 and '-'",
        check=lambda obj: dns1035_ok((obj.get("metadata") or {}).get("name"), limit),
    )


def object_errors(rules: tuple[Rule, ...], obj: Any) -> list[str]:
    """Messages of the (non-transition) rules `obj` breaks, for rules kept outside a model (whole objects)."""
    return [r.message for r in rules if r.check is not None and not r.check(obj)]


def transition_errors(rules: tuple[Rule, ...], old: Any, new: Any) -> list[str]:
    """Messages of the transition rules an update from `old` to `new` breaks (empty: allowed)."""
    return [r.message for r in rules if r.transition is not None and not r.transition(old, new)]


# json_schema_extra of a field whose pydantic default must not become a CRD default: the operator fills it
# in from its own settings (e.g. the runtime image), which a server-side default would always shadow.
NO_SERVER_DEFAULT: dict[str, Any] = {"x-kubeforge-no-server-default": True}

DEFAULT_IMAGE = "ghcr.io/kubeforge/runtime:0.1.0"


def image_field() -> Any:
    """`spec.image` of the kinds that run the runtime (TrainingJob, InferenceService)."""
    return Field(
        default=DEFAULT_IMAGE,
        max_length=1024,
        json_schema_extra=NO_SERVER_DEFAULT,
        description="Container image with the runtime. Unset: the operator's runtime image "
        "(KUBEFORGE_RUNTIME_IMAGE, by default " + DEFAULT_IMAGE + ").",
    )


def pod_image(spec: Any, operator_image: str) -> str:
    """The image pods run: spec.image when the object sets it, else the operator's (the model's default
    only stands in for it where no operator is involved, as in a local run)."""
    return str(spec.image) if "image" in spec.model_fields_set else operator_image


# Alias names as MLflow and models:/name@alias URIs accept them ('latest' and v<N> are reserved by MLflow).
ALIAS_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]*$"
AliasName = Annotated[str, Field(min_length=1, max_length=63, pattern=ALIAS_PATTERN)]
ALIASES_CEL = "!has(self.aliases) || self.aliases.all(a, a != 'latest' && !a.matches('^[vV][0-9]+$'))"
ALIASES_MESSAGE = (
    "aliases must not be 'latest' or v<number> (MLflow reserves them): choose another "
    "alias name, e.g. champion"
)


def aliases_ok(aliases: list[str] | None) -> bool:
    """Mirror of ALIASES_CEL."""
    return not any(a == "latest" or (a[:1] in ("v", "V") and a[1:].isdigit()) for a in aliases or ())


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
        description="Hardware family: nvidia (nvidia.com/gpu), amd (amd.com/gpu), ascend "
        "(huawei.com/Ascend910), "
        "cambricon (cambricon.com/mlu) or cpu (no accelerator).",
    )
    product: str | None = Field(
        default=None,
        max_length=128,
        description="Product to select nodes by, matched against the node's product label "
        "(nvidia.com/gpu.product, amd.com/gpu.product-name, ...), e.g. NVIDIA-H200, "
        "AMD-Instinct-MI300X, Ascend910B. "
        "Unset: any product of the vendor.",
    )
    count: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Accelerators per pod. Must be 0 for vendor cpu and at least 1 for any other vendor.",
    )

    x_rules = (
        Rule(
            cel="self.vendor != 'cpu' || self.count == 0",
            message="accelerator.count must be 0 when accelerator.vendor is cpu: remove count, "
            "or set vendor to nvidia, amd, ascend or cambricon",
            check=lambda m: m.vendor != "cpu" or m.count == 0,
            field_path=".count",
        ),
        Rule(
            cel="self.vendor == 'cpu' || self.count >= 1",
            message="accelerator.count must be at least 1 when accelerator.vendor is not cpu: "
            "set accelerator.count, e.g. 1",
            check=lambda m: m.vendor == "cpu" or m.count >= 1,
            field_path=".count",
        ),
        Rule(
            cel="self.vendor != 'cpu' || !has(self.product)",
            message=(
                "accelerator.product needs a vendor other than cpu: set accelerator.vendor or remove product"
            ),
            check=lambda m: m.vendor != "cpu" or m.product is None,
            field_path=".product",
        ),
    )


class ResourceList(KubeModel):
    """CPU and memory for each pod, in Kubernetes quantity syntax."""

    cpu: str | None = Field(default=None, description="CPU cores, e.g. '4' or '500m'.", max_length=32)
    memory: str | None = Field(default=None, description="Memory, e.g. '16Gi'.", max_length=32)


class Resources(KubeModel):
    """Requests and limits of CPU and memory per pod (accelerators come from `accelerator`)."""

    requests: ResourceList | None = Field(default=None, description="Guaranteed resources per pod.")
    limits: ResourceList | None = Field(default=None, description="Upper bounds per pod.")


# Conditions are a list keyed by type (server-side apply merges them per type, as for metav1.Condition).
CONDITIONS_LIST: dict[str, Any] = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


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
