"""A model's input/output signature in Open Inference Protocol terms, and request validation against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.serving.errors import BadRequest


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, OIP datatype and shape (-1 marks a variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """`name:DATATYPE:d0,d1,...` as given on the command line, e.g. `x:FP32:-1,3,32,32`."""
        try:
            name, datatype, dims = text.split(":")
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise ValueError(
                f"tensor spec {text!r} is not name:DATATYPE:d0,d1,... (e.g. x:FP32:-1,3,32,32)"
            ) from None
        return cls(name, datatype.upper(), shape)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batched(self) -> bool:
        """Every input's first dimension is variable, so requests can be stacked along it."""
        return bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        expected = [s.name for s in self.inputs]
        raise BadRequest(f"unknown input {name!r}; the model expects inputs {expected}")


def check_input(spec: TensorSpec, datatype: str, shape: Sequence[int]) -> None:
    """Refuse an input whose datatype or shape does not fit the spec, naming the mismatch."""
    if datatype != spec.datatype:
        raise BadRequest(
            f"input {spec.name!r}: datatype {datatype} does not match the model's {spec.datatype}"
        )
    if len(shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, shape, strict=True)):
        raise BadRequest(
            f"input {spec.name!r}: shape {list(shape)} does not match the model's {list(spec.shape)}"
        )
    if any(d < 0 for d in shape):
        raise BadRequest(f"input {spec.name!r}: shape {list(shape)} has a negative dimension")


def check_request(
    sig: Signature, names: Sequence[str], batch_sizes: Sequence[int], max_batch_size: int
) -> int:
    """Check the set of inputs is complete and their batch dimensions agree; return the batch size."""
    missing = [s.name for s in sig.inputs if s.name not in names]
    if missing:
        raise BadRequest(f"missing input(s) {missing}; the model expects {[s.name for s in sig.inputs]}")
    if len(set(names)) != len(names):
        raise BadRequest("an input is given more than once")
    if not sig.batched:
        return 1
    if len(set(batch_sizes)) > 1:
        raise BadRequest(
            f"inputs disagree on the batch dimension: {dict(zip(names, batch_sizes, strict=True))}"
        )
    batch = batch_sizes[0] if batch_sizes else 0
    if batch < 1:
        raise BadRequest("batch dimension is 0: send at least one row")
    if batch > max_batch_size:
        raise BadRequest(f"batch of {batch} rows exceeds the model's max batch size {max_batch_size}")
    return batch
