"""Publishing progress (rank 0): the pod's ``kubeforge.io/progress`` annotation in the cluster, a JSON
file and a
terminal progress bar locally, and the final summary in /dev/termination-log. Failures to publish are logged,
never fatal; publishing is throttled (at most every ``interval`` seconds, plus forced reports at
checkpoints and
at the end)."""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO

from crds.common import ANNOTATION_PROGRESS
from crds.trainingjob import TrainingProgress

log = logging.getLogger("kubeforge.progress")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TERMINATION_LOG = Path("/dev/termination-log")


class Sink(Protocol):
    def publish(self, p: TrainingProgress) -> None: ...


class FileSink:
    """The latest report as JSON, replaced atomically."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def publish(self, p: TrainingProgress) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(p.to_wire()))
        tmp.replace(self.path)


class PodAnnotationSink:
    """Merge-patches this pod's annotation through the API server with the pod's service-account token."""

    def __init__(self, pod: str, namespace: str, host: str, port: str, sa_dir: Path = SA_DIR) -> None:
        self.url = f"https://{host}:{port}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.sa_dir = sa_dir
        ca = sa_dir / "ca.crt"
        self.ctx = (
            ssl.create_default_context(cafile=str(ca)) if ca.is_file() else ssl.create_default_context()
        )

    @classmethod
    def from_env(cls) -> PodAnnotationSink | None:
        pod, ns = os.environ.get("KUBEFORGE_POD_NAME"), os.environ.get("KUBEFORGE_POD_NAMESPACE")
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        # KUBEFORGE_SERVICEACCOUNT_DIR: token and ca.crt elsewhere (a process standing in for a pod, in tests)
        sa_dir = Path(os.environ.get("KUBEFORGE_SERVICEACCOUNT_DIR") or SA_DIR)
        if not (pod and ns and host and (sa_dir / "token").is_file()):
            return None
        return cls(pod, ns, host, port, sa_dir)

    def publish(self, p: TrainingProgress) -> None:
        body = {
            "metadata": {"annotations": {ANNOTATION_PROGRESS: json.dumps(p.to_wire(), separators=(",", ":"))}}
        }
        token = (self.sa_dir / "token").read_text().strip()
        req = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
        )
        with urllib.request.urlopen(req, timeout=5, context=self.ctx) as resp:
            resp.read()


class TerminalBar:
    """A one-line bar on a terminal; a plain line per report otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream: TextIO = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def publish(self, p: TrainingProgress) -> None:
        total = max(1, p.total_steps)
        width = 30
        done = int(width * min(p.step, total) / total)
        loss = f" loss {p.loss:.4f}" if p.loss is not None else ""
        ckpt = f" ckpt {p.last_checkpoint_step}" if p.last_checkpoint_step is not None else ""
        line = (
            f"[{'#' * done}{'.' * (width - done)}] {p.step}/{p.total_steps}{loss}{ckpt} "
            f"ws {p.world_size} restarts {p.restarts} {p.state}"
        )
        end = "\n" if (not self.tty or p.state != "running") else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


class ProgressPublisher:
    def __init__(self, sinks: list[Sink], interval_s: float = 5.0) -> None:
        self.sinks, self.interval = sinks, interval_s
        self.last = 0.0

    def publish(self, p: TrainingProgress, *, force: bool = False) -> bool:
        """Send ``p`` to every sink unless throttled; True when sent."""
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return False
        self.last = now
        p = p.model_copy(update={"updated": datetime.now(UTC).isoformat(timespec="seconds")})
        for sink in self.sinks:
            try:
                sink.publish(p)
            except Exception as e:  # never fatal: the operator falls back to pod phases
                log.warning("publishing progress to %s failed: %s", type(sink).__name__, e)
        return True


def write_termination_log(p: TrainingProgress, path: Path = TERMINATION_LOG) -> None:
    """The final summary where Kubernetes reads a container's termination message (if the file exists)."""
    if not path.exists():
        return
    try:
        path.write_text(json.dumps(p.to_wire(), separators=(",", ":"))[:4096])
    except OSError as e:
        log.warning("writing %s failed: %s", path, e)
