"""`kubeforge-registry`: the model registry's service and web UI (FastAPI).

Models, versions and aliases, and each run's metrics, come from MLflow (the system of record) on every
request; lineage (training job → run → version → deployments) from the kubeforge.io objects of the cluster,
recorded in a database (model_registry.lineage) at most every `refresh_seconds`, so that it outlives the
objects. JSON under /api, the same as HTML pages under /.

    kubeforge-registry --mlflow-uri http://mlflow:5000 --db sqlite:////var/lib/kubeforge/lineage.db
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import jinja2
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_registry import charts, lineage, promotions
from model_registry.mlflow_gateway import (
    MlflowGateway,
    NotFound,
    RegisteredModel,
    RegistryError,
    RegistryUnavailable,
)

log = logging.getLogger("kubeforge.registry")
Objects = Mapping[str, Iterable[Mapping[str, Any]]]
KINDS = {
    lineage.TRAINING: "trainingjobs",
    lineage.REGISTRATION: "modelversions",
    lineage.DEPLOYMENT: "inferenceservices",
}
MAX_CHARTS = 24  # a version page draws at most this many of its run's metrics (one MLflow call each)
COMPARED_VERSIONS = 20  # a model page shows the runs' metrics of this many newest versions (a call per run)
COMPARED_METRICS = 6  # in this many columns: the metrics most of those runs logged


def cluster_lister(kubeconfig: str | None = None) -> Callable[[], Objects]:
    """The kubeforge.io objects of every namespace, read with the kubernetes client (in-cluster credentials,
    else `kubeconfig`, else KUBECONFIG)."""
    from kubernetes import client, config

    if kubeconfig is None:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            api = client.ApiClient()
        except config.ConfigException:
            api = config.new_client_from_config()  # type: ignore[no-untyped-call]
    else:
        api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    custom = client.CustomObjectsApi(api)

    def objects() -> Objects:
        out: dict[str, list[Mapping[str, Any]]] = {}
        for kind, plural in KINDS.items():
            listed = cast(
                dict[str, Any], custom.list_cluster_custom_object("kubeforge.io", "v1alpha1", plural)
            )
            out[kind] = list(listed.get("items") or [])
        return out

    return objects


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True
)
# the record keeps full timestamps (two readings within a second must not look like one); pages show seconds
_ENV.filters["seconds"] = lambda iso: datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")


def create_app(
    gateway: MlflowGateway,
    engine: Engine,
    lister: Callable[[], Objects] | None = None,
    refresh_seconds: float = 10.0,
) -> FastAPI:
    SQLModel.metadata.create_all(engine)
    refreshed = [float("-inf")]
    lock = threading.Lock()

    def refresh() -> None:
        """Read the cluster (lineage) and MLflow's aliases (promotions), at most every refresh_seconds; what
        cannot be read keeps what was recorded (the cluster is an enrichment, MLflow answers again later)."""
        with lock:
            if time.monotonic() - refreshed[0] < refresh_seconds:
                return
            refreshed[0] = time.monotonic()
            now = datetime.now(UTC)
            objects: Objects | None = None
            if lister is not None:
                try:
                    objects = lister()
                except Exception as e:
                    log.warning("lineage not refreshed, the cluster could not be read: %s", e)
            try:
                listed: list[RegisteredModel] | None = gateway.list_models()
            except RegistryError as e:
                log.warning("promotions not recorded, MLflow could not be read: %s", e)
                listed = None
            with Session(engine) as session:
                if objects is not None:
                    lineage.observe(session, objects, now)
                if listed is not None:
                    declared = (
                        None
                        if objects is None
                        else promotions.declarations(objects.get(lineage.REGISTRATION, ()))
                    )
                    promotions.record(session, {m.name: m.aliases for m in listed}, declared, now)

    @asynccontextmanager
    async def watch(_: FastAPI) -> AsyncIterator[None]:
        """While served, read every refresh_seconds (at least 1 s apart) so that no page has to ask: an alias
        moved and moved back while nobody looked still leaves its trail."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(max(refresh_seconds, 1.0)):
                try:
                    refresh()
                except Exception:
                    log.exception("reading the cluster and MLflow failed")

        thread = threading.Thread(target=loop, name="registry-refresh", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)

    app = FastAPI(title="Kubeforge model registry", lifespan=watch)

    def registry(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RegistryUnavailable as e:
            raise HTTPException(503, f"MLflow is unavailable: {e}") from None
        except NotFound as e:
            raise HTTPException(404, f"MLflow has no such thing: {e}") from None
        except RegistryError as e:  # MLflow refused the request as asked
            raise HTTPException(400, f"MLflow refused: {e}") from None

    def models(q: str = "") -> dict[str, Any]:
        """Registered models; with `q`, those whose name, an alias or the description holds it (any case)."""
        found = registry(gateway.list_models)
        want = q.strip().casefold()
        if want:
            found = [m for m in found if want in _haystack(m.name, *m.aliases, m.description)]
        return {"models": [asdict(m) for m in found], "q": q}

    def model(name: str) -> dict[str, Any]:
        found = registry(lambda: gateway.get_registered_model(name))
        if found is None:
            raise HTTPException(404, f"no registered model {name!r} in MLflow")
        versions = registry(lambda: gateway.list_versions(name))
        # MLflow's version search leaves aliases out: they come from the registered model
        held = {v: sorted(a for a, n in found.aliases.items() if n == v) for v in found.aliases.values()}
        refresh()
        with Session(engine) as session:
            moves = [p.model_dump(mode="json") for p in promotions.trail(session, name)]
        return {
            **asdict(found),
            "versions": [{**asdict(v), "aliases": held.get(v.version, [])} for v in versions],
            "promotions": moves,
        }

    def version(name: str, number: str) -> dict[str, Any]:
        if not number.isdigit():
            raise HTTPException(404, f"{number!r} is not a version number (1, 2, ...)")
        v = registry(lambda: gateway.get_version(name, number))
        if v is None:
            raise HTTPException(404, f"no version {number} of registered model {name!r} in MLflow")
        run = registry(lambda: gateway.get_run(v.run_id)) if v.run_id else None
        refresh()
        with Session(engine) as session:
            links = lineage.lineage_of(session, name, number, v.run_id)
            observed = lineage.last_observed(session)
            found: dict[str, list[dict[str, Any]]] = {
                step: [link.model_dump(mode="json") | {"current": link.last_seen == observed} for link in ls]
                for step, ls in links.items()
            }
        return {
            "version": asdict(v),
            "run": asdict(run) | {"link": gateway.run_link(run)} if run else None,
            "lineage": found,
        }

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        return cast(list[tuple[int, float]], registry(lambda: gateway.metric_history(run_id, key)))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/models")
    def api_models(q: str = "") -> dict[str, Any]:
        return models(q)

    @app.get("/api/models/{name}")
    def api_model(name: str) -> dict[str, Any]:
        return model(name)

    @app.get("/api/models/{name}/versions/{number}")
    def api_version(name: str, number: str) -> dict[str, Any]:
        return version(name, number)

    @app.get("/api/runs/{run_id}/metrics/{key:path}")  # keys may hold "/" (train/loss)
    def api_metric(run_id: str, key: str) -> dict[str, Any]:
        """Every (step, value) logged for one of a run's metrics (NaN and infinities as MLflow keeps them:
        strings, since JSON has no such numbers)."""
        if registry(lambda: gateway.get_run(run_id)) is None:  # MLflow answers an unknown run's history: []
            raise HTTPException(404, f"no run {run_id!r} in MLflow")
        points = history(run_id, key)
        return {
            "run_id": run_id,
            "key": key,
            "history": [{"step": s, "value": x if math.isfinite(x) else str(x)} for s, x in points],
        }

    def page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(_ENV.get_template(template).render(**context), status_code=status_code)

    @app.exception_handler(StarletteHTTPException)
    async def error(request: Request, exc: StarletteHTTPException) -> Response:
        """/api answers errors in JSON ({"detail": ...}); the pages in a page that says what went wrong."""
        if request.url.path.startswith("/api/") or request.url.path == "/healthz":
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return page("error.html", exc.status_code, title=f"Error {exc.status_code}", detail=exc.detail)

    @app.get("/", response_class=HTMLResponse)
    def index(q: str = "") -> HTMLResponse:
        return page("models.html", title="Models", **models(q))

    @app.get("/models/{name}", response_class=HTMLResponse)
    def model_page(name: str) -> HTMLResponse:
        got = model(name)
        runs: dict[str, dict[str, float]] = {}
        for v in got["versions"][:COMPARED_VERSIONS]:
            rid = v["run_id"]
            if rid and rid not in runs:
                run = registry(functools.partial(gateway.get_run, rid))
                runs[rid] = dict(run.metrics) if run else {}
        counts: dict[str, int] = {}
        for metrics in runs.values():
            for key in metrics:
                counts[key] = counts.get(key, 0) + 1
        columns = sorted(counts, key=lambda k: (-counts[k], k))[:COMPARED_METRICS]
        return page("model.html", title=name, metric_columns=sorted(columns), run_metrics=runs, **got)

    @app.get("/models/{name}/versions/{number}", response_class=HTMLResponse)
    def version_page(name: str, number: str) -> HTMLResponse:
        got = version(name, number)
        run = got["run"]
        keys = sorted(run["metrics"]) if run else []
        drawn = {k: charts.line_chart(history(run["run_id"], k)) for k in keys[:MAX_CHARTS]}
        return page(
            "version.html",
            title=f"{name} version {number}",
            name=name,
            v=got["version"],
            run=run,
            lineage=got["lineage"],
            charts=drawn,
            more_metrics=len(keys) - len(drawn),
        )

    return app


def _haystack(*texts: str) -> str:
    return "\n".join(texts).casefold()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kubeforge-registry", description=__doc__.split("\n\n")[0])
    p.add_argument("--mlflow-uri", required=True, help="MLflow tracking and registry server")
    p.add_argument("--mlflow-ui-url", help="base of links to MLflow's UI (default: --mlflow-uri)")
    p.add_argument("--db", default="sqlite:///lineage.db", help="SQLAlchemy URL of the lineage database")
    p.add_argument(
        "--kubeconfig", help="read the cluster with this file (default: in-cluster, else KUBECONFIG)"
    )
    p.add_argument("--no-cluster", action="store_true", help="no lineage from a cluster (MLflow only)")
    p.add_argument("--refresh-seconds", type=float, default=10.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    args = p.parse_args(argv)
    import uvicorn

    app = create_app(
        MlflowGateway(args.mlflow_uri, ui_url=args.mlflow_ui_url),
        create_engine(args.db),
        None if args.no_cluster else cluster_lister(args.kubeconfig),
        args.refresh_seconds,
    )
    uvicorn.run(app, host=args.host, port=args.port)
