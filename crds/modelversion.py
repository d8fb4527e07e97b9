"""ModelVersion: a version of a registered model in MLflow, declared from the cluster."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from crds.common import Condition, KubeModel


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


class DeletionPolicy(StrEnum):
    keep = "Keep"
    archive = "Archive"
    delete = "Delete"


class ModelVersionSpec(KubeModel):
    """Desired state of a ModelVersion."""

    model_name: str = Field(min_length=1, max_length=256, description="Registered model name in MLflow.")
    source: ModelSource = Field(description="Where the artifacts come from.")
    aliases: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="Aliases this version holds, e.g. [champion]. Exclusive within a model: a second "
        "ModelVersion claiming the same alias is a conflict.",
    )
    tags: dict[str, str] | None = Field(default=None, description="Tags of the registry version.")
    description: str | None = Field(default=None, max_length=5000, description="Description of the version.")
    deletion_policy: DeletionPolicy = Field(
        default=DeletionPolicy.keep,
        description="On delete: Keep the registry version, Archive it (tag kubeforge.io/archived=true, "
        "aliases removed) or Delete it. A version still served by an InferenceService is never deleted.",
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
    conditions: list[Condition] | None = Field(default=None, description="Ready, AliasesReady, SourceResolved.")
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
