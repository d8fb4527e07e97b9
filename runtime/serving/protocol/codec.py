"""Tensor (de)serialisation for the REST protocol: JSON data (flat or nested) and the binary tensor data
extension (`Inference-Header-Content-Length`, `binary_data_size`), validated against the signature."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import orjson
import torch

from runtime.serving.errors import BadRequest
from runtime.serving.protocol import datatypes
from runtime.serving.protocol.sharedmem import BYTE_SIZE, NOT_ALLOWED, OFFSET, REGION, Reads, Target
from runtime.serving.signature import Signature, check_input, check_request

if TYPE_CHECKING:
    from runtime.serving.protocol.sharedmem import SharedMemory


@dataclass
class Request:
    id: str | None
    inputs: list[torch.Tensor]  # in signature order
    rows: int
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # requested (name, binary); empty = all
    timeout_s: float | None = None  # parameters.timeout: how long the client waits for the answer
    priority: int = 0  # parameters.priority: 1 the most urgent, 0 the model's default level
    shm_outputs: dict[str, Target] = field(default_factory=dict)  # outputs asked for in shared memory
    shm_reads: Reads | None = None  # what inputs read from shared memory hold until the answer


def _whole(value: object) -> TypeGuard[int]:
    """A JSON or protobuf parameter that is a whole number >= 0 (not a bool, which Python counts as int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def request_timeout(value: object, where: str) -> float | None:
    """Triton's request `timeout` parameter (microseconds; 0: none) -> seconds or None."""
    if not _whole(value):
        raise BadRequest(
            f"{where} must be a whole number of microseconds >= 0 (how long the client waits for the "
            f"answer; 0: no limit), not {value!r}"
        )
    return value / 1e6 if value else None


def request_priority(value: object, where: str) -> int:
    """Triton's request `priority` parameter: a level, 1 the most urgent (0: the model's default level)."""
    if not _whole(value):
        raise BadRequest(
            f"{where} must be a whole number >= 0 (1 the most urgent level; 0: the model's default), not"
            f" {value!r}"
        )
    return value


def tensor_from_bytes(
    name: str, dt: datatypes.DataType, shape: list[int], raw: bytes | bytearray | memoryview
) -> torch.Tensor:
    n = math.prod(shape)
    if len(raw) != n * dt.itemsize:
        raise BadRequest(
            f"input {name!r}: {len(raw)} bytes of {dt.name} data, shape {shape} needs {n * dt.itemsize}"
        )
    if memoryview(raw).readonly:  # gRPC's bytes: copy (tensors must be writable); REST's body is our own
        raw = bytearray(raw)
    return datatypes.tensor_view(raw, dt.torch, shape)


def tensor_from_json(name: str, dt: datatypes.DataType, shape: list[int], data: Any) -> torch.Tensor:
    try:
        arr = np.asarray(data, dtype=np.float32 if dt.name == "BF16" else dt.numpy)
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"input {name!r}: data is not valid {dt.name}: {e}") from None
    if dt.name == "BOOL" and not isinstance(data, list | bool | np.ndarray):
        raise BadRequest(f"input {name!r}: BOOL data must be true/false values")
    n = math.prod(shape)
    if arr.size != n:
        raise BadRequest(f"input {name!r}: data has {arr.size} elements, shape {shape} needs {n}")
    t = torch.from_numpy(np.ascontiguousarray(arr).reshape(shape))
    return t.to(torch.bfloat16) if dt.name == "BF16" else t


