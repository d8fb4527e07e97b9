"""Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`): one servicer, served by our own
HTTP/2 (protocol.http2, through `native_handlers`) or by grpc.aio (`add_to_server`).

Inputs arrive as raw bytes (`raw_input_contents`, one entry per input, in order) or typed `contents`;
outputs always travel as raw bytes (`raw_output_contents`), as Triton does.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
from google.protobuf import json_format

from runtime.serving.errors import BadRequest, InferError
from runtime.serving.metrics import Metrics
from runtime.serving.model import Repository
from runtime.serving.protocol import datatypes, protowire
from runtime.serving.protocol._generated import grpc_predict_v2_pb2 as _pb
from runtime.serving.protocol._generated import grpc_predict_v2_pb2_grpc as pb_grpc
from runtime.serving.protocol.codec import (
    request_priority,
    request_timeout,
    shm_target,
    tensor_bytes,
    tensor_from_bytes,
    tensor_from_json,
)
from runtime.serving.protocol.http2 import PUSHBACK, CallContext, RpcError
from runtime.serving.protocol.sharedmem import CUDA_REFUSED, Reads, SharedMemory, Target
from runtime.serving.protocol.triton import LOAD_REFUSED, Extensions
from runtime.serving.signature import check_input, check_request

if TYPE_CHECKING:
    from runtime.serving.protocol.http1 import Body
    from runtime.serving.protocol.http2 import Buffer
    from runtime.serving.protocol.rest import SlotBody

pb: Any = _pb  # generated message classes (untyped)

_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


UNKNOWN_MODEL = "(unknown)"  # the model label of requests for no model this server has


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repo: Repository,
        metrics: Metrics,
        server_info: Callable[[], dict[str, Any]],
        is_ready: Callable[[], bool],
        triton: Extensions | None = None,
    ) -> None:
        self.repo = repo
        self.metrics = metrics
        self.server_info = server_info
        self.is_ready = is_ready
        self.triton = triton or Extensions(repo, metrics, {})

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            model = self.repo.get(request.name, request.version or None)
        except InferError as e:
            await context.abort(e.grpc_code, e.message)
        return pb.ModelReadyResponse(ready=model.ready and self.is_ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        info = self.server_info()
        return pb.ServerMetadataResponse(
            name=info["name"], version=info["version"], extensions=info["extensions"]
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            model = self.repo.get(request.name, request.version or None)
        except InferError as e:
            await context.abort(e.grpc_code, e.message)
        md = model.metadata()
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=md["name"],
            versions=md["versions"],
            platform=md["platform"],
            inputs=[
                tm(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.signature.inputs
            ],
            outputs=[
                tm(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.signature.outputs
            ],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        """Triton's model configuration extension (protocol.triton)."""
        try:
            config = self.triton.config(request.name, request.version or None)
        except InferError as e:
            await context.abort(e.grpc_code, e.message)
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """Triton's statistics extension (protocol.triton): of one model, or of every one (no name)."""
        try:
            stats = await self.triton.statistics(request.name, request.version or None)
        except InferError as e:
            await context.abort(e.grpc_code, e.message)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        """Triton's model repository index (protocol.triton)."""
        return json_format.ParseDict(
            {"models": self.triton.index(request.ready)}, pb.RepositoryIndexResponse()
        )

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, LOAD_REFUSED)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, LOAD_REFUSED)

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        """Triton's shared memory extension (protocol.sharedmem): the registered regions, by name."""
        try:
            regions = self.triton.shm_status(request.name)
        except InferError as e:
            await context.abort(e.grpc_code, e.message)
        return json_format.ParseDict(
            {"regions": {r.name: r.status() for r in regions}}, pb.SystemSharedMemoryStatusResponse()
        )

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        try:
            self.triton.shm_register(request.name, request.key, request.offset, request.byte_size)
        except InferError as e:
            await context.abort(e.grpc_code, e.message)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self.triton.shm_unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"CUDA shared memory region {request.name!r} is not registered"
            )
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, CUDA_REFUSED)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return pb.CudaSharedMemoryUnregisterResponse()

    async def LogSettings(self, request: Any, context: Any) -> Any:
        """Triton's logging extension (protocol.triton): change the settings given (those with a value),
        answer them all."""
        changes = {
            k: getattr(v, kind)
            for k, v in request.settings.items()
            if (kind := v.WhichOneof("parameter_choice")) is not None
        }
        try:
            settings = await self.triton.update_log_settings(changes)
        except InferError as e:
            await context.abort(e.grpc_code, e.message)
        out = pb.LogSettingsResponse()
        for k, v in settings.items():
            kind = (
                "bool_param"
                if isinstance(v, bool)
                else "uint32_param"
                if isinstance(v, int)
                else "string_param"
            )
            setattr(out.settings[k], kind, v)
        return out

    async def health_check(self, request: bytes | memoryview, context: Any) -> bytes:
        """The standard gRPC health protocol's Check (grpc.health.v1.Health, what Kubernetes' `grpc` probes
        call), on raw bytes: HealthCheckRequest {string service = 1} -> HealthCheckResponse {status = 1}.
        Services: "", "ready" and "inference.GRPCInferenceService" are SERVING once the model is ready (not
        while it loads or the server drains), "live" whenever this process answers; another: NOT_FOUND."""
        try:
            service = ""
            message = memoryview(request)
            for field, wire, _, value, end in protowire.fields(message):
                if end > len(message):
                    raise ValueError("truncated")
                if field == 1 and wire == 2:
                    service = bytes(message[value:end]).decode()
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"HealthCheckRequest does not parse: {e}")
        if service == HEALTH_LIVE:
            serving = True
        elif service in HEALTH_READY:
            serving = self.is_ready()
        else:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no health service {service!r}: ask for '' or 'ready' (ready to serve), or 'live' (the "
                "process answers)",
            )
        return bytes([0x08, SERVING if serving else NOT_SERVING])

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self.infer(request, request.raw_input_contents, context)

    async def ModelStreamInfer(self, requests: Any, context: Any) -> Any:
        """Triton's streaming inference over grpc.aio: each request answered in turn (the native server
        answers a call's requests concurrently: `native_stream_handlers`)."""
        each = _InBand(context)
        async for request in requests:
            yield await stream_one(self, request, request.raw_input_contents, each)

    async def infer(self, request: Any, raw: Sequence[bytes | memoryview], context: Any) -> Any:
        """ModelInfer with the raw input contents given apart (the native server's views of the message)."""
        t0 = time.perf_counter()
        label = UNKNOWN_MODEL  # not the name asked for: a client's made-up names would each add series
        code = "OK"
        shm, reads = self.triton.shm, Reads("grpc")
        try:
            model = self.repo.get(request.model_name, request.model_version or None)
            label = model.name
            self.metrics.started(label)
            try:
                model.batcher.announce()
                try:
                    inputs, rows = _decode(request, raw, model.signature, model.max_batch_size, shm, reads)
                    wanted = _outputs(request, model.signature, shm)  # refused before the model runs
                    deadline = _deadline(request, context)
                    priority = _priority(request)
                except BaseException:
                    model.batcher.withdraw()
                    raise
                outs = await model.infer(inputs, rows, deadline=deadline, priority=priority)
            finally:
                self.metrics.ended(label)
            return _encode(request, model.name, model.version, model.signature, outs, wanted, shm)
        except InferError as e:
            code = e.grpc_code.name
            await context.abort(e.grpc_code, e.message, PUSHBACK if e.overload else ())
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client reset the call or left
            raise
        except Exception:
            code = "INTERNAL"  # the transport answers it so; not counted as OK
            raise
        finally:
            if shm is not None:
                shm.release(reads)
            self.metrics.answered(label, "grpc", code, time.perf_counter() - t0 if code == "OK" else None)


