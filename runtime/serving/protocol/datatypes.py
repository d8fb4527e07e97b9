"""Open Inference Protocol datatypes and their numpy / torch counterparts.

One table maps each OIP datatype to its numpy dtype (for decoding bytes and JSON), its torch dtype and its
element size. BF16 has no numpy dtype: its bytes travel as uint16 and are reinterpreted by torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DataType:
    name: str
    numpy: np.dtype[np.generic]
    torch: torch.dtype
    itemsize: int


def _dt(name: str, np_dtype: type[np.generic], torch_dtype: torch.dtype) -> DataType:
    nd = np.dtype(np_dtype)
    return DataType(name, nd, torch_dtype, nd.itemsize)


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        _dt("BOOL", np.bool_, torch.bool),
        _dt("INT8", np.int8, torch.int8),
        _dt("INT16", np.int16, torch.int16),
        _dt("INT32", np.int32, torch.int32),
        _dt("INT64", np.int64, torch.int64),
        _dt("UINT8", np.uint8, torch.uint8),
        _dt("UINT16", np.uint16, torch.uint16),
        _dt("UINT32", np.uint32, torch.uint32),
        _dt("UINT64", np.uint64, torch.uint64),
        _dt("FP16", np.float16, torch.float16),
        _dt("BF16", np.uint16, torch.bfloat16),  # bytes as uint16, reinterpreted by torch
        _dt("FP32", np.float32, torch.float32),
        _dt("FP64", np.float64, torch.float64),
    )
}

_BY_TORCH: dict[torch.dtype, str] = {d.torch: d.name for d in DATATYPES.values()}
_BY_NUMPY: dict[str, str] = {str(d.numpy): d.name for d in DATATYPES.values() if d.name != "BF16"}


def from_torch(dtype: torch.dtype) -> str:
    """The OIP datatype of a torch dtype."""
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no Open Inference Protocol datatype") from None


def from_numpy(dtype: np.dtype[np.generic] | str) -> str:
    """The OIP datatype of a numpy dtype (MLflow signatures use numpy dtypes)."""
    key = str(np.dtype(dtype))
    try:
        return _BY_NUMPY[key]
    except KeyError:
        raise ValueError(f"numpy dtype {key} has no Open Inference Protocol datatype") from None


def lookup(name: str) -> DataType:
    """The DataType of an OIP datatype name; KeyError for unknown names."""
    return DATATYPES[name]


# Tensors from and to bytes run once per request in the threads that feed the model. They go through numpy:
# torch.from_numpy and Tensor.numpy keep the GIL, whereas torch's view/reshape/contiguous release it and then
# queue to take it back behind the batcher thread.
_NUMPY_OF: dict[torch.dtype, np.dtype[np.generic]] = {d.torch: d.numpy for d in DATATYPES.values()}


def numpy_of(dtype: torch.dtype) -> np.dtype[np.generic]:
    """The numpy dtype a torch dtype's bytes are read as (BF16: uint16)."""
    return _NUMPY_OF[dtype]


def tensor_view(
    raw: bytes | bytearray | memoryview, dtype: torch.dtype, shape: Sequence[int]
) -> torch.Tensor:
    """A tensor of `dtype` and `shape` viewing `raw` (no copy; `raw` must be writable to be written to)."""
    if len(raw) == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    t = torch.from_numpy(np.frombuffer(raw, dtype=_NUMPY_OF[dtype]).reshape(shape))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def tensor_array(t: torch.Tensor) -> np.ndarray:
    """A numpy array viewing a CPU tensor's memory (BF16 as uint16: numpy has no bfloat16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, row-major: no copy when it is contiguous."""
    return array_buffer(tensor_array(t))


def array_buffer(a: np.ndarray) -> memoryview:
    """An array's bytes, row-major: no copy when it is contiguous."""
    if a.size == 0:
        return memoryview(b"")
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.data.cast("B")
