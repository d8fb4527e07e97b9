"""Open Inference Protocol v2 over REST as a plain ASGI application (no framework on the hot path).

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{m}[/versions/{v}], .../ready, /metrics;
POST /v2/models/{m}[/versions/{v}]/infer. Errors are `{"error": "..."}` with a 4xx/5xx status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from runtime.serving.errors import BadRequest, InferError, PayloadTooLarge
from runtime.serving.metrics import CONTENT_TYPE, Metrics
from runtime.serving.model import Repository
from runtime.serving.protocol.codec import decode_request, encode_response

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]


class RestApp:
    def __init__(
        self,
        repo: Repository,
        metrics: Metrics,
        server_info: Callable[[], dict[str, Any]],
        *,
        max_payload_bytes: int,
        is_ready: Callable[[], bool],
        render_metrics: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.repo = repo
        self.metrics = metrics
        self.server_info = server_info
        self.max_payload = max_payload_bytes
        self.is_ready = is_ready
        self.render_metrics = render_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if method == "POST" and path.endswith("/infer"):
                await self._infer(scope, receive, send)
                return
            if method not in ("GET", "HEAD"):
                raise _HttpError(405, f"method {method} not allowed on {path}")
            if path == "/metrics":
                text = await self.render_metrics() if self.render_metrics else self.metrics.render()
                await _respond(send, 200, text, [(b"content-type", CONTENT_TYPE.encode())])
                return
            status, body, headers = self._get(path)
            await _respond(send, status, body, headers)
        except _HttpError as e:
            await _respond(send, e.status, orjson.dumps({"error": e.message}), _JSON)
        except InferError as e:
            await _respond(send, e.http_status, orjson.dumps({"error": e.message}), _JSON)

    def _get(self, path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        if path == "/v2/health/live":
            return 200, b'{"live":true}', _JSON
        if path == "/v2/health/ready":
            ready = self.is_ready()
            return (200 if ready else 503), orjson.dumps({"ready": ready}), _JSON
        if path in ("/v2", "/v2/"):
            return 200, orjson.dumps(self.server_info()), _JSON
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            name, version, rest = _model_path(parts)
            model = self.repo.get(name, version)
            if rest == []:
                return 200, orjson.dumps(model.metadata()), _JSON
            if rest == ["ready"]:
                ready = model.ready and self.is_ready()
                body = {"name": model.name, "version": model.version, "ready": ready, **model.info}
                return (200 if ready else 503), orjson.dumps(body), _JSON
        raise _HttpError(404, f"no route {path}")

    async def _infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        parts = scope["path"].strip("/").split("/")
        if len(parts) < 4 or parts[:2] != ["v2", "models"]:
            raise _HttpError(404, f"no route {scope['path']}")
        name, version, rest = _model_path(parts)
        if rest != ["infer"]:
            raise _HttpError(404, f"no route {scope['path']}")
        model = self.repo.get(name, version)
        code = 200
        announced = False
        model_label = model.name
        self.metrics.inflight.labels(model_label).inc()
        try:
            header_len: int | None = None
            length: int | None = None
            for k, v in scope["headers"]:
                if k == b"inference-header-content-length":
                    header_len = _int_header(k, v)
                elif k == b"content-length":
                    length = _int_header(k, v)
                elif k == b"content-encoding" and v not in (b"identity", b""):
                    raise _HttpError(415, f"Content-Encoding {v.decode(errors='replace')} is not supported")
            if length is not None and length > self.max_payload:
                raise PayloadTooLarge(
                    f"payload of {length} bytes exceeds the limit of {self.max_payload} bytes"
                )
            model.batcher.announce()
            announced = True
            body = await self._read_body(receive)
            req = decode_request(body, header_len, model.signature, model.max_batch_size)
            announced = False  # infer() consumes the announcement
            outs = await model.infer(req.inputs, req.rows)
            payload, head_len = encode_response(model.name, model.version, req, model.signature, outs)
            headers = (
                list(_JSON)
                if head_len is None
                else [
                    (b"content-type", b"application/octet-stream"),
                    (b"inference-header-content-length", str(head_len).encode()),
                ]
            )
            await _respond(send, 200, payload, headers)
        except _HttpError as e:
            code = e.status
            raise
        except InferError as e:
            code = e.http_status
            raise
        finally:
            if announced:
                model.batcher.withdraw()
            self.metrics.inflight.labels(model_label).dec()
            self.metrics.requests.labels(model_label, "rest", str(code)).inc()
            if code == 200:
                self.metrics.latency.labels(model_label, "rest").observe(time.perf_counter() - t0)

    async def _read_body(self, receive: Receive) -> bytearray:
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise BadRequest("client disconnected before sending the whole body")
            body += msg.get("body", b"")
            if len(body) > self.max_payload:
                raise PayloadTooLarge(f"payload exceeds the limit of {self.max_payload} bytes")
            if not msg.get("more_body", False):
                return body


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
