"""The operator application: kopf settings, probes and the handlers of the three kinds.

Run it with `kopf run operator/main.py` (which imports this module) or the `kubeforge-operator` entry point.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, cast

import kopf

from controllers import config
from controllers.inferenceservice import handlers as _inferenceservice_handlers  # noqa: F401  (registers handlers)
from controllers.trainingjob import handlers as _trainingjob_handlers  # noqa: F401  (registers handlers)
from crds.common import API_VERSION, FINALIZER, GROUP

try:  # registered when the ModelVersion controller is present
    from controllers.modelversion import handlers as _modelversion_handlers  # noqa: F401
except ImportError as _e:  # pragma: no cover - only while the controller is being built
    if "controllers.modelversion" not in str(_e):
        raise

log = logging.getLogger("kubeforge.operator")


class ChangeTrackedDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, for the kinds that have change handlers (on.create/update/resume/delete) only.

    kopf builds a diff base (a deep copy of the body minus system fields) and reads the stored one for every
    event of every watched resource, whether or not a handler reacts to changes. Only ModelVersion has such
    handlers; TrainingJobs, their Jobs and pods (a dozen events per job) are handled level-triggered by
    on.event, so their essence is empty. With 1,000 TrainingJobs starting this was a third of the event
    loop's CPU (py-spy, bench/trainingjob_scale.py).
    """

    TRACKED = frozenset({(API_VERSION, "ModelVersion")})

    def _tracked(self, body: kopf.Body) -> bool:
        return (body.get("apiVersion"), body.get("kind")) in self.TRACKED

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if not self._tracked(body):
            return cast(kopf.BodyEssence, {})
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        if not self._tracked(body):
            return cast(kopf.BodyEssence, {})
        return super().fetch(body=body)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    cfg = config.load()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = ChangeTrackedDiffBase(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events for what a user must see are posted explicitly; kopf's per-handler chatter stays in the logs.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.queueing.idle_timeout = 60.0
    # Timers (ModelVersion drift checks) call MLflow synchronously: give them a moment to finish, then poll
    # once a second, so a deleted object or a stopping operator never waits kopf's default minute.
    settings.background.instant_exit_timeout = 2.0
    settings.background.cancellation_polling = 1.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    log.info(
        "kubeforge operator starting: mlflow=%s runtime image=%s gang scheduler=%s",
        cfg.mlflow_tracking_uri or "(not configured: registration disabled)",
        cfg.runtime_image,
        cfg.gang_scheduler_name,
    )


@kopf.on.probe(id="config")
def probe_config(**_: Any) -> dict[str, Any]:
    cfg = config.load()
    return {"mlflow": bool(cfg.mlflow_tracking_uri), "image": cfg.runtime_image}


def main(argv: list[str] | None = None) -> None:
    """`kubeforge-operator`: the same as `kopf run operator/main.py`, with the liveness endpoint on."""
    p = argparse.ArgumentParser(prog="kubeforge-operator", description=__doc__)
    p.add_argument("--standalone", action="store_true", help="no peering (a single operator)")
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch only these (globs allowed)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    p.add_argument("--peering", default="kubeforge", help="peering object name (high availability)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    args = p.parse_args(argv)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    kopf.run(
        standalone=args.standalone,
        # kopf makes peering mandatory whenever a name is given, even with standalone: pass none then
        peering_name=None if args.standalone else args.peering,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