def _shape(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise BadRequest(f"input {name!r}: shape must be a list of integers")
    return value


def _byte_count(params: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if not _whole(value):
        raise BadRequest(f"{where}: parameter {key} must be a whole number of bytes >= 0, not {value!r}")
    return value


def shm_target(shm: SharedMemory | None, params: object, where: str) -> Target | None:
    """The shared memory region an input or output names in its parameters (protocol.sharedmem; Triton's:
    region and byte size together, offset optional), or None when it names none."""
    if not isinstance(params, dict):
        return None
    region = params.get(REGION)
    if region is None and BYTE_SIZE not in params:
        return None
    if not isinstance(region, str) or not region:
        raise BadRequest(f"{where}: {BYTE_SIZE} given without {REGION} (the registered region's name)")
    if BYTE_SIZE not in params:
        raise BadRequest(f"{where}: {REGION} {region!r} given without {BYTE_SIZE}")
    t = Target(region, _byte_count(params, OFFSET, where, 0), _byte_count(params, BYTE_SIZE, where))
    if shm is None:
        raise BadRequest(f"{where} names shared memory region {t.region!r}, but {NOT_ALLOWED}")
    return t


def parse_json(data: bytes | bytearray | memoryview) -> Any:
    """A request body's (or head's) JSON; BadRequest when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None


def shm_register_body(body: bytes | bytearray | memoryview) -> tuple[str, int, int]:
    """A REST shared memory register request's body: key, offset, byte size."""
    d = parse_json(body)
    if not isinstance(d, dict) or not isinstance(d.get("key"), str):
        raise BadRequest('a register request is {"key": "/name", "offset": n, "byte_size": n}: key missing')
    where = "register request"
    return d["key"], _byte_count(d, "offset", where, 0), _byte_count(d, "byte_size", where)


def decode_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    sig: Signature,
    max_batch_size: int,
    shm: SharedMemory | None = None,
) -> Request:
    """Parse an OIP infer request body (JSON, optionally followed by binary tensor data); inputs may lie in
    registered shared memory regions (`shm`), and their bytes stay taken from its budget until the caller
    releases `shm_reads`."""
    reads = Reads("rest")
    try:
        return _decode_request(body, header_length, sig, max_batch_size, shm, reads)
    except BaseException:
        if shm is not None:
            shm.release(reads)
        raise


def _decode_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    sig: Signature,
    max_batch_size: int,
    shm: SharedMemory | None,
    reads: Reads,
) -> Request:
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    req = parse_json(head)
    if not isinstance(req, dict):
        raise BadRequest("malformed request: the body must be a JSON object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("malformed request: 'inputs' must be a non-empty list")
    by_name: dict[str, torch.Tensor] = {}
    names: list[str] = []
    batches: list[int] = []
    offset = 0
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("malformed request: each input needs a string 'name'")
        name = item["name"]
        spec = sig.input(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise BadRequest(f"input {name!r}: 'datatype' must be a string")
        shape = _shape(name, item.get("shape"))
        check_input(spec, datatype, shape)
        dt = datatypes.lookup(datatype)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        region = shm_target(shm, params, f"input {name!r}")
        if region is not None:
            if size is not None or "data" in item:
                raise BadRequest(f"input {name!r}: in shared memory and in the request both: give one")
            assert shm is not None
            t = shm.read(region, dt, shape, f"input {name!r}", reads)
        elif size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size} runs past the end of the body")
            t = tensor_from_bytes(name, dt, shape, binary[offset : offset + size])
            offset += size
        elif "data" in item:
            t = tensor_from_json(name, dt, shape, item["data"])
        else:
            raise BadRequest(f"input {name!r}: no 'data' and no binary_data_size parameter")
        by_name[name] = t
        names.append(name)
        batches.append(shape[0] if shape else 1)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    rows = check_request(sig, names, batches, max_batch_size)
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("malformed request: 'parameters' must be a JSON object")
    timeout = request_timeout(params["timeout"], "parameters.timeout") if "timeout" in params else None
    priority = request_priority(params["priority"], "parameters.priority") if "priority" in params else 0
    default_binary = bool(params.get("binary_data_output", False))
    wanted: list[tuple[str, bool]] = []
    in_shm: dict[str, Target] = {}
    known = {o.name for o in sig.outputs}
    for out in req.get("outputs") or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise BadRequest("malformed request: each requested output needs a string 'name'")
        if known and out["name"] not in known:
            raise BadRequest(f"unknown output {out['name']!r}; the model has outputs {sorted(known)}")
        p = out.get("parameters") or {}
        region = shm_target(shm, p, f"output {out['name']!r}")
        if region is not None:
            in_shm[out["name"]] = region
        wanted.append((out["name"], bool(p.get("binary_data", default_binary))))
    if not wanted:
        wanted = [(o.name, default_binary) for o in sig.outputs]
    rid = req.get("id")
    return Request(
        rid if isinstance(rid, str) else None,
        [by_name[s.name] for s in sig.inputs],
        rows,
        wanted,
        timeout,
        priority,
        in_shm,
        reads if reads.nbytes else None,
    )


def tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(datatypes.tensor_buffer(t))


def encode_response(
    model: str,
    version: str,
    req: Request,
    sig: Signature,
    outs: tuple[torch.Tensor, ...],
    shm: SharedMemory | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when any output travels as binary, the JSON header's length. Outputs asked for
    in shared memory are written there and answered with their region instead of data."""
    index = {o.name: i for i, o in enumerate(sig.outputs)}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in req.outputs:
        t = outs[index[name]]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatypes.from_torch(t.dtype),
            "shape": list(t.shape),
        }
        region = req.shm_outputs.get(name)
        if region is not None:
            assert shm is not None
            data = datatypes.tensor_buffer(t)
            shm.write(region, data, f"output {name!r}")
            entry["parameters"] = {
                "shared_memory_region": region.region,
                "shared_memory_byte_size": len(data),
            }
            if region.offset:
                entry["parameters"]["shared_memory_offset"] = region.offset
        elif binary:
            blob = tensor_bytes(t)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy().ravel()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if req.id is not None:
        body["id"] = req.id
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
