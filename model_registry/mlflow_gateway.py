"""The one module that talks to MLflow's model registry.

Everything else in kubeforge calls these functions and gets typed, immutable results. Under the hood it is
MLflow's own `MlflowClient`, with MLflow's built-in HTTP retries turned off (they wait minutes) and our own
bounded retries instead:

- transient failures (connection refused or reset, timeouts, HTTP 5xx, HTTP 429) are retried with exponential
  backoff a few times, then raised as `RegistryUnavailable`;
- permanent failures (HTTP 4xx: an invalid name, a missing run, a reserved alias) raise `RegistryRejected`
  at once, carrying MLflow's error code and message; `NotFound` is the 404 case.

Creating a version is never retried blindly: a timed-out create may have succeeded, so callers look the
version up by its tag (`find_versions_by_tag`) before creating again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

log = logging.getLogger("kubeforge.mlflow")
T = TypeVar("T")

READY = "READY"
PENDING_REGISTRATION = "PENDING_REGISTRATION"
FAILED_REGISTRATION = "FAILED_REGISTRATION"


class RegistryError(Exception):
    """A failed registry call."""

    def __init__(self, message: str, *, code: str = "", http_status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status


class RegistryUnavailable(RegistryError):
    """Transient: MLflow could not be reached or failed on its side (5xx, 429). Retrying later can help."""


class RegistryRejected(RegistryError):
    """Permanent: MLflow refused the request (4xx). Retrying the same request cannot help."""


class NotFound(RegistryRejected):
    """The registered model, version, alias or run does not exist."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> version
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    status: str
    status_message: str = ""
    source: str = ""
    run_id: str = ""
    run_link: str = ""
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    creation_timestamp: int = 0

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Run:
    run_id: str
    experiment_id: str
    status: str
    artifact_uri: str
    name: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)  # the last value of each
    params: Mapping[str, str] = field(default_factory=dict)


def _to_model(rm: Any) -> RegisteredModel:
    return RegisteredModel(
        name=rm.name,
        aliases={a: str(v) for a, v in (rm.aliases or {}).items()},
        tags=dict(rm.tags or {}),
        description=str(rm.description or ""),
    )


def _to_version(mv: Any) -> ModelVersion:
    return ModelVersion(
        name=mv.name,
        version=str(mv.version),
        status=str(mv.status or ""),
        status_message=str(mv.status_message or ""),
        source=str(mv.source or ""),
        run_id=str(mv.run_id or ""),
        run_link=str(mv.run_link or ""),
        aliases=tuple(sorted(mv.aliases or ())),
        tags=dict(mv.tags or {}),
        description=str(mv.description or ""),
        creation_timestamp=int(mv.creation_timestamp or 0),
    )


def classify(exc: BaseException) -> RegistryError:
    """Map an exception raised by MlflowClient (or requests below it) to ours."""
    if isinstance(exc, RegistryError):
        return exc
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
        code = str(exc.error_code)
        message = str(exc.message)
        if status == 404 or code == "RESOURCE_DOES_NOT_EXIST":
            return NotFound(message, code=code, http_status=404)
        if status == 429 or status >= 500:
            return RegistryUnavailable(message, code=code, http_status=status)
        return RegistryRejected(message, code=code, http_status=status)
    # requests.ConnectionError / Timeout, socket errors
    if isinstance(exc, OSError) or type(exc).__module__.startswith(("requests", "urllib3")):
        return RegistryUnavailable(f"{type(exc).__name__}: {exc}", code="UNREACHABLE")
    return RegistryUnavailable(f"{type(exc).__name__}: {exc}", code="UNKNOWN")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # total tries of an idempotent call
    backoff_s: float = 0.2  # first pause; doubles each time, with jitter
    max_backoff_s: float = 2.0


