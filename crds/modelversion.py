"""ModelVersion: a version of a registered model in MLflow, declared from the cluster."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from crds.common import (
    ALIASES_CEL,
    ALIASES_MESSAGE,
    CONDITIONS_LIST,
    AliasName,
    Condition,
    KubeModel,
    Rule,
    aliases_ok,
    transition_errors,
)


class ModelSource(KubeModel):
    """Where the version's artifacts come from. Exactly one of trainingJob, runId or uri."""

    training_job: str | None = Field(
        default=None, max_length=253, description="A TrainingJob in the same namespace: its logged model."
    )
    run_id: str | None = Field(default=None, max_length=64, description="An MLflow run id; see artifactPath.")
    artifact_path: str = Field(
        default="model", max_length=1024, description="Path of the model inside the run's artifacts."
    )
    uri: str | None = Field(
        default=None,
        max_length=4096,
        description="An artifact URI (runs:/..., models:/..., s3://..., file:///..., mlflow-artifacts:/...).",
    )

    x_rules = (
        Rule(
            cel="(has(self.trainingJob) ? 1 : 0) + (has(self.runId) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1",
            message="source: set exactly one of source.trainingJob (a TrainingJob in this namespace), "
            "source.runId (an MLflow run) or source.uri (an artifact URI)",
            check=lambda m: [m.training_job, m.run_id, m.uri].count(None) == 2,
        ),
    )


class DeletionPolicy(StrEnum):
    keep = "Keep"
    archive = "Archive"
    delete = "Delete"


class ModelVersionSpec(KubeModel):
    """Desired state of a ModelVersion."""

    model_name: str = Field(min_length=1, max_length=256, description="Registered model name in MLflow.")
    source: ModelSource = Field(description="Where the artifacts come from.")
    aliases: list[AliasName] = Field(
        default_factory=list,
        max_length=10,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Aliases this version holds, e.g. [champion]. Exclusive within a model: a second "
        "ModelVersion claiming the same alias is a conflict.",
    )
    tags: dict[str, str] | None = Field(
        default=None, max_length=64, description="Tags of the registry version."
    )
    description: str | None = Field(default=None, max_length=5000, description="Description of the version.")
    deletion_policy: DeletionPolicy = Field(
        default=DeletionPolicy.keep,
        description="On delete: Keep the registry version, Archive it (tag kubeforge.io/archived=true, "
        "aliases removed) or Delete it. A version still served by an InferenceService is never deleted.",
    )

    x_rules = (
        Rule(
            cel=ALIASES_CEL,
            message=ALIASES_MESSAGE,
            check=lambda m: aliases_ok(m.aliases),
            field_path=".aliases",
        ),
        Rule(
            cel="self.modelName == oldSelf.modelName",
            message="modelName is immutable: create a new ModelVersion to register into another model",
            transition=lambda old, new: old.model_name == new.model_name,
            field_path=".modelName",
        ),
        Rule(
            cel="self.source == oldSelf.source",
            message="source is immutable (a registry version's artifacts never change): create a new "
            "ModelVersion for other artifacts",
            transition=lambda old, new: old.source == new.source,
            field_path=".source",
        ),
    )


class ModelVersionPhase(StrEnum):
    pending = "Pending"
    registering = "Registering"
    ready = "Ready"
    failed = "Failed"
    deleting = "Deleting"


class ModelVersionStatus(KubeModel):
    """Observed state of a ModelVersion."""

    phase: ModelVersionPhase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] | None = Field(
        default=None, json_schema_extra=CONDITIONS_LIST, description="Ready, AliasesReady, SourceResolved."
    )
    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    registry_version: str | None = Field(default=None, description="Version number in MLflow.")
    registry_status: str | None = Field(
        default=None, description="PENDING_REGISTRATION, READY or FAILED_REGISTRATION."
    )
    registry_message: str | None = Field(default=None, description="MLflow's status message.")
    source_uri: str | None = Field(default=None, description="Resolved artifact URI.")
    run_id: str | None = Field(default=None, description="MLflow run the version came from.")
    run_url: str | None = Field(default=None, description="Link to the run.")
    aliases: list[str] | None = Field(default=None, description="Aliases the version holds in MLflow now.")
    signature: str | None = Field(default=None, description="Summary of the model's input/output signature.")
    model_uri: str | None = Field(default=None, description="models:/name/N of this version.")


def update_errors(old: ModelVersionSpec, new: ModelVersionSpec) -> list[str]:
    """Messages of the transition rules an update of a ModelVersion's spec breaks (empty: allowed)."""
    return transition_errors(ModelVersionSpec.x_rules, old, new)


def parse_spec(obj: dict[str, Any]) -> ModelVersionSpec:
    """The spec of a ModelVersion object (or a bare spec)."""
    spec = obj.get("spec", obj) if "kind" in obj or "spec" in obj else obj
    return ModelVersionSpec.model_validate(spec)
