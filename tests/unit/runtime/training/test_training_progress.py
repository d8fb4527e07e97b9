"""Progress publishing: file, pod annotation (merge patch with the service-account token), throttling."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from crds.common import ANNOTATION_PROGRESS
from crds.trainingjob import TrainingProgress
from runtime.training.progress import (
    FileSink,
    PodAnnotationSink,
    ProgressPublisher,
    TerminalBar,
    write_termination_log,
)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[TrainingProgress] = []

    def publish(self, p: TrainingProgress) -> None:
        self.seen.append(p)


class Failing:
    def publish(self, p: TrainingProgress) -> None:
        raise ConnectionError("api server down")


def test_throttled_but_forced_reports_pass_and_failures_are_not_fatal() -> None:
    rec = Recorder()
    pub = ProgressPublisher([Failing(), rec], interval_s=60)
    assert pub.publish(TrainingProgress(step=1))
    assert not pub.publish(TrainingProgress(step=2))
    assert pub.publish(TrainingProgress(step=3, last_checkpoint_step=3), force=True)
    assert [p.step for p in rec.seen] == [1, 3]
    assert all(p.updated for p in rec.seen)


def test_file_sink_and_termination_log(tmp_path: Path) -> None:
    FileSink(str(tmp_path / "p.json")).publish(TrainingProgress(step=4, total_steps=10, run_id="r1"))
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["step"] == 4 and data["totalSteps"] == 10 and data["runId"] == "r1"
    log = tmp_path / "termination-log"
    write_termination_log(TrainingProgress(state="succeeded"), log)
    assert not log.exists(), "written only where Kubernetes provides the file"
    log.touch()
    write_termination_log(TrainingProgress(state="succeeded", step=10), log)
    assert json.loads(log.read_text())["state"] == "succeeded"


def test_terminal_bar() -> None:
    out = io.StringIO()
    TerminalBar(out).publish(TrainingProgress(step=5, total_steps=10, loss=1.5))
    assert "5/10" in out.getvalue() and "loss 1.5000" in out.getvalue()


def test_pod_annotation_merge_patch(tmp_path: Path) -> None:
    got: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            got["path"], got["auth"] = self.path, self.headers["Authorization"]
            got["type"] = self.headers["Content-Type"]
            got["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    (tmp_path / "token").write_text("secret-token\n")
    sink = PodAnnotationSink("job-worker-0", "team-a", "127.0.0.1", "1", sa_dir=tmp_path)
    sink.url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/namespaces/team-a/pods/job-worker-0"
    sink.publish(TrainingProgress(step=7, total_steps=9, restarts=1))
    server.server_close()
    assert got["path"] == "/api/v1/namespaces/team-a/pods/job-worker-0"
    assert got["auth"] == "Bearer secret-token" and got["type"] == "application/merge-patch+json"
    annotation = json.loads(got["body"]["metadata"]["annotations"][ANNOTATION_PROGRESS])
    assert annotation["step"] == 7 and annotation["restarts"] == 1
