"""REST codec: every datatype through JSON and binary, and the bad-input table at the codec level."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from runtime.serving.errors import BadRequest
from runtime.serving.protocol import datatypes
from runtime.serving.protocol.codec import decode_request, encode_response, tensor_bytes
from runtime.serving.signature import Signature, TensorSpec

ALL = [
    "BOOL",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "BF16",
    "FP32",
    "FP64",
]


def _values(name: str) -> torch.Tensor:
    dt = datatypes.lookup(name).torch
    if dt == torch.bool:
        return torch.tensor([[True, False, True], [False, False, True]])
    if dt.is_floating_point:
        return torch.tensor([[0.5, -1.25, 3.0], [2.0, 0.0, -0.75]]).to(dt)
    return torch.tensor([[0, 1, 7], [3, 100, 42]]).to(dt)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype_round_trips(name: str, binary: bool) -> None:
    sig = Signature((TensorSpec("x", name, (-1, 3)),), (TensorSpec("y", name, (-1, 3)),))
    t = _values(name)
    item: dict[str, object] = {"name": "x", "shape": [2, 3], "datatype": name}
    if binary:
        blob = tensor_bytes(t)
        item["parameters"] = {"binary_data_size": len(blob)}
        head = orjson.dumps({"inputs": [item], "parameters": {"binary_data_output": True}})
        body, hlen = head + blob, len(head)
    else:
        item["data"] = (t.float() if name == "BF16" else t).numpy().tolist()
        body, hlen = orjson.dumps({"id": "r1", "inputs": [item]}), None
    req = decode_request(body, hlen, sig, max_batch_size=8)
    assert req.rows == 2 and req.inputs[0].dtype == t.dtype
    assert torch.equal(req.inputs[0], t)
    out, out_hlen = encode_response("m", "1", req, sig, (req.inputs[0],))
    head = orjson.loads(out[:out_hlen] if out_hlen else out)
    o = head["outputs"][0]
    assert o["datatype"] == name and o["shape"] == [2, 3]
    if binary:
        assert out_hlen is not None and o["parameters"]["binary_data_size"] == len(out) - out_hlen
        assert out[out_hlen:] == tensor_bytes(t)
    else:
        assert head["id"] == "r1"
        want = (t.float() if name == "BF16" else t).numpy().ravel()
        np.testing.assert_array_equal(np.asarray(o["data"], dtype=want.dtype), want)


SIG = Signature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 2)),))


def _req(**kw: object) -> bytes:
    item = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]} | kw
    return orjson.dumps({"inputs": [item]})


@pytest.mark.parametrize(
    ("body", "hlen", "problem"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "'inputs' must be a non-empty list"),
        (_req(name="z"), None, "unknown input 'z'"),
        (_req(datatype="INT64"), None, "datatype INT64 does not match the model's FP32"),
        (_req(shape=[1, 5], data=[1, 2, 3, 4, 5]), None, "shape [1, 5] does not match"),
        (_req(shape=[1, 4], data=[1, 2, 3]), None, "data has 3 elements"),
        (_req(shape="1,4"), None, "shape must be a list of integers"),
        (_req(data=["a", "b", "c", "d"]), None, "not valid FP32"),
        (_req(shape=[9, 4], data=[0.0] * 36), None, "exceeds the model's max batch size 8"),
        (_req(shape=[0, 4], data=[]), None, "batch dimension is 0"),
        (_req(parameters={"binary_data_size": 16}), None, "runs past the end"),
        (_req(), 10_000, "outside the body"),
    ],
)
def test_bad_inputs_name_the_problem(body: bytes, hlen: int | None, problem: str) -> None:
    with pytest.raises(BadRequest) as e:
        decode_request(body, hlen, SIG, max_batch_size=8)
    assert problem in e.value.message
    assert e.value.http_status == 400


def test_binary_size_must_match_the_shape() -> None:
    head = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
            ]
        }
    )
    with pytest.raises(BadRequest, match="12 bytes of FP32 data, shape \\[1, 4\\] needs 16"):
        decode_request(head + b"\0" * 12, len(head), SIG, max_batch_size=8)


def test_missing_input_is_named() -> None:
    sig = Signature((TensorSpec("a", "FP32", (-1, 1)), TensorSpec("b", "FP32", (-1, 1))), ())
    body = orjson.dumps({"inputs": [{"name": "a", "shape": [1, 1], "datatype": "FP32", "data": [1]}]})
    with pytest.raises(BadRequest, match=r"missing input\(s\) \['b'\]"):
        decode_request(body, None, sig, max_batch_size=8)


def test_binary_tensors_view_a_writable_body_and_copy_a_read_only_one() -> None:
    """REST bodies are our own bytearray: the tensor views it (no copy of a 602 KB image). gRPC's raw
    contents are bytes: the tensor gets a writable copy."""
    from runtime.serving.protocol.codec import tensor_from_bytes

    dt = datatypes.lookup("FP32")
    values = np.arange(6, dtype=np.float32)
    body = bytearray(values.tobytes())
    t = tensor_from_bytes("x", dt, [2, 3], memoryview(body))
    body[:4] = np.float32(42.0).tobytes()
    assert t[0, 0].item() == 42.0  # a view of the body
    raw = values.tobytes()
    u = tensor_from_bytes("x", dt, [2, 3], raw)
    u[0, 0] = 7.0  # writable, and the bytes are untouched
    assert u[0, 0].item() == 7.0 and np.frombuffer(raw, dtype=np.float32)[0] == 0.0
