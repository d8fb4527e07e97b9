"""TrainingJob → desired child objects. Pure: no kopf, no Kubernetes client, no clock.

Children (all owned by the TrainingJob, so deleting it garbage-collects them):
- ConfigMap <name>-spec: the TrainingJob as the runtime reads it, mounted at /etc/kubeforge.
- Job <name>: Indexed (node rank = completion index), one pod per node, torchrun's PET_* environment.
- PodGroup <name> (when scheduling.gang): scheduler-plugins coscheduling, minMember = the fewest nodes.

Per namespace, shared by every TrainingJob there and owned by none (`namespace_objects`): the trainer identity
and the headless Service `kubeforge-trainers`, which gives every training pod the stable DNS name
<name>-<index>.kubeforge-trainers (rendezvous on index 0). One Service per namespace rather than per job: each
Service costs an Endpoints and an EndpointSlice object and their updates, a third of the API writes a job
causes before its pods run (measured in bench/trainingjob_scale.py); hostnames <name>-<index> are unique in a
namespace because TrainingJob names are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controllers import owned
from controllers.owned import Owner as Owner
from controllers.owned import owned_meta, owner_labels
from controllers.placement import placement, pod_resources
from crds.common import (
    LABEL_ROLE,
    LABEL_TRAINING_JOB,
    SPEC_FILE_NAME,
    SPEC_MOUNT_DIR,
    pod_image,
)
from crds.trainingjob import TrainingJobSpec

Obj = dict[str, Any]

RDZV_PORT = 29400
CONTAINER = "trainer"
SERVICE_ACCOUNT = "kubeforge-trainer"
TRAINERS_SERVICE = "kubeforge-trainers"
ROLE_TRAINER = "trainer"  # value of LABEL_ROLE on training pods: the shared Service selects them by it
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
# A Kueue-queued Job is created (POST, never applied) by this field manager, which then owns `suspend: true`;
# the operator's applies leave `suspend` out, so Kueue alone flips it. Were the Job created by the operator's
# own apply, its next apply (without the field) would make server-side apply remove `suspend`, unsuspending
# the Job before Kueue admitted it.
QUEUED_CREATE_MANAGER = "kubeforge-operator-queued-create"

LABEL_POD_GROUP = "scheduling.x-k8s.io/pod-group"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass(frozen=True)
class RenderConfig:
    """What the operator adds from its own settings."""

    default_image: str
    mlflow_tracking_uri: str | None = None
    gang_scheduler_name: str = "scheduler-plugins-scheduler"


def labels(owner: Owner) -> dict[str, str]:
    return owner_labels(LABEL_TRAINING_JOB, owner)


def selector(owner: Owner) -> str:
    return f"{LABEL_TRAINING_JOB}={owner.name}"


def _meta(owner: Owner, name: str) -> Obj:
    return owned_meta("TrainingJob", owner, name, labels(owner))


def spec_config_map(owner: Owner, spec: TrainingJobSpec) -> Obj:
    return owned.spec_config_map("TrainingJob", owner, spec, SPEC_FILE_NAME, labels(owner))


def rendezvous_endpoint(owner: Owner) -> str:
    return f"{owner.name}-0.{TRAINERS_SERVICE}.{owner.namespace}.svc:{RDZV_PORT}"


def _env(owner: Owner, spec: TrainingJobSpec, cfg: RenderConfig) -> list[Obj]:
    lo = spec.nodes.min or spec.nodes.count
    hi = spec.nodes.max or spec.nodes.count
    env: list[Obj] = [
        {"name": "PET_NNODES", "value": f"{lo}:{hi}" if lo != hi else str(lo)},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.processes_per_node)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ENDPOINT", "value": rendezvous_endpoint(owner)},
        {"name": "PET_RDZV_ID", "value": owner.uid},
        {"name": "PET_MAX_RESTARTS", "value": str(spec.failure_policy.max_restarts)},
        {"name": "KUBEFORGE_JOB_NAME", "value": owner.name},
        {"name": "KUBEFORGE_JOB_UID", "value": owner.uid},
        {"name": "KUBEFORGE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KUBEFORGE_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    tracking = spec.mlflow.tracking_uri or cfg.mlflow_tracking_uri
    if tracking:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking})
    env.append({"name": "MLFLOW_EXPERIMENT_NAME", "value": spec.mlflow.experiment or owner.namespace})
    env += [{"name": k, "value": v} for k, v in sorted((spec.env or {}).items())]
    return env


def _volumes(owner: Owner, spec: TrainingJobSpec) -> tuple[list[Obj], list[Obj]]:
    ckpt: Obj = (
        {"persistentVolumeClaim": {"claimName": spec.checkpoint.claim_name}}
        if spec.checkpoint.claim_name
        else {"emptyDir": {}}
    )
    volumes: list[Obj] = [
        {"name": "spec", "configMap": {"name": f"{owner.name}-spec"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        {"name": "checkpoints", **ckpt},
    ]
    mounts: list[Obj] = [
        {"name": "spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "checkpoints", "mountPath": spec.checkpoint.path},
    ]
    return volumes, mounts


def pod_template(owner: Owner, spec: TrainingJobSpec, cfg: RenderConfig) -> Obj:
    place = placement(spec.accelerator)
    volumes, mounts = _volumes(owner, spec)
    pod_labels = {**labels(owner), LABEL_ROLE: ROLE_TRAINER}
    if spec.scheduling.gang:
        pod_labels[LABEL_POD_GROUP] = owner.name
    pod: Obj = {
        "restartPolicy": "Never",
        "subdomain": TRAINERS_SERVICE,
        "serviceAccountName": SERVICE_ACCOUNT,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,  # the runtime checkpoints on SIGTERM
        "containers": [
            {
                "name": CONTAINER,
                "image": pod_image(spec, cfg.default_image),
                "command": ["kubeforge-train", f"{SPEC_MOUNT_DIR}/{SPEC_FILE_NAME}"],
                "env": _env(owner, spec, cfg),
                "ports": [{"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}],
                "resources": pod_resources(spec.resources, spec.accelerator),
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
    }
    if place.tolerations:
        pod["tolerations"] = place.tolerations
    if place.node_selector:
        pod["nodeSelector"] = place.node_selector
    if spec.scheduling.gang:
        pod["schedulerName"] = cfg.gang_scheduler_name
    if spec.scheduling.priority_class_name:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    return {"metadata": {"labels": pod_labels}, "spec": pod}


def job(owner: Owner, spec: TrainingJobSpec, cfg: RenderConfig, nodes: int, *, creating: bool) -> Obj:
    """The Indexed Job running `nodes` pods.

    `nodes` is the size to run at now (the spec's count, or less while a scale-up cannot be scheduled).
    With a Kueue queue the Job is created suspended and Kueue owns `suspend` afterwards; otherwise the
    Job's `suspend` follows spec.suspend.
    """
    retryable = sorted(set(spec.failure_policy.retryable_exit_codes))
    job_spec: Obj = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": spec.failure_policy.max_restarts,
        "podFailurePolicy": {
            "rules": [
                # preemption, node drain and eviction never use the restart budget
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # any exit code that is not retryable fails the whole job at once
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "NotIn",
                        "values": [0, *retryable],
                    },
                },
            ]
        },
        "template": pod_template(owner, spec, cfg),
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    meta = _meta(owner, owner.name)
    if spec.scheduling.queue_name:
        meta["labels"][LABEL_QUEUE] = spec.scheduling.queue_name
        if spec.suspend or creating:
            job_spec["suspend"] = True
    else:
        job_spec["suspend"] = spec.suspend
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def created_not_applied(child: Obj, *, creating: bool) -> bool:
    """Whether `child` must be created by QUEUED_CREATE_MANAGER instead of applied."""
    queued = LABEL_QUEUE in (child["metadata"].get("labels") or {})
    return creating and queued and child["kind"] == "Job"


def pod_group(owner: Owner, spec: TrainingJobSpec) -> Obj:
    return {
        "apiVersion": "scheduling.x-k8s.io/v1alpha1",
        "kind": "PodGroup",
        "metadata": _meta(owner, owner.name),
        "spec": {
            "minMember": spec.nodes.min or spec.nodes.count,
            "scheduleTimeoutSeconds": spec.scheduling.schedule_timeout_seconds,
        },
    }


def namespace_objects(namespace: str) -> list[Obj]:
    """What every TrainingJob of `namespace` shares: the identity of training pods (rank 0 patches its own
    pod's progress annotation with it) and the headless Service that names them in DNS."""
    shared = dict(owned.MANAGED_LABELS)
    meta = {"name": SERVICE_ACCOUNT, "namespace": namespace, "labels": shared}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": TRAINERS_SERVICE, "namespace": namespace, "labels": shared},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous must resolve before pods are Ready
            "selector": {LABEL_ROLE: ROLE_TRAINER},
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }
    return [
        service,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
        },
    ]


def render(
    owner: Owner, spec: TrainingJobSpec, cfg: RenderConfig, nodes: int, *, creating: bool
) -> list[Obj]:
    """Every child of the TrainingJob, in the order to apply them."""
    children = [spec_config_map(owner, spec)]
    if spec.scheduling.gang:
        children.append(pod_group(owner, spec))
    children.append(job(owner, spec, cfg, nodes, creating=creating))
    return children