async def stream_one(
    service: InferenceService, request: Any, raw: Sequence[bytes | memoryview], context: Any
) -> Any:
    """One request of Triton's ModelStreamInfer: its ModelStreamInferResponse. A request that fails has its
    error in error_message and the call goes on, as Triton answers (tritonclient's stream callback gets it as
    an InferenceServerException); `context` raises RpcError on abort."""
    try:
        reply = await service.infer(request, raw, context)
    except RpcError as e:
        failed = pb.ModelInferResponse(id=request.id, model_name=request.model_name)
        return pb.ModelStreamInferResponse(error_message=e.message, infer_response=failed)
    return pb.ModelStreamInferResponse(infer_response=reply)


class _InBand(CallContext):
    """A grpc.aio streaming call's context for one of its requests: abort raises RpcError (the request's
    answer carries the error) instead of ending the call; the time left is the call's."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def time_remaining(self) -> float | None:
        return self.context.time_remaining()  # type: ignore[no-any-return]


def _deadline(request: Any, context: Any) -> float:
    """The client's deadline (time.monotonic; batching.Pending): the sooner of Triton's `timeout` parameter
    (µs) and the call's own (grpc-timeout)."""
    now = time.monotonic()
    deadline = math.inf
    if "timeout" in request.parameters:
        timeout = request_timeout(_parameter(request, "timeout"), "parameters['timeout'] (int64_param)")
        if timeout is not None:
            deadline = now + timeout
    remaining = context.time_remaining()
    return deadline if remaining is None else min(deadline, now + remaining)


