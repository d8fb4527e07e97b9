"""The entry-point protocol: how a user's own model, data and loss plug into the runtime.

A TrainingJob with ``spec.model.entrypoint: "package.module:function"`` makes every worker call
``function(spec)`` with the parsed :class:`crds.trainingjob.TrainingJobSpec` and expects a :class:`TrainTask`:

.. code-block:: python

    def make_task(spec: TrainingJobSpec) -> TrainTask:
        torch.manual_seed(spec.optimizer.seed)          # same weights on every rank and every layout
        model = MyNet()                                  # a plain nn.Module on CPU, forward(x) -> output
        return TrainTask(model=model, dataset=MyDataset(), loss_fn=torch.nn.functional.cross_entropy)

Rules:
* ``model`` is built on CPU, deterministically (seeded), and takes one tensor; the runtime moves it to
  the device and applies data parallelism (FSDP2 or DDP per the spec) to it as a whole.
* ``dataset`` is map-style: ``dataset[i] -> (input, target)`` tensors. The runtime picks the samples of
  each step from the seed and the step alone, so a resumed or re-shaped job sees the same data.
* ``loss_fn(output, target)`` returns the mean loss of a (micro-)batch.
* Optional: ``parallelize`` (apply tensor parallelism / activation checkpointing / compile / FSDP
  yourself, see ``runtime.training.models.llama.parallelize_llama``; set ``tensor_parallel=True`` when
  it implements tensor parallelism; default: torch.compile of the whole model when asked, then data
  parallelism), ``split_pipeline`` (cut the model into pipeline stages), ``flops_per_sample`` (enables
  MFU), ``tokens_per_sample`` (reports tokens/s), ``example_input`` (the MLflow signature of the logged
  model; default: the first sample), ``init_weights`` (for a model built under ``torch.device("meta")``:
  ``init_weights(name, shape, device)`` returns a parameter's or buffer's full initial value, made on the
  rank's ``device`` (or anywhere: it is moved), and each rank fills only its own shards from it once the
  model is parallelized, so that no rank ever holds the whole model; runtime.training.parallel.materialize).
A model without ``parallelize`` cannot use tensor parallelism and one without ``split_pipeline`` cannot
be pipelined: the job then fails at once with a message naming the field.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from runtime.training.parallel.materialize import on_meta

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from crds.trainingjob import TrainingJobSpec
    from runtime.training.parallel.dims import ParallelDims


class EntryPointError(ValueError):
    """spec.model.entrypoint cannot be used; the message says why."""


@dataclass
class ParallelContext:
    """What a parallelize function needs: the layout, the mesh and the numerics options of the spec."""

    dims: ParallelDims
    mesh: DeviceMesh
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    compression: str  # none | fp16 | bf16 | powerSGD
    power_sgd_rank: int
    activation_checkpointing: str  # none | full | selective
    compile: bool
    # with tensor parallelism, split the activations along the sequence too (parallelism.sequenceParallel;
    # a parallelize function that does tensor parallelism applies it, as parallelize_llama does)
    sequence_parallel: bool = False
    # with tensor parallelism: the model (a pipeline's last stage) may return its logits vocabulary-sharded (a
    # DTensor, as parallelize_llama does); the loss then runs under DTensor's loss_parallel (cross-entropy
    # only)
    loss_parallel: bool = False
    # fills a model built on the meta device (parallel.materialize; nothing for one that is not): what a
    # parallelize function calls before a wrapper that needs storage (DDP), the runtime after it
    materialize: Callable[[nn.Module], None] = lambda module: None

    @property
    def param_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


ParallelizeFn = Callable[[nn.Module, ParallelContext], nn.Module]
SplitFn = Callable[[nn.Module, list[int], int], list[nn.Module]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainTask:
    """A model, its data and its loss: what the train loop needs."""

    model: nn.Module
    dataset: torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: LossFn
    parallelize: ParallelizeFn | None = None
    tensor_parallel: bool = False
    split_pipeline: SplitFn | None = None
    flops_per_sample: float | None = None
    tokens_per_sample: int | None = None
    example_input: torch.Tensor | None = None
    name: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)
    # for a model built on the meta device: a parameter's or buffer's full initial value by its name and
    # shape, made on the device given (parallel.materialize fills each rank's shards from it)
    init_weights: Callable[[str, torch.Size, torch.device], torch.Tensor] | None = None


def resolve_entrypoint(ref: str) -> Callable[..., Any]:
    """Import ``package.module:function``; errors say what is wrong with the reference."""
    if ref.count(":") != 1:
        raise EntryPointError(f"spec.model.entrypoint {ref!r} must look like 'package.module:function'")
    mod_name, fn_name = ref.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise EntryPointError(
            f"spec.model.entrypoint {ref!r}: module {mod_name!r} cannot be imported ({e}); install it in "
            f"the image "
            "or put it on PYTHONPATH (spec.env)"
        ) from None
    except Exception as e:  # the user's module raised while importing
        raise EntryPointError(f"spec.model.entrypoint {ref!r}: importing {mod_name!r} failed: {e!r}") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise EntryPointError(
            f"spec.model.entrypoint {ref!r}: module {mod_name!r} has no attribute {fn_name!r}"
        )
    if not callable(fn):
        raise EntryPointError(
            f"spec.model.entrypoint {ref!r}: {fn_name!r} is a {type(fn).__name__}, not a function"
        )
    return fn  # type: ignore[no-any-return]


def load_task(ref: str, spec: TrainingJobSpec) -> TrainTask:
    """Call the user's entry point and check what it returned."""
    fn = resolve_entrypoint(ref)
    task = fn(spec)
    if not isinstance(task, TrainTask):
        raise EntryPointError(
            f"spec.model.entrypoint {ref!r} returned {type(task).__name__}; it must return "
            "runtime.training.protocol.TrainTask(model=..., dataset=..., loss_fn=...)"
        )
    if not isinstance(task.model, nn.Module):
        raise EntryPointError(f"spec.model.entrypoint {ref!r}: TrainTask.model must be a torch.nn.Module")
    if not hasattr(task.dataset, "__getitem__") or not hasattr(task.dataset, "__len__"):
        raise EntryPointError(
            f"spec.model.entrypoint {ref!r}: TrainTask.dataset must be a map-style dataset "
            "(__getitem__ and __len__)"
        )
    if not callable(task.loss_fn):
        raise EntryPointError(f"spec.model.entrypoint {ref!r}: TrainTask.loss_fn must be callable")
    if on_meta(task.model) and not callable(task.init_weights):
        raise EntryPointError(
            f"spec.model.entrypoint {ref!r}: TrainTask.model is on the meta device, so "
            "TrainTask.init_weights must be set (name, shape, device -> the tensor's full initial value); "
            "or build the model on the CPU"
        )
    return task


def check_task_supports(task: TrainTask, dims: ParallelDims) -> None:
    """Fail fast when the layout asks for a parallelism the task cannot do."""
    if dims.tp > 1 and not (task.parallelize is not None and task.tensor_parallel):
        raise EntryPointError(f"model {task.name} has no tensor-parallel plan; set parallelism.tensor: 1")
    if dims.pp > 1 and task.split_pipeline is None:
        raise EntryPointError(f"model {task.name} has no pipeline split; set parallelism.pipeline: 1")