class MlflowGateway:
    """A client of one MLflow tracking/registry server. Thread-safe (MlflowClient uses a pooled session)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        ui_url: str | None = None,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        # MLflow reads these per request. Its defaults (7 retries, backoff factor 2, 120 s timeout) would hold
        # a reconcile for minutes while the server is down; we retry ourselves, briefly, and let the caller
        # requeue. One retry stays (urllib3 makes the first one at once): a pooled keep-alive connection the
        # server closed while idle (uvicorn: after 5 s) is reset on reuse, and that must not fail a call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.ui_url = (ui_url or (tracking_uri if tracking_uri.startswith("http") else "")).rstrip("/")
        self.retry = retry or RetryPolicy()
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- plumbing ---------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        attempts = self.retry.attempts if retry else 1
        pause = self.retry.backoff_s
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                err = classify(exc)
                if not isinstance(err, RegistryUnavailable) or attempt == attempts:
                    raise err from exc
                log.debug("%s failed (%s), retry %d/%d in %.2fs", what, err, attempt, attempts - 1, pause)
                time.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, self.retry.max_backoff_s)
        raise AssertionError("unreachable")

    # --- registered models ----------------------------------------------------------------------------
    def get_registered_model(self, name: str) -> RegisteredModel | None:
        try:
            rm = self._call("get registered model", lambda: self._client.get_registered_model(name))
        except NotFound:
            return None
        return _to_model(rm)

    def ensure_registered_model(self, name: str) -> RegisteredModel:
        """The registered model, created when missing (a concurrent creation is fine)."""
        found = self.get_registered_model(name)
        if found is not None:
            return found
        try:
            self._call("create registered model", lambda: self._client.create_registered_model(name))
        except RegistryRejected as e:
            if e.code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = self.get_registered_model(name)
        if found is None:
            raise RegistryUnavailable(f"registered model {name!r} vanished right after its creation")
        return found

    def get_aliases(self, name: str) -> dict[str, str]:
        """alias -> version of a registered model ({} when the model does not exist)."""
        rm = self.get_registered_model(name)
        return dict(rm.aliases) if rm else {}

    # --- versions -------------------------------------------------------------------------------------
    def find_versions_by_tag(self, name: str, key: str, value: str) -> list[ModelVersion]:
        """Versions of `name` whose tag `key` equals `value`, oldest first."""
        q = f"name = '{_quote(name)}' and tags.`{key}` = '{_quote(value)}'"
        found = self._call("search versions", lambda: self._client.search_model_versions(q, max_results=100))
        return sorted((_to_version(mv) for mv in found), key=lambda v: int(v.version))

    def create_version(
        self,
        name: str,
        source: str,
        *,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        run_link: str | None = None,
    ) -> ModelVersion:
        """Create a version, its tags set in the same call.

        Not retried: look the version up by tag before calling again. A runs:/ source goes through
        `registrable_source` first."""
        source, model_id = self.registrable_source(source)
        mv = self._call(
            "create version",
            lambda: self._client.create_model_version(
                name,
                source,
                run_id=run_id or None,
                tags=dict(tags or {}),
                run_link=run_link or None,
                description=description,
                await_creation_for=0,
                model_id=model_id,
            ),
            retry=False,
        )
        return _to_version(mv)

    def registrable_source(self, source: str) -> tuple[str, str | None]:
        """(source, model id) to register for `source`. MLflow 3 logs a model as a LoggedModel whose files
        are stored apart from the run's artifacts: a runs:/<run>/<name> URI naming the run's logged model
        <name> (the newest, if several) is registered as models:/<model id> with that id, as
        mlflow.register_model does. Registered as the runs:/ URI, the server would point the version at the
        run's artifact folder <name>, which is empty, and no server could load the version. (Listing the
        run's artifacts first, as mlflow.register_model does, goes through MLflow's process-wide tracking
        URI, not this client's.) Other sources, and runs without such a model, go as given."""
        if not source.startswith("runs:/"):
            return source, None
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        path = path.strip("/")
        if not path:
            return source, None
        run = self._call("get run", lambda: self._client.get_run(run_id))
        found = self._call(
            "search logged models",
            lambda: self._client.search_logged_models(
                [run.info.experiment_id], filter_string=f"name = '{_quote(path)}'"
            ),
        )
        mine = [m for m in found if m.source_run_id == run_id]
        if not mine:
            return source, None
        newest = max(mine, key=lambda m: m.creation_timestamp or 0)
        return f"models:/{newest.model_id}", str(newest.model_id)

    def get_version(self, name: str, version: str) -> ModelVersion | None:
        try:
            mv = self._call("get version", lambda: self._client.get_model_version(name, version))
            return _to_version(mv)
        except NotFound:
            return None

    def delete_version(self, name: str, version: str) -> bool:
        """Delete a version (its aliases go with it). False when it was already gone."""
        try:
            self._call("delete version", lambda: self._client.delete_model_version(name, version))
        except NotFound:
            return False
        return True

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call("set alias", lambda: self._client.set_registered_model_alias(name, alias, version))

    def delete_alias(self, name: str, alias: str) -> None:
        with contextlib.suppress(NotFound):
            self._call("delete alias", lambda: self._client.delete_registered_model_alias(name, alias))

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._call("set tag", _bind(self._client.set_model_version_tag, name, version, key, value))

    def delete_version_tags(self, name: str, version: str, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(NotFound):
                self._call("delete tag", _bind(self._client.delete_model_version_tag, name, version, key))

    def set_description(self, name: str, version: str, description: str) -> None:
        self._call(
            "update version",
            lambda: self._client.update_model_version(name, version, description=description),
        )

    def archive_version(self, name: str, version: str, tag: str = "kubeforge.io/archived") -> None:
        """Archive: tag the version and remove the aliases it holds."""
        self.set_version_tags(name, version, {tag: "true"})
        mv = self.get_version(name, version)
        for alias in mv.aliases if mv else ():
            self.delete_alias(name, alias)

    # --- runs and links -------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> Run | None:
        try:
            r = self._call("get run", lambda: self._client.get_run(run_id))
        except NotFound:
            return None
        return Run(
            run_id=r.info.run_id,
            experiment_id=str(r.info.experiment_id),
            status=str(r.info.status),
            artifact_uri=str(r.info.artifact_uri or ""),
            name=str(r.info.run_name or ""),
            metrics={k: float(v) for k, v in (r.data.metrics or {}).items()},
            params={k: str(v) for k, v in (r.data.params or {}).items()},
        )

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Every value logged for a run's metric, as (step, value) in the order MLflow returns them."""
        found = self._call("get metric history", lambda: self._client.get_metric_history(run_id, key))
        return [(int(m.step), float(m.value)) for m in found]

    def _all_pages(self, what: str, search: Callable[..., Any]) -> list[Any]:
        """Every item of an MLflow search, its pages followed to the end (`search(page_token=...)`)."""
        out: list[Any] = []
        token: str | None = None
        while True:
            page = self._call(what, functools.partial(search, page_token=token))
            out += list(page)
            token = getattr(page, "token", None)
            if not token:
                return out

    def list_models(self, page_size: int = 1000) -> list[RegisteredModel]:
        """Every registered model, by name."""
        search = functools.partial(self._client.search_registered_models, max_results=page_size)
        found = self._all_pages("search registered models", search)
        return sorted((_to_model(m) for m in found), key=lambda m: m.name)

    def list_versions(self, name: str, page_size: int = 1000) -> list[ModelVersion]:
        """Every version of `name`, newest first."""
        q = f"name = '{_quote(name)}'"
        search = functools.partial(self._client.search_model_versions, q, max_results=page_size)
        found = self._all_pages("search versions", search)
        return sorted((_to_version(mv) for mv in found), key=lambda v: -int(v.version))

    def run_link(self, run: Run) -> str:
        """Link to a run in MLflow's UI ('' when no UI URL is known)."""
        if not self.ui_url:
            return ""
        return f"{self.ui_url}/#/experiments/{run.experiment_id}/runs/{run.run_id}"

    def signature_summary(self, model_source: str) -> str | None:
        """'inputs: ...; outputs: ...' from the model's MLmodel file (None: none, or unreadable)."""
        from mlflow.artifacts import download_artifacts

        uri = model_source.rstrip("/") + "/MLmodel"
        try:
            path = self._call(
                "download MLmodel",
                lambda: download_artifacts(artifact_uri=uri, tracking_uri=self.tracking_uri),
            )
            with open(path) as f:
                mlmodel = yaml.safe_load(f) or {}
        except (RegistryError, OSError, ValueError, yaml.YAMLError) as e:
            log.debug("no signature for %s: %s", model_source, e)
            return None
        return summarize_signature(mlmodel.get("signature"))


def summarize_signature(sig: Any) -> str | None:
    """Short text of an MLmodel `signature` section: 'inputs: [x: double (-1, 4)]; outputs: [...]'."""
    if not isinstance(sig, dict):
        return None
    parts: list[str] = []
    for side in ("inputs", "outputs"):
        raw = sig.get(side)
        if not raw:
            continue
        specs = yaml.safe_load(raw) if isinstance(raw, str) else raw
        items: list[str] = []
        for s in specs if isinstance(specs, list) else []:
            if not isinstance(s, dict):
                continue
            name = s.get("name")
            dtype = s.get("type") if s.get("type") != "tensor" else (s.get("tensor-spec") or {}).get("dtype")
            shape = (s.get("tensor-spec") or {}).get("shape")
            text = f"{name}: {dtype}" if name else str(dtype)
            if shape is not None:
                text += f" {tuple(shape)}"
            items.append(text)
        parts.append(f"{side}: [{', '.join(items)}]")
    return "; ".join(parts) or None


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return functools.partial(fn, *args)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
