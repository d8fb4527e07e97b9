"""Open Inference Protocol v2 over REST, served by runtime.serving.protocol.http1 (no framework, no ASGI).

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{m}[/versions/{v}], .../ready, /metrics,
Triton's .../config, .../stats and /v2/models/stats (protocol.triton), GET/POST /v2/logging (its logging
extension), its shared memory routes
/v2/{system,cuda}sharedmemory/... (protocol.sharedmem); POST /v2/models/{m}[/versions/{v}]/infer.
Errors are `{"error": "..."}` with a 4xx/5xx status.

An infer request is announced to the batcher as soon as its head is read (the batcher waits for announced
requests), and its body goes where `slot_body` says (a protocol worker's shared-memory slot, for binary
tensor data) or into a buffer of its own.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from runtime.serving.errors import BadRequest, InferError, NotFound
from runtime.serving.metrics import CONTENT_TYPE, Metrics
from runtime.serving.model import Repository, ServedModel
from runtime.serving.protocol.codec import decode_request, encode_response, parse_json, shm_register_body
from runtime.serving.protocol.compression import CompressionError, inflate
from runtime.serving.protocol.http1 import (
    JSON,
    Body,
    Budget,
    HttpError,
    PlainBody,
    Request,
    Response,
    error_response,
)
from runtime.serving.protocol.sharedmem import CUDA_REFUSED
from runtime.serving.protocol.triton import LOAD_REFUSED, Extensions

# (body length, Inference-Header-Content-Length) -> a body in shared memory, or None
SlotBody = Callable[[int, int], Body | None]
SLOT_BODY_MIN = 64 << 10  # smaller bodies are copied into shared memory after decoding (cheap)


class _Announced:
    """A body whose request is announced to its model's batcher: withdrawn on release unless infer() took
    the announcement over."""

    __slots__ = ("inner", "model", "view")

    def __init__(self, inner: Body, model: ServedModel) -> None:
        self.view = inner.view
        self.inner = inner
        self.model: ServedModel | None = model
        model.batcher.announce()

    def take(self) -> None:
        self.model = None

    def release(self) -> None:
        if self.model is not None:
            self.model.batcher.withdraw()
            self.model = None
        self.inner.release()


class RestApp:
    def __init__(
        self,
        repo: Repository,
        metrics: Metrics,
        server_info: Callable[[], dict[str, Any]],
        *,
        is_ready: Callable[[], bool],
        render_metrics: Callable[[], Awaitable[bytes]] | None = None,
        slot_body: SlotBody | None = None,
        triton: Extensions | None = None,
        max_payload: int = 64 << 20,
        budget: Budget | None = None,
    ) -> None:
        """`max_payload`, `budget`: what a compressed request body may inflate to, and the process's request
        bytes it is held against (protocol.compression)."""
        self.max_payload = max_payload
        self.budget = budget or Budget(4 * max_payload)
        self.repo = repo
        self.triton = triton or Extensions(repo, metrics, {}, render_metrics)
        self.metrics = metrics
        self.server_info = server_info
        self.is_ready = is_ready
        self.render_metrics = render_metrics
        self.slot_body = slot_body

    # -- http1.App --
    def body_buffer(self, req: Request, length: int) -> Body:
        body: Body | None = None
        infer = req.method == "POST" and req.path.endswith("/infer")
        # a compressed body is inflated out of its buffer (protocol.compression): no slot for it
        encoded = req.header(b"content-encoding") not in (None, b"", b"identity")
        if infer and self.slot_body is not None and length >= SLOT_BODY_MIN and not encoded:
            head = req.header(b"inference-header-content-length")
            if head is not None and head.isdigit():
                body = self.slot_body(length, int(head))
        if body is None:
            body = PlainBody(memoryview(bytearray(length)))
        model = self._model_of(req.path) if infer else None
        return body if model is None else _Announced(body, model)

    def answer_now(self, req: Request) -> Response | None:
        if req.method == "POST" and req.path.endswith("/infer"):
            return None
        if req.method == "POST" and req.path.startswith("/v2/repository/"):
            return self._repository(req.path)
        if req.path.startswith(SHM_ROUTES):
            return None if req.method == "POST" else self._shm(req, b"")
        if req.path == LOGGING and req.method == "POST":
            return None
        if req.method not in ("GET", "HEAD"):
            return error_response(405, f"method {req.method} not allowed on {req.path}")
        if req.path == "/metrics":
            if self.render_metrics is not None:
                return None
            return 200, self.metrics.render(), [(b"content-type", CONTENT_TYPE.encode())]
        if req.path.endswith("/stats"):
            return None  # read from the metrics: answered by `answer`
        try:
            return self._get(req.path)
        except HttpError as e:
            return error_response(e.status, e.message)
        except InferError as e:
            return error_response(e.http_status, e.message)

    async def answer(self, req: Request, body: Body) -> Response:
        if req.path == "/metrics":
            assert self.render_metrics is not None
            return 200, await self.render_metrics(), [(b"content-type", CONTENT_TYPE.encode())]
        try:
            if req.method != "POST":  # .../stats
                return 200, orjson.dumps(await self._stats(req.path)), JSON
            if req.path.startswith(SHM_ROUTES):
                return self._shm(req, body.view)
            if req.path == LOGGING:
                changes = parse_json(body.view) if len(body.view) else {}  # empty: read them
                return 200, orjson.dumps(await self.triton.update_log_settings(changes)), JSON
            return await self._infer(req, body)
        except HttpError as e:
            return error_response(e.status, e.message)
        except InferError as e:
            return error_response(e.http_status, e.message)

    def _infer_model(self, path: str) -> ServedModel:
        """The model an infer route names; HttpError 404 for another route, InferError for a missing model."""
        parts = path.strip("/").split("/")
        if len(parts) < 4 or parts[:2] != ["v2", "models"]:
            raise HttpError(404, f"no route {path}")
        name, version, rest = _model_path(parts)
        if rest != ["infer"]:
            raise HttpError(404, f"no route {path}")
        return self.repo.get(name, version)

    def _model_of(self, path: str) -> ServedModel | None:
        try:
            return self._infer_model(path)
        except (HttpError, InferError):
            return None  # answered when the request is: 404 naming what is missing

    def _get(self, path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        if path == "/v2/health/live":
            return 200, b'{"live":true}', JSON
        if path == "/v2/health/ready":
            ready = self.is_ready()
            return (200 if ready else 503), orjson.dumps({"ready": ready}), JSON
        if path in ("/v2", "/v2/"):
            return 200, orjson.dumps(self.server_info()), JSON
        if path == LOGGING:
            return 200, orjson.dumps(self.triton.log_settings()), JSON
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            name, version, rest = _model_path(parts)
            model = self.repo.get(name, version)
            if rest == []:
                return 200, orjson.dumps(model.metadata()), JSON
            if rest == ["ready"]:
                ready = model.ready and self.is_ready()
                body = {"name": model.name, "version": model.version, "ready": ready, **model.info}
                return (200 if ready else 503), orjson.dumps(body), JSON
            if rest == ["config"]:
                return 200, orjson.dumps(self.triton.config(name, version)), JSON
        raise HttpError(404, f"no route {path}")

    def _repository(self, path: str) -> Response:
        """Triton's model repository extension: the index (every model: the filter of a `{"ready": true}`
        body is gRPC's here), load and unload refused (protocol.triton)."""
        parts = path.strip("/").split("/")
        if parts == ["v2", "repository", "index"]:
            return 200, orjson.dumps(self.triton.index()), JSON
        if len(parts) == 5 and parts[:3] == ["v2", "repository", "models"] and parts[4] in ("load", "unload"):
            return error_response(501, LOAD_REFUSED)
        return error_response(404, f"no route {path}")

    def _shm(self, req: Request, body: bytes | memoryview) -> Response:
        """Triton's shared memory extension: v2/{system,cuda}sharedmemory[/region/{name}]/{status,register,
        unregister} (protocol.sharedmem; CUDA: status empty, register refused)."""
        parts = req.path.strip("/").split("/")
        kind, op = parts[1], parts[-1]
        if len(parts) == 3:
            name = ""
        elif len(parts) == 5 and parts[2] == "region" and parts[3]:
            name = urllib.parse.unquote(parts[3])
        else:
            return error_response(404, f"no route {req.path}")
        if op not in SHM_OPS or (op == "register" and not name):
            return error_response(404, f"no route {req.path}")
        if (op == "status") != (req.method in ("GET", "HEAD")):
            return error_response(405, f"method {req.method} not allowed on {req.path}")
        try:
            if kind == "cudasharedmemory":
                if op == "register":
                    return error_response(501, CUDA_REFUSED)
                if op == "status" and name:
                    raise NotFound(f"CUDA shared memory region {name!r} is not registered")
                return 200, b"[]" if op == "status" else b"{}", JSON
            if op == "status":
                return 200, orjson.dumps([r.status() for r in self.triton.shm_status(name)]), JSON
            if op == "register":
                self.triton.shm_register(name, *shm_register_body(body))
            else:
                self.triton.shm_unregister(name)
            return 200, b"{}", JSON
        except InferError as e:
            return error_response(e.http_status, e.message)

    async def _stats(self, path: str) -> dict[str, Any]:
        """Triton's statistics of /v2/models/stats (every model) or /v2/models/{m}[/versions/{v}]/stats."""
        parts = path.strip("/").split("/")
        if parts == ["v2", "models", "stats"]:
            return await self.triton.statistics("", None)
        if len(parts) >= 4 and parts[:2] == ["v2", "models"]:
            name, version, rest = _model_path(parts)
            if rest == ["stats"]:
                return await self.triton.statistics(name, version)
        raise HttpError(404, f"no route {path}")

    async def _infer(self, req: Request, body: Body) -> Response:
        t0 = time.perf_counter()
        # an announced body's model was looked up when the head came
        announced = body if isinstance(body, _Announced) and body.model is not None else None
        model = announced.model if announced is not None and announced.model else self._infer_model(req.path)
        code = 200
        model_label = model.name
        self.metrics.started(model_label)
        shm = self.triton.shm
        decoded = None
        inflated = 0  # request bytes held for an inflated body (given back once answered)
        try:
            header_len: int | None = None
            deadline = math.inf
            encodings: list[str] = []
            for k, v in req.headers:
                if k == b"inference-header-content-length":
                    header_len = _int_header(k, v)
                elif k == b"content-encoding":
                    encodings += [e.strip() for e in v.decode(errors="replace").split(",")]
                elif k == ENVOY_TIMEOUT:
                    # what is left of a proxy's route timeout (Envoy, Istio, Knative: KServe's stack)
                    ms = _int_header(k, v)
                    if ms < 0:
                        raise BadRequest(f"header {k.decode()} is negative: {ms} ms")
                    deadline = time.monotonic() + ms / 1000 if ms else math.inf
            view = body.view
            encodings = [e for e in encodings if e.lower() not in ("identity", "")]
            if len(encodings) > 1:
                raise HttpError(415, f"Content-Encoding {', '.join(encodings)}: send the body encoded once")
            if encodings:
                view = memoryview(self._inflate(view, encodings[0]))
                inflated = len(view)
            decoded = decode_request(view, header_len, model.signature, model.max_batch_size, shm)
            if announced is not None:
                announced.take()  # infer() consumes the announcement
            else:
                model.batcher.announce()
            if decoded.timeout_s is not None:
                deadline = min(deadline, time.monotonic() + decoded.timeout_s)
            outs = await model.infer(
                decoded.inputs, decoded.rows, deadline=deadline, priority=decoded.priority
            )
            payload, head_len = encode_response(
                model.name, model.version, decoded, model.signature, outs, shm
            )
            if head_len is None:
                return 200, payload, JSON
            return (
                200,
                payload,
                [
                    (b"content-type", b"application/octet-stream"),
                    (b"inference-header-content-length", str(head_len).encode()),
                ],
            )
        except HttpError as e:
            code = e.status
            raise
        except InferError as e:
            code = e.http_status
            raise
        except asyncio.CancelledError:
            code = 499  # the client left before its answer (nginx's "client closed request")
            raise
        except Exception:
            code = 500  # what http1 answers for it; not counted as a success
            raise
        finally:
            if decoded is not None and decoded.shm_reads is not None and shm is not None:
                shm.release(decoded.shm_reads)
            self.budget.give(inflated)
            self.metrics.ended(model_label)
            seconds = time.perf_counter() - t0 if code == 200 else None
            self.metrics.answered(model_label, "rest", str(code), seconds)

    def _inflate(self, data: memoryview, encoding: str) -> bytearray:
        """A compressed request body inflated (protocol.compression), or the HTTP error that refuses it."""
        try:
            return inflate(data, encoding, self.max_payload, self.budget, "rest", "request body")
        except CompressionError as e:
            status = {"unsupported": 415, "too_large": 413, "busy": 429}.get(e.kind, 400)
            raise HttpError(status, f"Content-Encoding {encoding}: {e.message}") from None


SHM_ROUTES = ("/v2/systemsharedmemory/", "/v2/cudasharedmemory/")
LOGGING = "/v2/logging"  # Triton's logging extension (protocol.triton)
SHM_OPS = ("status", "register", "unregister")

# Envoy's time in ms it expects the request to complete in (its route timeout), set on requests it forwards
ENVOY_TIMEOUT = b"x-envoy-expected-rq-timeout-ms"


def _int_header(name: bytes, value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest(
            f"header {name.decode()} is not an integer: {value.decode(errors='replace')!r}"
        ) from None


def _model_path(parts: list[str]) -> tuple[str, str | None, list[str]]:
    """['v2','models',name,('versions',v),...rest] → (name, version, rest)."""
    name = parts[2]
    if len(parts) >= 5 and parts[3] == "versions":
        return name, parts[4], parts[5:]
    return name, None, parts[3:]