def _priority(request: Any) -> int:
    """Triton's `priority` parameter (uint64_param, as tritonclient sends it, or int64_param); 0: none."""
    if "priority" not in request.parameters:
        return 0
    return request_priority(_parameter(request, "priority"), "parameters['priority'] (uint64_param)")


def _parameter(request: Any, name: str) -> object:
    """An InferParameter's value, whichever of its kinds is set (None: none)."""
    return _value(request.parameters[name])


def _value(p: Any) -> object:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _shm_target(shm: SharedMemory | None, parameters: Any, where: str) -> Target | None:
    """The shared memory region a tensor's parameters name (protocol.sharedmem), if any."""
    if "shared_memory_region" not in parameters and "shared_memory_byte_size" not in parameters:
        return None
    return shm_target(shm, {k: _value(v) for k, v in parameters.items()}, where)


def _decode(
    request: Any,
    raw: Sequence[bytes | memoryview],
    sig: Any,
    max_batch_size: int,
    shm: SharedMemory | None = None,
    reads: Reads | None = None,
) -> tuple[list[torch.Tensor], int]:
    """The request's inputs in signature order and its rows; inputs in shared memory are read from it (their
    holdings added to `reads`, for the caller to release), the others from raw_input_contents, in order."""
    by_name: dict[str, torch.Tensor] = {}
    names: list[str] = []
    batches: list[int] = []
    regions = [_shm_target(shm, item.parameters, f"input {item.name!r}") for item in request.inputs]
    in_request = regions.count(None)
    if raw and len(raw) != in_request:
        raise BadRequest(
            f"{len(raw)} raw_input_contents for {in_request} inputs not in shared memory: give one per input"
        )
    taken = 0
    for item, region in zip(request.inputs, regions, strict=True):
        spec = sig.input(item.name)
        shape = list(item.shape)
        check_input(spec, item.datatype, shape)
        dt = datatypes.lookup(item.datatype)
        if region is not None:
            if item.HasField("contents"):
                raise BadRequest(f"input {item.name!r}: in shared memory and in contents both: give one")
            assert shm is not None and reads is not None
            t = shm.read(region, dt, shape, f"input {item.name!r}", reads)
        elif raw:
            t = tensor_from_bytes(item.name, dt, shape, raw[taken])
            taken += 1
        else:
            field = _CONTENTS.get(item.datatype)
            if field is None:
                raise BadRequest(f"input {item.name!r}: {item.datatype} travels only as raw_input_contents")
            values = getattr(item.contents, field)
            t = tensor_from_json(item.name, dt, shape, np.asarray(values, dtype=dt.numpy))
        by_name[item.name] = t
        names.append(item.name)
        batches.append(shape[0] if shape else 1)
    rows = check_request(sig, names, batches, max_batch_size)
    return [by_name[s.name] for s in sig.inputs], rows


def _outputs(request: Any, sig: Any, shm: SharedMemory | None) -> list[tuple[str, Target | None]]:
    """The outputs the request asks for (all, when it names none), each with the shared memory region it
    is to be written to, if any; BadRequest for an unknown one."""
    known = {o.name for o in sig.outputs}
    out: list[tuple[str, Target | None]] = []
    for o in request.outputs:
        if o.name not in known:
            raise BadRequest(f"unknown output {o.name!r}; the model has outputs {sorted(known)}")
        out.append((o.name, _shm_target(shm, o.parameters, f"output {o.name!r}")))
    return out or [(o.name, None) for o in sig.outputs]


def _encode(
    request: Any,
    name: str,
    version: str,
    sig: Any,
    outs: tuple[torch.Tensor, ...],
    wanted: list[tuple[str, Target | None]],
    shm: SharedMemory | None = None,
) -> Any:
    """The response; an output asked for in shared memory is written there, answered with its region in its
    parameters and an empty raw_output_contents entry (which stay in the outputs' order)."""
    index = {o.name: i for i, o in enumerate(sig.outputs)}
    resp = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for out_name, region in wanted:
        t = outs[index[out_name]]
        out = resp.outputs.add(name=out_name, datatype=datatypes.from_torch(t.dtype), shape=list(t.shape))
        if region is None:
            resp.raw_output_contents.append(tensor_bytes(t))
            continue
        assert shm is not None
        data = datatypes.tensor_buffer(t)
        shm.write(region, data, f"output {out_name!r}")
        out.parameters["shared_memory_region"].string_param = region.region
        out.parameters["shared_memory_byte_size"].int64_param = len(data)
        if region.offset:
            out.parameters["shared_memory_offset"].int64_param = region.offset
        resp.raw_output_contents.append(b"")
    return resp


def add_to_server(service: InferenceService, server: grpc.aio.Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    check = grpc.unary_unary_rpc_method_handler(service.health_check)  # raw bytes in and out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": check}),)
    )


def native_handlers(service: InferenceService) -> dict[str, Any]:
    """The service's methods for protocol.http2's server, by gRPC path. ModelInfer's raw input contents
    stay views of the received message (our own, writable bytes): no copy until shared memory or the batch."""
    from runtime.serving.protocol.http2 import CONTEXT, unary

    requests = {
        "ServerLive": pb.ServerLiveRequest,
        "ServerReady": pb.ServerReadyRequest,
        "ModelReady": pb.ModelReadyRequest,
        "ServerMetadata": pb.ServerMetadataRequest,
        "ModelMetadata": pb.ModelMetadataRequest,
        "ModelConfig": pb.ModelConfigRequest,
        "ModelStatistics": pb.ModelStatisticsRequest,
        "RepositoryIndex": pb.RepositoryIndexRequest,
        "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
        "RepositoryModelUnload": pb.RepositoryModelUnloadRequest,
        "SystemSharedMemoryStatus": pb.SystemSharedMemoryStatusRequest,
        "SystemSharedMemoryRegister": pb.SystemSharedMemoryRegisterRequest,
        "SystemSharedMemoryUnregister": pb.SystemSharedMemoryUnregisterRequest,
        "CudaSharedMemoryStatus": pb.CudaSharedMemoryStatusRequest,
        "CudaSharedMemoryRegister": pb.CudaSharedMemoryRegisterRequest,
        "CudaSharedMemoryUnregister": pb.CudaSharedMemoryUnregisterRequest,
        "LogSettings": pb.LogSettingsRequest,
    }
    handlers = {
        f"/inference.GRPCInferenceService/{name}": unary(cls.FromString, getattr(service, name))
        for name, cls in requests.items()
    }

    async def infer(parsed: tuple[Any, list[memoryview]], context: Any) -> Any:
        return await service.infer(*parsed, context)

    handlers[MODEL_INFER] = unary(_parse_infer, infer)

    async def health(message: memoryview) -> bytes:
        return await service.health_check(message, CONTEXT)

    handlers[HEALTH_CHECK] = health
    return handlers


def native_stream_handlers(service: InferenceService) -> dict[str, Any]:
    """ModelStreamInfer for protocol.http2's server: each request message to its answer's bytes."""
    from runtime.serving.protocol.http2 import CONTEXT

    async def each(message: memoryview) -> bytes:
        try:
            request, raw = _parse_infer(message)
        except Exception as e:
            return bytes(
                pb.ModelStreamInferResponse(
                    error_message=f"request message does not parse: {e}"
                ).SerializeToString()
            )
        return bytes((await stream_one(service, request, raw, CONTEXT)).SerializeToString())

    return {MODEL_STREAM_INFER: each}


def _parse_infer(message: memoryview) -> tuple[Any, list[memoryview]]:
    """A ModelInferRequest, its raw input contents left as views of `message` (protocol.protowire)."""
    from runtime.serving.protocol.protowire import RAW_INPUT_CONTENTS, split_field

    rest, raw = split_field(message, RAW_INPUT_CONTENTS)
    return pb.ModelInferRequest.FromString(rest), raw


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_LIVE = "live"
HEALTH_READY = ("", "ready", "inference.GRPCInferenceService")
SERVING, NOT_SERVING = 1, 2  # grpc.health.v1.HealthCheckResponse.ServingStatus
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def infer_buffer(slot_body: SlotBody) -> Buffer:
    """protocol.http2's buffer for ModelInfer messages of at least rest.SLOT_BODY_MIN bytes: a protocol
    worker's shared-memory slot, placed so that the first raw input's bytes start 64-byte aligned (found in
    the bytes received so far: the fields before it come first on the wire), so the tensors travel to the
    model process where they lie, as REST bodies do."""
    from runtime.serving.protocol.protowire import RAW_INPUT_CONTENTS, field_start
    from runtime.serving.protocol.rest import SLOT_BODY_MIN

    def make(size: int, seen: memoryview) -> Body | None:
        if size < SLOT_BODY_MIN or seen[0]:  # compressed: inflated out of it (protocol.compression)
            return None
        at = field_start(seen[5:], RAW_INPUT_CONTENTS)
        return slot_body(size, 5 + (at or 0))

    return make
